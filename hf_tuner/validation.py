"""Checks every recipe runs before any weights load: training values, batch size against the data, lengths.

Config fields, data rows and model sources are checked where they are read (hf_tuner.config, hf_tuner.data,
hf_tuner.models); what needs the config and the data together lives here. Errors name the field, file or row.
"""

from __future__ import annotations

from hf_tuner.errors import ConfigError, DataError


def check_training_values(training) -> None:
    """Learning rate, batch sizes and step counts must be positive (max_steps -1 means: count epochs)."""
    for name in ("learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
                 "gradient_accumulation_steps"):
        value = getattr(training, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    max_steps = getattr(training, "max_steps", -1)
    if max_steps == 0 or max_steps < -1:
        raise ConfigError(f"max_steps: must be positive (or -1 to train for num_train_epochs), got {max_steps}")
    if max_steps == -1 and getattr(training, "num_train_epochs", 1) <= 0:
        raise ConfigError(f"num_train_epochs: must be positive when max_steps is not set, got "
                          f"{training.num_train_epochs}")
    for name in ("save_steps", "logging_steps", "eval_steps", "max_length"):  # max_length: TRL's configs (None: none)
        value = getattr(training, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    for name in ("seed", "data_seed"):  # numpy takes 0 .. 2**32 - 1 and says only "Seed must be between ..."
        value = getattr(training, name, None)
        if value is not None and not 0 <= value < 2 ** 32:
            raise ConfigError(f"{name}: must be a whole number from 0 to 2**32 - 1, got {value}")
    for name in ("weight_decay", "max_grad_norm"):  # torch refuses a negative decay only when the optimizer is
        value = getattr(training, name, None)  # built; a negative max_grad_norm silently turns clipping off
        if value is not None and value < 0:
            raise ConfigError(f"{name}: must be 0 or more, got {value}")
    align_precision_with_launcher(training)


# Run fields (hf-tuner's own, per recipe) that only make sense as positive numbers. A 0 here reached a library
# below us as an empty tensor, a division by zero or an empty held-out set, after the weights had loaded.
POSITIVE_RUN_FIELDS = ("max_length", "block_size", "max_source_length", "max_target_length", "eval_batch_size",
                       "eval_max_new_tokens", "benchmark_batch_size", "response_length", "prompt_words", "top_k",
                       "passage_words", "eval_documents", "eval_topics", "vocab_size", "hidden_size",
                       "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                       "sample_tokens", "num_generations", "ppo_epochs", "num_mini_batches", "temperature",
                       "task_temperature")
NON_NEGATIVE_RUN_FIELDS = ("few_shot", "report_examples", "benchmark_num_fewshot", "train_samples")


def check_run_values(run) -> None:
    """The run fields above, where the recipe has them (None: not set)."""
    for name in POSITIVE_RUN_FIELDS:
        value = getattr(run, name, None)
        if value is not None and value <= 0:
            raise ConfigError(f"{name}: must be positive, got {value}")
    for name in NON_NEGATIVE_RUN_FIELDS:
        value = getattr(run, name, None)
        if value is not None and value < 0:
            raise ConfigError(f"{name}: must be 0 or more, got {value}")


def align_precision_with_launcher(training) -> str | None:
    """bf16 / fp16 made to say what the launch trains in. With both false, transformers 5.24 takes the
    precision from ACCELERATE_MIXED_PRECISION (multi_gpu.yaml, fsdp.yaml and the DeepSpeed yamls say bf16), so
    a TrainingArguments recipe (bf16 defaults to false there) silently trained in bf16 under DDP/FSDP while
    metrics.json said false, and under DeepSpeed the Trainer refused the mismatch (bf16.enabled true in the
    DeepSpeed config vs bf16=false). Returns the precision set, or None when nothing changed."""
    import logging

    mixed = getattr(training, "mixed_precision", "no")
    if mixed not in ("bf16", "fp16") or getattr(training, "bf16", False) or getattr(training, "fp16", False):
        return None
    setattr(training, mixed, True)
    logging.getLogger(__name__).warning(
        "%s: on, as the accelerate launch asks (mixed_precision: %s); to train in fp32, launch with "
        "--mixed_precision no", mixed, mixed)
    return mixed


def check_batch(n_examples: int, training, what: str) -> None:
    """A dataset smaller than one global batch would train on a partial batch per step, or not at all."""
    from hf_tuner.distributed import world_size

    batch = training.per_device_train_batch_size * world_size()
    if n_examples < batch:
        raise DataError(f"{what}: {n_examples} training example(s) is less than one batch "
                        f"(per_device_train_batch_size={training.per_device_train_batch_size} x {world_size()} "
                        "process(es)); add data or lower per_device_train_batch_size")


def check_lengths(lengths: list[tuple[str, int]], max_length: int | None, field: str = "max_length") -> None:
    """With truncation off, every (where, token count) must fit in max_length; the first misfit is named."""
    if max_length is None:
        return
    too_long = [(where, n) for where, n in lengths if n > max_length]
    if too_long:
        where, n = too_long[0]
        raise DataError(f"{where}: {n} tokens, longer than {field}={max_length}, and truncation is off "
                        f"({len(too_long)} row(s) in all); raise {field}, shorten the row, or set truncation: true")
