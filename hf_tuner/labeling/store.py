"""The append-only JSONL file a labelling round writes: every judgment is on disk before the page moves on.

Each judgment is one `write` of all its lines to a file opened for appending, then `fsync`, so a closed tab
or a killed server loses nothing that the page showed as saved. Reading the file back is how a round
resumes. A last line cut short by a crash mid-write (no newline, not valid JSON) is the only damage such a
file can have; it is cut off with a warning, because the reward model's reader would refuse the file.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

from hf_tuner.data.files import DataError


class JudgmentLog:
    """The rows of one output file, and appending to it. Safe to share between request threads."""

    def __init__(self, path: str | Path, required: tuple[str, ...] = ("item_id", "annotator")):
        self.path = Path(path)
        self.required = required
        self.lock = threading.Lock()
        self.rows: list[dict] = self._read() if self.path.exists() else []

    def _read(self) -> list[dict]:
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1].strip():  # no final newline: the last write may have been cut short
            try:
                json.loads(lines[-1])
            except json.JSONDecodeError:
                cut = len(data) - len(lines[-1])
                print(f"warning: {self.path}: the last line is incomplete (a write was interrupted); "
                      f"removing its {len(lines[-1])} bytes", file=sys.stderr)
                with open(self.path, "r+b") as f:
                    f.truncate(cut)
                    os.fsync(f.fileno())
                lines = lines[:-1]
            else:
                with open(self.path, "ab") as f:  # a whole row without its newline: finish the line
                    f.write(b"\n")
                    os.fsync(f.fileno())
        rows = []
        for i, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{self.path} row {i}: not valid JSON ({e.msg})") from e
            missing = [c for c in self.required if not isinstance(row, dict) or c not in row]
            if missing:
                raise DataError(f"{self.path} row {i}: no {', '.join(missing)}; this file was not written by "
                                "this mode of `hf-tuner label` (use another --output)")
            rows.append(row)
        return rows

    def append(self, rows: list[dict]) -> None:
        """Write rows (one judgment) in one write call and fsync. The caller holds self.lock."""
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
        new = not self.path.exists()
        if new:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        if new:  # the file's directory entry must survive a crash too
            fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.rows.extend(rows)

    def by_item(self, annotator: str) -> dict[str, list[dict]]:
        """{item_id: the rows of this annotator's judgment of it}."""
        out: dict[str, list[dict]] = {}
        for r in self.rows:
            if r["annotator"] == annotator:
                out.setdefault(r["item_id"], []).append(r)
        return out
