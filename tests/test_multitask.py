import json
from collections import Counter

import pytest
import torch

from conftest import assert_loss_falls, assert_run_files, logged_losses, write_vader_folder
from hf_tuner.config import ConfigError
from recipes.multitask import train

RUN_FILES = ["config.yaml", "metrics.json", "report.md", "log_history.json", "loss.png",
             "model/multitask.json", "model/heads.safetensors", "model/encoder/config.json",
             "model/encoder/tokenizer_config.json"]


def _config(tmp_path, vader, **overrides):
    cfg = {"model_name_or_path": "tiny-bert", "dataset_name": str(vader), "output_dir": str(tmp_path / "run"),
           "eval_samples": 30, "eval_batch_size": 16, "max_length": 32, "peft_method": "full",
           "task_sampling": "temperature", "task_temperature": 2.0, "per_device_train_batch_size": 16,
           "max_steps": 60, "learning_rate": 2e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
           "save_strategy": "no", "report_to": ["tensorboard"], "bf16": False, "seed": 0, "num_threads": 2}
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def vader(tmp_path_factory):
    return write_vader_folder(tmp_path_factory.mktemp("vader"), per_source=80)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, vader):
    return train(_config(tmp_path_factory.mktemp("mt"), vader))


def test_loss_falls_and_every_task_learns(finished_run):
    losses = logged_losses(finished_run.output_dir)
    assert_loss_falls(losses, steps=60, window=10, factor=0.7)
    base, tuned = finished_run.metrics["base"], finished_run.metrics["tuned"]
    assert tuned["polarity/accuracy"] > base["polarity/accuracy"]
    assert tuned["source/accuracy"] > base["source/accuracy"]
    assert tuned["rating/mse"] < base["rating/mse"]


def test_run_folder_is_complete_with_single_task_baselines(finished_run):
    assert_run_files(finished_run.output_dir, RUN_FILES)
    metrics = json.loads((finished_run.output_dir / "metrics.json").read_text())
    assert set(metrics) >= {"base", "baselines", "tuned", "train"}
    single = metrics["baselines"]["single-task, same budget"]
    assert set(single) == set(metrics["tuned"]) == {"polarity/accuracy", "polarity/f1", "rating/mse",
                                                    "rating/pearson", "source/accuracy", "source/f1"}
    assert set(metrics["train"]["single_task_runtime_s"]) == {"polarity", "rating", "source"}
    # tuned minus the better of the untrained heads and the single-task models, per task metric (mse: the lower)
    assert set(metrics["gain"]) == set(metrics["tuned"])
    for name, g in metrics["gain"].items():
        pick = min if name.endswith("mse") else max
        best = pick(metrics["base"][name], single[name])
        assert g["difference"] == pytest.approx(metrics["tuned"][name] - best), name
        assert g["examples"] == metrics["train"]["eval_rows"][name.split("/")[0]], name
    report = (finished_run.output_dir / "report.md").read_text()
    assert "single-task, same budget" in report and "polarity/accuracy" in report and "temperature" in report


def test_reloads_with_heads_and_predicts_by_task_name(finished_run):
    from hf_tuner.multitask import MultiTaskModel, predict

    texts = ["the film was great .", "omg my plot is so dull lol", "officials said the music appeared awful"]
    model = finished_run.model.eval()
    reloaded = MultiTaskModel.from_pretrained(finished_run.output_dir / "model")
    batch = finished_run.tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        for name in ("polarity", "rating", "source"):
            assert torch.allclose(model.for_task(name)(**batch).logits, reloaded.for_task(name)(**batch).logits,
                                  atol=1e-5)
    assert predict(finished_run.output_dir / "model", "polarity", texts) == model.predict(
        "polarity", texts, finished_run.tokenizer)
    sources = predict(finished_run.output_dir / "model", "source", texts)
    assert set(sources) <= {"amazonReviewSnippets", "movieReviewSnippets", "nytEditorialSnippets", "tweets"}
    assert all(isinstance(v, float) for v in predict(finished_run.output_dir / "model", "rating", texts))
    with pytest.raises(KeyError, match="unknown task"):
        reloaded.predict("topic", texts, finished_run.tokenizer)


@pytest.mark.parametrize("strategy,temperature", [("proportional", 1.0), ("temperature", 3.0), ("uniform", 1.0)])
def test_task_sampler_respects_its_weights(strategy, temperature):
    from hf_tuner.multitask import TaskSampler, task_weights

    sizes = [600, 150, 50]
    task_of_row = [k for k, n in enumerate(sizes) for _ in range(n)]
    weights = task_weights(sizes, strategy, temperature)
    expected = {"proportional": [0.75, 0.1875, 0.0625], "uniform": [1 / 3] * 3,
                "temperature": [n ** (1 / 3) / sum(m ** (1 / 3) for m in sizes) for n in sizes]}[strategy]
    assert weights == pytest.approx(expected)
    sampler = TaskSampler(task_of_row, weights, num_samples=20000, seed=0)
    drawn = list(sampler)
    counts = Counter(task_of_row[i] for i in drawn)
    for k, w in enumerate(weights):
        assert abs(counts[k] / len(drawn) - w) < 0.015, (k, counts[k] / len(drawn), w)
    assert drawn != list(sampler)  # the next pass is another order
    assert list(TaskSampler(task_of_row, weights, 500, seed=1)) == list(TaskSampler(task_of_row, weights, 500, seed=1))


def test_no_held_out_snippet_is_trained_on_in_any_task(vader):
    from recipes.multitask import _config as parse, _data

    specs, train_rows, held_rows = _data(parse({"dataset_name": str(vader), "eval_samples": 40, "peft_method": "full"}))
    assert [s.name for s in specs] == ["polarity", "rating", "source"]
    held = {r["group"] for rows in held_rows.values() for r in rows}
    assert len(held) == 40
    for name, rows in train_rows.items():
        assert not held & {r["group"] for r in rows}, name


def test_bad_task_settings_are_refused(tmp_path, vader):
    with pytest.raises(ConfigError, match="task_names"):
        train(_config(tmp_path, vader, task_names=["polarity", "topic"]))
    with pytest.raises(ConfigError, match="task_sampling"):
        train(_config(tmp_path, vader, task_sampling="random"))
    assert not (tmp_path / "run").exists()


def test_a_resumed_run_trains_its_single_task_baselines_afresh(tmp_path, vader):
    """resume_from_checkpoint names the multi-task model's checkpoint. The single-task baselines used to inherit
    it and load it into a one-head model ("loaded state dict contains a parameter group that doesn't match")."""
    cfg = _config(tmp_path, vader, eval_samples=8, per_device_train_batch_size=4, max_steps=2, save_strategy="steps",
                  save_steps=1, report_to=[])
    first = train(cfg)
    resumed = train({**cfg, "output_dir": str(tmp_path / "resumed"),
                     "resume_from_checkpoint": str(first.output_dir / "checkpoint-1")})
    assert resumed.metrics["tuned"] == first.metrics["tuned"]
    assert resumed.metrics["baselines"] == first.metrics["baselines"]
    assert not list((tmp_path / "resumed" / "single_task").rglob("checkpoint-*"))  # baselines never checkpoint
