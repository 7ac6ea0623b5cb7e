"""The one loader every recipe calls: sources -> checked rows -> train and held-out.

    sources = data_sources(cfg)                      # dataset_name/config/splits/streaming, or dataset_mixture
    data = load_rows(sources, sft_row, "sft_instruction", ("prompt_completion", "language_modeling"))
    train_rows, held_rows = held_out(data, cfg.run.eval_samples, cfg.run.split_seed)

Each source opens through `datasets` (hf_tuner.data.sources). Its rows are standardized and checked by a
recipe's row function (hf_tuner.data.formats) inside a batched `map`, before any model loads; a refusal
names the dataset, the split and the row. A dataset's own test split is the held-out set; without one,
whole groups (identical prompts) are carved out of train, and the run says so.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from hf_tuner.data.files import DataError
from hf_tuner.data.formats import accepts, check_columns, row_type, standardize
from hf_tuner.data.sources import BUILDERS, DataSource, open_splits, pick_splits

STREAM_BATCH = 256
AUTO_HELD_OUT_MAX = 200  # unless eval_samples is set: 10% of the distinct prompts, at most this many


@dataclass
class Loaded:
    """Checked rows of every source: `train` is a list (or an IterableDataset when streaming); `test` is the
    sources' own test split when they have one, else None."""

    train: object
    test: list | None
    counts: dict = field(default_factory=dict)  # source -> {"train": n, "test": n}
    streaming: bool = False
    label: str = ""
    notes: list = field(default_factory=list)


STREAMING_RECIPES = "continued_pretraining and sft_instruction"


def data_sources(cfg, default: str | None = None, streams: bool = False) -> list[DataSource]:
    """The sources a config names: `dataset_mixture`, else dataset_name with TRL's split fields.
    `streams`: the recipe trains from an IterableDataset; the others refuse dataset_streaming."""
    script, run = cfg.script, cfg.run
    if script.dataset_streaming and not streams:
        raise DataError(f"dataset_streaming: this recipe reads its data into memory; {STREAMING_RECIPES} stream")
    mixture = getattr(run, "dataset_mixture", None)
    given = getattr(cfg, "given", frozenset())
    if mixture:
        if script.dataset_name and "dataset_name" in given:
            raise DataError("dataset_name and dataset_mixture are both set; a mixture names its datasets itself")
        return mixture_sources(mixture, script, getattr(run, "dataset_columns", None))
    name = script.dataset_name or default
    if not name:
        raise DataError("dataset_name is required (an asset, a local file or folder, or a Hub id)")
    return [DataSource(name, script.dataset_config, script.dataset_train_split, script.dataset_test_split,
                       test_split_explicit="dataset_test_split" in given, streaming=bool(script.dataset_streaming),
                       columns=getattr(run, "dataset_columns", None))]


MIXTURE_KEYS = {"id", "path", "config", "name", "split", "test_split", "columns", "weight", "data_files", "data_dir"}


def mixture_sources(mixture: dict, script, columns: dict | None) -> list[DataSource]:
    """alignment-handbook's `dataset_mixture`: {datasets: [{id, config, split, columns, weight}], seed, ...}.

    `columns` of an entry is a mapping (our name -> its name) or a list of columns kept; `weight` is the share
    of that dataset's training rows used (alignment-handbook's meaning), drawn with the mixture's seed."""
    entries = mixture.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise DataError("dataset_mixture.datasets: need a list of datasets, each with an `id` (or `path`)")
    out = []
    for i, e in enumerate(entries):
        where = f"dataset_mixture.datasets[{i}]"
        if not isinstance(e, dict) or not (e.get("id") or e.get("path")):
            raise DataError(f"{where}: needs `id` (or `path`): an asset, a local file or folder, or a Hub id")
        unknown = sorted(set(e) - MIXTURE_KEYS)
        if unknown:
            raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(MIXTURE_KEYS))}")
        weight = e.get("weight")
        if weight is not None and not (isinstance(weight, (int, float)) and 0 < weight <= 1):
            raise DataError(f"{where}.weight: {weight!r} must lie in (0, 1]: the share of its rows used")
        cols = e.get("columns")
        if isinstance(cols, list):  # alignment-handbook: the columns kept, in TRL's names already
            cols = None
        if cols is not None and not isinstance(cols, dict):
            raise DataError(f"{where}.columns: a mapping of our name -> its column, or a list of columns kept")
        extra = {k: e[k] for k in ("data_files", "data_dir") if k in e}
        out.append(DataSource(e.get("id") or e["path"], e.get("config") or e.get("name"), e.get("split", "train"),
                              e.get("test_split", script.dataset_test_split), test_split_explicit="test_split" in e,
                              streaming=bool(script.dataset_streaming), columns=cols or columns, weight=weight,
                              extra=extra))
    return out


def _where(src: DataSource, split: str) -> Callable[[int], str]:
    """How a row is named in errors: a file's row as a user counts it, or dataset + split + row index."""
    path = Path(src.name).expanduser()
    if path.is_file() and BUILDERS.get(path.suffix) in ("json", "csv"):
        offset = 2 if path.suffix == ".csv" else 1  # CSV: the header is line 1
        return lambda i: f"{path} row {i + offset}"
    return lambda i: f"{src.label()} split {split} row {i}"


