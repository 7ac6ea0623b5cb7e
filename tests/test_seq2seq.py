import json

import pytest
import torch

from conftest import WORDS, assert_loss_falls, assert_run_files, logged_losses, write_jsonl
from hf_tuner.config import ConfigError
from recipes.seq2seq import train

RUN_FILES = ["config.yaml", "metrics.json", "report.md", "log_history.json", "loss.png", "metrics.png",
             "model/config.json", "model/model.safetensors", "model/tokenizer_config.json"]


def _config(tmp_path, data, **overrides):
    cfg = {"model_name_or_path": "tiny-t5", "dataset_name": str(data), "output_dir": str(tmp_path / "run"),
           "eval_samples": 4, "eval_batch_size": 4, "eval_max_new_tokens": 12, "peft_method": "full",
           "per_device_train_batch_size": 8, "max_steps": 40, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
           "eval_strategy": "steps", "eval_steps": 20, "trainer_eval_samples": 4, "logging_steps": 1,
           "save_strategy": "no", "report_to": ["tensorboard"], "bf16": False, "seed": 0, "num_threads": 2}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} that is used in the house"}
            for w in WORDS]
    return write_jsonl(tmp_path_factory.mktemp("s2s") / "defs.jsonl", rows)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data):
    return train(_config(tmp_path_factory.mktemp("t5"), data))


def test_loss_falls_and_rouge_improves(finished_run):
    history = json.loads((finished_run.output_dir / "log_history.json").read_text())
    losses = [h["loss"] for h in history if "loss" in h]
    assert_loss_falls(losses, steps=40, window=5, by=1.0)
    assert [h for h in history if "eval_rougeL" in h and "eval_bleu" in h]  # predict_with_generate evaluation
    base, tuned = finished_run.metrics["base"], finished_run.metrics["tuned"]
    assert tuned["rougeL"] > base["rougeL"] and tuned["perplexity"] < base["perplexity"]


def test_run_folder_is_complete(finished_run):
    assert_run_files(finished_run.output_dir, RUN_FILES)
    metrics = json.loads((finished_run.output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"base", "baselines", "tuned", "train"}
    for part in ("base", "tuned"):
        assert {"rouge1", "rouge2", "rougeL", "bleu", "perplexity"} <= set(metrics[part])
    assert "t5 encoder-decoder" in metrics["train"]["model"]
    assert "Example generations" in (finished_run.output_dir / "report.md").read_text()


def test_reloaded_model_gives_the_same_logits_and_generations(finished_run):
    from transformers import AutoModelForSeq2SeqLM

    tok = finished_run.tokenizer
    enc = tok(["Define the word 'lamp'."], return_tensors="pt")
    labels = tok(text_target=["a kind of lamp"], return_tensors="pt")["input_ids"]
    model = finished_run.model.eval()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(finished_run.output_dir / "model").eval()
    with torch.no_grad():
        assert torch.allclose(model(**enc, labels=labels).logits, reloaded(**enc, labels=labels).logits, atol=1e-5)
        assert torch.equal(model.generate(**enc, max_new_tokens=8), reloaded.generate(**enc, max_new_tokens=8))


def test_encoder_checkpoint_is_warm_started_as_bert2bert(tmp_path, data):
    from transformers import AutoModelForSeq2SeqLM

    result = train(_config(tmp_path, data, model_name_or_path="tiny-bert", max_steps=30, eval_strategy="no"))
    assert "BERT2BERT" in result.metrics["train"]["model"]
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]
    assert "base (untrained)" in (result.output_dir / "report.md").read_text()
    reloaded = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir / "model").eval()
    enc = result.tokenizer(["Define the word 'lamp'."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(result.model.eval().generate(**enc, max_new_tokens=6), reloaded.generate(**enc, max_new_tokens=6))


def test_no_held_out_word_is_trained_on(tmp_path, data):
    from recipes.seq2seq import _config as parse, _data

    train_rows, held_rows = _data(parse(_config(tmp_path, data, eval_samples=5)))
    assert len(held_rows) == 5 and not {r["group"] for r in train_rows} & {r["group"] for r in held_rows}


def test_lora_trains_a_t5_adapter(tmp_path, data):
    result = train(_config(tmp_path, data, peft_method="lora", max_steps=10, eval_strategy="no", learning_rate=1e-2))
    losses = logged_losses(result.output_dir)
    assert_loss_falls(losses, window=3)
    assert (result.output_dir / "model" / "adapter_config.json").is_file()


def test_adapter_methods_are_refused_on_a_warm_start(tmp_path, data):
    with pytest.raises(ConfigError, match="peft_method: 'lora' cannot tune a warm-started BERT2BERT"):
        train(_config(tmp_path, data, model_name_or_path="tiny-bert", peft_method="lora"))
    assert not (tmp_path / "run").exists()
