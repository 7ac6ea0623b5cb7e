"""Evaluation tasks: held-out rows, how a row becomes a prompt, its reference, and the metrics that apply."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from hf_tuner.evaluation.metrics import LABEL_METRICS, ROUGE_TYPES
from hf_tuner.prompts import PromptTemplate, draw_shots


@dataclass
class GenerationTask:
    """Chat prompts answered by generation, scored against one reference answer per row.

    rows: {"prompt": [messages], "completion": [one assistant message], "group": split unit}.
    shots: worked examples put before each prompt as earlier chat turns (few-shot baselines);
    they come from the training split only.
    """

    name: str
    rows: list[dict]
    metrics: tuple[str, ...] = (*ROUGE_TYPES, "bleu", "distinct_1", "distinct_2", "mean_length", "perplexity")
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
        held = {r.get("group") for r in self.rows}
        shots = draw_shots(train_rows, k, seed, exclude_groups=held)
        return replace(self, name=f"{self.name}/few_shot_{k}", shots=shots)


@dataclass
class ClassificationTask:
    """Rows {"text", "label"} scored by accuracy/precision/recall/F1.

    A sequence classifier is scored from its logits (class id i = labels[i]). A causal LM is prompted
    with `template` (plus shots) and its generated text is mapped back to a label through `label_words`.
    """

    name: str
    rows: list[dict]
    labels: list
    metrics: tuple[str, ...] = LABEL_METRICS
    average: str | None = None  # None: binary for two labels, macro otherwise
    label_words: dict | None = None  # label -> word the LM should answer with
    template: PromptTemplate | None = None
    shots: list[dict] = field(default_factory=list)

    def word_of(self, label) -> str:
        return (self.label_words or {}).get(label, str(label))

    def messages(self, row: dict) -> list[dict]:
        template = self.template or PromptTemplate(
            instruction="Classify the text. Answer with one word: " + ", ".join(map(self.word_of, self.labels)) + ".")
        return template.messages(row, shots=[(s, self.word_of(s["label"])) for s in self.shots])

    def parse_label(self, generated: str):
        """The label whose word appears first in the generation, as a whole word ("no" is not in "not" or
        "know"); None if none does."""
        text = generated.lower()
        found = []
        for i, label in enumerate(self.labels):
            match = re.search(rf"(?<!\w){re.escape(self.word_of(label).lower())}(?!\w)", text)
            if match:
                found.append((match.start(), i))
        return self.labels[min(found)[1]] if found else None

    def with_shots(self, k: int, train_rows: list[dict], seed: int) -> "ClassificationTask":
        held = {r.get("group", r["text"]) for r in self.rows}
        rows = [{**r, "group": r.get("group", r["text"])} for r in train_rows]
        shots = draw_shots(rows, k, seed, exclude_groups=held, balance_key="label")
        return replace(self, name=f"{self.name}/few_shot_{k}", shots=shots)


@dataclass
class RegressionTask:
    """Rows {"text", "target"}: a one-output head's value against a real-valued target (e.g. a mean rating)."""

    name: str
    rows: list[dict]
    metrics: tuple[str, ...] = ("mse", "mae", "pearson")


@dataclass
class LanguageModelingTask:
    """Held-out documents, concatenated and cut into `block_size`-token blocks, scored by perplexity.

    objective "clm": next-token perplexity over every position but the first of each block.
    objective "mlm": whole words masked at `mlm_probability` with a fixed seed (the same masks for the
    base and the tuned model); perplexity and accuracy over the masked tokens.
    """

    name: str
    rows: list[dict]  # {"text", ...}: whole documents
    block_size: int = 128
    objective: str = "clm"
    mlm_probability: float = 0.15
    max_blocks: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.objective not in ("clm", "mlm"):
            raise ValueError(f"objective {self.objective!r}: clm or mlm")


@dataclass
class PreferenceTask:
    """Rows {"chosen", "rejected", "prompt"?}: a scalar reward model should score chosen above rejected.

    Metrics: pairwise_accuracy (ties count as wrong), mean_margin (chosen - rejected) and the mean
    scores of each side."""

    name: str
    rows: list[dict]
    metrics: tuple[str, ...] = ("pairwise_accuracy", "mean_margin", "reward_chosen", "reward_rejected")


@dataclass
class RewardTask:
    """Prompts continued by a policy and scored by a reward: mean reward (with its standard error), the KL
    to the reference policy on the policy's own samples, distinct-n and length.

    reward_fn(prompts, responses) -> list[float]. reference_model: a frozen model, or None to use the
    evaluated PEFT model with its adapter disabled (KL 0 for a model without one).

    judge: a second scorer the policy was not trained against, reported beside the reward (a policy can
    raise its training reward model's score without getting more positive). "vader": VADER's compound
    sentiment (-1..1) of the response alone; None: no judge."""

    name: str
    rows: list[dict]  # {"prompt": text, ...}
    reward_fn: object = None
    temperature: float | None = 0.7  # None: greedy
    reference_model: object = None
    judge: str | None = "vader"
    metrics: tuple[str, ...] = ("mean_reward", "reward_se", "judge_vader", "judge_vader_se", "kl", "distinct_1",
                                "distinct_2", "mean_length")
