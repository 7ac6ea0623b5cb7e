"""Metrics through `evaluate` (local metric modules shipped in this package) and the packages underneath.

`evaluate.load("rouge")` needs the Hub, so we ship ROUGE and BLEU modules under
evaluation/metric_modules/ and load them by path; their numbers equal the Hub metrics' defaults.
Classification metrics come from scikit-learn directly, as the Hub `accuracy`/`f1`/... scripts do.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metric_modules"
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
TEXT_METRICS = (*ROUGE_TYPES, "bleu", "exact_match", "distinct_1", "distinct_2", "mean_length")
LABEL_METRICS = ("accuracy", "precision", "recall", "f1")
AVERAGES = ("binary", "macro", "micro", "weighted")


@lru_cache(maxsize=None)
def load_metric(name: str):
    import evaluate

    path = METRICS_DIR / name / f"{name}.py"
    if not path.exists():
        raise ValueError(f"unknown metric module {name!r}; shipped: {sorted(p.name for p in METRICS_DIR.iterdir())}")
    return evaluate.load(str(path))


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of all generations (Li et al. 2016); 0 when there are none."""
    grams = [tuple(toks[i:i + n]) for t in texts for toks in [t.split()] for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


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
    if "exact_match" in names:
        out["exact_match"] = sum(exact_matches(predictions, references)) / max(len(predictions), 1)
    if "distinct_1" in names:
        out["distinct_1"] = distinct_n(predictions, 1)
    if "distinct_2" in names:
        out["distinct_2"] = distinct_n(predictions, 2)
    if "mean_length" in names:
        out["mean_length"] = sum(len(p.split()) for p in predictions) / max(len(predictions), 1)
    return {k: float(v) for k, v in out.items()}


def exact_matches(predictions: list[str], references: list[str]) -> list[float]:
    """1.0 per example whose prediction equals its reference after stripping both sides: generations are decoded
    stripped (generation.py), so a reference with a trailing newline from its JSONL could never match."""
    return [float(p.strip() == r.strip()) for p, r in zip(predictions, references)]


def default_average(classes: list) -> str:
    """binary for two labels (or fewer), else macro."""
    return "binary" if len(classes) <= 2 else "macro"


def positive_label(classes: list):
    """scikit-learn's (and the Hub metrics') positive label is 1; for named labels, the last one."""
    return 1 if set(classes) <= {0, 1} else classes[-1]


def label_metrics(predictions: list, references: list, names=LABEL_METRICS, average: str | None = None,
                  labels: list | None = None) -> dict[str, float]:
    """accuracy/precision/recall/f1 with scikit-learn: binary for two labels, else `average` (default macro)."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    unknown = [n for n in names if n not in LABEL_METRICS]
    if unknown:
        raise ValueError(f"unknown label metric(s) {unknown}; known: {list(LABEL_METRICS)}")
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")
    classes = list(labels) if labels is not None else sorted(set(references) | set(predictions), key=str)
    if average is None:
        average = default_average(classes)
    if average not in AVERAGES:
        raise ValueError(f"average {average!r}: choose one of {list(AVERAGES)}")
    out = {"accuracy": accuracy_score(references, predictions)}
    if average == "binary":
        if len(classes) > 2:
            raise ValueError(f"average='binary' needs at most two labels, got {classes}; use macro, micro or weighted")
        # Scoring the positive class alone (average=None) also tolerates predictions outside the label set.
        pos = positive_label(classes)
        p, r, f, _ = precision_recall_fscore_support(references, predictions, labels=[pos], average=None,
                                                     zero_division=0)
        p, r, f = p[0], r[0], f[0]
    else:
        p, r, f, _ = precision_recall_fscore_support(references, predictions, labels=classes, average=average,
                                                     zero_division=0)
    out.update({"precision": p, "recall": r, "f1": f})
    return {k: float(out[k]) for k in names}


REGRESSION_METRICS = ("mse", "mae", "pearson")


def regression_metrics(predictions: list[float], references: list[float], names=REGRESSION_METRICS) -> dict:
    """Mean squared error, mean absolute error and Pearson correlation (0 when either side is constant)."""
    import numpy as np

    unknown = [n for n in names if n not in REGRESSION_METRICS]
    if unknown:
        raise ValueError(f"unknown regression metric(s) {unknown}; known: {list(REGRESSION_METRICS)}")
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    p, r = np.asarray(predictions, dtype=float), np.asarray(references, dtype=float)
    out = {"mse": float(((p - r) ** 2).mean()), "mae": float(np.abs(p - r).mean()),
           "pearson": float(np.corrcoef(p, r)[0, 1]) if p.std() > 0 and r.std() > 0 else 0.0}
    return {k: out[k] for k in names}


def confusion_counts(predictions: list, references: list, labels: list) -> list[list[int]]:
    """counts[i][j]: references labels[i] predicted as labels[j]; predictions outside `labels` are not counted."""
    from sklearn.metrics import confusion_matrix

    return confusion_matrix(references, predictions, labels=labels).tolist()
