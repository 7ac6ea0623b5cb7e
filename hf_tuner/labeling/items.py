"""What the label page shows, read from files and run folders and checked row by row.

- Ranking items: a prompt and 2 to 4 candidate responses. Candidate files (JSONL/JSON/CSV) hold rows
  {"prompt": ..., "candidates": [text or {"text": ..., "source": ...}, ...]}, as `hf-tuner generate` writes
  them. Rows with the same prompt, in one file or several, are merged, so candidates from two models can
  be ranked together; identical texts are shown once.
- A/B items: a prompt, the base model's answer and the tuned model's answer. From a pairs file with rows
  {"prompt", "base", "tuned"}, from a run folder's `generations.jsonl` (same columns; sft_instruction and
  the RL recipes write it), or from two folders that each hold `generations.jsonl` or an `hf-tuner eval`
  `predictions.json`, matched by prompt.

An item's id is a hash of its prompt, so it stays the same when the files are read again: that is what
resuming and the agreement between annotators key on.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from hf_tuner.data.files import SUFFIXES, DataError, _read_rows, _text

MIN_CANDIDATES, MAX_CANDIDATES = 2, 4


@dataclass(frozen=True)
class Item:
    id: str
    prompt: str
    responses: tuple[str, ...]  # ranking: the candidates; A/B: (base, tuned)
    sources: tuple[str, ...]    # where each response came from ("" when unknown)


def item_id(prompt: str) -> str:
    return hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]


def candidate_id(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:8]


def _rows(path: Path) -> list[tuple[str, dict]]:
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    out = []
    for i, raw in _read_rows(path):
        where = f"{path} row {i}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with columns, got {type(raw).__name__}")
        out.append((where, raw))
    if not out:
        raise DataError(f"{path}: no rows")
    return out


def _answer(value, where: str, column: str) -> str:
    """A model's answer: text, possibly empty (a model may say nothing; that is a fair thing to judge)."""
    if not isinstance(value, str):
        raise DataError(f"{where}: `{column}` must be text, got {type(value).__name__}")
    return value


def _candidate(value, where: str, j: int) -> tuple[str, str]:
    if isinstance(value, dict):
        if "text" not in value:
            raise DataError(f"{where}: `candidates[{j}]` is an object without `text`")
        source = value.get("source", "")
        if not isinstance(source, str):
            raise DataError(f"{where}: `candidates[{j}].source` must be text")
        return _answer(value["text"], where, f"candidates[{j}].text"), source
    return _answer(value, where, f"candidates[{j}]"), ""


def read_candidates(paths: list[str | Path]) -> tuple[list[Item], int]:
    """(ranking items in first-seen prompt order, number of prompts left out for lack of 2 distinct candidates).

    Empty responses are left out: the reward model's reader refuses an empty chosen or rejected text."""
    if not paths:
        raise DataError("give at least one candidates file")
    merged: dict[str, dict] = {}
    for path in paths:
        for where, raw in _rows(Path(path)):
            prompt = _text(raw.get("prompt"), where, "prompt")
            cands = raw.get("candidates")
            if isinstance(cands, str):  # a CSV cell holds JSON text
                try:
                    cands = json.loads(cands)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: `candidates` is not a JSON list ({e.msg})") from e
            if not isinstance(cands, list) or not cands:
                raise DataError(f"{where}: `candidates` must be a non-empty list of responses "
                                f"(columns: {', '.join(raw)})")
            entry = merged.setdefault(prompt, {"texts": {}, "where": []})
            entry["where"].append(where)
            for j, c in enumerate(cands):
                text, source = _candidate(c, where, j)
                if text.strip():  # an empty response cannot be a chosen/rejected text for the reward model
                    entry["texts"].setdefault(text, source)
    items, skipped = [], 0
    for prompt, entry in merged.items():
        texts = entry["texts"]
        if len(texts) < MIN_CANDIDATES:
            skipped += 1
            continue
        if len(texts) > MAX_CANDIDATES:
            raise DataError(f"{', '.join(entry['where'])}: prompt {prompt[:60]!r} has {len(texts)} distinct "
                            f"candidates; the page shows {MIN_CANDIDATES} to {MAX_CANDIDATES}")
        items.append(Item(item_id(prompt), prompt, tuple(texts), tuple(texts.values())))
    if not items:
        raise DataError(f"{', '.join(map(str, paths))}: no prompt has {MIN_CANDIDATES} distinct candidates to rank")
    return items, skipped


