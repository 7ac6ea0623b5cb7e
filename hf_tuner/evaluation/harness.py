"""The shared harness: every recipe evaluates the base and the tuned model through `evaluate_model`."""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from hf_tuner.evaluation.metrics import TEXT_METRICS, text_metrics
from hf_tuner.evaluation.tasks import GenerationTask
from hf_tuner.generation import DecodingSettings, generate_batched


def _prompt_text(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def reference_perplexity(model, tokenizer, prompts: list[str], references: list[str], batch_size: int) -> float:
    """Token-weighted perplexity of each reference (plus the end-of-turn token) given its prompt.

    Rows are left-padded so every reference ends at the last position; the output layer then runs on
    the last few positions only (`logits_to_keep`), not over long few-shot prompts.
    """
    eos = tokenizer.eos_token or ""
    pairs = []
    for prompt, ref in zip(prompts, references):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        full = tokenizer(prompt + ref + eos, add_special_tokens=False)["input_ids"]
        pairs.append((full, len(full) - n_prompt))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in tqdm(range(0, len(pairs), batch_size), desc="perplexity", unit="batch", leave=False):
            batch = pairs[start:start + batch_size]
            width = max(len(ids) for ids, _ in batch)
            keep = max(n_ref for _, n_ref in batch) + 1  # +1: the last prompt token predicts the first answer token
            input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
            attention = torch.zeros_like(input_ids)
            labels = torch.full((len(batch), keep), -100, dtype=torch.long)
            for row, (ids, n_ref) in enumerate(batch):
                input_ids[row, width - len(ids):] = torch.tensor(ids)
                attention[row, width - len(ids):] = 1
                labels[row, keep - n_ref:] = torch.tensor(ids[len(ids) - n_ref:])
            position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                           position_ids=position_ids.to(device), logits_to_keep=keep).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
            loss = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                     shift_labels.reshape(-1), ignore_index=-100, reduction="sum")
            nll += loss.item()
            count += int((shift_labels != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(nll / max(count, 1))


def evaluate_model(model, tokenizer, task: GenerationTask, settings: DecodingSettings) -> dict:
    """Generate for every held-out row and score it. Returns {"metrics", "predictions", "seconds"}."""
    start = time.perf_counter()
    prompts = [_prompt_text(tokenizer, task.messages(row)) for row in task.rows]
    references = [task.reference(row) for row in task.rows]
    metrics: dict[str, float] = {}
    predictions: list[str] = []
    wanted_text = [m for m in task.metrics if m in TEXT_METRICS]
    if wanted_text or "mean_length" in task.metrics:
        predictions = generate_batched(model, tokenizer, prompts, settings, desc=f"generate {task.name}")
        if wanted_text:
            metrics.update(text_metrics(predictions, references, wanted_text))
        if "mean_length" in task.metrics:
            metrics["mean_length"] = sum(len(p.split()) for p in predictions) / max(len(predictions), 1)
    if "perplexity" in task.metrics:
        metrics["perplexity"] = reference_perplexity(model, tokenizer, prompts, references, settings.batch_size)
    return {"metrics": metrics, "predictions": predictions, "references": references,
            "seconds": time.perf_counter() - start}
