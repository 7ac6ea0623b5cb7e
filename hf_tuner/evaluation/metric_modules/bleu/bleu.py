"""BLEU as a local `evaluate` module: the Hub `sacrebleu` metric's defaults, offline.

sacrebleu.corpus_bleu with its default settings (13a tokenizer, exp smoothing), on the 0-100 scale.
"""

import datasets
import evaluate
import sacrebleu

_CITATION = "Post, Matt. A Call for Clarity in Reporting BLEU Scores. WMT 2018."
_DESCRIPTION = "Corpus BLEU from sacrebleu with default settings, 0-100."
_KWARGS_DESCRIPTION = "predictions: list of str; references: list of str or list of list of str."


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
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

    def _compute(self, predictions, references, smooth_method="exp", smooth_value=None, lowercase=False,
                 tokenize=None, use_effective_order=False):
        refs = [r if isinstance(r, list) else [r] for r in references]
        n_refs = len(refs[0]) if refs else 1
        if any(len(r) != n_refs for r in refs):
            raise ValueError("every prediction needs the same number of references")
        transposed = [[r[i] for r in refs] for i in range(n_refs)]
        kwargs = {} if tokenize is None else {"tokenize": tokenize}
        result = sacrebleu.corpus_bleu(predictions, transposed, smooth_method=smooth_method,
                                       smooth_value=smooth_value, lowercase=lowercase,
                                       use_effective_order=use_effective_order, **kwargs)
        return {"bleu": result.score, "precisions": result.precisions, "brevity_penalty": result.bp,
                "sys_len": result.sys_len, "ref_len": result.ref_len}
