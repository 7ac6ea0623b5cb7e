"""Trainer adjustments that some PEFT methods need, and the step count a run will take."""

from __future__ import annotations

import math
import re

from transformers import Trainer, TrainerCallback


class AdaLoraAllocationCallback(TrainerCallback):
    """AdaLoRA re-allocates rank from the gradients' sensitivity: PEFT asks for `update_and_allocate(step)`
    after the optimizer step and before the gradients are zeroed, which is when Trainer calls
    `on_optimizer_step`. Neither Trainer nor TRL does it for us."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def plain_loss_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (an SFTTrainer) with Trainer's own loss: the model's `outputs.loss` from its labels.

    TRL computes the loss from a fused output head that LLaMA-Adapter's wrapper does not support, and that
    skips AdaLoRA's orthogonality penalty (added to `outputs.loss` only). The data, collator and logging
    stay TRL's; only the loss call changes.
    """

    class PlainLossTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs,
                                        num_items_in_batch)

    PlainLossTrainer.__name__ = f"PlainLoss{trainer_cls.__name__}"
    return PlainLossTrainer


def planned_steps(args, n_examples: int) -> int:
    """Optimizer steps a run will take: max_steps, or epochs over the data, whose global batch spans every
    process of the launch (AdaLoRA's schedule is sized from this)."""
    from hf_tuner.distributed import world_size

    if args.max_steps and args.max_steps > 0:
        return args.max_steps
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size()
    return max(1, math.ceil(math.ceil(n_examples / per_step) * args.num_train_epochs))


def sync_checkpointing_kwargs(args) -> bool:
    """Hand the Trainer the checkpointing kwargs TRL set, under the name transformers 5.24 reads.

    TrainingArguments mirrors `gradient_checkpointing_kwargs` and `activation_checkpointing_kwargs` once, at
    construction. TRL 1.16's trainers then write the old name: SFTTrainer forces `use_reentrant=True` for
    PEFT + DeepSpeed ZeRO-3 (`args.gradient_checkpointing_kwargs = ... or {}` rebinds it to a new dict), while
    `Trainer.train` reads `activation_checkpointing_kwargs`, so the fix was silently dropped. Call before
    `train()`; TRL's keys win. True when something was copied."""
    old = getattr(args, "gradient_checkpointing_kwargs", None)
    new = getattr(args, "activation_checkpointing_kwargs", None)
    if not old or old is new or all(new and k in new and new[k] == v for k, v in old.items()):
        return False
    args.activation_checkpointing_kwargs = {**(new or {}), **old}
    args.gradient_checkpointing_kwargs = args.activation_checkpointing_kwargs
    return True


def loss_counts_items(model) -> bool:
    """Whether the model's forward hands `num_items_in_batch` to its loss (transformers' `self.loss_function`,
    as causal LMs do), read from the source of its `forward` (under PEFT, the base model's).

    transformers 5.24 decides from the signature alone: a forward with `**kwargs` "accepts loss kwargs", so the
    Trainer counts the labels across ranks and multiplies the loss by the number of processes, expecting a sum
    over the batch divided by that global count. BERT's sequence classification and masked-LM heads, T5 and
    other heads take **kwargs but compute a plain mean with their own CrossEntropyLoss: under any launch of N
    processes (DDP, ZeRO, FSDP) their loss, and so their gradient, came out N times too large (logged loss 1.39
    for a binary classifier that one process logs as 0.70; max_grad_norm clipped N times earlier)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):  # no source to read (compiled, built at run time): keep transformers' choice
        return True
    for start in (m.end() for m in re.finditer(r"loss_function\(", source)):
        depth, end = 1, start
        while depth and end < len(source):
            depth += {"(": 1, ")": -1}.get(source[end], 0)
            end += 1
        if "**" in source[start:end]:  # the call passes the Trainer's kwargs on (Llama's sequence head does not)
            return True
    return False


def mean_loss_across_processes(trainer) -> bool:
    """Have the Trainer treat a model's loss as the per-batch mean it is, when `loss_counts_items` says the
    model ignores `num_items_in_batch`. True when it changed the Trainer's setting."""
    if not getattr(trainer, "model_accepts_loss_kwargs", False) or loss_counts_items(trainer.model):
        return False
    trainer.model_accepts_loss_kwargs = False
    return True
