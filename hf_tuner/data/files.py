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


def read_text(path: Path) -> str:
    """A file's UTF-8 text; anything else is refused with the line and byte where decoding failed."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}); "
                        "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from e


def _read_rows(path: Path) -> list[tuple[int, object]]:
    """(row number as a user would count it, raw row)."""
    text = read_text(path)
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append((i, json.loads(line)))
            except json.JSONDecodeError as e:
                raise DataError(f"{path} row {i}: not valid JSON ({e.msg})") from e
        return rows
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON at line {e.lineno} ({e.msg})") from e
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows (or {{\"data\": [...]}})")
        return list(enumerate(data, start=1))
    import io

    return [(i, row) for i, row in enumerate(csv.DictReader(io.StringIO(text, newline="")), start=2)]  # 1: header


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
    return {"prompt": prompt, "completion": completion, "group": group, "where": where}


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


def read_labelled(path: str | Path, labels: list[str]) -> list[dict]:
    """Rows {"text", "label", "group", "where"} of a classification file with `text` and `label` columns;
    a label outside `labels` is refused with its row."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    if path.suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(SUFFIXES)}")
    rows = []
    for i, raw in _read_rows(path):
        where = f"{path} row {i}"
        if not isinstance(raw, dict):
            raise DataError(f"{where}: expected an object with columns, got {type(raw).__name__}")
        for col in ("text", "label"):
            if col not in raw:
                raise DataError(f"{where}: missing column `{col}` (columns: {', '.join(map(str, raw)) or 'none'})")
        text, label = _text(raw["text"], where, "text"), str(raw["label"]).strip()
        if label not in labels:
            raise DataError(f"{where}: `label` {raw['label']!r} is not in the label set {labels} (set `labels`)")
        rows.append({"text": text, "label": label, "group": " ".join(text.lower().split()), "where": where})
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows
