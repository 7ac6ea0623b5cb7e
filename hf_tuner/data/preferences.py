"""Preference pairs: human ratings turned into chosen/rejected pairs, and user files in three shapes.

Every source gives rows {"chosen", "rejected", "prompt", "group"}; `prompt` may be "" and `group` names
the texts a row was built from, so a split never puts one text on both sides.

- vader ground truth (`vader-sentiment`): the mean rating of ~20 human raters per movie-review snippet.
  Two snippets whose ratings differ by at least `min_gap` make a pair; chosen = the more positive one.
  Snippets are split first, so held-out pairs are built from held-out snippets only.
- files (.jsonl/.json/.csv), one shape per row:
    {"chosen": ..., "rejected": ...}                     (optionally with "prompt")
    {"prompt": ..., "ranking": [best, ..., worst]}       expanded into all ordered pairs
    {"prompt": ..., "tie": true, "responses": [...]}      a judged tie (`hf-tuner label` writes them): no pair
  Extra fields (annotator, timestamp, ...) are kept out of training but allowed.
"""

from __future__ import annotations

import random
from itertools import combinations
from pathlib import Path

from hf_tuner.data.files import SUFFIXES, DataError, _read_rows, _text

DEFAULT_SOURCE = "movieReviewSnippets"


def _pair_row(raw, where: str) -> list[dict]:
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with columns, got {type(raw).__name__}")
    prompt = raw.get("prompt") or ""
    if not isinstance(prompt, str):
        raise DataError(f"{where}: `prompt` must be text (conversational preference rows are not supported yet)")
    if raw.get("tie") is True:  # a person found the responses equally good: a record, not a training pair
        return []
    if "ranking" in raw:
        ranking = raw["ranking"]
        if not isinstance(ranking, list) or len(ranking) < 2:
            raise DataError(f"{where}: `ranking` must be a list of at least two responses, best first")
        texts = [_text(t, where, f"ranking[{i}]") for i, t in enumerate(ranking)]
        return [{"prompt": prompt, "chosen": a, "rejected": b, "group": prompt or f"{where}"}
                for a, b in combinations(texts, 2)]
    missing = [c for c in ("chosen", "rejected") if c not in raw]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(f'`{c}`' for c in missing)}: need `chosen` and "
                        f"`rejected` (optionally `prompt`), or `prompt` and `ranking` (columns: {', '.join(raw)})")
    chosen, rejected = _text(raw["chosen"], where, "chosen"), _text(raw["rejected"], where, "rejected")
    if chosen == rejected:
        raise DataError(f"{where}: `chosen` and `rejected` are the same text")
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": prompt or chosen}]


