"""`hf-tuner eval`: any checkpoint or adapter, on a task, under several baselines and decoding strategies."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

from hf_tuner.evaluation.harness import evaluate_model
from hf_tuner.evaluation.report import format_table
from hf_tuner.evaluation.tasks import GenerationTask
from hf_tuner.generation import DECODING_PRESETS, DecodingSettings
from hf_tuner.prompts import baseline_shots


def held_out_split(dataset_name: str, eval_samples: int | None, split_seed: int, config: dict | None = None):
    """The same train/held-out split the recipes use (the dataset's test split, or the group-aware carve), so
    `eval` scores the rows a recipe held out. `config`: the run's config.yaml, whose dataset fields
    (dataset_config, splits, dataset_columns) choose the data as they did in the run."""
    from hf_tuner.data import SFT_COLUMNS, SFT_TYPES, DataSource, held_out, load_rows, sft_row

    config = config or {}
    src = DataSource(dataset_name, config.get("dataset_config"), config.get("dataset_train_split") or "train",
                     config.get("dataset_test_split", "test"), columns=config.get("dataset_columns"))
    train_rows, held_rows = held_out(load_rows([src], sft_row, "eval", SFT_TYPES, SFT_COLUMNS), eval_samples,
                                     split_seed)
    random.Random(split_seed).shuffle(train_rows)
    return train_rows, held_rows[:eval_samples]


SPLIT_FIELDS = ("eval_samples", "split_seed")  # with the dataset, they decide which rows a run held out
DEFAULT_SPLIT = {"eval_samples": None, "split_seed": 0}  # None: the recipes' automatic held-out size


def find_run_config(model: str, adapter: str | None) -> Path | None:
    """The config.yaml of the run that made `adapter` (RUN/adapter) or `model` (RUN/model, RUN/merged ...)."""
    for where in (adapter, model):
        if not where:
            continue
        folder = Path(where).expanduser()
        for candidate in (folder / "config.yaml", folder.parent / "config.yaml"):
            if folder.is_dir() and candidate.is_file():
                return candidate
    return None


def _same_dataset(a, b) -> bool:
    names = b if isinstance(b, list) else [b]
    for name in names:
        if name is None:
            continue
        if str(a) == str(name):
            return True
        pa, pb = Path(str(a)).expanduser(), Path(str(name)).expanduser()
        if pa.exists() and pb.exists() and pa.resolve() == pb.resolve():
            return True
    return False


def resolve_split(task: str, given: dict, run_config: Path | None) -> tuple[dict, dict | None]:
    """The split settings to rebuild `task`'s held-out rows with: the run's own when `task` is the dataset it
    trained on (a flag left unset takes the run's value; a flag set to another value is refused, since
    another split would count training rows as held-out), else the flags or their defaults.
    Returns (settings, the run's config or None when it does not apply)."""
    import yaml

    config = yaml.safe_load(run_config.read_text()) if run_config else None
    if not isinstance(config, dict) or not _same_dataset(task, config.get("dataset_name")):
        return {k: DEFAULT_SPLIT[k] if given.get(k) is None else given[k] for k in SPLIT_FIELDS}, None
    wrong = [f"--{k} {given[k]} (the run used {config.get(k)})" for k in SPLIT_FIELDS
             if given.get(k) is not None and given[k] != config.get(k)]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: {run_config} trained on {task} with another held-out split, so these "
                         "flags would score rows the model trained on as held-out. Leave them out to use the "
                         "run's values.")
    return {k: config.get(k, DEFAULT_SPLIT[k]) for k in SPLIT_FIELDS}, config


def load_for_eval(model: str, adapter: str | None):
    from hf_tuner.models import load_model

    base, tokenizer = load_model(model, "causal-lm")
    if adapter is None:
        return base, tokenizer
    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"--adapter {adapter}: no adapter_config.json there")
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def evaluate_checkpoint(model: str, task: str, output_dir: str | Path, adapter: str | None = None,
                        baselines=("zero_shot",), decoding=("greedy",), eval_samples: int | None = None,
                        split_seed: int | None = None, max_new_tokens: int = 48, batch_size: int = 16, seed: int = 0,
                        system_prompt: str | None = None) -> dict:
    """Evaluate one model under each baseline x decoding strategy; write metrics.json and report.md.

    When the adapter or model comes from a run folder that trained on `task`, its config.yaml decides the
    held-out split (eval_samples, split_seed: None takes the run's, another value is refused) and the system
    prompt (when none is given), so the rows scored are the ones the run held out, prompted the same way."""
    for name in decoding:
        if name not in DECODING_PRESETS:
            raise ValueError(f"unknown decoding strategy {name!r}; known: {list(DECODING_PRESETS)}")
    shots = {b: baseline_shots(b) for b in baselines}
    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output_dir {out} already exists and is not empty")
    run_config = find_run_config(model, adapter)
    split, config = resolve_split(task, {"eval_samples": eval_samples, "split_seed": split_seed}, run_config)
    eval_samples, split_seed = split["eval_samples"], split["split_seed"]
    if config is not None and system_prompt is None:
        system_prompt = config.get("system_prompt")
    train_rows, held_rows = held_out_split(task, eval_samples, split_seed, config)
    net, tokenizer = load_for_eval(model, adapter)
    base_task = GenerationTask("held-out", held_rows, system_prompt=system_prompt)
    results, predictions = {}, {}
    for b, k in shots.items():
        t = base_task.with_shots(k, train_rows, split_seed) if k else base_task
        # Perplexity of the references does not depend on decoding: score it once per prompt set, so
        # seconds_per_example compares the decoding strategies alone.
        perplexity = {}
        if "perplexity" in t.metrics:
            perplexity = evaluate_model(net, tokenizer, replace(t, metrics=("perplexity",)),
                                        DecodingSettings(batch_size=batch_size))["metrics"]
        generation_task = replace(t, metrics=tuple(m for m in t.metrics if m != "perplexity"))
        for strategy in decoding:
            settings = DecodingSettings(strategy=strategy, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                        seed=seed)
            r = evaluate_model(net, tokenizer, generation_task, settings)
            label = f"{strategy}/{b}"
            results[label] = {**r["metrics"], **perplexity, "seconds_per_example": r["seconds_per_example"]}
            predictions[label] = r["predictions"]
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": model, "adapter": adapter, "task": task, "eval_examples": len(held_rows),
              "held_out_tasks": [task], "trained_tasks": [], "results": results,
              "split": {**split, "from_run_config": str(run_config) if config is not None else None},
              "system_prompt": system_prompt}
    (out / "metrics.json").write_text(json.dumps(record, indent=2))
    (out / "predictions.json").write_text(json.dumps(
        {"prompts": [r["prompt"][-1]["content"] for r in held_rows],
         "references": [GenerationTask.reference(r) for r in held_rows], **predictions}, indent=2))
    table = format_table(list(results.items()))
    (out / "report.md").write_text(f"# eval: {model}{' + ' + adapter if adapter else ''} on {task}\n\n"
                                   f"{len(held_rows)} held-out examples.\n\n{table}\n")
    record["table"] = table
    return record
