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
    ours = text_metrics(preds, refs)
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
