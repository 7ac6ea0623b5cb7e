"""The shared harness: every recipe evaluates the base and the tuned model through `evaluate_model`.

Under a multi-process launch (torch.distributed up, world size > 1) each rank evaluates its share of the
rows and every rank gets all of them back (hf_tuner.distributed.EvalShard), so the metrics are computed from
the same rows, in the same order, as in one process. Batched forwards (classifier logits, perplexity) are
shared out by whole batches: each batch is the one a single process runs, so its numbers are bit-identical.
"""

from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from hf_tuner.distributed import SINGLE, EvalShard, evaluation_shard
from hf_tuner.evaluation.metrics import TEXT_METRICS, label_metrics, regression_metrics, text_metrics
from hf_tuner.evaluation.preference import evaluate_policy, evaluate_preferences
from hf_tuner.evaluation.significance import Stat, label_stats, text_stats
from hf_tuner.evaluation.tasks import (ClassificationTask, GenerationTask, LanguageModelingTask, PreferenceTask,
                                     RegressionTask, RewardTask)
from hf_tuner.generation import (DECODING_PRESETS, DecodingSettings, SharedPrefix, for_inference, generate_batched,
                                 is_encoder_decoder, unwrapped_forward)


def _prompt_text(tokenizer, messages: list[dict], model=None) -> str:
    if model is not None and is_encoder_decoder(model):
        # An encoder-decoder reads the task text itself: no chat template, no earlier turns.
        return "\n".join(m["content"] for m in messages if m["role"] == "user")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def reference_perplexity(model, tokenizer, prompts: list[str], references: list[str], batch_size: int,
                         shard: EvalShard = SINGLE, per_row: list | None = None) -> float:
    """Token-weighted perplexity of each reference (plus the end-of-turn token) given its prompt.

    The prompts' common prefix (chat template, shots) runs once (`SharedPrefix`); each row's own tokens
    follow it, left-padded, so every reference ends at the last position and the output layer runs on the
    last few positions only (`logits_to_keep`), not over long few-shot prompts.
    `shard`: this rank runs its share of the batches (the prefix and the batches are those of all the rows);
    the per-batch sums are gathered and added in batch order, as one process adds them.
    per_row: a list to fill with each row's (log-loss sum, token count), in prompt order (significance.Stat).
    """
    eos = tokenizer.eos_token or ""
    pairs = []
    for prompt, ref in zip(prompts, references):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        full = tokenizer(prompt + ref + eos, add_special_tokens=False)["input_ids"]
        pairs.append((full, len(full) - n_prompt, len(pairs)))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    was_training = model.training
    model.eval()
    sums: list[tuple[float, int]] = []
    # the prefix stops before every prompt's last token (it predicts the answer's first); virtual-token
    # (prompt learning) models bring their own cache: no shared prefix there
    prompt_learning = getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False)
    limit = 0 if prompt_learning else max(min(len(ids) - n_ref for ids, n_ref, _ in pairs) - 1, 0)
    try:
        prefix = SharedPrefix(model, [ids for ids, _, _ in pairs], limit=limit)
        batches = _logit_batches(pairs, batch_size, len(tokenizer))
        mine = shard.rows(len(batches))
        for batch in tqdm([batches[b] for b in mine], desc="perplexity", unit="batch", leave=False):
            keep = max(n_ref for _, n_ref, _ in batch) + 1  # +1: the last prompt token predicts the first answer token
            inputs = prefix.batch([ids for ids, _, _ in batch], pad_id)
            if not prefix.length:
                inputs.pop(prefix.arg), inputs.pop("use_cache")
            labels = torch.full((len(batch), keep), -100, dtype=torch.long)
            for row, (ids, n_ref, _) in enumerate(batch):
                labels[row, keep - n_ref:] = torch.tensor(ids[len(ids) - n_ref:])
            logits = model(**inputs, logits_to_keep=keep).logits.float()
            shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(logits.device)
            losses = torch.nn.functional.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)),
                                                       shift_labels.reshape(-1), ignore_index=-100, reduction="none")
            rows = losses.view(len(batch), -1).sum(-1).tolist(), (shift_labels != -100).sum(-1).tolist()
            sums.append((losses.sum().item(), int((shift_labels != -100).sum()), [i for _, _, i in batch], *rows))
    finally:
        model.train(was_training)
    nll, count = 0.0, 0
    for batch_nll, batch_count, *rows in shard.gather_rows(len(batches), mine, sums):
        nll += batch_nll
        count += batch_count
        if per_row is not None:
            per_row.extend(zip(*rows))
    if per_row is not None:
        per_row.sort()
        per_row[:] = [(row_nll, row_count) for _, row_nll, row_count in per_row]
    return math.exp(nll / max(count, 1))


