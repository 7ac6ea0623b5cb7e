"""One labelling round, without HTTP: which item comes next, how it is laid out, and what a judgment writes.

Layouts (the order of the candidates, which side base is on) are drawn from a generator seeded by
(seed, annotator, item), so a reload or a restarted server shows the same item the same way, and the
keys the person pressed keep their meaning. A/B layouts are never sent to the page until the round ends.

A judgment is final: submitting the same one again (a double click, a resent form) records nothing and
succeeds; submitting a different one for an item already judged is refused (409).
"""

from __future__ import annotations

import random
import re
import secrets
import uuid
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path

from hf_tuner.labeling.items import Item, candidate_id
from hf_tuner.labeling.store import JudgmentLog

MODES = ("rank", "ab")
CHOICES = ("left", "right", "tie")
_ANNOTATOR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")
_ORDER = re.compile(r"[1-9]([>=][1-9])*")


class JudgmentError(Exception):
    """A judgment the round refuses; `status` is the HTTP status the page answers with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def parse_order(text: str, k: int) -> list[list[int]]:
    """"2>1=3" -> [[2], [1, 3]]: display positions (1-based), best first, `=` for a tie; every position once."""
    text = text.replace(" ", "")
    if not _ORDER.fullmatch(text):
        raise JudgmentError(400, f"`order` {text[:40]!r} is not a ranking such as 2>1=3 (positions 1 to {k}, "
                                 "best first, > between ranks, = for a tie)")
    groups = [[int(p) for p in group.split("=")] for group in text.split(">")]
    flat = [p for g in groups for p in g]
    bad = sorted({p for p in flat if not 1 <= p <= k})
    twice = sorted({p for p in flat if flat.count(p) > 1})
    missing = sorted(set(range(1, k + 1)) - set(flat))
    if bad or twice or missing:
        problems = [f"no position {bad}" * bool(bad), f"{twice} given twice" * bool(twice),
                    f"{missing} not ranked" * bool(missing)]
        raise JudgmentError(400, f"`order` {text!r}: {'; '.join(p for p in problems if p)} "
                                 f"(rank all {k} responses)")
    return groups


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class LabelSession:
    """A round over `items` for one annotator, writing to `output`."""

    def __init__(self, mode: str, items: list[Item], output: str | Path, annotator: str, seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: expected one of {MODES}")
        if not _ANNOTATOR.fullmatch(annotator or ""):
            raise ValueError(f"annotator {annotator!r}: use 1 to 64 letters, digits or . _ @ - (no spaces)")
        if not items:
            raise ValueError("no items to label")
        self.mode, self.items, self.annotator, self.seed = mode, items, annotator, seed
        self.by_id = {item.id: item for item in items}
        if len(self.by_id) != len(items):
            raise ValueError("two items share a prompt")
        required = ("item_id", "annotator", "order") if mode == "rank" else ("item_id", "annotator", "winner")
        self.log = JudgmentLog(output, required)
        self.token = secrets.token_urlsafe(18)  # proves a post came from a page this server rendered

    @property
    def output(self) -> Path:
        return self.log.path

    def layout(self, item: Item) -> list[int]:
        """layout[p] = index into item.responses of the response shown at position p."""
        order = list(range(len(item.responses)))
        random.Random(f"{self.seed}:{self.annotator}:{item.id}").shuffle(order)
        return order

    def judged(self) -> dict[str, list[dict]]:
        return {k: v for k, v in self.log.by_item(self.annotator).items() if k in self.by_id}

    def progress(self) -> tuple[int, int]:
        return len(self.judged()), len(self.items)

    def current(self) -> Item | None:
        done = self.judged()
        return next((item for item in self.items if item.id not in done), None)

    def submit(self, item_id: str, value: str) -> str:
        """Record a judgment: `value` is an order ("2>1=3") in rank mode, left/right/tie in A/B mode.
        Returns "recorded" or "duplicate"; raises JudgmentError for anything else."""
        item = self.by_id.get(item_id)
        if item is None:
            raise JudgmentError(404, f"no item {item_id[:40]!r} in this round")
        rows = self._rank_rows(item, value) if self.mode == "rank" else self._ab_rows(item, value)
        key = "order" if self.mode == "rank" else "winner"
        with self.log.lock:
            prior = self.log.by_item(self.annotator).get(item.id)
            if prior:
                if prior[0][key] == rows[0][key]:
                    return "duplicate"
                raise JudgmentError(409, f"item {item.id} was already judged ({key} {prior[0][key]!r}); "
                                         "judgments are final")
            self.log.append(rows)
        return "recorded"

    def _common(self, item: Item) -> dict:
        return {"item_id": item.id, "annotator": self.annotator, "timestamp": now(), "judgment_id": uuid.uuid4().hex}

    def _rank_rows(self, item: Item, value: str) -> list[dict]:
        """Every pair of responses: a chosen/rejected row, or a tie row (which the reward model's reader skips)."""
        layout = self.layout(item)
        groups = [[layout[p - 1] for p in g] for g in parse_order(value, len(item.responses))]
        level = {idx: rank for rank, g in enumerate(groups) for idx in g}
        texts = item.responses
        order = ">".join("=".join(sorted(candidate_id(texts[i]) for i in g)) for g in groups)
        common = {"order": order, **self._common(item)}
        rows = []
        for a, b in combinations(range(len(texts)), 2):
            if level[a] == level[b]:
                rows.append({"prompt": item.prompt, "tie": True, "responses": [texts[a], texts[b]], **common})
                continue
            hi, lo = (a, b) if level[a] < level[b] else (b, a)
            row = {"prompt": item.prompt, "chosen": texts[hi], "rejected": texts[lo], **common}
            if item.sources[hi] or item.sources[lo]:
                row.update(chosen_source=item.sources[hi], rejected_source=item.sources[lo])
            rows.append(row)
        return rows

    def _ab_rows(self, item: Item, choice: str) -> list[dict]:
        if choice not in CHOICES:
            raise JudgmentError(400, f"`choice` {choice[:20]!r}: expected one of {', '.join(CHOICES)}")
        sides = ["base", "tuned"]
        left, right = (sides[i] for i in self.layout(item))
        winner = {"left": left, "right": right, "tie": "tie"}[choice]
        base, tuned = item.responses
        return [{"prompt": item.prompt, "base": base, "tuned": tuned, "left": left, "choice": choice,
                 "winner": winner, **self._common(item), "base_source": item.sources[0],
                 "tuned_source": item.sources[1]}]
