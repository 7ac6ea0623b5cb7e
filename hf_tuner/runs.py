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
    """Run `train` on the command line.

    Bad config, data or assets exit with status 2 and one line naming the field, file or row: no traceback
    unless `--debug` is given. A run stopped by SIGINT / SIGTERM exits 128 + the signal, saying how to resume.
    """
    from hf_tuner.assets import AssetError
    from hf_tuner.checkpoints import RunInterrupted
    from hf_tuner.config import ConfigError
    from hf_tuner.data import DataError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        train(argv)
    except (ConfigError, DataError, AssetError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as e:
        print(f"{e}\nresume with: {resume_command(argv)}", file=sys.stderr)
        sys.exit(e.exit_code)


def resume_command(argv: list[str]) -> str:
    """This run's command line, asking to resume from the last complete checkpoint."""
    import shlex

    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--resume_from_checkpoint", "--overwrite_output_dir"):
            skip = True
            continue
        if a.startswith(("--resume_from_checkpoint=", "--overwrite_output_dir=")):
            continue
        kept.append(a)
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else "recipes/<recipe>.py"
    return shlex.join(["accelerate", "launch", script, *kept, "--resume_from_checkpoint", "latest"])