LOGIT_BUDGET = 64 * 2 ** 20  # bytes of fp32 logits per perplexity batch (the cross-entropy holds a copy too)


def _logit_batches(pairs: list[tuple[list[int], int]], batch_size: int, vocab: int) -> list[list]:
    """Rows in length order (less padding), at most `batch_size` per batch and fewer where the scored
    positions x vocabulary would pass LOGIT_BUDGET: a 49k vocabulary makes logits, not weights, the peak."""
    batches, batch, widest = [], [], 0
    for pair in sorted(pairs, key=lambda p: len(p[0])):
        wide = max(widest, pair[1] + 1)
        if batch and (len(batch) >= batch_size or (len(batch) + 1) * wide * vocab * 4 > LOGIT_BUDGET):
            batches.append(batch)
            batch, wide = [], pair[1] + 1
        batch.append(pair)
        widest = wide
    return batches + ([batch] if batch else [])


def _is_classifier(model) -> bool:
    if getattr(model, "is_sequence_classifier", False):  # e.g. one task head of a multi-task model
        return True
    return model.__class__.__name__.endswith("ForSequenceClassification") or (
        hasattr(model, "base_model") and hasattr(model, "peft_config")
        and model.get_base_model().__class__.__name__.endswith("ForSequenceClassification"))


@torch.no_grad()
def classifier_logits(model, tokenizer, texts: list[str], batch_size: int, shard: EvalShard = SINGLE) -> torch.Tensor:
    """A sequence classifier's (or regressor's) logits for every text, batched: (len(texts), num_outputs).
    `shard`: this rank runs its share of the batches, and every rank gets all the logits back."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = list(range(0, len(texts), batch_size))
    mine = shard.rows(len(starts))
    out: list[torch.Tensor] = []
    try:
        for start in tqdm([starts[b] for b in mine], desc="classify", unit="batch", leave=False):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
            out.append(model(**batch.to(device)).logits.float().cpu())
    finally:
        model.train(was_training)
    return torch.cat(shard.gather_rows(len(starts), mine, out))


def classifier_predictions(model, tokenizer, texts: list[str], batch_size: int,
                           shard: EvalShard = SINGLE) -> list[int]:
    """Argmax class ids from a sequence classifier's logits, batched."""
    return classifier_logits(model, tokenizer, texts, batch_size, shard).argmax(-1).tolist()


def _generate_shared(model, tokenizer, prompts: list[str], settings: DecodingSettings, shard: EvalShard, desc: str,
                     stats: dict) -> list[str]:
    """generate_batched over this rank's share of the prompts (every world-th one), the texts of all ranks back
    in prompt order; `stats` sums prompts and new tokens over the ranks, over the slowest rank's seconds.

    Sampled strategies run every prompt on every rank, as in one process: a share would draw from another
    point of the seeded random stream, so the samples, and the metrics, would change with the world size."""
    if shard.world == 1 or DECODING_PRESETS.get(settings.strategy, {}).get("do_sample", False):
        return generate_batched(model, tokenizer, prompts, settings, desc=desc, stats=stats)
    mine = shard.rows(len(prompts))
    own: dict = {}
    texts = generate_batched(model, tokenizer, [prompts[i] for i in mine], settings, desc=desc,
                             stats=own) if mine else []
    texts = shard.gather_rows(len(prompts), mine, texts)
    parts = [s for s in shard.all_gather(own) if s]
    if parts:
        produced, seconds = sum(s["new_tokens"] for s in parts), max(s["seconds"] for s in parts)
        stats.update(prompts=sum(s["prompts"] for s in parts), new_tokens=produced, seconds=seconds,
                     tokens_per_s=produced / max(seconds, 1e-9), ranks=shard.world)
    return texts


def _evaluate_regression(model, tokenizer, task: RegressionTask, settings: DecodingSettings,
                         shard: EvalShard = SINGLE) -> dict:
    values = classifier_logits(model, tokenizer, [r["text"] for r in task.rows], settings.batch_size,
                               shard)[:, 0].tolist()
    references = [float(r["target"]) for r in task.rows]
    per_example = {"mse": Stat("mean", [(v - r) ** 2 for v, r in zip(values, references)]),
                   "mae": Stat("mean", [abs(v - r) for v, r in zip(values, references)]),
                   "pearson": Stat("pearson", values, references=references)}
    return {"metrics": regression_metrics(values, references, task.metrics),
            "predictions": [f"{v:.3f}" for v in values], "references": [str(r) for r in references],
            "per_example": {k: v for k, v in per_example.items() if k in task.metrics}}


