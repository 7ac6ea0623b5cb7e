"""The paired bootstrap of tuned minus the best baseline (issue 22, item 7): each metric's per-example
statistics give back the harness's own number, the interval is calibrated (about 5% false positives with no
true difference), pairing is used, and the report and end-of-run summary say significant or not."""

import json
import math
import random

import numpy as np
import pytest

from hf_tuner.evaluation.metrics import label_metrics, regression_metrics, text_metrics
from hf_tuner.evaluation.report import TABLE_METRICS, gains, write_run_record
from hf_tuner.evaluation.significance import Stat, gain, label_stats, text_stats, value


def _point(stat):
    return float(value(stat, np.ones((1, len(stat))))[0])


@pytest.mark.parametrize("labels,average", [([0, 1], None), (["neg", "pos"], None), (["a", "b", "c"], None),
                                            (["a", "b", "c"], "micro"), (["a", "b", "c"], "weighted")])
def test_label_statistics_give_back_label_metrics(labels, average):
    rng = random.Random(len(labels) + len(average or ""))
    refs = [rng.choice(labels) for _ in range(60)]
    unparsed = -1 if isinstance(labels[0], int) else "<none>"  # an answer that names no label
    preds = [r if rng.random() < 0.6 else rng.choice(labels + [unparsed]) for r in refs]
    names = ("accuracy", "precision", "recall", "f1")
    expected = label_metrics(preds, refs, names, average, labels=labels)
    stats = label_stats(preds, refs, labels, average, names)
    assert {m: _point(s) for m, s in stats.items()} == pytest.approx(expected, abs=1e-12)


def test_text_statistics_give_back_text_metrics():
    rng = random.Random(0)
    words = "the a cat dog sat ran on under mat log quickly".split()
    refs = [" ".join(rng.choices(words, k=rng.randint(3, 9))) for _ in range(40)]
    preds = [r if i % 5 == 0 else " ".join(rng.choices(words, k=rng.randint(1, 9))) for i, r in enumerate(refs)]
    names = ("rouge1", "rouge2", "rougeL", "bleu", "exact_match")
    expected = text_metrics(preds, refs, names)
    assert expected["exact_match"] > 0 and expected["bleu"] > 0
    stats = text_stats(preds, refs, names)
    assert {m: _point(s) for m, s in stats.items()} == pytest.approx(expected, rel=1e-9)


def test_regression_statistics_give_back_regression_metrics():
    rng = np.random.default_rng(0)
    refs = rng.normal(size=50).tolist()
    preds = (np.array(refs) * 0.7 + rng.normal(scale=0.5, size=50)).tolist()
    expected = regression_metrics(preds, refs)
    stats = {"mse": Stat("mean", [(p - r) ** 2 for p, r in zip(preds, refs)]),
             "mae": Stat("mean", [abs(p - r) for p, r in zip(preds, refs)]),
             "pearson": Stat("pearson", preds, references=refs)}
    assert {m: _point(s) for m, s in stats.items()} == pytest.approx(expected, rel=1e-9)


def _correct(p: float, n: int, rng) -> Stat:
    return Stat("mean", (rng.random(n) < p).astype(float).tolist())


def test_no_true_difference_is_significant_about_five_percent_of_the_time():
    """Base and tuned answer 100 items, each right with probability 0.6 independently: the 95% interval of the
    difference should exclude 0 in about 5% of 400 draws (a binomial 95% range for 400 draws at 5%: 11-30)."""
    rng = np.random.default_rng(1)
    hits = sum(gain({"base": {"per_example": {"accuracy": _correct(0.6, 100, rng)}},
                     "tuned": {"per_example": {"accuracy": _correct(0.6, 100, rng)}}},
                    TABLE_METRICS, resamples=400, seed=s)["accuracy"]["significant"] for s in range(400))
    assert 8 <= hits <= 32, hits


