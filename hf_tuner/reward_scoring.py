"""Scoring text with a scalar-head reward model: shared by rl/ (rewards for training) and evaluation/
(held-out pairwise accuracy), so neither layer imports the other.

A reward model scores the decoded text `prompt + " " + response`, re-tokenized with its own tokenizer, so the
policy and the reward model need not share a vocabulary (MiniLM scoring SmolLM2's text).
"""

from __future__ import annotations

import torch

from hf_tuner.errors import ConfigError


def joined(prompt: str, response: str) -> str:
    return f"{prompt} {response}".strip() if prompt else response


class RewardModel:
    """A sequence classifier with one output, used as a reward function. Scores are its raw logits."""

    def __init__(self, model, tokenizer, max_length: int = 128, batch_size: int = 32):
        self.model, self.tokenizer, self.max_length, self.batch_size = model.eval(), tokenizer, max_length, batch_size

    @classmethod
    def load(cls, path: str, **kw) -> "RewardModel":
        from hf_tuner.models import load_model

        model, tokenizer = load_model(path, "classification")
        if model.config.num_labels != 1:
            raise ConfigError(f"reward_model {path}: expected a scalar head (num_labels=1), got {model.config.num_labels}")
        return cls(model, tokenizer, **kw)

    @torch.no_grad()
    def score_texts(self, texts: list[str]) -> list[float]:
        out = []
        device = next(self.model.parameters()).device
        for s in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(texts[s:s + self.batch_size], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt").to(device)
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out

    def __call__(self, prompts: list[str], responses: list[str]) -> list[float]:
        return self.score_texts([joined(p, r) for p, r in zip(prompts, responses)])


def pairwise_scores(reward: RewardModel, pairs: list[dict]) -> tuple[list[float], list[float]]:
    chosen = reward.score_texts([joined(p.get("prompt", ""), p["chosen"]) for p in pairs])
    rejected = reward.score_texts([joined(p.get("prompt", ""), p["rejected"]) for p in pairs])
    return chosen, rejected
