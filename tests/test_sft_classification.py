import json

import pytest
import torch

from conftest import (assert_loss_falls, assert_run_files, dropout_free_copy, logged_losses,
                      write_vader_folder)
from hf_tuner.config import ConfigError
from recipes.sft_classification import train

RUN_FILES = ["config.yaml", "metrics.json", "report.md", "log_history.json", "loss.png", "metrics.png",
             "confusion_matrix.png", "model/config.json", "model/model.safetensors", "model/tokenizer_config.json"]


def _config(tmp_path, vader, **overrides):
    cfg = {"model_name_or_path": "tiny-bert", "dataset_name": str(vader), "output_dir": str(tmp_path / "run"),
           "vader_sources": ["movieReviewSnippets", "tweets"], "eval_samples": 16, "few_shot": 2,
           "baseline_model": "tiny-llama", "eval_batch_size": 8, "eval_max_new_tokens": 3, "max_length": 32,
           "peft_method": "full", "per_device_train_batch_size": 8, "max_steps": 80, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
           "logging_steps": 1, "save_strategy": "no", "report_to": ["tensorboard"], "bf16": False, "seed": 0,
           "num_threads": 2}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def vader(tmp_path_factory):
    return write_vader_folder(tmp_path_factory.mktemp("vader"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, vader):
    tmp = tmp_path_factory.mktemp("cls")
    return train(_config(tmp, vader)), tmp


def test_loss_falls_and_accuracy_beats_the_untrained_head(finished_run):
    result, _ = finished_run
    losses = logged_losses(result.output_dir)
    assert_loss_falls(losses, steps=80, window=5, by=0.2)
    assert result.metrics["tuned"]["accuracy"] >= 0.8
    # the untrained head on the same held-out rows (16, balanced) is a coin toss or worse
    assert result.metrics["tuned"]["accuracy"] >= result.metrics["base"]["accuracy"] + 0.2, result.metrics


def test_run_folder_is_complete(finished_run):
    result, _ = finished_run
    assert_run_files(result.output_dir, RUN_FILES)
    metrics = json.loads((result.output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"base", "baselines", "tuned", "train"}
    assert set(metrics["baselines"]) == {"tiny-llama zero_shot", "tiny-llama few_shot_2"}
    for part in (metrics["base"], *metrics["baselines"].values(), metrics["tuned"]):
        assert {"accuracy", "precision", "recall", "f1"} <= set(part)
    matrix = metrics["confusion_matrix"]
    assert matrix["labels"] == ["negative", "positive"]
    assert sum(map(sum, matrix["tuned"])) == metrics["train"]["eval_examples"] == 16
    report = (result.output_dir / "report.md").read_text()
    assert "base (untrained head)" in report and "tiny-llama few_shot_2" in report and "Confusion matrices" in report
    assert set(metrics["bias"]) == {"base (untrained head)", "tuned"} and "Counterfactual bias checks" in report
    assert set(metrics["bias"]["tuned"]["dimensions"]) == {"names", "pronouns", "nationalities"}
    # the gain is set against the best of the untrained head and the prompted LM, on the same 16 rows
    named = {"base": metrics["base"], **metrics["baselines"]}
    for name, g in metrics["gain"].items():
        assert g["difference"] == pytest.approx(metrics["tuned"][name] - named[g["baseline"]][name]), name
        assert named[g["baseline"]][name] == max(m[name] for m in named.values()), name
    assert set(metrics["gain"]) == {"accuracy", "precision", "recall", "f1"}


def test_reloaded_model_gives_the_same_logits(finished_run):
    from transformers import AutoModelForSequenceClassification

    result, _ = finished_run
    batch = result.tokenizer(["the film was great .", "omg my plot is so dull lol"], return_tensors="pt", padding=True)
    result.model.eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(result.output_dir / "model").eval()
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, reloaded(**batch).logits, atol=1e-5)
    assert reloaded.config.id2label == {0: "negative", 1: "positive"}


def test_lora_adapter_trains_and_reloads(tmp_path, vader):
    from peft import AutoPeftModelForSequenceClassification

    result = train(_config(tmp_path, vader, peft_method="lora", baseline_model="", few_shot=0, max_steps=6,
                           lora_r=4))
    assert (result.output_dir / "model" / "adapter_config.json").exists()
    batch = result.tokenizer(["the film was great ."], return_tensors="pt")
    result.model.eval()
    reloaded = AutoPeftModelForSequenceClassification.from_pretrained(result.output_dir / "model").eval()
    with torch.no_grad():
        assert torch.allclose(result.model(**batch).logits, reloaded(**batch).logits, atol=1e-5)


def test_no_held_out_snippet_is_trained_on(vader):
    from recipes.sft_classification import _config as parse, _data

    cfg = parse({"model_name_or_path": "tiny-bert", "dataset_name": str(vader), "eval_samples": 20})
    train_rows, held_rows = _data(cfg)
    assert not {r["group"] for r in train_rows} & {r["group"] for r in held_rows}
    assert all(abs(r["rating"]) >= 0.5 for r in train_rows + held_rows)  # near-neutral rows dropped
    assert {r["label"] for r in train_rows} == {"negative", "positive"}


def test_unknown_vader_source_is_refused(tmp_path, vader):
    from hf_tuner.data import DataError

    with pytest.raises(DataError, match="unknown source"):
        train(_config(tmp_path, vader, vader_sources=["reddit"]))
    with pytest.raises(ConfigError, match="peft_method"):
        train(_config(tmp_path, vader, peft_method="magic"))


def test_gradient_accumulation_matches_the_same_batch_in_one_step(tmp_path, vader):
    """4 rows x 2 accumulation steps train as 8 rows in one step. The head's loss is a plain mean that ignores
    the Trainer's item count; transformers 5.24 took it for a sum over that count (the forward has **kwargs) and
    did not divide it by the accumulation steps, so the gradient came out twice as large
    (`hf_tuner.training.mean_loss_across_processes`). Dropout off, so both see the same network."""
    from safetensors.torch import load_file

    model = dropout_free_copy("tiny-bert", tmp_path / "tiny-bert")
    runs = {}
    for name, batch, accumulate in (("one_step", 8, 1), ("accumulated", 4, 2)):
        cfg = _config(tmp_path / name, vader, model_name_or_path=str(model), baseline_model="", few_shot=0,
                      eval_samples=8, max_steps=4, report_to=[], per_device_train_batch_size=batch,
                      gradient_accumulation_steps=accumulate, max_grad_norm=1e9)  # no clipping: the raw gradient
        runs[name] = train(cfg).output_dir
    assert logged_losses(runs["accumulated"]) == pytest.approx(logged_losses(runs["one_step"]), rel=1e-4)
    one, acc = (load_file(runs[n] / "model" / "model.safetensors") for n in ("one_step", "accumulated"))
    assert max((one[k] - acc[k]).abs().max().item() for k in one) < 1e-5
