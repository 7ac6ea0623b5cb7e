"""The data layer: one loader over `datasets` (hf_tuner.data.loader) for every recipe, the row shapes it
takes (hf_tuner.data.formats), and the bundled offline sources (hf_tuner.data.builtin)."""

from __future__ import annotations

from hf_tuner.data.files import SUFFIXES, DataError
from hf_tuner.data.formats import sft_row
from hf_tuner.data.loader import Loaded, data_sources, held_out, held_out_size, load_rows, split_by_group
from hf_tuner.data.sources import DataSource

__all__ = ["DataError", "DataSource", "Loaded", "SFT_TYPES", "SFT_COLUMNS", "data_sources", "held_out",
           "held_out_size", "load_examples", "load_rows", "split_by_group", "SUFFIXES"]

SFT_TYPES = {"prompt_completion": "prompt + completion", "language_modeling": "messages"}
SFT_COLUMNS = ("prompt", "completion", "turns", "group", "where")


def load_examples(dataset_name: str, recipe: str = "sft_instruction", config: str | None = None,
                  split: str = "train") -> list[dict]:
    """Rows {"prompt", "completion", "turns", "group", "where"} of one split of any source (held-out tasks,
    `hf-tuner eval`)."""
    src = DataSource(dataset_name, config, train_split=split, test_split=None)
    return load_rows([src], sft_row, recipe, SFT_TYPES, SFT_COLUMNS).train