def checked(ds, row_fn: Callable, where: Callable[[int], str], mapping: dict | None, columns: tuple[str, ...],
            source: str | None = None):
    """`ds` mapped, in batches, through standardize + `row_fn(row, where) -> row | [rows]`.

    Streaming datasets are checked lazily, as they are read."""
    from datasets import Dataset

    def batch(rows: dict, indices: list[int]) -> dict:
        out = defaultdict(list, {c: [] for c in columns})
        names = list(rows)
        for k, i in enumerate(indices):
            w = where(i)
            result = row_fn(standardize({c: rows[c][k] for c in names}, mapping, w), w)
            for r in (result if isinstance(result, list) else [result]):
                for c in columns:
                    out[c].append(r.get(c))
                if source is not None:
                    out["source"].append(source)
        return dict(out)

    names = ds.column_names or list(next(iter(ds)).keys())
    # a stream is checked in batches of STREAM_BATCH as it is read
    kwargs = {"desc": f"checking {source or 'rows'}"} if isinstance(ds, Dataset) else {"batch_size": STREAM_BATCH}
    return ds.map(batch, batched=True, with_indices=True, remove_columns=names, **kwargs)


def load_rows(sources: list[DataSource], row_fn: Callable, recipe: str, kinds: dict | tuple,
              columns: tuple[str, ...], materialize: bool = True) -> Loaded:
    """Open every source, check its type against what `recipe` takes, and check every row (streaming: as
    read). Rows carry `source` when several datasets are mixed. materialize=False keeps the training rows an
    Arrow-backed Dataset (memory-mapped, for corpora larger than memory) instead of a list."""
    from datasets import concatenate_datasets
    from datasets import interleave_datasets

    kinds = dict.fromkeys(kinds) if not isinstance(kinds, dict) else kinds
    trains, tests, counts, notes = [], [], {}, []
    mixed = len(sources) > 1
    for n, src in enumerate(sources):
        train, test = pick_splits(src, open_splits(src))
        first = next(iter(train), None)
        if first is None:
            raise DataError(f"{src.label()} split {src.train_split}: no rows")
        check_columns(list(first), src.columns, src.label())
        row = standardize(first, src.columns, f"{src.label()} split {src.train_split} row 0")
        accepts(recipe, kinds, row_type(row), row, src.label())
        label = src.label() if mixed else None
        train = checked(train, row_fn, _where(src, src.train_split), src.columns, columns, label)
        if test is not None:
            test = checked(test, row_fn, _where(src, src.test_split), src.columns, columns, label)
        if src.weight is not None and not src.streaming:
            keep = max(1, round(src.weight * len(train)))
            train = train.shuffle(seed=n).select(range(keep))
        trains.append(train)
        if test is not None:
            tests.append(test)
        if not src.streaming:
            counts[src.label()] = {"train": len(train), "test": len(test) if test is not None else 0}
    streaming = any(s.streaming for s in sources)
    if streaming:
        train = trains[0] if len(trains) == 1 else interleave_datasets(trains, seed=0)
        test = [r for t in tests for r in t] if tests else None
    else:
        train = trains[0] if len(trains) == 1 else concatenate_datasets(trains)
        train = train.to_list() if materialize else train
        test = concatenate_datasets(tests).to_list() if tests else None
        if not len(train):
            raise DataError(f"{', '.join(s.label() for s in sources)}: no usable training rows")
    if tests and len(tests) < len(sources):
        notes.append("held-out: only some mixture sources have a test split; those splits are the held-out set")
    return Loaded(train, test, counts, streaming, " + ".join(s.label() for s in sources), notes)


def held_out_size(eval_samples: int | None, n_groups: int) -> int:
    """eval_samples when set; otherwise 10% of the distinct prompts, at least 1 and at most 200."""
    return eval_samples if eval_samples else max(1, min(AUTO_HELD_OUT_MAX, n_groups // 10))


def split_by_group(rows: list[dict], eval_size: int | None, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `eval_size` whole groups (e.g. words), so no held-out group is seen in training.
    eval_size None: held_out_size's automatic size."""
    groups = sorted({r["group"] for r in rows})
    eval_size = held_out_size(eval_size, len(groups))
    if eval_size >= len(groups):
        raise DataError(f"eval_samples={eval_size} leaves nothing to train on ({len(groups)} distinct prompts)")
    random.Random(seed).shuffle(groups)
    held = set(groups[:eval_size])
    train = [r for r in rows if r["group"] not in held]
    held_rows = [r for r in rows if r["group"] in held]
    return train, held_rows


def held_out(data: Loaded, eval_samples: int | None, seed: int, log=print):
    """(train rows, held-out rows): the test split (first eval_samples rows) when there is one, else a
    group-aware carve from train. Streaming without a test split: the first rows of the stream are held out."""
    for note in data.notes:
        log(note)
    if data.test is not None:
        n = eval_samples or AUTO_HELD_OUT_MAX
        log(f"held-out: the dataset's test split ({len(data.test)} rows, {min(n, len(data.test))} evaluated); "
            "nothing carved out of train")
        train_groups = None if data.streaming else {r["group"] for r in data.train}
        overlap = 0 if train_groups is None else sum(r["group"] in train_groups for r in data.test[:n])
        if overlap:
            log(f"warning: {overlap} held-out row(s) share their prompt with a training row")
        return data.train, data.test[:n]
    if data.streaming:
        n = eval_samples or AUTO_HELD_OUT_MAX
        held = list(data.train.take(n))
        log(f"held-out: no test split in {data.label}; the first {len(held)} rows of the stream are held out "
            "and skipped in training")
        return data.train.skip(n), held
    train, held = split_by_group(data.train, eval_samples, seed)
    groups = len({r["group"] for r in held})
    log(f"held-out: no test split in {data.label}; {groups} of {groups + len({r['group'] for r in train})} distinct "
        f"prompts carved out of train (whole prompts, split_seed={seed})")
    return train, held
