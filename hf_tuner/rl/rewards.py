"""Rewards for RL: a trained reward model (any tokenizer) or a Python function, and the gate before RL.

A reward is a callable `(prompts, responses) -> list[float]`. A reward model scores the decoded text
`prompt + " " + response`, re-tokenized with its own tokenizer, so the policy and the reward model need
not share a vocabulary (MiniLM scoring SmolLM2's text). TRL's old PPOTrainer required a shared tokenizer.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch

from hf_tuner.config import ConfigError
from hf_tuner.reward_scoring import RewardModel, joined, pairwise_scores  # noqa: F401 - re-exported


def load_reward_function(spec: str):
    """`module:function` (called as f(prompts, responses) -> list[float]) or a reward-model folder/asset/run."""
    if ":" in spec and not Path(spec).exists():
        module, _, name = spec.partition(":")
        try:
            fn = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"reward: cannot import {spec!r} ({e})") from e
        if not callable(fn):
            raise ConfigError(f"reward: {spec!r} is not callable")
        return fn
    return RewardModel.load(str(reward_model_folder(spec)))


def reward_model_folder(spec: str) -> Path | str:
    """A reward_model run folder holds its model in `model/`; anything else is passed on as it is."""
    p = Path(spec).expanduser()
    return p / "model" if (p / "model" / "config.json").is_file() else spec


SPLIT_FIELDS = ("split_seed", "eval_snippets", "vader_sources")  # what decides which snippets the reward model saw


def check_same_split(reward_spec: str, split: dict) -> bool:
    """The reward-model run's config.yaml against the RL run's split fields: the RL run's held-out prompts open
    snippets the reward model never saw, and its metrics.json accuracy was measured on the same held-out side,
    only when both runs split the snippets alike. A mismatch is refused; False when there is no config.yaml."""
    import yaml

    config_file = Path(reward_spec).expanduser() / "config.yaml"
    if not config_file.is_file():
        return False
    theirs = yaml.safe_load(config_file.read_text()) or {}
    from hf_tuner.data.preferences import DEFAULT_SOURCE

    def norm(key, value):
        return (value or [DEFAULT_SOURCE]) if key == "vader_sources" else value

    wrong = [f"{k}: {norm(k, split[k])!r} here, {norm(k, theirs.get(k))!r} in the reward model's run"
             for k in SPLIT_FIELDS if k in split and norm(k, split[k]) != norm(k, theirs.get(k))]
    if wrong:
        raise ConfigError(f"reward_model {reward_spec}: this run splits the snippets differently from the reward "
                          f"model's run ({config_file}): {'; '.join(wrong)}. Its held-out prompts could open snippets "
                          "the reward model trained on, and the reward model's held-out accuracy would not be "
                          f"measured on this run's held-out side. Set {', '.join(k for k in SPLIT_FIELDS if k in split)} "
                          "as in the reward model's run.")
    return True


def check_reward_gate(reward_spec: str, min_accuracy: float, pairs: list[dict] | None = None,
                      split: dict | None = None) -> float | None:
    """Refuse RL on a reward model that does not rank held-out pairs well enough.

    The accuracy comes from the reward-model run's metrics.json when its config.yaml shows the same split as
    `split` (the RL run's split_seed, eval_snippets, vader_sources; a different one is refused), or is measured
    on `pairs`. A Python reward function passes (None is returned: nothing to check)."""
    if ":" in reward_spec and not Path(reward_spec).exists():
        return None
    metrics_file = Path(reward_spec).expanduser() / "metrics.json"
    trusted = metrics_file.is_file() and (split is None or check_same_split(reward_spec, split))
    if metrics_file.is_file() and not trusted and not pairs:
        raise ConfigError(f"reward_model {reward_spec}: its metrics.json cannot be checked against this run's split "
                          "(no config.yaml beside it) and there are no held-out pairs to measure it on")
    if trusted:
        accuracy = json.loads(metrics_file.read_text())["tuned"]["pairwise_accuracy"]
        where = str(metrics_file)
    elif pairs:
        chosen, rejected = pairwise_scores(RewardModel.load(str(reward_model_folder(reward_spec))), pairs)
        accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
        where = f"{len(pairs)} held-out pairs"
    else:
        raise ConfigError(f"reward_model {reward_spec}: no metrics.json and no held-out pairs to check it on")
    if accuracy < min_accuracy:
        raise ConfigError(f"reward_model {reward_spec}: held-out pairwise accuracy {accuracy:.3f} ({where}) is below "
                          f"min_reward_accuracy={min_accuracy}; RL against it would optimise noise. Train a better "
                          "reward model, or lower min_reward_accuracy deliberately.")
    return accuracy
