"""Preference pairs: human ratings turned into chosen/rejected pairs, and user files in three shapes.

Every source gives rows {"chosen", "rejected", "prompt", "group"}; `prompt` may be "" and `group` names
the texts a row was built from, so a split never puts one text on both sides.

- vader ground truth (`vader-sentiment`): the mean rating of ~20 human raters per movie-review snippet.
  Two snippets whose ratings differ by at least `min_gap` make a pair; chosen = the more positive one.
  Snippets are split first, so held-out pairs are built from held-out snippets only.
- any source the loader reads (files, save_to_disk and repo folders, Hub ids), one shape per row:
    {"chosen": ..., "rejected": ...}                     (optionally with "prompt"; text or messages)
    {"prompt": ..., "ranking": [best, ..., worst]}       expanded into all ordered pairs
    {"prompt": ..., "tie": true, "responses": [...]}      a judged tie (`hf-tuner label` writes them): no pair
  Extra fields (annotator, timestamp, ...) are kept out of training but allowed.
"""

from __future__ import annotations

import random
from itertools import combinations
from pathlib import Path

from hf_tuner.data.files import DataError
from hf_tuner.data.formats import preference_row, prompt_row

DEFAULT_SOURCE = "movieReviewSnippets"
# `ranking` and `tie` rows (hf-tuner label writes them) have a prompt and no chosen/rejected: TRL calls that
# prompt-only, so it is accepted here and each row is checked for its own shape.
PREFERENCE_TYPES = {"preference": "chosen + rejected (prompt optional)", "prompt_only": "prompt + ranking or tie"}
PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected", "group", "where")


def is_vader(name) -> bool:
    """The `vader-sentiment` asset, or a local folder of its *_GroundTruth.txt files."""
    if not isinstance(name, str):
        return False
    path = Path(name).expanduser()
    return name == "vader-sentiment" or (path.is_dir() and any(path.glob("*_GroundTruth.txt")))


def _single_name(dataset) -> str | None:
    """The dataset's name when it is one source (a name, or a list of one DataSource), else None."""
    if isinstance(dataset, str):
        return dataset
    return dataset[0].name if len(dataset) == 1 else None


def _sources(dataset):
    from hf_tuner.data.sources import DataSource

    return [DataSource(dataset)] if isinstance(dataset, str) else list(dataset)


def read_preference_file(path: str | Path) -> list[dict]:
    """Every pair of one local file, through the one loader (hf_tuner.data.loader)."""
    from hf_tuner.data.loader import load_rows
    from hf_tuner.data.sources import DataSource

    path = Path(path)
    if not path.is_file():
        raise DataError(f"preference file not found: {path}")
    rows = load_rows([DataSource(str(path), test_split=None)], preference_row, "reward_model",
                     PREFERENCE_TYPES, PREFERENCE_COLUMNS).train
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


def chat_prompt_renderer(model_path: str):
    """messages -> the policy's prompt text (its chat template, with the generation prompt); the tokenizer
    loads on first use, so only conversational prompt data pays for it. The data layer loads no model."""
    state = {}

    def render(messages: list[dict]) -> str:
        if "tokenizer" not in state:
            from transformers import AutoTokenizer

            state["tokenizer"] = AutoTokenizer.from_pretrained(model_path)
        tokenizer = state["tokenizer"]
        if not tokenizer.chat_template:
            raise DataError(f"conversational prompts need a chat template; {model_path} has none")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    return render


def with_prompt(pair: dict) -> dict:
    """A pair whose prompt is implicit (the shared start of chosen and rejected) made explicit, TRL's way."""
    if pair["prompt"]:
        return pair
    from trl.data_utils import extract_prompt

    parts = extract_prompt({"chosen": pair["chosen"], "rejected": pair["rejected"]})
    return {**pair, **{k: v.strip() if isinstance(v, str) else v for k, v in parts.items()},
            "chosen": parts["chosen"], "rejected": parts["rejected"]}


def opening(text: str, words: int) -> str:
    """The first `words` words of a snippet: the prompt an RL policy continues."""
    return " ".join(text.split()[:words])


def load_preferences(dataset, sources: list[str] | None = None, train_pairs: int = 4000,
                     eval_pairs: int | None = 500, eval_snippets: int = 1000, min_gap: float = 1.0,
                     seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train pairs, held-out pairs) from `vader-sentiment` (or a folder of its files), or any preference data
    the loader reads (a name or a list of DataSource): standard or conversational, explicit or implicit prompt.

    The dataset's test split is the held-out set when it has one; otherwise whole groups (the prompt, or the
    chosen text when there is none) are held out."""
    from hf_tuner.data.loader import held_out, load_rows

    name = _single_name(dataset)
    if not is_vader(name):
        data = load_rows(_sources(dataset), preference_row, "reward_model", PREFERENCE_TYPES, PREFERENCE_COLUMNS)
        if not data.train:
            raise DataError(f"{data.label}: no preference rows")
        groups = len({r["group"] for r in data.train})
        size = eval_pairs if data.test is not None else max(1, min(eval_pairs or 500, groups // 5))
        train, held = held_out(data, size, seed)
        return train[:train_pairs] if train_pairs else train, held
    train_snippets, held_snippets = vader_snippet_split(name, sources, eval_snippets, seed)
    return (rating_pairs(train_snippets, train_pairs, min_gap, seed),
            rating_pairs(held_snippets, eval_pairs or 500, min_gap, seed + 1))


def rl_prompts(dataset, sources: list[str] | None, eval_snippets: int, seed: int, prompt_words: int,
               eval_prompts: int | None, train_cap: int | None = None,
               render=None) -> tuple[list[str], list[str], list[dict]]:
    """(train prompts, held-out prompts, held-out pairs) for RL and DPO.

    vader: the openings (`prompt_words` words) of snippets; held-out prompts open the snippets a reward model
    trained with the same `eval_snippets` and `seed` never saw, and the held-out pairs (for the reward
    gate) come from those snippets too. Any other source (a name or a list of DataSource): prompt-only rows
    (standard, or conversational rendered to text by `render(messages)`), held out by its test split or by
    whole prompts."""
    from hf_tuner.data.loader import held_out, load_rows

    name = _single_name(dataset)
    if not is_vader(name):
        data = load_rows(_sources(dataset), prompt_row, "ppo_rlhf", {"prompt_only": "prompt"},
                         ("prompt", "group", "where"))
        size = eval_prompts if data.test is not None else max(1, min(eval_prompts or 64, len(data.train) // 5))
        train, held = held_out(data, size, seed)

        def text(p):
            if isinstance(p, str):
                return p
            if render is None:
                raise DataError("conversational prompts need the policy's chat template to become text")
            return render(p)

        train_prompts, held_prompts, pairs = [text(r["prompt"]) for r in train], [text(r["prompt"]) for r in held], []
    else:
        train, held = vader_snippet_split(name, sources, eval_snippets, seed)
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
