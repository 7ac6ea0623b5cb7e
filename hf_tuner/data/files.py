"""Our own reading of local JSON / JSONL / CSV files, kept for what `datasets` does not do.

Datasets load through `datasets` (hf_tuner.data.sources). Its errors carry no row number, and pyarrow's JSON
reader takes non-UTF-8 bytes and fails much later, so when `datasets` refuses a file this reader finds the
line or row at fault (`diagnose_file`), and `check_utf8` checks the encoding first. The labelling tools read
their small JSONL records with `_read_rows` too.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

SUFFIXES = {".json", ".jsonl", ".csv"}
ROLES = {"system", "user", "assistant"}


from hf_tuner.errors import DataError  # noqa: E402,F401 - re-exported: `from hf_tuner.data import DataError`


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


def check_utf8(path: Path, chunk: int = 1 << 24) -> None:
    """Refuse a text file that is not UTF-8, naming the line and byte; read in chunks, so a corpus of many GB
    costs about a second per GB and no memory. (pyarrow's JSON reader takes such bytes and fails much later.)"""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, lines = 0, 0
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:
                at = offset + e.start
                line = lines + block.count(b"\n", 0, max(e.start, 0)) + 1
                bad = block[e.start] if 0 <= e.start < len(block) else 0
                raise DataError(f"{path} line {line}: not UTF-8 text (byte {bad:#04x} at offset {at}); "
                                "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from e
            if not block:
                return
            offset += len(block)
            lines += block.count(b"\n")


def diagnose_file(path: Path) -> None:
    """Find the line or row of a JSON/JSONL/CSV file that `datasets` refused (its errors name none): raises
    DataError naming it, or returns when our reader finds no fault either."""
    if path.suffix in SUFFIXES:
        _read_rows(path)


