"""SFT loss that projects only the positions with a label through the LM head.

Why by hand: TRL's SFTTrainer computes its loss with a fused, chunked LM head that, off CUDA/XPU (no Triton),
scores *every* position of the padded batch (prompt, padding and completion alike) and also computes the
entropy of each one, then masks the result (`trl.trainer.utils.add_fused_lm_head`, `compact = _use_triton(...)`).
With completion-only loss on short answers most of those positions carry no label, and SmolLM2's output
layer is 49,152 x 576: on CPU that head is about half of each step. transformers 5 lets a causal LM
project only chosen positions (`logits_to_keep` as a boolean (batch, seq) mask), so we ask for exactly the
positions whose next token has a label and take the cross-entropy there. The loss is the same token-mean
negative log-likelihood TRL computes; only the work on ignored positions is skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, targets): `mask[b, t]` is true where token t+1 has a label, so position t's logits are scored;
    the last position never is. `targets` are those labels, in mask order."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask, labels[:, 1:][labels[:, 1:] != -100]


def compact_lm_loss(model, inputs: dict, num_items_in_batch=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, logits of the scored positions, their targets) for a causal LM batch with `labels`."""
    labels = inputs["labels"]
    mask, targets = label_positions(labels)
    model_inputs = {k: v for k, v in inputs.items() if k not in ("labels", "completion_mask")}
    outputs = model(**model_inputs, use_cache=False, logits_to_keep=mask)
    logits = outputs.logits.reshape(-1, outputs.logits.size(-1))  # (scored positions, vocab)
    total = F.cross_entropy(logits.float(), targets, reduction="sum")
    denominator = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    loss = total / torch.as_tensor(denominator, device=total.device).clamp(min=1)
    return loss, logits, targets


def compact_loss_trainer(trainer_cls: type) -> type:
    """`trainer_cls` (an SFTTrainer) whose training and eval loss come from `compact_lm_loss`.

    Data, collator, sampler and logging stay TRL's; the token accuracy TRL logs is kept (computed on the
    scored positions only, which is where TRL counts it too); the per-token entropy metric is dropped.
    """

    class CompactLossTrainer(trainer_cls):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, logits, targets = compact_lm_loss(model, inputs, num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as Trainer/TRL: DDP averages the gradients
            mode = "train" if model.training else "eval"
            with torch.no_grad():
                n = self.accelerator.gather_for_metrics(torch.tensor(targets.numel(), device=logits.device)).sum()
                correct = self.accelerator.gather_for_metrics((logits.argmax(-1) == targets).sum()).sum()
            self._metrics[mode]["mean_token_accuracy"].append((correct / n).item() if n > 0 else 0.0)
            if mode == "train":
                # padding-free (packed) batches carry position_ids instead of an attention mask: every token is real
                real = inputs["attention_mask"].sum() if "attention_mask" in inputs else \
                    torch.tensor(inputs["position_ids"].numel(), device=logits.device)
                tokens = self.accelerator.gather_for_metrics(real).sum().item()
                self._total_train_tokens += tokens
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, {"logits": logits}) if return_outputs else loss

    CompactLossTrainer.__name__ = f"CompactLoss{trainer_cls.__name__}"
    return CompactLossTrainer
