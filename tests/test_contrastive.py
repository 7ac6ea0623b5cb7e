import math

import pytest
import torch

from conftest import assert_loss_falls, assert_run_files, logged_losses, write_jsonl
from hf_tuner.config import ConfigError
from hf_tuner.contrastive import info_nce_loss, mean_pool, retrieval_metrics
from hf_tuner.data import DataError
from recipes.contrastive import train

NOUNS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "chair", "glass", "music", "paper", "forest",
         "window", "garden", "silver", "candle", "mirror", "bridge", "island", "thunder", "horse", "pencil", "table",
         "castle", "rocket", "violin", "button", "planet", "jacket", "engine", "ladder", "basket", "cheese", "rabbit",
         "pillow", "wallet", "hammer", "carpet", "bottle", "ticket", "kettle", "saddle", "anchor", "camera", "helmet",
         "lemon", "onion", "tunnel", "valley", "wizard", "zebra", "bucket", "cotton", "dragon", "feather", "orange",
         "pepper", "rubber", "spider", "turtle"]
FILLERS = ["a thing people keep", "something found outside", "an object of daily use", "a common sight"]


def test_identity_embeddings_give_the_closed_form_loss():
    n = 6
    eye = torch.eye(n)
    # cosine 1 with itself, 0 with the others: loss = -log(e^(1/T) / (e^(1/T) + (n-1)))
    for t in (1.0, 0.5):
        expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1))
        assert info_nce_loss(eye, eye, temperature=t).item() == pytest.approx(expected, rel=1e-5)
        assert info_nce_loss(eye, eye, t, symmetric=True).item() == pytest.approx(expected, rel=1e-5)
    # scale does not matter: inputs are normalised
    assert info_nce_loss(3 * eye, eye, 1.0).item() == pytest.approx(info_nce_loss(eye, eye, 1.0).item(), rel=1e-5)


def test_temperature_towards_zero_is_a_hard_argmax():
    eye = torch.eye(5)
    shifted = eye.roll(1, dims=0)  # each query's positive is orthogonal to it, a negative is identical
    assert info_nce_loss(eye, eye, temperature=1e-3).item() < 1e-6  # right answer at ~zero temperature: no loss
    assert info_nce_loss(eye, shifted, temperature=1e-3).item() == pytest.approx(1 / 1e-3, rel=1e-3)  # margin / T
    with pytest.raises(ValueError, match="temperature"):
        info_nce_loss(eye, eye, temperature=0.0)


def test_recall_at_k_and_mrr_on_a_toy_set():
    passages = torch.eye(4)
    # query 0 -> rank 1; query 1 -> its passage ranks 2nd; query 2 -> 3rd; query 3 -> 1st
    queries = torch.tensor([[1.0, 0, 0, 0], [0.9, 0.5, 0, 0], [0.9, 0, 0.3, 0.6], [0, 0, 0, 1.0]])
    m = retrieval_metrics(queries, passages, ks=(1, 2, 10))
    assert m["recall@1"] == pytest.approx(0.5) and m["recall@2"] == pytest.approx(0.75) and m["recall@10"] == 1.0
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1) / 4)


def test_mean_pool_leaves_padding_out():
    hidden = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    assert mean_pool(hidden, torch.tensor([[1, 1, 0]])).tolist() == [[2.0, 2.0]]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    rows = [{"query": w, "passage": f"{w} : {FILLERS[i % 4]} , called {w}", "group": w} for i, w in enumerate(NOUNS)]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)


def _config(tmp_path, pairs, **overrides):
    cfg = {"model_name_or_path": "tiny-bert", "dataset_name": str(pairs), "output_dir": str(tmp_path / "run"),
           "eval_samples": 16, "max_length": 24, "per_device_train_batch_size": 16, "max_steps": 40,
           "learning_rate": 2e-3, "lr_scheduler_type": "constant", "temperature": 0.1, "logging_steps": 1,
           "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0, "num_threads": 1}
    cfg.update(overrides)
    return cfg


def test_recipe_trains_an_embedding_that_retrieves_better_and_reloads(tmp_path, pairs_file):
    from transformers import AutoModel

    from hf_tuner.contrastive import encode

    result = train(_config(tmp_path, pairs_file))
    assert_loss_falls(logged_losses(result.output_dir), window=5, by=0.3)
    m = result.metrics
    assert m["tuned"]["mrr"] > m["base"]["mrr"] + 0.1, m
    # the paired bootstrap over the 16 held-out queries: tuned minus the base encoder
    assert m["gain"]["mrr"]["difference"] == pytest.approx(m["tuned"]["mrr"] - m["base"]["mrr"])
    assert m["gain"]["mrr"]["examples"] == 16 and m["gain"]["mean_rank"]["baseline"] == "base"
    assert m["train"]["eval_pairs"] == 16 and m["train"]["train_pairs"] == len(NOUNS) - 16
    assert_run_files(result.output_dir, ("metrics.json", "report.md", "config.yaml", "model/config.json",
                                         "model/model.safetensors", "model/tokenizer.json"))
    assert "recall@10" in (result.output_dir / "report.md").read_text()
    texts = ["apple", "a thing people keep"]
    reloaded = AutoModel.from_pretrained(result.output_dir / "model")
    assert torch.allclose(encode(result.model, result.tokenizer, texts), encode(reloaded, result.tokenizer, texts),
                          atol=1e-5)


def test_bad_input_is_refused(tmp_path, pairs_file):
    with pytest.raises(ConfigError, match="peft_method"):
        train(_config(tmp_path, pairs_file, peft_method="lora"))
    with pytest.raises(ConfigError, match="temperature"):
        train(_config(tmp_path, pairs_file, temperature=0))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"query": "a", "passage": "b"}, {"query": "c"}])
    with pytest.raises(DataError, match=r"bad.jsonl:2: needs non-empty"):
        train(_config(tmp_path, bad))
