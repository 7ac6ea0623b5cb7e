"""Evaluation tasks: held-out rows, how a row becomes a prompt, its reference, and the metrics that apply."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace

from hf_tuner.evaluation.metrics import TEXT_METRICS


@dataclass
class GenerationTask:
    """Chat prompts answered by generation, scored against one reference answer per row.

    rows: {"prompt": [messages], "completion": [one assistant message]}.
    shots: worked examples put before each prompt as earlier chat turns (few-shot baselines);
    they must come from the training split.
    """

    name: str
    rows: list[dict]
    metrics: tuple[str, ...] = (*TEXT_METRICS, "perplexity", "mean_length")
    system_prompt: str | None = None
    shots: list[dict] = field(default_factory=list)

    def messages(self, row: dict) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        for shot in self.shots:
            msgs += shot["prompt"] + shot["completion"]
        return msgs + row["prompt"]

    @staticmethod
    def reference(row: dict) -> str:
        return row["completion"][-1]["content"]

    def with_shots(self, k: int, train_rows: list[dict], seed: int) -> "GenerationTask":
        """The same task with k examples drawn, with a fixed seed, from the training rows only."""
        if k > len(train_rows):
            raise ValueError(f"{k}-shot needs {k} training rows, there are {len(train_rows)}")
        held = {r.get("group") for r in self.rows}
        pool = [r for r in train_rows if r.get("group") not in held]
        shots = random.Random(seed).sample(pool, k)
        return replace(self, name=f"{self.name}/few_shot_{k}", shots=shots)