def read_preference_file(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    rows = [pair for i, raw in _read_rows(path) for pair in _pair_row(raw, f"{path} row {i}")]
    if not rows:
        raise DataError(f"{path}: no preference rows")
    return rows


def rating_pairs(snippets: list[dict], n_pairs: int, min_gap: float, seed: int) -> list[dict]:
    """Up to n_pairs distinct pairs of snippets whose mean ratings differ by >= min_gap; chosen = more positive.

    Partners are drawn at random (seeded), so every snippet appears in pairs of many gaps, not only extremes."""
    rng = random.Random(seed)
    if len(snippets) < 2:
        raise DataError(f"{len(snippets)} snippet(s): too few to build preference pairs")
    seen, pairs, tries = set(), [], 0
    while len(pairs) < n_pairs and tries < 50 * n_pairs:
        tries += 1
        a, b = rng.sample(range(len(snippets)), 2)
        x, y = snippets[a], snippets[b]
        if abs(x["rating"] - y["rating"]) < min_gap or (min(a, b), max(a, b)) in seen:
            continue
        seen.add((min(a, b), max(a, b)))
        hi, lo = (x, y) if x["rating"] > y["rating"] else (y, x)
        pairs.append({"prompt": "", "chosen": hi["text"], "rejected": lo["text"], "gap": hi["rating"] - lo["rating"],
                      "group": hi["group"] + "\n" + lo["group"]})
    if not pairs:
        raise DataError(f"no two snippets differ in rating by min_gap={min_gap}")
    return pairs


def vader_snippet_split(dataset_name: str, sources: list[str] | None, eval_snippets: int, seed: int):
    """(train snippets, held-out snippets) from the vader ground truth, split by normalised text."""
    from hf_tuner.data import split_by_group
    from hf_tuner.data.vader import read_ground_truth

    rows = read_ground_truth(dataset_name, sources or [DEFAULT_SOURCE])
    return split_by_group(rows, eval_snippets, seed)


def opening(text: str, words: int) -> str:
    """The first `words` words of a snippet: the prompt an RL policy continues."""
    return " ".join(text.split()[:words])


def load_preferences(dataset_name: str, sources: list[str] | None = None, train_pairs: int = 4000,
                     eval_pairs: int = 500, eval_snippets: int = 1000, min_gap: float = 1.0,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) from `vader-sentiment` (or a folder of its files) or a preference file.

    For a file, whole groups (the prompt, or the chosen text when there is none) are held out."""
    from hf_tuner import assets
    from hf_tuner.data import split_by_group

    path = Path(dataset_name).expanduser()
    if dataset_name not in assets.ASSETS and (path.suffix in SUFFIXES or path.is_file()):
        rows = read_preference_file(path)
        groups = len({r["group"] for r in rows})
        train, held = split_by_group(rows, max(1, min(eval_pairs, groups // 5)), seed)
        return train[:train_pairs] if train_pairs else train, held
    train_snippets, held_snippets = vader_snippet_split(dataset_name, sources, eval_snippets, seed)
    return (rating_pairs(train_snippets, train_pairs, min_gap, seed),
            rating_pairs(held_snippets, eval_pairs, min_gap, seed + 1))


def rl_prompts(dataset_name: str, sources: list[str] | None, eval_snippets: int, seed: int, prompt_words: int,
               eval_prompts: int, train_cap: int | None = None) -> tuple[list[str], list[str], list[dict]]:
    """(train prompts, held-out prompts, held-out pairs) for RL and DPO.

    vader: the openings (`prompt_words` words) of snippets; held-out prompts open the snippets a reward model
    trained with the same `eval_snippets` and `seed` never saw, and the held-out pairs (for the reward
    gate) come from those snippets too. A local file: its `prompt` column, whole prompts held out."""
    from hf_tuner import assets
    from hf_tuner.data import split_by_group

    path = Path(dataset_name).expanduser()
    if dataset_name not in assets.ASSETS and path.suffix in SUFFIXES:
        if not path.is_file():
            raise DataError(f"prompt file not found: {path}")
        rows = []
        for i, raw in _read_rows(path):
            prompt = raw.get("prompt") if isinstance(raw, dict) else None
            rows.append({"prompt": _text(prompt, f"{path} row {i}", "prompt"), "group": prompt})
        train, held = split_by_group(rows, max(1, min(eval_prompts, len(rows) // 5)), seed)
        train_prompts, held_prompts, pairs = [r["prompt"] for r in train], [r["prompt"] for r in held], []
    else:
        train, held = vader_snippet_split(dataset_name, sources, eval_snippets, seed)
        held_prompts = sorted({opening(r["text"], prompt_words) for r in held
                               if len(r["text"].split()) > prompt_words + 2})
        train_prompts = sorted({opening(r["text"], prompt_words) for r in train
                                if len(r["text"].split()) > prompt_words + 2} - set(held_prompts))
        random.Random(seed).shuffle(held_prompts)
        pairs = rating_pairs(held, 300, 1.0, seed + 1)
    return train_prompts[:train_cap] if train_cap else train_prompts, held_prompts[:eval_prompts], pairs


def as_continuations(pairs: list[dict], prompt_words: int, seed: int) -> list[dict]:
    """Pairs of whole snippets written as prompt + chosen/rejected continuations (for DPO).

    The prompt is the opening of one of the two snippets, picked at random (seeded) so that fitting the
    prompt says nothing about which side was preferred; each continuation is its snippet after that many words."""
    rng = random.Random(seed)
    out = []
    for p in pairs:
        rest = {side: " ".join(p[side].split()[prompt_words:]) for side in ("chosen", "rejected")}
        if not rest["chosen"] or not rest["rejected"]:
            continue
        source = p[rng.choice(("chosen", "rejected"))]
        out.append({"prompt": opening(source, prompt_words), "chosen": " " + rest["chosen"],
                    "rejected": " " + rest["rejected"]})
    if not out:
        raise DataError(f"no preference pair is longer than prompt_words={prompt_words} words on both sides")
    return out