def test_a_real_gain_is_significant_and_the_interval_holds_it():
    rng = np.random.default_rng(2)
    g = gain({"base": {"per_example": {"accuracy": _correct(0.5, 200, rng)}},
              "tuned": {"per_example": {"accuracy": _correct(0.8, 200, rng)}}}, TABLE_METRICS)["accuracy"]
    assert g["significant"] and g["better"] and g["ci95"][0] < g["difference"] < g["ci95"][1]
    assert g["ci95"][0] > 0.15, g


def test_the_bootstrap_is_paired():
    """Tuned gets right every item base gets right, and 6 more of 100. Paired, that is significant (the
    difference never falls below 0 on any resample); two independent resamples would give an SE of about 0.07
    and an interval across 0."""
    base = [1.0] * 50 + [0.0] * 50
    tuned = [1.0] * 56 + [0.0] * 44
    g = gain({"base": {"per_example": {"accuracy": Stat("mean", base)}},
              "tuned": {"per_example": {"accuracy": Stat("mean", tuned)}}}, TABLE_METRICS)["accuracy"]
    assert g["difference"] == pytest.approx(0.06)
    assert g["significant"] and g["ci95"][0] > 0, g


def test_the_best_baseline_is_chosen_in_the_metrics_direction():
    rng = np.random.default_rng(3)
    tokens = [10] * 30

    def ppl(scale):
        return Stat("ratio_exp", (rng.random(30) * 10 + scale * 10).tolist(), counts=tokens)

    results = {"base": {"per_example": {"accuracy": _correct(0.3, 30, rng), "perplexity": ppl(3.0)}},
               "few_shot_3": {"per_example": {"accuracy": _correct(0.9, 30, rng), "perplexity": ppl(1.0)}},
               "tuned": {"per_example": {"accuracy": _correct(0.7, 30, rng), "perplexity": ppl(2.0)}}}
    g = gains(results)
    assert g["accuracy"]["baseline"] == "few_shot_3" and g["accuracy"]["difference"] < 0
    assert g["perplexity"]["baseline"] == "few_shot_3"  # the lower perplexity is the better baseline
    assert g["perplexity"]["difference"] > 0 and not g["perplexity"]["better"]
    exp_mean = math.exp(sum(results["tuned"]["per_example"]["perplexity"].values) / 300)
    assert g["perplexity"]["difference"] + _point(results["few_shot_3"]["per_example"]["perplexity"]) == \
        pytest.approx(exp_mean)


def test_report_and_summary_say_whether_the_gain_is_significant(tmp_path):
    rng = np.random.default_rng(4)
    results = {"base": {"per_example": {"accuracy": _correct(0.5, 120, rng), "f1": _correct(0.5, 120, rng)}},
               "tuned": {"per_example": {"accuracy": _correct(0.9, 120, rng), "f1": _correct(0.52, 120, rng)}}}
    metrics = {"base": {"accuracy": 0.5, "f1": 0.5}, "baselines": {}, "tuned": {"accuracy": 0.9, "f1": 0.52},
               "gain": gains(results)}
    table = write_run_record(tmp_path, "t", metrics, [], [])
    acc, f1 = metrics["gain"]["accuracy"], metrics["gain"]["f1"]
    assert acc["significant"] and not f1["significant"]
    assert f"accuracy: tuned - base (zero-shot) = {acc['difference']:+.3f}" in table
    assert table.splitlines()[-2].endswith("significant, better") and table.endswith("not significant")
    report = (tmp_path / "report.md").read_text()
    row = next(line for line in report.splitlines() if line.startswith("| tuned - best baseline"))
    assert f"{acc['difference']:+.3f} [{acc['ci95'][0]:+.3f}, {acc['ci95'][1]:+.3f}]*" in row
    assert f"{f1['difference']:+.3f} [" in row and not row.endswith("]* |")
    saved = json.loads((tmp_path / "metrics.json").read_text())["gain"]
    assert saved["accuracy"]["ci95"] == acc["ci95"] and saved["accuracy"]["examples"] == 120
