"""What every recipe run shares: its result object, its training summary and its command-line entry point."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable


@dataclass
class RunResult:
    output_dir: Path
    metrics: dict
    table: str
    model: object = None  # the tuned model in memory (PEFT-wrapped for adapter methods)
    tokenizer: object = None


def train_summary(trainer, train_output, runtime_s: float, **extra) -> dict:
    """The `train` part of metrics.json from a finished transformers Trainer."""
    state = trainer.state
    summary = {"runtime_s": runtime_s, "train_loss": train_output.training_loss, "steps": state.global_step,
               "bf16": bool(trainer.args.bf16)}
    if state.num_input_tokens_seen:
        summary["train_tokens"] = state.num_input_tokens_seen
        summary["train_tokens_per_s"] = state.num_input_tokens_seen / runtime_s
    return {**summary, **extra}


def save_log_history(out: Path, log_history: list[dict]) -> None:
    """Rank 0 only, in a multi-process launch."""
    from hf_tuner.distributed import is_main_process

    if is_main_process():
        (out / "log_history.json").write_text(json.dumps(log_history, indent=2))


def recipe_main(train: Callable, argv: list[str] | None = None) -> None:
    """Run `train` on the command line: bad config, data or assets exit with status 2 and one line, no traceback."""
    from hf_tuner.assets import AssetError
    from hf_tuner.config import ConfigError
    from hf_tuner.data import DataError

    try:
        train(sys.argv[1:] if argv is None else argv)
    except (ConfigError, DataError, AssetError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
