"""Prompt templates (context/role, instruction, task input, output format) and zero/one/k-shot builders.

Prompting the base model is the baseline every fine-tune must beat, so the same template builds the
zero-shot, one-shot and few-shot prompts; worked examples come from the training split only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class PromptTemplate:
    """A chat prompt in parts; any part may be empty. `task` is formatted with the row's fields."""

    task: str = "{text}"
    instruction: str = ""
    context: str = ""  # role or background, sent as the system message
    output_format: str = ""

    def user_text(self, row: dict) -> str:
        try:
            task = self.task.format(**row)
        except KeyError as e:
            raise ValueError(f"prompt template needs field {e} that the row lacks (fields: {sorted(row)})") from e
        return "\n\n".join(part for part in (self.instruction, task, self.output_format) if part)

    def messages(self, row: dict, answer: str | None = None, shots: list[tuple[dict, str]] = ()) -> list[dict]:
        """System context, then each shot as an earlier user/assistant turn, then the row's question."""
        msgs = [{"role": "system", "content": self.context}] if self.context else []
        for shot_row, shot_answer in shots:
            msgs += [{"role": "user", "content": self.user_text(shot_row)},
                     {"role": "assistant", "content": shot_answer}]
        msgs.append({"role": "user", "content": self.user_text(row)})
        if answer is not None:
            msgs.append({"role": "assistant", "content": answer})
        return msgs


def draw_shots(train_rows: list[dict], k: int, seed: int, exclude_groups: set | None = None,
               balance_key: str | None = None) -> list[dict]:
    """k examples from the training rows with a fixed seed, never from `exclude_groups` (held-out ones).

    With `balance_key` (e.g. "label"), classes take turns, so a 2-shot sentiment prompt shows both. The
    shots are then shuffled with the seed: in class order, the last shot (the one nearest the question)
    would always be the same class, and models lean toward the most recent label.
    """
    pool = [r for r in train_rows if not exclude_groups or r.get("group") not in exclude_groups]
    if k > len(pool):
        raise ValueError(f"{k}-shot needs {k} training rows, there are {len(pool)}")
    rng = random.Random(seed)
    if not balance_key:
        return rng.sample(pool, k)
    by_class: dict = {}
    for r in rng.sample(pool, len(pool)):
        by_class.setdefault(r[balance_key], []).append(r)
    classes = sorted(by_class, key=str)
    rng.shuffle(classes)  # which classes get the extra shots when k is not a multiple of their number
    shots = []
    while len(shots) < k:
        for c in classes:
            if by_class[c] and len(shots) < k:
                shots.append(by_class[c].pop())
    rng.shuffle(shots)
    return shots


def baseline_shots(name: str) -> int:
    """zero_shot -> 0, one_shot -> 1, few_shot_K -> K."""
    if name == "zero_shot":
        return 0
    if name == "one_shot":
        return 1
    if name.startswith("few_shot_") and name[len("few_shot_"):].isdigit():
        return int(name[len("few_shot_"):])
    raise ValueError(f"unknown baseline {name!r}: zero_shot, one_shot or few_shot_K (e.g. few_shot_3)")
