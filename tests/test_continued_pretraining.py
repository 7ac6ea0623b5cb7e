import json

import pytest
import torch

from conftest import assert_loss_falls, assert_run_files, logged_losses
from hf_tuner.config import ConfigError
from recipes.continued_pretraining import train

RUN_FILES = ["config.yaml", "metrics.json", "report.md", "log_history.json", "loss.png", "model/tokenizer_config.json"]
GENERAL = ["Hello, how are you today?\nI am fine, thank you.", "What is your favourite food?\nI like pizza a lot.",
           "Do you like music?\nYes, I listen to jazz.", "Where do you live?\nIn a small town by the sea."]


@pytest.fixture(scope="module")
def general_text(tmp_path_factory):
    folder = tmp_path_factory.mktemp("general")
    for i, text in enumerate(GENERAL * 3):
        (folder / f"dialogue{i}.txt").write_text(text)
    return folder


def _config(tmp_path, general, **overrides):
    cfg = {"model_name_or_path": "tiny-llama", "dataset_name": "pydoc-topics", "general_dataset": str(general),
           "output_dir": str(tmp_path / "run"), "objective": "clm", "block_size": 32, "eval_documents": 4,
           "eval_samples": 16, "train_samples": 96, "eval_batch_size": 8, "peft_method": "lora", "lora_r": 8,
           "per_device_train_batch_size": 8, "max_steps": 24, "learning_rate": 1e-2, "lr_scheduler_type": "constant",
           "logging_steps": 1, "save_strategy": "no", "report_to": ["tensorboard"], "bf16": False, "seed": 0,
           "num_threads": 2}
    cfg.update(overrides)
    return cfg


def _losses(result):
    return logged_losses(result.output_dir)


@pytest.fixture(scope="module")
def clm_run(tmp_path_factory, general_text):
    # full fine-tuning: LoRA (the default on SmolLM2) barely moves a random tiny model in a few steps
    return train(_config(tmp_path_factory.mktemp("clm"), general_text, peft_method="full", learning_rate=3e-3))


@pytest.fixture(scope="module")
def mlm_run(tmp_path_factory, general_text):
    return train(_config(tmp_path_factory.mktemp("mlm"), general_text, model_name_or_path="tiny-bert",
                         objective="mlm", peft_method="full", learning_rate=3e-3, mlm_probability=0.3))


@pytest.mark.parametrize("run_name", ["clm_run", "mlm_run"])
def test_loss_falls_and_domain_perplexity_improves(run_name, request):
    result = request.getfixturevalue(run_name)
    losses = _losses(result)
    assert_loss_falls(losses, steps=24, window=4, by=0.3)
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]
    assert result.metrics["summary"]["domain_perplexity_change_pct"] < 0


@pytest.mark.parametrize("run_name", ["clm_run", "mlm_run"])
def test_run_folder_is_complete(run_name, request):
    result = request.getfixturevalue(run_name)
    assert_run_files(result.output_dir, RUN_FILES)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"base", "baselines", "tuned", "train"}
    (general,) = metrics["held_out_tasks"].values()
    assert {"base", "tuned"} == set(general) and "general_perplexity_change_pct" in metrics["summary"]
    report = (result.output_dir / "report.md").read_text()
    assert "forgetting, general-text perplexity" in report and "domain perplexity" in report
    assert len(metrics["train"]["held_out_documents"]) == 4


def test_mlm_reports_masked_accuracy_and_the_fresh_head(mlm_run):
    metrics = mlm_run.metrics
    assert 0 <= metrics["base"]["masked_accuracy"] < metrics["tuned"]["masked_accuracy"] <= 1
    assert any(name.startswith("cls.predictions") for name in metrics["newly_initialized_weights"])
    assert "started fresh" in (mlm_run.output_dir / "report.md").read_text()


def test_reloaded_models_give_the_same_logits(clm_run, mlm_run):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    for result, load in ((clm_run, AutoModelForCausalLM.from_pretrained),
                         (mlm_run, AutoModelForMaskedLM.from_pretrained)):
        batch = result.tokenizer(["The for statement is used to iterate"], return_tensors="pt")
        batch.pop("token_type_ids", None)
        result.model.eval()
        reloaded = load(result.output_dir / "model").eval()
        with torch.no_grad():
            assert torch.allclose(result.model(**batch).logits, reloaded(**batch).logits, atol=1e-5)


def test_no_held_out_topic_is_trained_on(tmp_path, general_text):
    from hf_tuner.data.text import pydoc_topics
    from recipes.continued_pretraining import _config as parse, _data

    train_docs, held_docs, general, _ = _data(parse(_config(tmp_path, general_text, eval_documents=10)))
    held = {d["name"] for d in held_docs}
    assert len(held) == 10 and not held & {d["name"] for d in train_docs}
    assert held | {d["name"] for d in train_docs} == {d["name"] for d in pydoc_topics()}
    assert len(general) == 12


def test_whole_word_masking_masks_whole_words_at_the_configured_rate():
    from hf_tuner.data.text import chunk_documents, pydoc_topics, whole_word_mask_collator
    from hf_tuner.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-bert")
    texts = [d["text"] for d in pydoc_topics()[:20]]
    blocks = chunk_documents(texts, tokenizer, 64, word_offsets=True, max_blocks=200)
    rate = 0.25
    batch = whole_word_mask_collator(tokenizer, rate, seed=0)([dict(b) for b in blocks])
    masked = (batch["labels"] != -100).numpy()
    assert (batch["input_ids"][batch["labels"] != -100] == tokenizer.mask_token_id).all()  # no random/kept tokens
    words_total = words_masked = multi_token_words = 0
    for row, block in enumerate(blocks):
        words: dict[int, list[int]] = {}
        word, prev_end = -1, None
        for pos, ((start, end), special) in enumerate(zip(block["offset_mapping"], block["special_tokens_mask"])):
            if special:
                prev_end = None
                continue
            if prev_end is None or start != prev_end:
                word += 1
            prev_end = end
            words.setdefault(word, []).append(pos)
        for positions in words.values():
            flags = {bool(masked[row, p]) for p in positions}
            assert len(flags) == 1, "a word is masked only in part"
            words_total += 1
            words_masked += flags.pop()
            multi_token_words += len(positions) > 1
    assert multi_token_words > 1000  # the check above covered real multi-token words
    assert abs(words_masked / words_total - rate) < 0.02, words_masked / words_total


def test_bad_objective_is_refused(tmp_path, general_text):
    with pytest.raises(ConfigError, match="objective"):
        train(_config(tmp_path, general_text, objective="span"))
