"""Bad input, table-driven: every case is refused before any model weights load, with a message naming the
field, file or row; on the command line the exit status is 2 and no traceback is printed unless --debug."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import hf_tuner.models
from conftest import NEGATIVE, NOUNS, POSITIVE, WORDS, subprocess_env, write_jsonl
from hf_tuner.assets import AssetError
from hf_tuner.config import ConfigError
from hf_tuner.data import DataError
from recipes import reward_model, sft_classification, sft_instruction

ROOT = Path(__file__).resolve().parents[1]
GOOD_ROWS = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} used in the house"} for w in WORDS * 2]


def _lines(*rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def _instruction(tmp: Path, data: Path) -> dict:
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(data), "output_dir": str(tmp / "run"),
            "eval_samples": 4, "few_shot": 0, "per_device_train_batch_size": 4, "max_steps": 2, "max_length": 64,
            "save_strategy": "no", "report_to": [], "bf16": False}


def _classification(tmp: Path, data: Path) -> dict:
    return {"model_name_or_path": "tiny-bert", "dataset_name": str(data), "output_dir": str(tmp / "run"),
            "eval_samples": 2, "baseline_model": "", "peft_method": "full", "per_device_train_batch_size": 4,
            "max_steps": 2, "save_strategy": "no", "report_to": [], "bf16": False}


def _preferences(tmp: Path, data: Path) -> dict:
    return {"model_name_or_path": "tiny-bert", "dataset_name": str(data), "output_dir": str(tmp / "run"),
            "eval_samples": 2, "peft_method": "full", "per_device_train_batch_size": 4, "max_steps": 2,
            "save_strategy": "no", "report_to": [], "bf16": False}


LABELLED = [{"text": f"the {NOUNS[i % 10]} was {(POSITIVE if i % 2 else NEGATIVE)[i % 8]} ({i})",
             "label": "positive" if i % 2 else "negative"} for i in range(20)]
PAIRS = [{"chosen": f"the {NOUNS[i % 10]} was {POSITIVE[i % 8]} ({i})",
          "rejected": f"the {NOUNS[i % 10]} was {NEGATIVE[i % 8]} ({i})"} for i in range(20)]

# (case, recipe, config builder, data file name, data file text or bytes, config overrides, error, message)
CASES = [
    ("unknown config key", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS), {"lerning_rate": 1e-3},
     ConfigError, "unknown field(s): `lerning_rate` (did you mean `learning_rate`?)"),
    ("wrong type", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS), {"learning_rate": "fast"},
     ConfigError, "learning_rate: invalid float value: 'fast'"),
    ("zero learning rate", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS), {"learning_rate": 0},
     ConfigError, "learning_rate: must be positive"),
    ("negative batch size", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS),
     {"per_device_train_batch_size": -4}, ConfigError, "per_device_train_batch_size: must be positive, got -4"),
    ("zero steps", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS), {"max_steps": 0},
     ConfigError, "max_steps: must be positive"),
    ("missing column", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS[:2], {"prompt": "Define 'x'."}),
     {}, DataError, "d.jsonl row 3: missing column `completion`"),
    ("empty text", sft_instruction, _instruction, "d.jsonl", _lines(GOOD_ROWS[0], {"prompt": "x", "completion": " "}),
     {}, DataError, "d.jsonl row 2: `completion` is empty"),
    ("non-UTF-8 file", sft_instruction, _instruction, "d.jsonl",
     _lines(*GOOD_ROWS[:2]).encode() + '{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"),
     {}, DataError, "d.jsonl line 3: not UTF-8 text (byte 0xe9"),
    ("row not valid JSON", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS[:2], '{"prompt": "x",'),
     {}, DataError, "d.jsonl row 3: not valid JSON"),
    ("label outside the label set", sft_classification, _classification, "l.jsonl",
     _lines(*LABELLED[:5], {"text": "the plot was fine", "label": "neutral"}), {}, DataError,
     "l.jsonl row 6: `label` 'neutral' is not in the label set ['negative', 'positive']"),
    ("chosen equal to rejected", reward_model, _preferences, "p.jsonl",
     _lines(*PAIRS[:3], {"chosen": "same words", "rejected": "same words"}), {}, DataError,
     "p.jsonl row 4: `chosen` and `rejected` are the same text"),
    ("dataset smaller than one batch", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS),
     {"per_device_train_batch_size": 64}, DataError, "d.jsonl: 32 training example(s) is less than one batch"),
    ("too long without truncation", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS),
     {"truncation": False, "max_length": 12}, DataError, "tokens, longer than max_length=12, and truncation is off"),
    ("PEFT method misfit", sft_classification, _classification, "l.jsonl", _lines(*LABELLED),
     {"peft_method": "llama-adapter"}, ConfigError, "peft_method 'llama-adapter' does not fit bert"),
    ("model path missing", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS),
     {"model_name_or_path": "/nonexistent/models/llama"}, AssetError, "model path /nonexistent/models/llama does not"),
    ("Hub id while offline", sft_instruction, _instruction, "d.jsonl", _lines(*GOOD_ROWS),
     {"model_name_or_path": "some-org/some-model"}, AssetError,
     "this machine is offline (HF_HUB_OFFLINE=1) and it is not in the Hugging Face cache"),
]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight loading fails the test: every refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was refused")

    monkeypatch.setattr(hf_tuner.models, "load_model", refuse)
    monkeypatch.setattr(hf_tuner.models, "load_seq2seq_model", refuse)


@pytest.mark.parametrize("case, recipe, build, name, content, overrides, error, message", CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_before_weights_load(tmp_path, tiny_llama, no_weights, case, recipe, build, name,
                                                  content, overrides, error, message):
    data = tmp_path / name
    data.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error) as caught:
        recipe.train({**build(tmp_path, data), **overrides})
    assert message in str(caught.value)
    assert not (tmp_path / "run").exists(), "a refused run must not create its run folder"


def test_an_existing_run_folder_is_kept(tmp_path, tiny_llama, no_weights):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="already exists and is not empty.*--overwrite_output_dir"):
        sft_instruction.train(_instruction(tmp_path, data))
    assert (tmp_path / "run" / "metrics.json").read_text() == "{}"


def _cli(tmp_path, *extra):
    data = write_jsonl(tmp_path / "d.jsonl", GOOD_ROWS)
    cmd = [sys.executable, str(ROOT / "recipes" / "sft_instruction.py"), "--config",
           str(ROOT / "recipes" / "configs" / "sft_instruction.yaml"), "--dataset_name", str(data),
           "--model_name_or_path", "tiny-llama", "--output_dir", str(tmp_path / "run"), "--learning_rate", "-1", *extra]
    return subprocess.run(cmd, env=subprocess_env(), cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_command_line_exits_2_with_one_line_and_a_traceback_only_with_debug(tmp_path, tiny_llama):
    plain = _cli(tmp_path)
    assert plain.returncode == 2
    assert "error: " in plain.stderr and "learning_rate: must be positive, got -1.0" in plain.stderr
    assert "Traceback" not in plain.stderr
    debug = _cli(tmp_path, "--debug")
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
