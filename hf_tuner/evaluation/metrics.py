"""Text metrics through `evaluate`, from local metric modules shipped in this package.

`evaluate.load("rouge")` needs the Hub, so we ship the modules under evaluation/metric_modules/ and load
them by path; their numbers equal the Hub metrics' defaults.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metric_modules"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TEXT_METRICS = (*ROUGE_TYPES, "bleu")


@lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.exists():
        raise ValueError(f"unknown metric module {name!r}; shipped: {sorted(p.name for p in METRICS_DIR.iterdir())}")
    return evaluate.load(str(path))


def text_metrics(predictions: list[str], references: list[str], names=TEXT_METRICS) -> dict[str, float]:
    unknown = [n for n in names if n not in TEXT_METRICS]
    if unknown:
        raise ValueError(f"unknown text metric(s) {unknown}; known: {list(TEXT_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    out: dict[str, float] = {}
    rouge = [n for n in names if n in ROUGE_TYPES]
    if rouge:
        out.update(load_metric("rouge").compute(predictions=predictions, references=references, rouge_types=rouge))
    if "bleu" in names:
        out["bleu"] = load_metric("bleu").compute(predictions=predictions, references=references)["bleu"]
    return {k: float(v) for k, v in out.items()}