@torch.no_grad()
def _evaluate_language_modeling(model, tokenizer, task: LanguageModelingTask, settings: DecodingSettings,
                                shard: EvalShard = SINGLE) -> dict:
    """Token-weighted perplexity over fixed blocks; for a masked LM, over whole-word-masked tokens (fixed seed).
    `shard`: this rank runs its share of the batches; the per-batch sums are added in batch order."""
    from hf_tuner.data.text import chunk_documents, whole_word_mask_collator

    mlm = task.objective == "mlm"
    blocks = chunk_documents([r["text"] for r in task.rows], tokenizer, task.block_size, word_offsets=mlm,
                             max_blocks=task.max_blocks)
    collate = whole_word_mask_collator(tokenizer, task.mlm_probability, seed=task.seed) if mlm else None
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = list(range(0, len(blocks), settings.batch_size))
    mine = set(shard.rows(len(starts)))
    sums: list[tuple[float, int, int]] = []
    try:
        for b, start in enumerate(tqdm(starts, desc=f"perplexity {task.name}", unit="batch", leave=False)):
            if b not in mine and not mlm:
                continue
            rows = blocks.select(range(start, min(start + settings.batch_size, len(blocks))))
            if mlm:
                # every rank masks every batch, so the seeded masker's stream reaches each batch as in one process
                batch = collate([dict(r) for r in rows])
                labels = batch.pop("labels")
                if b not in mine:
                    continue
            else:
                batch = {"input_ids": torch.tensor(rows["input_ids"]), "attention_mask": torch.tensor(rows["attention_mask"])}
                labels = torch.tensor(rows["labels"])
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
            if not mlm:  # position t predicts token t+1
                logits, labels = logits[:, :-1], labels[:, 1:]
            labels = labels.to(device)
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                       ignore_index=-100, reduction="none").view(labels.shape)
            keep = labels != -100
            hits = (logits.argmax(-1) == labels) & keep
            sums.append((losses.sum().item(), int(keep.sum()), int(hits.sum()),
                         list(zip(losses.sum(-1).tolist(), keep.sum(-1).tolist(), hits.sum(-1).tolist()))))
    finally:
        model.train(was_training)
    nll, count, correct, blocks_seen = 0.0, 0, 0, []
    for batch_nll, batch_count, batch_correct, rows in shard.gather_rows(len(starts), sorted(mine), sums):
        nll += batch_nll
        count += batch_count
        correct += batch_correct
        blocks_seen += rows
    metrics = {"perplexity": math.exp(nll / max(count, 1)), "eval_tokens": float(count)}
    # each block's log-loss, scored tokens and hits: the paired bootstrap's input (significance)
    counts = [c for _, c, _ in blocks_seen]
    per_example = {"perplexity": Stat("ratio_exp", [n for n, _, _ in blocks_seen], counts=counts)}
    if mlm:
        metrics["masked_accuracy"] = correct / max(count, 1)
        per_example["masked_accuracy"] = Stat("ratio", [h for _, _, h in blocks_seen], counts=counts)
    return {"metrics": metrics, "predictions": [], "references": [], "per_example": per_example}


def _evaluate_classification(model, tokenizer, task: ClassificationTask, settings: DecodingSettings,
                             shard: EvalShard = SINGLE) -> dict:
    references = [row["label"] for row in task.rows]
    if _is_classifier(model):
        ids = classifier_predictions(model, tokenizer, [row["text"] for row in task.rows], settings.batch_size,
                                     shard)
        predictions = [task.labels[i] for i in ids]
        texts = [str(p) for p in predictions]
        unparsed = 0
    else:  # a causal LM answers with a label word
        prompts = [_prompt_text(tokenizer, task.messages(row), model) for row in task.rows]
        stats: dict = {}
        texts = _generate_shared(model, tokenizer, prompts, settings, shard, f"generate {task.name}", stats)
        predictions = [task.parse_label(t) for t in texts]
        unparsed = sum(p is None for p in predictions)
        # An answer that names no label counts as wrong: score it as a label no reference has.
        predictions = ["<none>" if p is None else p for p in predictions]
    metrics = label_metrics(predictions, references, task.metrics, task.average, labels=list(task.labels))
    metrics["unparsed"] = float(unparsed)
    result = {"metrics": metrics, "predictions": texts, "references": [str(r) for r in references],
              "per_example": label_stats(predictions, references, list(task.labels), task.average, task.metrics)}
    if not _is_classifier(model):
        result["generation"] = stats
    return result


