"""Contrastive embedding training: mean pooling, InfoNCE with in-batch negatives, retrieval metrics.

sentence-transformers offers this (MultipleNegativesRankingLoss), but it is not installed here and the
checkpoint must load with plain `AutoModel`; so the loss is a few lines on top of transformers' Trainer,
which keeps the run loop, logging, checkpoints and resume the same as every other recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import Trainer


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding left out (the pooling all-MiniLM-L6-v2 was trained with)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model, input_ids, attention_mask, **extra) -> torch.Tensor:
    """L2-normalised mean-pooled embeddings of one tokenized batch."""
    hidden = model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    return F.normalize(mean_pool(hidden, attention_mask).float(), dim=-1)


def info_nce_loss(queries: torch.Tensor, passages: torch.Tensor, temperature: float = 0.05,
                  symmetric: bool = False) -> torch.Tensor:
    """InfoNCE with in-batch negatives: query i's positive is passage i, every other passage a negative.

    Inputs are L2-normalised here, so the logits are cosine similarities / temperature. symmetric also
    scores passage -> query (CLIP-style)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    q, p = F.normalize(queries, dim=-1), F.normalize(passages, dim=-1)
    logits = q @ p.T / temperature
    target = torch.arange(len(q), device=q.device)
    loss = F.cross_entropy(logits, target)
    return (loss + F.cross_entropy(logits.T, target)) / 2 if symmetric else loss


@torch.no_grad()
def encode(model, tokenizer, texts: list[str], batch_size: int = 64, max_length: int = 64) -> torch.Tensor:
    """Normalised embeddings of `texts` (n, hidden), batched, in input order."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                              return_tensors="pt").to(device)
            out.append(embed(model, batch["input_ids"], batch["attention_mask"]).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def gold_ranks(queries: torch.Tensor, passages: torch.Tensor, gold: list[int] | None = None) -> torch.Tensor:
    """The rank (1 = first) of query i's gold passage (default: passage i) among all passages, by cosine."""
    scores = F.normalize(queries, dim=-1) @ F.normalize(passages, dim=-1).T
    gold_t = torch.arange(len(queries)) if gold is None else torch.tensor(gold)
    gold_scores = scores[torch.arange(len(queries)), gold_t]
    return (scores > gold_scores[:, None]).sum(1) + 1  # ties go to the gold passage


def per_query_scores(ranks: torch.Tensor, ks: tuple[int, ...] = (1, 10)) -> dict[str, list[float]]:
    """Each query's recall@k (0 or 1), reciprocal rank and rank: the metrics are their means."""
    out = {f"recall@{k}": (ranks <= k).float().tolist() for k in ks}
    out["mrr"] = (1.0 / ranks.float()).tolist()
    out["mean_rank"] = ranks.float().tolist()
    return out


def retrieval_metrics(queries: torch.Tensor, passages: torch.Tensor, gold: list[int] | None = None,
                      ks: tuple[int, ...] = (1, 10)) -> dict[str, float]:
    """recall@k and MRR of query i's gold passage (default: passage i) among all passages, by cosine."""
    ranks = gold_ranks(queries, passages, gold)
    out = {f"recall@{k}": float((ranks <= k).float().mean()) for k in ks}
    out["mrr"] = float((1.0 / ranks.float()).mean())
    out["mean_rank"] = float(ranks.float().mean())
    return out


def evaluate_retrieval(model, tokenizer, rows: list[dict], batch_size: int = 64, max_length: int = 64) -> dict:
    """Each held-out query against every held-out passage: {"metrics", "ranked"} (top-3 per query, for reports)."""
    import time

    start = time.perf_counter()
    q = encode(model, tokenizer, [r["query"] for r in rows], batch_size, max_length)
    p = encode(model, tokenizer, [r["passage"] for r in rows], batch_size, max_length)
    from hf_tuner.evaluation.significance import Stat

    metrics = retrieval_metrics(q, p)
    top = (q @ p.T).topk(min(3, len(rows)), dim=1).indices.tolist()
    per_example = {k: Stat("mean", v) for k, v in per_query_scores(gold_ranks(q, p)).items()}  # report.gains
    return {"metrics": metrics, "top": top, "seconds": time.perf_counter() - start, "per_example": per_example}


class PairCollator:
    """Raw {"query", "passage"} rows -> two padded batches (q_*, p_*)."""

    def __init__(self, tokenizer, max_length: int = 64):
        self.tokenizer, self.max_length = tokenizer, max_length

    def __call__(self, rows: list[dict]) -> dict:
        out = {}
        for side, key in (("q", "query"), ("p", "passage")):
            enc = self.tokenizer([r[key] for r in rows], padding=True, truncation=True, max_length=self.max_length,
                                 return_tensors="pt")
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = enc["input_ids"], enc["attention_mask"]
        return out


class ContrastiveTrainer(Trainer):
    """transformers' Trainer with the InfoNCE loss over (query, passage) batches from PairCollator.
    Needs `remove_unused_columns=False` (the rows are raw text)."""

    def __init__(self, *args, temperature: float = 0.05, symmetric: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature, self.symmetric = temperature, symmetric

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        q = embed(model, inputs["q_input_ids"], inputs["q_attention_mask"])
        p = embed(model, inputs["p_input_ids"], inputs["p_attention_mask"])
        loss = info_nce_loss(q, p, self.temperature, self.symmetric)
        return (loss, {"q": q, "p": p}) if return_outputs else loss
