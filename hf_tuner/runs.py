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
    precision = precision_used(trainer)
    summary = {"runtime_s": runtime_s, "train_loss": train_output.training_loss, "steps": state.global_step,
               "bf16": precision == "bf16", "mixed_precision": precision}
    if state.num_input_tokens_seen:
        summary["train_tokens"] = state.num_input_tokens_seen
        summary["train_tokens_per_s"] = state.num_input_tokens_seen / runtime_s
    return {**summary, **extra}


def precision_used(trainer) -> str:
    """The mixed precision training ran in ("bf16", "fp16" or "no"): the accelerator's, not `args.bf16`.
    transformers 5.24 takes ACCELERATE_MIXED_PRECISION (an accelerate config's `mixed_precision: bf16`)
    when bf16 and fp16 are both false, so `args.bf16` can say false for a bf16 run."""
    accelerator = getattr(trainer, "accelerator", None)
    value = getattr(accelerator, "mixed_precision", None) or getattr(trainer.args, "mixed_precision", None)
    return str(value or ("bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "no"))


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
    if "-h" in argv or "--help" in argv:  # the recipe's fields, grouped, instead of argparse's dump of all of them
        from hf_tuner.config_reference import render_help

        print(render_help(recipe_name(train)), end="")
        return
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    try:
        result = train(argv)
    except (ConfigError, DataError, AssetError) as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as e:
        print(f"{e}\nresume with: {resume_command(argv)}", file=sys.stderr)
        sys.exit(e.exit_code)
    from hf_tuner.distributed import is_main_process

    if isinstance(result, RunResult) and is_main_process():
        print(run_summary(result.output_dir))


def recipe_name(train: Callable) -> str:
    """`sft_instruction` for recipes/sft_instruction.py, also when it runs as __main__ (python -m, a script)."""
    module = sys.modules.get(train.__module__)
    return Path(getattr(module, "__file__", None) or train.__module__).stem.split(".")[-1]


def next_commands(out: Path) -> list[tuple[str, str]]:
    """(what, command) pairs that make sense for the run folder `out`, read from what it holds."""
    import shlex

    import yaml

    from hf_tuner.adapters import MERGEABLE_PEFT_TYPES

    out = Path(out)
    q = shlex.quote
    config = {}
    if (out / "config.yaml").is_file():
        config = yaml.safe_load((out / "config.yaml").read_text()) or {}
    adapter, generations = out / "adapter", out / "generations.jsonl"
    peft_type = None
    if (adapter / "adapter_config.json").is_file():
        peft_type = json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
    commands = []
    with_reference = False
    if generations.is_file():
        with generations.open(encoding="utf-8") as f:
            first = f.readline()
        with_reference = bool(first.strip()) and "reference" in json.loads(first)
    # the same held-out rows as the run (eval applies the recipes' split)
    split = "".join(f" --{k} {config[k]}" for k in ("eval_samples", "split_seed") if isinstance(config.get(k), int))
    if peft_type and with_reference and config.get("model_name_or_path") and config.get("dataset_name"):
        commands.append(("evaluate under other decoding strategies", (
            f"hf-tuner eval --model {q(str(config['model_name_or_path']))} --adapter {q(str(adapter))} "
            f"--task {q(str(config['dataset_name']))}{split} --decoding greedy,beam,top_p "
            f"--output_dir {q(str(out))}-eval")))
    commands.append(("compare with other runs",
                     f"hf-tuner compare {q(str(out))} runs/OTHER_RUN --output comparison.md"))
    if peft_type in MERGEABLE_PEFT_TYPES:
        commands.append(("merge the adapter into a plain checkpoint",
                         f"hf-tuner merge --adapter {q(str(adapter))} --output_dir {q(str(out / 'merged'))}"))
    if generations.is_file():
        judgments = q(str(out / "judgments.jsonl"))
        commands.append(("judge base vs tuned blind", f"hf-tuner label ab --run {q(str(out))} --output {judgments}"))
        commands.append(("then add the win rate to the report",
                         f"hf-tuner report {q(str(out))} --judgments {judgments}"))
    return commands


def run_summary(out: Path) -> str:
    """The end of a recipe's output: where the report is, and what to run next."""
    out = Path(out)
    lines = [f"Report: {out / 'report.md'}", "Next:"]
    lines += [f"  # {what}\n  {command}" for what, command in next_commands(out)]
    return "\n".join(lines) + "\n"


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
