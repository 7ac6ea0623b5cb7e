"""Plain-text corpora as documents, and the classic concatenate-and-chunk preprocessing for language modelling.

Sources (each gives documents {"name", "text"}; a document is the unit a held-out split keeps whole):
- `pydoc-topics`: the Python documentation topics that ship with the standard library (pydoc_data.topics);
- `chatterbot-corpus` (asset): English dialogues, one document per conversation;
- a local `.txt`/`.md` file (one document) or a folder of them (one document per file).
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from hf_tuner.data.files import DataError, read_text

TEXT_SUFFIXES = {".txt", ".md"}
PYDOC_TOPICS = "pydoc-topics"


def pydoc_topics() -> list[dict]:
    from pydoc_data.topics import topics

    return [{"name": name, "text": text} for name, text in sorted(topics.items()) if text.strip()]


def chatterbot_dialogues(folder: str | Path) -> list[dict]:
    """Each conversation's turns joined by newlines; names are `<file stem>/<index>`."""
    import yaml

    docs = []
    for path in sorted(Path(folder).rglob("*.yml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for i, turns in enumerate(data.get("conversations") or []):
            lines = [str(t).strip() for t in turns if str(t).strip()]
            if lines:
                docs.append({"name": f"{path.stem}/{i}", "text": "\n".join(lines)})
    if not docs:
        raise DataError(f"{folder}: no chatterbot conversations (*.yml with a `conversations` list)")
    return docs


def text_files(path: str | Path) -> list[dict]:
    path = Path(path).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
    docs = [{"name": str(p.relative_to(path) if path.is_dir() else p.name), "text": read_text(p)}
            for p in files]
    docs = [d for d in docs if d["text"].strip()]
    if not docs:
        raise DataError(f"{path}: no non-empty {'/'.join(sorted(TEXT_SUFFIXES))} files")
    return docs


def load_documents(name: str) -> list[dict]:
    """Documents from `pydoc-topics`, the `chatterbot-corpus` asset, or a local text file or folder."""
    from hf_tuner import assets

    if name == PYDOC_TOPICS:
        return pydoc_topics()
    if name == "chatterbot-corpus":
        return chatterbot_dialogues(assets.resolve(name))
    path = Path(name).expanduser()
    if path.is_dir() and list(path.rglob("*.yml")) and not any(p.suffix in TEXT_SUFFIXES for p in path.rglob("*")):
        return chatterbot_dialogues(path)
    if path.is_dir() or (path.is_file() and path.suffix in TEXT_SUFFIXES):
        return text_files(path)
    raise DataError(f"text source {name!r}: not {PYDOC_TOPICS}, chatterbot-corpus, or an existing "
                    f"{'/'.join(sorted(TEXT_SUFFIXES))} file or folder")


def split_documents(docs: list[dict], eval_docs: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out `eval_docs` whole documents (e.g. pydoc topics): no held-out text is trained on."""
    if not 0 < eval_docs < len(docs):
        raise DataError(f"eval_documents={eval_docs}: need between 1 and {len(docs) - 1} of {len(docs)} documents")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    held = set(order[:eval_docs])
    return [d for i, d in enumerate(docs) if i not in held], [d for i, d in enumerate(docs) if i in held]


def chunk_documents(texts: list[str], tokenizer, block_size: int, word_offsets: bool = False,
                    max_blocks: int | None = None):
    """Tokenize, concatenate and cut into `block_size`-token blocks, dropping the remainder (run_clm's
    `group_texts`). Documents end with the tokenizer's end token (EOS, or BERT's [SEP]) so a block that
    spans two documents still marks the boundary.

    word_offsets=True keeps `offset_mapping` and `special_tokens_mask`, which whole-word masking needs:
    offsets restart at each document, so the first token of a document always starts a new word.
    Returns a datasets.Dataset with input_ids, attention_mask (and labels = input_ids for the causal LM
    loss; without word_offsets).
    """
    from datasets import Dataset

    if block_size < 2:
        raise ValueError(f"block_size={block_size}: need at least 2 tokens")
    enc = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=word_offsets,
                    return_special_tokens_mask=word_offsets, verbose=False)
    columns = ["input_ids"] + (["offset_mapping", "special_tokens_mask"] if word_offsets else [])
    flat: dict[str, list] = {c: [] for c in columns}
    eos = tokenizer.eos_token_id
    for i in range(len(texts)):
        ids = enc["input_ids"][i]
        for c in columns:
            flat[c] += enc[c][i]
        if eos is not None and (not ids or ids[-1] != eos):  # e.g. Llama tokenizers add no end token
            flat["input_ids"].append(eos)
            if word_offsets:
                flat["offset_mapping"].append((0, 0))
                flat["special_tokens_mask"].append(1)
    n_blocks = len(flat["input_ids"]) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        raise DataError(f"{len(flat['input_ids'])} tokens make no block of {block_size}; lower block_size")
    blocks = {c: [v[k * block_size:(k + 1) * block_size] for k in range(n_blocks)] for c, v in flat.items()}
    if word_offsets:
        blocks["offset_mapping"] = [[list(o) for o in row] for row in blocks["offset_mapping"]]
    blocks["attention_mask"] = [[1] * block_size for _ in range(n_blocks)]
    if not word_offsets:
        blocks["labels"] = [list(row) for row in blocks["input_ids"]]
    return Dataset.from_dict(blocks)


def chunk_dataset(ds, tokenizer, block_size: int, word_offsets: bool = False, max_blocks: int | None = None):
    """`chunk_documents` as one batched `map` over a Dataset or a streaming IterableDataset of {"text"} rows:
    tokenize, then concatenate and cut each batch of 1,000 documents into blocks (run_clm's group_texts; the
    remainder of each batch is dropped). A file-backed dataset is tokenized once and served from the datasets
    cache on the next run; a stream is tokenized as it is read, so memory does not grow with the corpus."""
    from datasets import Dataset

    if block_size < 2:
        raise ValueError(f"block_size={block_size}: need at least 2 tokens")
    columns = ["input_ids"] + (["offset_mapping", "special_tokens_mask"] if word_offsets else [])
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict) -> dict:
        enc = tokenizer(batch["text"], add_special_tokens=True, return_offsets_mapping=word_offsets,
                        return_special_tokens_mask=word_offsets, verbose=False)
        out = {c: [list(x) for x in enc[c]] for c in columns}
        for i, ids in enumerate(out["input_ids"]):
            if eos is not None and (not ids or ids[-1] != eos):  # e.g. Llama tokenizers add no end token
                ids.append(eos)
                if word_offsets:
                    out["offset_mapping"][i].append((0, 0))
                    out["special_tokens_mask"][i].append(1)
        if word_offsets:
            out["offset_mapping"] = [[list(o) for o in row] for row in out["offset_mapping"]]
        return out

    def group(batch: dict) -> dict:
        flat = {c: [t for row in batch[c] for t in row] for c in columns}
        n = len(flat["input_ids"]) // block_size
        blocks = {c: [v[k * block_size:(k + 1) * block_size] for k in range(n)] for c, v in flat.items()}
        blocks["attention_mask"] = [[1] * block_size for _ in range(n)]
        if not word_offsets:
            blocks["labels"] = [list(row) for row in blocks["input_ids"]]
        return blocks

    def blocks(batch: dict) -> dict:  # one pass: the token lists of a batch never go through Arrow
        return group(tokenize(batch))

    names = ds.column_names or list(next(iter(ds)).keys())
    desc = {"desc": f"tokenizing into blocks of {block_size}"} if isinstance(ds, Dataset) else {}
    ds = ds.map(blocks, batched=True, remove_columns=names, **desc)
    if isinstance(ds, Dataset):
        if len(ds) == 0:
            raise DataError(f"the training text makes no block of {block_size} tokens; lower block_size")
        return ds.select(range(min(max_blocks, len(ds)))) if max_blocks else ds
    return ds.take(max_blocks) if max_blocks else ds


def whole_word_mask_collator(tokenizer, mlm_probability: float = 0.15, seed: int | None = None):
    """transformers' own whole-word masking (DataCollatorForLanguageModeling(whole_word_mask=True)):
    a word is a run of tokens with no gap in their character offsets; each word is picked with
    probability `mlm_probability` and then every one of its tokens is replaced by [MASK]."""
    from transformers import DataCollatorForLanguageModeling

    if tokenizer.mask_token is None:
        raise DataError(f"{type(tokenizer).__name__} has no mask token; masked-LM training needs one")
    return DataCollatorForLanguageModeling(tokenizer, mlm=True, whole_word_mask=True, mlm_probability=mlm_probability,
                                           mask_replace_prob=1.0, random_replace_prob=0.0, seed=seed)


def paragraphs(text: str) -> list[str]:
    """Blank-line separated blocks, each joined into one line; underline rows (*** / ===) dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.split("\n") if line.strip()]
        lines = [line for line in lines if not set(line) <= set("*=-~^")]
        if lines:
            out.append(" ".join(lines))
    return out


def chunk_text(text: str, max_words: int = 60) -> list[str]:
    """Passages of at most `max_words` words: whole paragraphs merged while they fit, long ones cut."""
    passages, current = [], []
    for para in paragraphs(text):
        words = para.split()
        while len(words) > max_words:  # a long paragraph: cut it, the first part on its own
            if current:
                passages.append(" ".join(current))
                current = []
            passages.append(" ".join(words[:max_words]))
            words = words[max_words:]
        if current and len(current) + len(words) > max_words:
            passages.append(" ".join(current))
            current = []
        current += words
    if current:
        passages.append(" ".join(current))
    return passages
