"""ROUGE as a local `evaluate` module: the Hub `rouge` metric's defaults, offline.

rouge_score with use_stemmer=False; each score is the mean F-measure over examples. (The Hub script's
default aggregation is a bootstrap whose median approximates this mean; we report the exact mean.)
"""

import datasets
import evaluate
from rouge_score import rouge_scorer

_CITATION = "Lin, Chin-Yew. ROUGE: a Package for Automatic Evaluation of Summaries. 2004."
_DESCRIPTION = "ROUGE-1/2/L/Lsum F-measures, averaged over examples, as the Hub `rouge` metric."
_KWARGS_DESCRIPTION = "predictions: list of str; references: list of str or list of list of str."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=[
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Sequence(datasets.Value("string"))}),
                datasets.Features({"predictions": datasets.Value("string"),
                                   "references": datasets.Value("string")}),
            ],
        )

    def _compute(self, predictions, references, rouge_types=None, use_stemmer=False, tokenizer=None,
                 use_aggregator=True):
        """use_aggregator=False: each example's F-measure (a list per type), as the Hub module gives them."""
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types=rouge_types, use_stemmer=use_stemmer, tokenizer=tokenizer)
        scores = {t: [] for t in rouge_types}
        for pred, ref in zip(predictions, references):
            if isinstance(ref, list):
                score = scorer.score_multi(ref, pred)
            else:
                score = scorer.score(ref, pred)
            for t in rouge_types:
                scores[t].append(score[t].fmeasure)
        if not use_aggregator:
            return scores
        n = max(len(predictions), 1)
        return {t: sum(scores[t]) / n for t in rouge_types}
