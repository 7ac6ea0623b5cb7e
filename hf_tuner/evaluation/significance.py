"""Is the gain real? A paired bootstrap of tuned minus the best baseline, over the held-out examples.

The harness keeps, next to each metric, what each example contributes to it (`Stat`): a score to average
(accuracy, ROUGE, exact match, MSE), a sum over a sum (perplexity: log-loss and token count per example), the
label pairs (precision, recall, F1 are not averages of examples), BLEU's n-gram counts per sentence, or the
(prediction, target) pairs of a correlation. Both models answered the same examples, so one set of resamples
serves both: each resample draws N examples with replacement (a weight per example, `rng.multinomial`), the
metric is recomputed for each model on that resample, and the 2.5th and 97.5th percentiles of the differences
are the 95% interval. The gain is significant when that interval excludes 0.

Written here rather than taken from a library: sacrebleu's paired bootstrap covers BLEU and chrF only, and
scipy's `bootstrap` resamples one statistic of arrays, not a metric recomputed from label pairs or counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

RESAMPLES = 1000
SEED = 0


@dataclass
class Stat:
    """What each example contributes to one metric. kind: mean (values), ratio (sum of values / sum of counts:
    token accuracy), ratio_exp (the same, then exp: perplexity), labels (predictions, references; `metric` of
    label_metrics), bleu (sacrebleu sentence statistics), pearson (values, references)."""
    kind: str
    values: list = field(default_factory=list)
    counts: list | None = None
    references: list | None = None
    labels: list | None = None
    average: str | None = None
    metric: str | None = None

    def __len__(self) -> int:
        return len(self.values)


def value(stat: Stat, weights: np.ndarray) -> np.ndarray:
    """The metric on each resample: weights (resamples, N), how often each example was drawn."""
    w = np.asarray(weights, dtype=float)
    n = w.sum(axis=1)
    if stat.kind == "mean":
        return w @ np.asarray(stat.values, dtype=float) / n
    if stat.kind in ("ratio", "ratio_exp"):
        ratio = w @ np.asarray(stat.values, dtype=float) / np.maximum(w @ np.asarray(stat.counts, float), 1)
        return np.exp(ratio) if stat.kind == "ratio_exp" else ratio
    if stat.kind == "bleu":
        from sacrebleu.metrics import BLEU

        sums = w @ np.asarray(stat.values, dtype=float)
        bleu = BLEU()  # the defaults of our bleu module (13a, exp smoothing): the statistics came from it
        return np.array([bleu._compute_score_from_stats([int(round(x)) for x in row]).score for row in sums])
    if stat.kind == "pearson":
        return np.array([_weighted_pearson(np.asarray(stat.values, float), np.asarray(stat.references, float), row)
                         for row in w])
    if stat.kind == "labels":
        return _label_metric(stat, w)
    raise ValueError(f"unknown statistic kind {stat.kind!r}")


def _weighted_pearson(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
    mx, my = (w @ x) / w.sum(), (w @ y) / w.sum()
    cov, vx, vy = w @ ((x - mx) * (y - my)), w @ (x - mx) ** 2, w @ (y - my) ** 2
    return float(cov / math.sqrt(vx * vy)) if vx > 1e-12 and vy > 1e-12 else 0.0  # constant side: 0, as reported


def _label_metric(stat: Stat, w: np.ndarray) -> np.ndarray:
    """accuracy / precision / recall / f1 as `metrics.label_metrics` computes them (scikit-learn's definitions,
    zero_division=0), from per-class true-positive, false-positive and false-negative counts on each resample."""
    pred, ref = np.asarray(stat.values, dtype=object), np.asarray(stat.references, dtype=object)
    if stat.metric == "accuracy":
        return w @ (pred == ref).astype(float) / w.sum(axis=1)
    from hf_tuner.evaluation.metrics import positive_label

    classes = [positive_label(stat.labels)] if stat.average == "binary" else list(stat.labels)
    tp = np.stack([w @ ((pred == c) & (ref == c)).astype(float) for c in classes], axis=1)
    fp = np.stack([w @ ((pred == c) & (ref != c)).astype(float) for c in classes], axis=1)
    fn = np.stack([w @ ((pred != c) & (ref == c)).astype(float) for c in classes], axis=1)
    if stat.average == "micro":
        tp, fp, fn = tp.sum(1, keepdims=True), fp.sum(1, keepdims=True), fn.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        score = {"precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
                 "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0),
                 "f1": np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)}[stat.metric]
    if stat.average == "weighted":
        support = tp + fn
        return np.where(support.sum(1) > 0, (score * support).sum(1) / np.maximum(support.sum(1), 1e-12), 0.0)
    return score.mean(axis=1)


def label_stats(predictions: list, references: list, labels: list, average: str | None, names) -> dict[str, Stat]:
    from hf_tuner.evaluation.metrics import default_average

    return {m: Stat("labels", list(predictions), references=list(references), labels=list(labels),
                    average=average or default_average(labels), metric=m) for m in names}


def text_stats(predictions: list[str], references: list[str], names) -> dict[str, Stat]:
    """Per-example ROUGE F-measures (the module's mean is their mean), exact matches and BLEU statistics."""
    from hf_tuner.evaluation.metrics import ROUGE_TYPES, exact_matches, load_metric

    out: dict[str, Stat] = {}
    rouge = [n for n in names if n in ROUGE_TYPES]
    if rouge:
        scores = load_metric("rouge").compute(predictions=predictions, references=references, rouge_types=rouge,
                                              use_aggregator=False)
        out.update({t: Stat("mean", scores[t]) for t in rouge})
    if "exact_match" in names:
        out["exact_match"] = Stat("mean", exact_matches(predictions, references))
    if "bleu" in names:
        from sacrebleu.metrics import BLEU

        out["bleu"] = Stat("bleu", BLEU()._extract_corpus_statistics(predictions, [references]))
    return out


def _point(stat: Stat) -> float:
    return float(value(stat, np.ones((1, len(stat))))[0])


def gain(results: dict[str, dict], directions: dict[str, str | None], tuned: str = "tuned",
         resamples: int = RESAMPLES, seed: int = SEED) -> dict[str, dict]:
    """For each metric with a direction that the tuned result and at least one other result carry per example:
    {"baseline": the best other result on the point estimate, "difference": tuned minus it, "ci95": [low, high]
    from the paired bootstrap, "significant": the interval excludes 0, "better": the difference points the
    metric's good way, "examples", "resamples"}.

    results: name -> harness result ({"per_example": {metric: Stat}, ...}); the others are the baselines."""
    per = results.get(tuned, {}).get("per_example", {})
    out: dict[str, dict] = {}
    weights: dict[int, np.ndarray] = {}  # per number of examples: the same resamples for every metric
    for name, stat in per.items():
        direction = directions.get(name)
        others = {k: r["per_example"][name] for k, r in results.items()
                  if k != tuned and name in r.get("per_example", {}) and len(r["per_example"][name]) == len(stat)}
        if direction is None or not others or len(stat) < 2:
            continue
        points = {k: _point(s) for k, s in others.items()}
        best = (max if direction == "higher" else min)(points, key=points.get)
        n = len(stat)
        if n not in weights:
            weights[n] = np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=resamples)
        diffs = value(stat, weights[n]) - value(others[best], weights[n])
        low, high = (float(x) for x in np.percentile(diffs, [2.5, 97.5]))
        difference = _point(stat) - points[best]
        out[name] = {"baseline": best, "difference": difference, "ci95": [low, high],
                     "significant": bool(low > 0 or high < 0),
                     "better": bool(difference > 0 if direction == "higher" else difference < 0),
                     "examples": len(stat), "resamples": resamples}
    return out


def summary_lines(gains: dict[str, dict], digits: dict[str, int] | None = None) -> list[str]:
    """One line per metric: 'rougeL: tuned - few_shot_3 = +0.123 (95% CI +0.081 to +0.166), significant'."""
    digits = digits or {}
    lines = []
    for name, g in gains.items():
        d = digits.get(name, 3)
        verdict = ("significant" if g["significant"] else "not significant") + (
            "" if not g["significant"] else ", better" if g["better"] else ", worse")
        lines.append(f"{name}: tuned - {g['baseline']} = {g['difference']:+.{d}f} (95% CI {g['ci95'][0]:+.{d}f} "
                     f"to {g['ci95'][1]:+.{d}f}, paired bootstrap over {g['examples']} examples), {verdict}")
    return lines
