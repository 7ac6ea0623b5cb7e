"""Pretraining from scratch: train a tokenizer on the corpus, then a small Llama-style model (causal LM).

    accelerate launch recipes/pretrain.py --config recipes/configs/pretrain.yaml [--key value ...]
    python -m recipes.pretrain --config recipes/configs/pretrain.yaml
    from recipes.pretrain import train; train("recipes/configs/pretrain.yaml")

Default: the Python documentation topics (standard library) plus the WordNet glosses, whole documents held out.
The tokenizer (byte-level BPE, `tokenizers`) is measured in tokens per word on held-out text at several
vocabulary sizes, beside SmolLM2's. The model is a LlamaConfig built from the config's sizes; base = the
random initialisation, tuned = after training; both scored by held-out perplexity, plus a few samples.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history, train_summary  # noqa: E402


@dataclass
class PretrainArguments(RunArguments):
    """eval_samples caps the held-out blocks scored; train_samples caps the training blocks."""

    peft_method: str = field(default="full", metadata={"help": "full: a model from scratch trains every weight"})
    corpus: list[str] = field(default_factory=lambda: ["pydoc-topics", "wordnet-glosses"], metadata={
        "help": "text sources: pydoc-topics, wordnet-glosses, chatterbot-corpus, .txt/.md files or folders"})
    eval_fraction: float = field(default=0.05, metadata={"help": "share of each source's documents held out"})
    tokenizer_kind: str = field(default="bpe", metadata={"help": "bpe (byte-level) or unigram"})
    vocab_size: int = field(default=8000, metadata={"help": "vocabulary of the tokenizer trained here"})
    tokenizer_sweep: list[int] = field(default_factory=lambda: [2000, 16000], metadata={
        "help": "other vocabulary sizes measured (tokens per word) for the report; empty: none"})
    compare_tokenizers: list[str] = field(default_factory=lambda: ["smollm2-135m-instruct"], metadata={
        "help": "existing tokenizers measured on the same held-out text"})
    block_size: int = field(default=128, metadata={"help": "tokens per training block (concatenate and chunk)"})
    hidden_size: int = field(default=256)
    intermediate_size: int = field(default=768)
    num_hidden_layers: int = field(default=4)
    num_attention_heads: int = field(default=4)
    num_key_value_heads: int = field(default=2)
    sample_prompts: list[str] = field(default_factory=lambda: ["The for statement", "dog:", "An exception"],
                                      metadata={"help": "prompts continued by the tuned model in the report"})
    sample_tokens: int = field(default=32, metadata={"help": "new tokens per sample (top-p 0.9, seeded)"})

    def __post_init__(self):
        super().__post_init__()
        from hf_tuner.tokenizer_training import KINDS

        if self.peft_method != "full":
            raise ConfigError(f"peft_method: a model from scratch trains in full; got {self.peft_method!r}")
        if self.tokenizer_kind not in KINDS:
            raise ConfigError(f"tokenizer_kind: {self.tokenizer_kind!r} is not one of {list(KINDS)}")
        if not 0 < self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction: {self.eval_fraction} must lie between 0 and 1")
        if self.hidden_size % self.num_attention_heads or self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("hidden_size must divide by num_attention_heads, and num_attention_heads by "
                              "num_key_value_heads")


def _config(source):
    from transformers import TrainingArguments

    return parse_config(TrainingArguments, source, run_cls=PretrainArguments)


def build_model(run: PretrainArguments, tokenizer):
    """A Llama-style causal LM from the config's sizes, tied input/output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=run.hidden_size,
                         intermediate_size=run.intermediate_size, num_hidden_layers=run.num_hidden_layers,
                         num_attention_heads=run.num_attention_heads, num_key_value_heads=run.num_key_value_heads,
                         max_position_embeddings=max(run.block_size, 512), tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def _samples(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[dict]:
    from hf_tuner.generation import DecodingSettings, generate_batched

    settings = DecodingSettings(strategy="top_p", max_new_tokens=max_new_tokens, batch_size=len(prompts) or 1,
                                seed=seed)
    return [{"prompt": p, "continuation": c} for p, c in
            zip(prompts, generate_batched(model, tokenizer, prompts, settings, desc="samples"))]


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from transformers import Trainer, default_data_collator, set_seed

    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.data.text import chunk_documents
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads
    from hf_tuner.distributed import is_main_process
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.evaluation.tasks import LanguageModelingTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source
    from hf_tuner.tokenizer_training import (report_table, split_corpus, tokenizer_report, tokens_per_word,
                                             train_tokenizer)
    from hf_tuner.validation import check_batch

    # 1. config and corpus, checked before anything trains
    cfg = _config(config)
    run, args = cfg.run, cfg.training
    if cfg.model.model_name_or_path:
        raise ConfigError("model_name_or_path: pretraining starts from scratch (set the sizes instead); "
                          "for a pretrained checkpoint use recipes/continued_pretraining.py")
    for name in run.compare_tokenizers:
        check_model_source(name)
    train_docs, held_docs = split_corpus(run.corpus, run.eval_fraction, run.split_seed)
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)

    # 2. the tokenizer, trained on the training documents only, and how tightly it fits held-out text
    start = time.perf_counter()
    train_texts, held_texts = [d["text"] for d in train_docs], [d["text"] for d in held_docs]
    tokenizer = train_tokenizer(train_texts, run.tokenizer_kind, run.vocab_size, model_max_length=run.block_size)
    tokenizer_seconds = time.perf_counter() - start
    token_rows = [{"tokenizer": f"{run.tokenizer_kind} (trained here, used)", "vocab_size": len(tokenizer),
                   "tokens_per_word": tokens_per_word(tokenizer, held_texts)}]
    token_rows += tokenizer_report(train_texts, held_texts, run.tokenizer_kind,
                                   sorted(set(run.tokenizer_sweep) - {run.vocab_size}), run.compare_tokenizers)
    blocks = chunk_documents(train_texts, tokenizer, run.block_size)
    if run.train_samples:
        blocks = blocks.shuffle(seed=run.split_seed).select(range(min(run.train_samples, len(blocks))))
    check_batch(len(blocks), args, "corpus blocks")

    # 3. the model from its config; "base" is the random initialisation
    model = build_model(run, tokenizer)
    task = LanguageModelingTask("held-out documents", [{"text": t} for t in held_texts], block_size=run.block_size,
                                max_blocks=run.eval_samples)
    settings = DecodingSettings(batch_size=run.eval_batch_size, seed=args.seed)
    results = {"base": evaluate_model(model, tokenizer, task, settings)}

    # 4. train: next-token prediction on concatenated blocks
    trainer = Trainer(model=model, args=args, train_dataset=blocks, data_collator=default_data_collator,
                      processing_class=tokenizer)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 5. evaluate the trained model on the same held-out blocks; a few samples
    results["tuned"] = evaluate_model(trainer.model, tokenizer, task, settings)
    samples = _samples(trainer.model, tokenizer, run.sample_prompts, run.sample_tokens, args.seed)

    # 6. save and report
    trainer.save_model(str(out / "model"))
    if is_main_process():
        tokenizer.save_pretrained(out / "model")
    n_params = sum(p.numel() for p in trainer.model.parameters())
    metrics = {"base_label": "base (random init)", "base": results["base"]["metrics"], "baselines": {},
               "tuned": results["tuned"]["metrics"], "gain": gains(results), "tokenizer": token_rows,
               "train": train_summary(trainer, train_output, runtime, train_blocks=len(blocks),
                                      train_documents=len(train_docs), held_out_documents=len(held_docs),
                                      parameters=n_params, tokenizer_seconds=tokenizer_seconds,
                                      peak_rss_mb=peak_rss_mb()),
               "eval_seconds": {k: v["seconds"] for k, v in results.items()}}
    notes = ["## Tokenizer", "", f"Trained on {len(train_docs)} documents of {', '.join(run.corpus)}; tokens per "
             f"whitespace word on the {len(held_docs)} held-out documents (lower: a tighter fit).", "",
             report_table(token_rows), "",
             f"Model: Llama, {run.num_hidden_layers} layers, hidden {run.hidden_size}, {n_params / 1e6:.2f} M "
             f"parameters; {len(blocks)} training blocks of {run.block_size} tokens. Perplexity is per token of "
             "this model's own tokenizer: compare it across runs with the same tokenizer only.", ""]
    table = write_run_record(out, "pretrain", metrics, samples, trainer.state.log_history, notes)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out perplexity, run folder {out}:\n{table}\n\n{report_table(token_rows)}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