def evaluate_model(model, tokenizer, task, settings: DecodingSettings | None = None) -> dict:
    """Evaluate one model on one task: {"metrics", "predictions", "references", "seconds", "seconds_per_example"}.

    The same call serves the base model, the prompting baselines (tasks with shots) and the tuned
    model, so their numbers are comparable. GenerationTask: generate and score text (plus perplexity of
    the references); ClassificationTask: from a classifier's logits, or a causal LM's label word.
    Call it on every rank of a multi-process launch: each rank evaluates its share of the rows, and every
    rank returns the result one process would (see `hf_tuner.distributed.evaluation_shard`). RewardTask
    samples its responses, so every rank still samples every prompt (a share would change the samples).
    """
    settings = settings or DecodingSettings()
    start = time.perf_counter()
    shard = evaluation_shard(model)
    if shard.world > 1:  # DDP's forward may broadcast buffers (a collective): the ranks' forwards now differ
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(model, DistributedDataParallel):
            model = model.module
    scorers = {ClassificationTask: _evaluate_classification, GenerationTask: _evaluate_generation,
               RegressionTask: _evaluate_regression, LanguageModelingTask: _evaluate_language_modeling}
    scorer = next((f for cls, f in scorers.items() if isinstance(task, cls)), None)
    if scorer is not None:  # fp32 as loaded; a LoRA-family adapter merged for the evaluation (one matmul per layer)
        with for_inference(model):
            result = scorer(model, tokenizer, task, settings, shard)
    elif isinstance(task, PreferenceTask):  # these compare with the adapter disabled: left unmerged
        with unwrapped_forward(model):
            result = evaluate_preferences(model, tokenizer, task, settings, shard)
    elif isinstance(task, RewardTask):
        with unwrapped_forward(model):
            result = evaluate_policy(model, tokenizer, task, settings)
    else:
        raise TypeError(f"unknown task type {type(task).__name__}")
    result["seconds"] = time.perf_counter() - start
    result["seconds_per_example"] = result["seconds"] / max(len(task.rows), 1)
    return result


def _evaluate_generation(model, tokenizer, task: GenerationTask, settings: DecodingSettings,
                         shard: EvalShard = SINGLE) -> dict:
    prompts = [_prompt_text(tokenizer, task.messages(row), model) for row in task.rows]
    references = [task.reference(row) for row in task.rows]
    metrics: dict[str, float] = {}
    predictions: list[str] = []
    wanted_text = [m for m in task.metrics if m in TEXT_METRICS]
    stats: dict = {}
    per_example: dict = {}  # what each example adds to each metric: the paired bootstrap's input (significance)
    if wanted_text:
        predictions = _generate_shared(model, tokenizer, prompts, settings, shard, f"generate {task.name}", stats)
        metrics.update(text_metrics(predictions, references, wanted_text))
        per_example.update(text_stats(predictions, references, wanted_text))
    if "perplexity" in task.metrics:
        score = seq2seq_reference_perplexity if is_encoder_decoder(model) else reference_perplexity
        rows: list = []
        metrics["perplexity"] = score(model, tokenizer, prompts, references, settings.batch_size, shard, rows)
        per_example["perplexity"] = Stat("ratio_exp", [n for n, _ in rows], counts=[c for _, c in rows])
    result = {"metrics": metrics, "predictions": predictions, "references": references, "per_example": per_example}
    if stats:
        result["generation"] = stats
    return result


@torch.no_grad()
def seq2seq_reference_perplexity(model, tokenizer, sources: list[str], references: list[str], batch_size: int,
                                 shard: EvalShard = SINGLE, per_row: list | None = None) -> float:
    """Token-weighted perplexity of each reference as the decoder's target, given its source (encoder-decoders).
    `shard`: this rank runs its share of the batches; the per-batch sums are added in batch order.
    per_row: a list to fill with each row's (log-loss sum, token count), in row order."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    starts = list(range(0, len(sources), batch_size))
    mine = shard.rows(len(starts))
    sums: list[tuple[float, int]] = []
    try:
        for start in [starts[b] for b in mine]:
            enc = tokenizer(sources[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
            labels = tokenizer(text_target=references[start:start + batch_size], padding=True, truncation=True,
                               return_tensors="pt")["input_ids"]
            labels[labels == tokenizer.pad_token_id] = -100
            logits = model(**enc.to(device), labels=labels.to(device)).logits.float()
            labels = labels.to(device)
            losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                       ignore_index=-100, reduction="none").view(len(labels), -1)
            sums.append((losses.sum().item(), int((labels != -100).sum()),
                         list(zip(losses.sum(-1).tolist(), (labels != -100).sum(-1).tolist()))))
    finally:
        model.train(was_training)
    nll, count = 0.0, 0
    for batch_nll, batch_count, rows in shard.gather_rows(len(starts), mine, sums):
        nll += batch_nll
        count += batch_count
        if per_row is not None:
            per_row.extend(rows)
    return math.exp(nll / max(count, 1))
