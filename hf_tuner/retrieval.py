"""A small retrieval index over a knowledge base, for knowledge-grounded prompts.

Passages are embedded once with a sentence encoder (mean pooling, L2-normalised: minilm-l6, or the
`model/` of a contrastive run) and searched by exact top-k cosine similarity. For the few thousand
passages of a recipe's knowledge base an exact matrix product takes milliseconds, so no vector library
(faiss, hnswlib) is needed; they pay off at millions of passages and would be one more dependency.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

# text chunking lives with the other text functions in data/, which loads no models; re-exported here
from hf_tuner.data.text import chunk_text, paragraphs  # noqa: F401

_WORD = re.compile(r"\w+")


def load_knowledge_base(name: str, max_words: int = 60) -> list[dict]:
    """Passages {"id", "source", "text"} from `pydoc-topics`, a folder of .txt/.md files, one such file, or a
    .jsonl of {"text", "source"?} rows (taken as they are, not re-chunked)."""
    from hf_tuner.data import DataError
    from hf_tuner.data.text import load_documents

    path = Path(name).expanduser()
    if path.suffix == ".jsonl" and path.is_file():
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not JSON ({e.msg})") from e
            if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
                raise DataError(f"{path}:{i}: a knowledge-base row needs a non-empty `text`")
            rows.append({"source": str(row.get("source", f"row {i}")), "text": row["text"].strip()})
    else:
        rows = [{"source": d["name"], "text": t} for d in load_documents(name) for t in chunk_text(d["text"], max_words)]
    if not rows:
        raise DataError(f"knowledge base {name!r} holds no passages")
    return [{"id": i, **r} for i, r in enumerate(rows)]


@dataclass
class PassageIndex:
    passages: list[dict]
    embeddings: torch.Tensor  # (n, dim), L2-normalised
    model: object
    tokenizer: object
    max_length: int = 128
    batch_size: int = 64

    @classmethod
    def build(cls, model, tokenizer, passages: list[dict], max_length: int = 128, batch_size: int = 64):
        from hf_tuner.contrastive import encode

        emb = encode(model, tokenizer, [p["text"] for p in passages], batch_size, max_length)
        return cls(passages, emb, model, tokenizer, max_length, batch_size)

    def search(self, queries: list[str], k: int = 3) -> list[list[dict]]:
        """The k most similar passages per query, best first, each with its cosine `score`."""
        from hf_tuner.contrastive import encode

        q = encode(self.model, self.tokenizer, queries, self.batch_size, self.max_length)
        scores, idx = (q @ self.embeddings.T).topk(min(k, len(self.passages)), dim=1)
        return [[{**self.passages[i], "score": float(s)} for s, i in zip(srow.tolist(), irow.tolist())]
                for srow, irow in zip(scores, idx)]


def load_encoder(name_or_path: str):
    """(AutoModel, tokenizer) of a sentence encoder: an asset, a folder (a contrastive run's model/) or a Hub id."""
    from hf_tuner import models

    model, tokenizer = models.load_encoder(name_or_path)
    return model.eval(), tokenizer


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def groundedness(answer: str, passages: list[str]) -> float:
    """Share of the answer's word tokens that occur in the passages (1.0 for an empty answer has no meaning:
    it scores 0)."""
    tokens = words(answer)
    if not tokens:
        return 0.0
    vocabulary = {w for p in passages for w in words(p)}
    return sum(t in vocabulary for t in tokens) / len(tokens)


def grounded_prompt(question: str, passages: list[str]) -> str:
    """The user turn of a knowledge-grounded example: numbered passages, then the question."""
    context = "\n".join(f"[{i + 1}] {p}" for i, p in enumerate(passages))
    return ("Answer the question using only the passages below. Answer briefly, in words taken from them.\n\n"
            f"Passages:\n{context}\n\nQuestion: {question}")
