"""Dataset sources and formats, validated row by row before any model loads."""

from __future__ import annotations

import random
from pathlib import Path

from hf_tuner.data.files import SUFFIXES, DataError, read_examples

__all__ = ["DataError", "load_examples", "split_by_group", "SUFFIXES"]


def load_examples(dataset_name: str) -> list[dict]:
    """Rows {"prompt", "completion", "group"} from an asset name or a local file.

    Hub datasets are not supported by this source yet: the machines this project runs on are offline.
    """
    from hf_tuner import assets

    if dataset_name == "wordnet-definitions":
        from hf_tuner.data.wordnet import definition_examples

        return definition_examples(assets.resolve(dataset_name))
    path = Path(dataset_name).expanduser()
    if path.suffix in SUFFIXES or path.exists():
        return read_examples(path)
    raise DataError(f"dataset_name {dataset_name!r}: not a known dataset asset (wordnet-definitions) "
                    f"or an existing {'/'.join(sorted(SUFFIXES))} file")


def split_by_group(rows: list[dict], eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `eval_size` whole groups (e.g. words), so no held-out group is seen in training."""
    groups = sorted({r["group"] for r in rows})
    if eval_size >= len(groups):
        raise DataError(f"eval_samples={eval_size} leaves nothing to train on ({len(groups)} distinct prompts)")
    random.Random(seed).shuffle(groups)
    held = set(groups[:eval_size])
    train = [r for r in rows if r["group"] not in held]
    held_rows = [r for r in rows if r["group"] in held]
    return train, held_rows
