"""Harness parts for preference learning: reward models on held-out pairs, policies under a reward."""

from __future__ import annotations

import math

import torch

from hf_tuner.evaluation.metrics import distinct_n
from hf_tuner.evaluation.significance import Stat
from hf_tuner.evaluation.tasks import PreferenceTask, RewardTask


def evaluate_preferences(model, tokenizer, task: PreferenceTask, settings, shard=None) -> dict:
    """The reward model's scores of each pair's chosen and rejected text. `shard` (hf_tuner.distributed.EvalShard):
    this rank scores its share of whole batches of pairs, each the batch one process scores, and every rank
    gets all the scores back in pair order."""
    from hf_tuner.distributed import SINGLE
    from hf_tuner.reward_scoring import RewardModel, pairwise_scores

    shard = shard or SINGLE
    reward = RewardModel(model, tokenizer, batch_size=settings.batch_size)
    was_training = model.training
    try:
        if shard.world == 1:
            chosen, rejected = pairwise_scores(reward, task.rows)
        else:
            size = settings.batch_size
            mine = [i for b in shard.rows(math.ceil(len(task.rows) / size))
                    for i in range(b * size, min((b + 1) * size, len(task.rows)))]
            own = pairwise_scores(reward, [task.rows[i] for i in mine]) if mine else ([], [])
            scores = shard.gather_rows(len(task.rows), mine, list(zip(*own)))
            chosen, rejected = [c for c, _ in scores], [r for _, r in scores]
    finally:
        model.train(was_training)
    n = max(len(task.rows), 1)
    metrics = {"pairwise_accuracy": sum(c > r for c, r in zip(chosen, rejected)) / n,
               "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
               "reward_chosen": sum(chosen) / n, "reward_rejected": sum(rejected) / n}
    per_example = {"pairwise_accuracy": Stat("mean", [float(c > r) for c, r in zip(chosen, rejected)]),
                   "mean_margin": Stat("mean", [c - r for c, r in zip(chosen, rejected)])}
    return {"metrics": {k: v for k, v in metrics.items() if k in task.metrics},
            "predictions": [f"{c:.3f} vs {r:.3f}" for c, r in zip(chosen, rejected)],
            "references": ["chosen > rejected"] * len(task.rows), "chosen": chosen, "rejected": rejected,
            "per_example": {k: v for k, v in per_example.items() if k in task.metrics}}


@torch.no_grad()
def evaluate_policy(model, tokenizer, task: RewardTask, settings) -> dict:
    """Sample one response per prompt (seeded), score it, and estimate KL(policy || reference) on those
    samples: the sum over response tokens of log pi - log pi_ref, averaged over prompts."""
    from hf_tuner.policy_sampling import eos_token_ids, forward_logprobs, reference_context, sample_responses

    if task.reward_fn is None:
        raise ValueError(f"task {task.name}: a RewardTask needs a reward_fn")
    prompts = [r["prompt"] for r in task.rows]
    q, qm, r, rm, texts, _ = sample_responses(model, tokenizer, prompts, settings.max_new_tokens, task.temperature,
                                              settings.batch_size, seed=settings.seed)
    rewards = [float(x) for x in task.reward_fn(prompts, texts)]
    kls = []
    adapter = task.reference_model is None and hasattr(model, "disable_adapter")
    if task.reference_model is not None or adapter:
        was_training = model.training
        model.eval()
        temperature = task.temperature or 1.0
        eos = eos_token_ids(model, tokenizer)
        try:
            for s in range(0, len(prompts), settings.batch_size):
                part = [t[s:s + settings.batch_size] for t in (q, qm, r, rm)]
                logprobs, _, _ = forward_logprobs(model, *part, temperature, eos_ids=eos)
                ref, ctx = reference_context(model, task.reference_model)
                with ctx:
                    ref_logprobs, _, _ = forward_logprobs(ref, *part, temperature, eos_ids=eos)
                kls += (logprobs - ref_logprobs.to(logprobs.device)).sum(1).tolist()  # a reference elsewhere
        finally:
            model.train(was_training)
    n = len(rewards)
    mean, se = mean_and_se(rewards)
    metrics = {"mean_reward": mean, "reward_se": se, "kl": sum(kls) / n if kls else 0.0,
               "distinct_1": distinct_n(texts, 1), "distinct_2": distinct_n(texts, 2),
               "mean_length": sum(len(t.split()) for t in texts) / n}
    judged = judge_scores(task.judge, texts)
    if judged is not None:
        metrics[f"judge_{task.judge}"], metrics[f"judge_{task.judge}_se"] = mean_and_se(judged)
    return {"metrics": {k: v for k, v in metrics.items() if k in task.metrics}, "predictions": texts,
            "references": prompts, "rewards": rewards, "judge": task.judge, "judge_scores": judged}


JUDGES = ("vader",)


def judge_scores(judge: str | None, responses: list[str]) -> list[float] | None:
    """An independent judge's score of each response (the policy's own words, not the prompt), or None.

    vader: VADER's compound sentiment, -1..1, a lexicon-and-rules scorer that shares nothing with a
    trained reward model, so a gain under the reward model that VADER does not see is a warning sign."""
    if judge is None:
        return None
    if judge not in JUDGES:
        raise ValueError(f"judge {judge!r}: one of {', '.join(JUDGES)}, or None")
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(text)["compound"] for text in responses]


def mean_and_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / max(n - 1, 1))
    return mean, sd / math.sqrt(n)
