"""Train a BPE or unigram tokenizer with the `tokenizers` library, and measure it: tokens per word on held-out text.

`hf-tuner tokenizer train` and `recipes/pretrain.py` use it. The result is a transformers
`PreTrainedTokenizerFast` (saved with `save_pretrained`, loaded with `AutoTokenizer`).
"""

from __future__ import annotations

from pathlib import Path

KINDS = ("bpe", "unigram")
WORDNET_GLOSSES = "wordnet-glosses"
SPECIALS = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}


def wordnet_gloss_documents(folder: str | Path, glosses_per_document: int = 500) -> list[dict]:
    """WordNet as documents of `lemma: gloss` lines, in database order (which groups related senses), cut
    every `glosses_per_document` lines, so a held-out split keeps whole stretches of the dictionary."""
    from hf_tuner.data.wordnet_synsets import read_synsets

    lines = [f"{s['lemmas'][0]}: {s['gloss']}" for s in read_synsets(folder, min_words=1, max_words=1000)]
    return [{"name": f"wordnet/{i // glosses_per_document}", "text": "\n".join(lines[i:i + glosses_per_document])}
            for i in range(0, len(lines), glosses_per_document)]


def load_corpus(name: str) -> list[dict]:
    """Documents {"name", "text"} of one source: `wordnet-glosses`, or anything `load_documents` reads
    (`pydoc-topics`, `chatterbot-corpus`, a .txt/.md file or folder)."""
    from hf_tuner import assets
    from hf_tuner.data.text import load_documents

    if name == WORDNET_GLOSSES:
        return wordnet_gloss_documents(assets.resolve("wordnet-definitions"))
    return load_documents(name)


def split_corpus(sources: list[str], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Each source loses the same share of whole documents (at least one) to the held-out side."""
    from hf_tuner.data.text import split_documents

    train, held = [], []
    for name in sources:
        docs = load_corpus(name)
        t, h = split_documents(docs, max(1, round(eval_fraction * len(docs))), seed)
        train += [{**d, "source": name} for d in t]
        held += [{**d, "source": name} for d in h]
    return train, held


def train_tokenizer(texts: list[str], kind: str = "bpe", vocab_size: int = 8000, model_max_length: int = 2048):
    """A new tokenizer trained on `texts`: byte-level BPE (GPT-2 / Llama 3 style, never an unknown token) or
    unigram (SentencePiece style, Metaspace word boundaries). Special tokens: <|endoftext|>, <|im_start|>,
    <|im_end|> (ChatML names, like SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"tokenizer kind {kind!r}: one of {', '.join(KINDS)}")
    specials = list(dict.fromkeys([SPECIALS["unk_token"], SPECIALS["bos_token"], SPECIALS["eos_token"]]))
    if vocab_size <= len(specials) + (256 if kind == "bpe" else 0):
        raise ValueError(f"vocab_size={vocab_size} is too small for a {kind} tokenizer")
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token=SPECIALS["unk_token"]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                          unk_token=SPECIALS["unk_token"])
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length,
                                   pad_token=SPECIALS["eos_token"], **SPECIALS)


def tokens_per_word(tokenizer, texts: list[str]) -> float:
    """Tokens (no special tokens) per whitespace-separated word: lower means a tighter fit to the text."""
    words = sum(len(t.split()) for t in texts)
    tokens = sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
    return tokens / max(words, 1)


def tokenizer_report(train_texts: list[str], held_texts: list[str], kind: str, vocab_sizes: list[int],
                     compare: list[str] | None = None) -> list[dict]:
    """Rows {"tokenizer", "vocab_size", "tokens_per_word"} on held-out text: one new tokenizer per vocab size,
    then each existing tokenizer in `compare` (asset names or folders, e.g. smollm2-135m-instruct)."""
    from hf_tuner.models import load_tokenizer

    rows = []
    for size in vocab_sizes:
        tok = train_tokenizer(train_texts, kind, size)
        rows.append({"tokenizer": f"{kind} (trained here)", "vocab_size": len(tok),
                     "tokens_per_word": tokens_per_word(tok, held_texts)})
    for name in compare or []:
        tok = load_tokenizer(name)
        rows.append({"tokenizer": name, "vocab_size": len(tok), "tokens_per_word": tokens_per_word(tok, held_texts)})
    return rows


def report_table(rows: list[dict]) -> str:
    lines = ["| tokenizer | vocabulary | tokens per word (held-out) |", "|---|---:|---:|"]
    lines += [f"| {r['tokenizer']} | {r['vocab_size']} | {r['tokens_per_word']:.3f} |" for r in rows]
    return "\n".join(lines)


def train_tokenizer_cli(corpus: list[str], kind: str, vocab_size: int, output_dir: str | Path,
                        eval_fraction: float = 0.1, seed: int = 0, compare: list[str] | None = None,
                        sweep: list[int] | None = None) -> str:
    """`hf-tuner tokenizer train`: train on the training documents, save, and write report.md + report.json."""
    import json

    out = Path(output_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output_dir {out} already exists and is not empty")
    train_docs, held_docs = split_corpus(corpus, eval_fraction, seed)
    train_texts, held_texts = [d["text"] for d in train_docs], [d["text"] for d in held_docs]
    tok = train_tokenizer(train_texts, kind, vocab_size)
    sizes = sorted(set(sweep or []) - {vocab_size})
    rows = [{"tokenizer": f"{kind} (saved)", "vocab_size": len(tok), "tokens_per_word": tokens_per_word(tok, held_texts)}]
    rows += tokenizer_report(train_texts, held_texts, kind, sizes, compare)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out)
    table = report_table(rows)
    (out / "report.json").write_text(json.dumps({"corpus": corpus, "kind": kind, "train_documents": len(train_docs),
                                                 "held_out_documents": len(held_docs), "rows": rows}, indent=2))
    (out / "report.md").write_text(f"# Tokenizer: {kind}, {len(tok)} tokens\n\nTrained on {len(train_docs)} documents "
                                   f"of {', '.join(corpus)}; measured on {len(held_docs)} held-out documents.\n\n"
                                   f"{table}\n")
    return table
