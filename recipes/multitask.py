"""Multi-task fine-tuning: one shared encoder, a head per task, trained on mixed batches drawn by task sampling.

    accelerate launch recipes/multitask.py --config recipes/configs/multitask.yaml [--key value ...]
    python -m recipes.multitask --config recipes/configs/multitask.yaml
    from recipes.multitask import train; train("recipes/configs/multitask.yaml")

Default: MiniLM-L6 on the vader ground-truth snippets (all four files) with three heads: polarity
(classification), mean rating (regression, -4..4) and source (which file, 4 classes). Sampling is
proportional to task size, or temperature-based (`task_sampling: temperature`, `task_temperature: T`).
Each task's metric for the multi-task model is reported next to a single-task model trained with the same
budget (same optimizer steps and batch size). Held-out snippets are held out of every task.
After training: `hf_tuner.multitask.predict(run_dir / "model", "polarity", ["great film"])`.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.data.vader import SOURCES, TASKS, VaderArguments  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history, train_summary  # noqa: E402

PRIMARY = {"classification": ("accuracy", "f1"), "regression": ("mse", "pearson")}


@dataclass
class MultiTaskArguments(RunArguments, VaderArguments):
    task_names: list[str] = field(default_factory=lambda: list(TASKS), metadata={"help": f"tasks among {list(TASKS)}"})
    task_sampling: str = field(default="proportional", metadata={"help": "proportional, temperature or uniform"})
    task_temperature: float = field(default=2.0, metadata={"help": "temperature sampling: p ~ n^(1/T)"})
    max_length: int = field(default=64, metadata={"help": "tokens per text; longer texts are truncated"})
    single_task_baselines: bool = field(default=True, metadata={"help": "train one single-task model per task"})


def _config(source):
    from transformers import TrainingArguments

    from hf_tuner.multitask import SAMPLING

    cfg = parse_config(TrainingArguments, source, run_cls=MultiTaskArguments)
    run = cfg.run
    unknown = [t for t in run.task_names if t not in TASKS]
    if unknown or not run.task_names:
        raise ConfigError(f"task_names: {unknown or 'none given'}; choose among {list(TASKS)}")
    if run.task_sampling not in SAMPLING:
        raise ConfigError(f"task_sampling: {run.task_sampling!r} is not one of {list(SAMPLING)}")
    if run.task_temperature <= 0:
        raise ConfigError(f"task_temperature: {run.task_temperature} must be positive")
    if run.peft_method != "full":
        raise ConfigError(f"peft_method: {run.peft_method!r}; the multi-task recipe trains the shared encoder in full")
    return cfg


def _data(cfg):
    """(task specs, train rows per task, held-out rows per task); the split is by snippet, across all tasks."""
    from hf_tuner.data import split_by_group
    from hf_tuner.data.vader import read_ground_truth, task_labels, task_rows
    from hf_tuner.multitask import TaskSpec

    run = cfg.run
    rows = read_ground_truth(cfg.script.dataset_name or "vader-sentiment", run.vader_sources)
    train_rows, held_rows = split_by_group(rows, run.eval_samples, run.split_seed)
    random.Random(run.split_seed).shuffle(train_rows)
    train_rows = train_rows[:run.train_samples] if run.train_samples else train_rows
    sources = run.vader_sources or list(SOURCES)
    specs = [TaskSpec(t, TASKS[t], task_labels(t, sources)) for t in run.task_names]
    train = {t: task_rows(train_rows, t, run.min_abs_rating) for t in run.task_names}
    held = {t: task_rows(held_rows, t, run.min_abs_rating) for t in run.task_names}
    return specs, train, held


def _dataset(specs, rows_by_task, tokenizer, max_length):
    from datasets import Dataset

    records = [{"text": r["text"], "task_ids": k, "labels": float(
        spec.labels.index(r["label"]) if spec.kind == "classification" else r["target"])}
        for k, spec in enumerate(specs) for r in rows_by_task[spec.name]]
    ds = Dataset.from_list(records)
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"])


def _evaluate(model, tokenizer, specs, held, settings) -> dict:
    """{"metrics": {"<task>/<metric>": value}, "per_example": {"<task>/<metric>": Stat}} for every task, through
    the harness (per_example: what each row adds to the metric, for the paired bootstrap of report.gains)."""
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.tasks import ClassificationTask, RegressionTask

    out: dict = {"metrics": {}, "per_example": {}}
    for spec in specs:
        task = (ClassificationTask(spec.name, held[spec.name], labels=spec.labels) if spec.kind == "classification"
                else RegressionTask(spec.name, held[spec.name]))
        result = evaluate_model(model.for_task(spec.name), tokenizer, task, settings)
        for part in ("metrics", "per_example"):
            out[part].update({f"{spec.name}/{m}": result[part][m] for m in PRIMARY[spec.kind] if m in result[part]})
    return out


def _fit(model, tokenizer, args, specs, rows_by_task, run):
    from transformers import DataCollatorWithPadding

    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.multitask import MultiTaskTrainer, TaskSampler, task_weights

    ds = _dataset(specs, rows_by_task, tokenizer, run.max_length)
    weights = task_weights([len(rows_by_task[s.name]) for s in specs], run.task_sampling, run.task_temperature)
    sampler = TaskSampler(ds["task_ids"], weights, seed=args.seed)
    trainer = MultiTaskTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                               data_collator=DataCollatorWithPadding(tokenizer), task_sampler=sampler)
    start = time.perf_counter()
    output = train_resumable(trainer, run, Path(args.output_dir))
    return trainer, output, time.perf_counter() - start, dict(zip((s.name for s in specs), weights))


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from transformers import set_seed

    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.distributed import is_main_process
    from hf_tuner.evaluation.report import TABLE_METRICS, gains, write_run_record
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source
    from hf_tuner.multitask import MultiTaskModel
    from hf_tuner.validation import check_batch

    # 1. config, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an encoder such as minilm-l6, a folder or a Hub id)")
    check_model_source(mcfg.model_name_or_path)
    specs, train_rows, held_rows = _data(cfg)
    check_batch(sum(map(len, train_rows.values())), args, cfg.script.dataset_name or "vader-sentiment")
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state
    settings = DecodingSettings(batch_size=run.eval_batch_size)

    # 2. load: the shared pretrained encoder with a fresh head per task
    model, tokenizer = MultiTaskModel.from_encoder(mcfg.model_name_or_path, specs)

    # 3. evaluate the base: untrained heads
    base = _evaluate(model, tokenizer, specs, held_rows, settings)

    # 4. train the multi-task model on mixed batches
    trainer, output, runtime, weights = _fit(model, tokenizer, args, specs, train_rows, run)
    steps = trainer.state.global_step

    # 5. evaluate it, and single-task models trained with the same budget (steps x batch size)
    tuned = _evaluate(trainer.model, tokenizer, specs, held_rows, settings)
    single, single_runtime = {"metrics": {}, "per_example": {}}, {}
    if run.single_task_baselines and len(specs) > 1:
        for spec in specs:
            one, _ = MultiTaskModel.from_encoder(mcfg.model_name_or_path, [spec])
            # a baseline neither checkpoints nor resumes: a resumed run's checkpoint is the multi-task model's
            one_args = dataclasses.replace(args, output_dir=str(out / "single_task" / spec.name), max_steps=steps,
                                           report_to="none", save_strategy="no", resume_from_checkpoint=None)
            one_run = dataclasses.replace(run, resume="never")
            one_trainer, _, seconds, _ = _fit(one, tokenizer, one_args, [spec], train_rows, one_run)
            for part, values in _evaluate(one_trainer.model, tokenizer, [spec], held_rows, settings).items():
                single[part].update(values)
            single_runtime[spec.name] = seconds

    # 6. report
    trainer.model.save_pretrained(out / "model")  # every rank: gathered under FSDP2 / ZeRO-3, rank 0 writes
    if is_main_process():
        tokenizer.save_pretrained(out / "model" / "encoder")
    metrics = {
        "base_label": "base (untrained heads)",
        "base": base["metrics"],
        "baselines": {"single-task, same budget": single["metrics"]} if single["metrics"] else {},
        "tuned": tuned["metrics"],
        "gain": gains({"base": base, "single-task, same budget": single, "tuned": tuned},
                      {name: TABLE_METRICS.get(name.rsplit("/", 1)[-1]) for name in tuned["per_example"]}),
        "train": train_summary(trainer, output, runtime, tasks=run.task_names, task_sampling=run.task_sampling,
                               task_weights=weights, train_rows={t: len(r) for t, r in train_rows.items()},
                               eval_rows={t: len(r) for t, r in held_rows.items()},
                               single_task_runtime_s=single_runtime),
    }
    notes = ["## Tasks", "", f"Sampling: {run.task_sampling}" + (f" (T={run.task_temperature})"
             if run.task_sampling == "temperature" else "") + "; weights: "
             + ", ".join(f"{t} {w:.2f}" for t, w in weights.items()) + ".",
             "Metric columns are `<task>/<metric>`; mse is on the -4..4 rating scale. The single-task row takes "
             "each task's metrics from its own model, trained for the same steps and batch size.", ""]
    table = write_run_record(out, "multitask", metrics, [], trainer.state.log_history, notes)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out comparison, run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
