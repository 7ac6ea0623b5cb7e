"""The shared evaluation harness: one entry point, `evaluate_model`, for base and tuned models alike."""

from hf_tuner.evaluation.harness import evaluate_model, reference_perplexity
from hf_tuner.evaluation.metrics import text_metrics
from hf_tuner.evaluation.tasks import GenerationTask

__all__ = ["evaluate_model", "reference_perplexity", "text_metrics", "GenerationTask"]
