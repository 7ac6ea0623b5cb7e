import pytest
import sacrebleu
from rouge_score import rouge_scorer

from hf_tuner.evaluation.metrics import text_metrics

CASES = {
    "plain": (["the cat sat on the mat", "a dog barked at night"],
              ["the cat is on the mat", "the dog barked loudly at night"]),
    "empty prediction": (["", "a small river"], ["a large river", "a small river"]),
    "unicode": (["café au lait, très bon", "日本語 テキスト"], ["un café au lait", "日本語のテキスト"]),
    "single example": (["one short answer"], ["one longer reference answer"]),
}


def _reference(preds, refs):
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=False)
    scores = [scorer.score(r, p) for p, r in zip(preds, refs)]
    out = {k: sum(s[k].fmeasure for s in scores) / len(scores) for k in ("rouge1", "rouge2", "rougeL", "rougeLsum")}
    out["bleu"] = sacrebleu.corpus_bleu(preds, [refs]).score
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_metrics_equal_the_reference_packages(case):
    preds, refs = CASES[case]
    ours = text_metrics(preds, refs, names=["rouge1", "rouge2", "rougeL", "rougeLsum", "bleu"])
    expected = _reference(preds, refs)
    assert set(ours) == set(expected)
    for k in expected:
        assert ours[k] == pytest.approx(expected[k], abs=1e-6), k


def test_identical_texts_score_perfectly():
    ours = text_metrics(["the same sentence here"], ["the same sentence here"])
    assert ours["rougeL"] == pytest.approx(1.0) and ours["bleu"] == pytest.approx(100.0)


def test_mismatched_lengths_and_unknown_metrics_are_refused():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown text metric"):
        text_metrics(["a"], ["a"], names=["meteor"])


# ---- classification and diversity metrics, against scikit-learn and by hand
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score  # noqa: E402

from hf_tuner.evaluation.metrics import distinct_n, label_metrics  # noqa: E402

LABEL_CASES = {
    "binary": ([1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0], "binary"),
    "all same labels": ([1, 1, 1], [1, 1, 1], "binary"),
    "all same negative": ([0, 0, 0], [0, 0, 0], "binary"),
    "single example": ([1], [0], "binary"),
    "multiclass macro": ([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], "macro"),
    "multiclass micro": ([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], "micro"),
    "multiclass weighted": ([0, 1, 2, 2, 1], [0, 2, 2, 1, 1], "weighted"),
}


@pytest.mark.parametrize("case", list(LABEL_CASES))
def test_label_metrics_equal_scikit_learn(case):
    preds, refs, average = LABEL_CASES[case]
    requested = None if average == "binary" else average
    ours = label_metrics(preds, refs, average=requested)
    kw = {"average": average, "zero_division": 0}
    assert ours["accuracy"] == pytest.approx(accuracy_score(refs, preds))
    assert ours["precision"] == pytest.approx(precision_score(refs, preds, **kw))
    assert ours["recall"] == pytest.approx(recall_score(refs, preds, **kw))
    assert ours["f1"] == pytest.approx(f1_score(refs, preds, **kw))


def test_named_labels_and_answers_outside_the_label_set():
    refs = ["negative", "positive", "positive", "negative"]
    preds = ["negative", "positive", "<none>", "positive"]
    m = label_metrics(preds, refs, labels=["negative", "positive"])
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="average='binary' needs at most two labels"):
        label_metrics([0, 1, 2], [0, 1, 2], average="binary")


def test_exact_match_distinct_and_length():
    m = text_metrics(["a b", "a b", "c"], ["a b", "a c", "c"], names=["exact_match", "distinct_1", "distinct_2",
                                                                     "mean_length"])
    assert m["exact_match"] == pytest.approx(2 / 3)
    assert m["distinct_1"] == pytest.approx(3 / 5)  # unigrams a b a b c
    assert m["distinct_2"] == pytest.approx(1 / 2)  # bigrams (a b) (a b)
    assert m["mean_length"] == pytest.approx(5 / 3)
    assert distinct_n(["", ""], 2) == 0.0


def test_exact_match_strips_references_as_generations_are_stripped():
    """Generations come back stripped (generation.py decodes with .strip()); a reference's trailing newline or
    leading space must not turn a match into a miss."""
    m = text_metrics(["Paris", "blue"], ["Paris\n", " red "], names=["exact_match"])
    assert m["exact_match"] == 0.5
