"""Local JSON / JSONL / CSV files in `prompt`/`completion` or `messages` form, checked row by row.

We parse the files ourselves rather than with `datasets.load_dataset("json")`: its errors carry no
row number, and its CSV loader guesses types (" 0" becomes the int 0). The checked rows then go
into a `datasets.Dataset`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

SUFFIXES = {".json", ".jsonl", ".csv"}
ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A data file that cannot be used: the message names the file and the row."""


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """(row number as a user would count it, raw row)."""
    if path.suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append((i, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} row {i}: not valid JSON ({e.msg})") from e
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from e
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
        return list(enumerate(data, start=1))
    with open(path, encoding="utf-8", newline="") as f:
        return [(i, row) for i, row in enumerate(csv.DictReader(f), start=2)]  # line 1 is the header


def _text(value, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: `{column}` must be text, got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: `{column}` is empty")
    return value


def _messages(value, where: str, column: str) -> list[dict]:
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: `{column}` is not a JSON list of messages ({e.msg})") from e
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: `{column}` must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: `{column}[{j}]` needs `role` and `content`")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: `{column}[{j}].role` is {m['role']!r}; expected one of {sorted(ROLES)}")
        out.append({"role": m["role"], "content": _text(m["content"], where, f"{column}[{j}].content")})
    return out


def normalize_row(raw, where: str) -> dict:
    """Any supported row -> {"prompt": [messages], "completion": [one assistant message], "group": str}."""
    if not isinstance(raw, dict):
        raise DataError(f"{where}: expected an object with columns, got {type(raw).__name__}")
    if "messages" in raw:
        msgs = _messages(raw["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer, got {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise DataError(f"{where}: `messages` needs at least one message before the assistant's answer")
        prompt, completion = msgs[:-1], msgs[-1:]
    elif "prompt" in raw or "completion" in raw:
        for col in ("prompt", "completion"):
            if col not in raw:
                raise DataError(f"{where}: missing column `{col}` (columns: {', '.join(map(str, raw))})")
        p, c = raw["prompt"], raw["completion"]
        prompt = _messages(p, where, "prompt") if isinstance(p, list) else \
            [{"role": "user", "content": _text(p, where, "prompt")}]
        completion = _messages(c, where, "completion") if isinstance(c, list) else \
            [{"role": "assistant", "content": _text(c, where, "completion")}]
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise DataError(f"{where}: `completion` must be one assistant message")
    else:
        raise DataError(f"{where}: missing columns: need `prompt` and `completion`, or `messages` "
                        f"(columns: {', '.join(map(str, raw)) or 'none'})")
    group = json.dumps(prompt, sort_keys=True)  # identical prompts stay on one side of the split
    return {"prompt": prompt, "completion": completion, "group": group}


def read_examples(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    rows = [normalize_row(raw, f"{path} row {i}") for i, raw in _read_rows(path)]
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
