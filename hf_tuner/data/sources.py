"""Where a dataset comes from: every source opens through `datasets` into named splits.

`open_splits(source)` takes what a user writes as `dataset_name`:
- an asset name (`wordnet-definitions`, `vader-sentiment`, `pydoc-topics`, ...): built by our own readers,
  because their raw files (WordNet's database, VADER's TSV, YAML dialogues) are no format `datasets` reads;
- a local file: `.jsonl`/`.json` (json), `.csv`, `.parquet`, `.arrow`, `.txt`/`.md` (text, one row per
  paragraph);
- a folder written by `save_to_disk`;
- a local dataset repo folder (data files, with or without a README `configs:` block; splits from file names);
- a Hub id (needs the Hub, or the dataset in the local cache when offline).
and returns {split name: Dataset or IterableDataset}. Loading goes through `datasets.load_dataset` /
`load_from_disk`, so file-backed data is converted to Arrow once and served from the datasets cache after.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from hf_tuner.data.files import DataError, check_utf8, diagnose_file

# suffix -> datasets' packaged builder
BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow",
            ".txt": "text", ".md": "text"}


@dataclass
class DataSource:
    """One dataset as a recipe reads it: TRL's ScriptArguments names, plus a column mapping."""

    name: str
    config: str | None = None
    train_split: str = "train"
    test_split: str | None = "test"
    test_split_explicit: bool = False  # named in the config: a missing split is then an error
    streaming: bool = False
    columns: dict | None = None  # our name -> the dataset's name, e.g. {prompt: question}
    weight: float | None = None  # mixtures: the share of this dataset's training rows kept
    extra: dict = field(default_factory=dict)  # data_files / data_dir of a mixture entry

    def label(self) -> str:
        return self.name + (f" ({self.config})" if self.config else "")


def is_hub_id(name: str) -> bool:
    """`org/name` or `name` that is neither an existing path nor something with a file suffix."""
    p = Path(name).expanduser()
    return not p.exists() and p.suffix not in BUILDERS and not name.startswith((".", "/", "~"))


def _offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def _hub_error(src: DataSource, e: Exception) -> DataError:
    if _offline():
        return DataError(
            f"dataset_name {src.name!r} is a Hub id, but this machine is offline (HF_HUB_OFFLINE=1) and the dataset "
            "is not in the datasets cache. Download it where the Hub is reachable (`hf download "
            f"{src.name} --repo-type dataset --local-dir DIR`), copy DIR here and set dataset_name: DIR; or set "
            f"HF_HUB_OFFLINE=0 and HF_DATASETS_OFFLINE=0 on a machine with network ({type(e).__name__}: {e})")
    return DataError(f"dataset_name {src.name!r}: could not load it from the Hub ({type(e).__name__}: {e})")


def _as_splits(loaded) -> dict:
    from datasets import Dataset, IterableDataset

    if isinstance(loaded, (Dataset, IterableDataset)):
        return {"train": loaded}
    return dict(loaded)


def _load_file(path: Path, src: DataSource) -> dict:
    from datasets import Features, Value, load_dataset

    builder = BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {sorted(BUILDERS)}, a folder "
                        "written by save_to_disk, or a dataset repo folder")
    kwargs = {}
    if builder in ("json", "csv", "text"):
        check_utf8(path)
    if builder == "csv":
        # datasets' CSV reader guesses types (" 0" becomes the int 0): read every column as text.
        import csv

        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            header = next(csv.reader(f), [])
        kwargs = {"features": Features({c: Value("string") for c in header}), "keep_default_na": False}
    if builder == "text":
        kwargs = {"sample_by": "paragraph"}
    try:
        return _as_splits(load_dataset(builder, data_files={"train": str(path)}, streaming=src.streaming, **kwargs))
    except Exception as e:  # noqa: BLE001 - datasets' errors carry no row number; find the row, or re-raise
        diagnose_file(path)  # raises DataError naming the line/row when our reader finds the fault
        raise DataError(f"{path}: datasets could not read it ({type(e).__name__}: {e})") from e


def _load_folder(path: Path, src: DataSource) -> dict:
    from datasets import load_dataset, load_from_disk

    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # save_to_disk
        splits = _as_splits(load_from_disk(str(path)))
        if src.streaming:
            splits = {k: v.to_iterable_dataset() for k, v in splits.items()}
        return splits
    try:
        return _as_splits(load_dataset(str(path), name=src.config, streaming=src.streaming, **src.extra))
    except ValueError as e:  # datasets names the configs a folder has when one is missing or unknown
        raise DataError(f"dataset_name {path}: {' '.join(str(e).split())} (set dataset_config)") from e
    except FileNotFoundError as e:
        raise DataError(f"dataset_name {path}: no data files datasets can read in this folder ({e})") from e


def open_splits(src: DataSource) -> dict:
    """{split: Dataset | IterableDataset} of one source (the bundled ones: hf_tuner.data.builtin)."""
    from hf_tuner.data.builtin import BUILTIN, builtin_splits

    if src.name in BUILTIN:
        splits = builtin_splits(src.name)
        if src.streaming:
            splits = {k: v.to_iterable_dataset() for k, v in splits.items()}
        return splits
    path = Path(src.name).expanduser()
    if path.is_file():
        return _load_file(path, src)
    if path.is_dir():
        return _load_folder(path, src)
    if not is_hub_id(src.name):
        raise DataError(f"data file not found: {path}")
    from datasets import load_dataset

    try:
        return _as_splits(load_dataset(src.name, name=src.config, streaming=src.streaming, **src.extra))
    except (ConnectionError, FileNotFoundError, OSError) as e:
        raise _hub_error(src, e) from e
    except ValueError as e:
        raise DataError(f"dataset_name {src.name!r}: {e}") from e


def pick_splits(src: DataSource, splits: dict):
    """(train split, test split or None) as the config names them; a split the config names must exist."""
    have = sorted(splits)
    if src.train_split not in splits:
        raise DataError(f"{src.label()}: no split {src.train_split!r} (dataset_train_split); it has: {', '.join(have)}")
    test = splits.get(src.test_split) if src.test_split else None
    if src.test_split and test is None and src.test_split_explicit:
        raise DataError(f"{src.label()}: no split {src.test_split!r} (dataset_test_split); it has: {', '.join(have)}")
    if src.test_split == src.train_split:
        test = None
    return splits[src.train_split], test