def _ab_item(prompt: str, base: str, tuned: str, sources: tuple[str, str], seen: dict, where: str) -> Item:
    if prompt in seen:
        raise DataError(f"{where}: prompt {prompt[:60]!r} appears again (first at {seen[prompt]})")
    seen[prompt] = where
    return Item(item_id(prompt), prompt, (base, tuned), sources)


def read_ab_pairs(path: str | Path, sources: tuple[str, str] | None = None, repeats: str = "error") -> list[Item]:
    """A/B items from rows {"prompt", "base", "tuned"} (other columns ignored).

    repeats: "error" refuses a prompt that comes again; "first" keeps its first row (a run's held-out set
    may hold one prompt twice, with two references)."""
    path = Path(path)
    sources = sources or (f"{path}:base", f"{path}:tuned")
    items, seen = [], {}
    for where, raw in _rows(path):
        missing = [c for c in ("prompt", "base", "tuned") if c not in raw]
        if missing:
            raise DataError(f"{where}: missing column(s) {', '.join(f'`{c}`' for c in missing)}; A/B rows need "
                            f"`prompt`, `base` and `tuned` (columns: {', '.join(raw)})")
        if repeats == "first" and raw["prompt"] in seen:
            continue
        items.append(_ab_item(_text(raw["prompt"], where, "prompt"), _answer(raw["base"], where, "base"),
                              _answer(raw["tuned"], where, "tuned"), sources, seen, where))
    return items


def read_run(run_dir: str | Path) -> list[Item]:
    """A/B items from a recipe run folder: its generations.jsonl (every held-out prompt, base and tuned)."""
    path = Path(run_dir) / "generations.jsonl"
    if not path.is_file():
        raise DataError(f"{run_dir}: no generations.jsonl (sft_instruction, ppo_rlhf and dpo runs write it); "
                        "give --pairs FILE with prompt/base/tuned rows, or --base DIR --tuned DIR")
    name = Path(run_dir).name
    return read_ab_pairs(path, (f"{name}:base", f"{name}:tuned"), repeats="first")


def folder_answers(folder: str | Path, column: str | None) -> tuple[dict[str, str], str]:
    """({prompt: answer}, source name) from a folder's generations.jsonl (column default `tuned`) or an
    `hf-tuner eval` predictions.json (column default: its first decoding/baseline)."""
    folder = Path(folder)
    generations, predictions = folder / "generations.jsonl", folder / "predictions.json"
    if generations.is_file():
        column = column or "tuned"
        answers = {}
        for where, raw in _rows(generations):
            if column not in raw:
                raise DataError(f"{where}: no column `{column}` (columns: {', '.join(raw)})")
            answers[_text(raw.get("prompt"), where, "prompt")] = _answer(raw[column], where, column)
        return answers, f"{folder.name}:{column}"
    if predictions.is_file():
        data = json.loads(predictions.read_text(encoding="utf-8"))
        if "prompts" not in data:
            raise DataError(f"{predictions}: no `prompts` list (written by `hf-tuner eval` from this version on); "
                            "rerun the eval or give --pairs FILE")
        keys = [k for k in data if k not in ("prompts", "references")]
        column = column or (keys[0] if keys else None)
        if column not in data:
            raise DataError(f"{predictions}: no predictions named {column!r}; it has {keys}")
        if len(data[column]) != len(data["prompts"]):
            raise DataError(f"{predictions}: {len(data['prompts'])} prompts but {len(data[column])} `{column}` answers")
        return dict(zip(data["prompts"], data[column])), f"{folder.name}:{column}"
    raise DataError(f"{folder}: neither generations.jsonl nor predictions.json; is this a run or eval folder?")


def read_two_folders(base_dir: str | Path, tuned_dir: str | Path, base_column: str | None = None,
                     tuned_column: str | None = None) -> list[Item]:
    """A/B items from two folders, matched by prompt (in the base folder's order)."""
    base, base_source = folder_answers(base_dir, base_column)
    tuned, tuned_source = folder_answers(tuned_dir, tuned_column)
    shared = [p for p in base if p in tuned]
    if not shared:
        raise DataError(f"{base_dir} and {tuned_dir} have no prompt in common")
    seen: dict = {}
    return [_ab_item(p, base[p], tuned[p], (base_source, tuned_source), seen, f"{base_dir}") for p in shared]
