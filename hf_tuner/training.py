"""Trainer adjustments that some PEFT methods need, and the step count a run will take."""

from __future__ import annotations

import math

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
