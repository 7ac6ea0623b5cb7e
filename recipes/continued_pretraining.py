"""Domain-adaptive (continued) pretraining: causal LM (`objective: clm`) or masked LM with whole-word masking
(`objective: mlm`), on plain text, with transformers' Trainer.

    accelerate launch recipes/continued_pretraining.py --config recipes/configs/continued_pretraining.yaml [--key value ...]
    python -m recipes.continued_pretraining --config recipes/configs/continued_pretraining_mlm.yaml
    from recipes.continued_pretraining import train; train("recipes/configs/continued_pretraining.yaml")

Default: SmolLM2-135M-Instruct with LoRA on the Python documentation that ships with the standard library
(pydoc_data.topics); whole topics are held out. Text is concatenated and cut into fixed blocks (run_clm's
group_texts). Reported: held-out domain perplexity before and after, and forgetting: perplexity on general
text (chatterbot dialogues) before and after; for MLM also masked-token accuracy.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.data import DataError  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history, train_summary  # noqa: E402

OBJECTIVES = {"clm": "causal-lm", "mlm": "masked-lm"}


@dataclass
class PretrainingArguments(RunArguments):
    """eval_samples caps the held-out blocks scored per text set; train_samples caps the training blocks."""

    objective: str = field(default="clm", metadata={"help": "clm (causal LM) or mlm (masked LM, whole-word masking)"})
    block_size: int = field(default=128, metadata={"help": "tokens per block after concatenate-and-chunk"})
    mlm_probability: float = field(default=0.15, metadata={"help": "mlm: share of words masked"})
    eval_documents: int = field(default=8, metadata={"help": "whole documents (e.g. pydoc topics) held out"})
    general_dataset: str | None = field(
        default="chatterbot-corpus", metadata={"help": "general text for the forgetting figure (empty: none)"})


def _config(source):
    from transformers import TrainingArguments

    cfg = parse_config(TrainingArguments, source, run_cls=PretrainingArguments, uses={"held_out_benchmarks"})
    if cfg.run.objective not in OBJECTIVES:
        raise ConfigError(f"objective: {cfg.run.objective!r} is not one of {list(OBJECTIVES)}")
    if cfg.run.held_out_benchmarks and cfg.run.objective != "clm":
        raise ConfigError("held_out_benchmarks: lm-eval scores causal LMs; objective mlm cannot run them")
    if not 0 < cfg.run.mlm_probability < 1:
        raise ConfigError(f"mlm_probability: {cfg.run.mlm_probability} must lie between 0 and 1")
    return cfg


def _data(cfg):
    """(training documents, or a stream of them; held-out documents; general documents; the loaded record).

    Any language-modelling source (`text` or `messages` rows). The held-out documents are the dataset's test
    split (first eval_documents rows) when it has one, else eval_documents whole documents carved out of train
    (the first ones of a stream)."""
    from hf_tuner.data import data_sources, load_rows
    from hf_tuner.data.formats import text_row
    from hf_tuner.data.text import PYDOC_TOPICS, load_documents, split_documents

    kinds = {"language_modeling": "text or messages"}
    data = load_rows(data_sources(cfg, default=PYDOC_TOPICS, streams=True), text_row, "continued_pretraining", kinds,
                     ("text", "messages", "name", "where"), materialize=False)
    n = cfg.run.eval_documents
    if data.test is not None:
        train_docs, held_docs = data.train, data.test[:n]
        print(f"held-out: the dataset's test split ({len(data.test)} documents, {len(held_docs)} scored)")
    elif data.streaming:
        held_docs, train_docs = list(data.train.take(n)), data.train.skip(n)
        print(f"held-out: no test split in {data.label}; the first {n} documents of the stream are held out")
    else:  # whole documents carved by index; the training rows stay memory-mapped Arrow
        order = list(range(len(data.train)))
        train_idx, held_idx = split_documents(order, n, cfg.run.split_seed)
        train_docs, held_docs = data.train.select(train_idx), data.train.select(held_idx).to_list()
    general = load_documents(cfg.run.general_dataset) if cfg.run.general_dataset else []
    return train_docs, held_docs, general, data


def _as_text(docs, tokenizer):
    """Documents as plain text: `messages` rows rendered with the model's chat template."""
    import json

    from datasets import Dataset

    def text(row):
        if row.get("text"):
            return {"text": row["text"]}
        if not tokenizer.chat_template:
            raise DataError(f"{row['where']}: `messages` documents need a tokenizer with a chat template")
        return {"text": tokenizer.apply_chat_template(json.loads(row["messages"]), tokenize=False)}

    if isinstance(docs, list):
        return [{**d, **text(d)} for d in docs]
    if isinstance(docs, Dataset) and not any(docs["messages"]):  # all plain text: no rewrite of a large corpus
        return docs
    return docs.map(text)


def _percent_change(before: float, after: float) -> float:
    return 100.0 * (after - before) / before


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from peft import get_peft_model
    from transformers import Trainer, default_data_collator
    from transformers import set_seed

    from hf_tuner.adapters import peft_setup
    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.data.text import chunk_dataset, whole_word_mask_collator
    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.benchmarks import from_run, report as report_benchmarks, run_on_main
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.evaluation.tasks import LanguageModelingTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model

    # 1. config, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as smollm2-135m-instruct or minilm-l6)")
    model_path = check_model_source(mcfg.model_name_or_path)
    model_task = OBJECTIVES[run.objective]
    mlm = run.objective == "mlm"
    # The block count is known only after tokenizing, so AdaLoRA's schedule needs max_steps here.
    peft = peft_setup(run.peft_method, model_path, model_task, mcfg, run.peft_options,
                      total_steps=args.max_steps if args.max_steps > 0 else None)
    train_docs, held_docs, general_docs, data = _data(cfg)
    if data.streaming and args.max_steps <= 0:
        raise ConfigError("dataset_streaming: a stream has no length; set max_steps")
    benchmarks = from_run(run)  # lm-eval tasks checked (data readable) before weights load
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state

    # 2. load (for MLM on an encoder without a trained MLM head, the head's missing weights start fresh)
    model, tokenizer, info = load_model(mcfg.model_name_or_path, model_task, dtype=mcfg.dtype,
                                        revision=mcfg.model_revision, output_loading_info=True,
                                        quantization_config=peft.quantization)
    fresh = sorted(info["missing_keys"])

    # 3. evaluate the base: held-out domain text, and general text for the forgetting figure
    def lm_task(name, docs):
        return LanguageModelingTask(name, docs, block_size=run.block_size, objective=run.objective,
                                    mlm_probability=run.mlm_probability, max_blocks=run.eval_samples, seed=args.seed)

    held_docs = _as_text(held_docs, tokenizer)
    domain = lm_task("domain (held-out documents)", held_docs)
    general = lm_task(f"general: {run.general_dataset}", general_docs) if general_docs else None
    settings = DecodingSettings(batch_size=run.eval_batch_size)
    results = {"base": evaluate_model(model, tokenizer, domain, settings)}
    general_results = {"base": evaluate_model(model, tokenizer, general, settings)} if general else {}
    bench_base = run_on_main(benchmarks, model, tokenizer, out, "base")

    # 4. train on the concatenated, chunked training documents
    texts = _as_text(train_docs, tokenizer).select_columns(["text"])
    blocks = chunk_dataset(texts, tokenizer, run.block_size, word_offsets=mlm, max_blocks=run.train_samples)
    if peft.config is not None:
        model = get_peft_model(model, peft.config)
    if mlm:
        args.remove_unused_columns = False  # the collator needs offset_mapping to find whole words
    collator = whole_word_mask_collator(tokenizer, run.mlm_probability, seed=args.seed) if mlm else default_data_collator
    trainer = Trainer(model=model, args=args, train_dataset=blocks, processing_class=tokenizer, data_collator=collator,
                      callbacks=peft.callbacks)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 5. evaluate the tuned model on the same blocks (and, for MLM, the same masks)
    results["tuned"] = evaluate_model(trainer.model, tokenizer, domain, settings)
    if general:
        general_results["tuned"] = evaluate_model(trainer.model, tokenizer, general, settings)
    bench_tuned = run_on_main(benchmarks, trainer.model, tokenizer, out, "tuned")

    # 6. report
    trainer.save_model(str(out / "model"))
    base_ppl, tuned_ppl = results["base"]["metrics"]["perplexity"], results["tuned"]["metrics"]["perplexity"]
    summary = {"domain_perplexity_change_pct": _percent_change(base_ppl, tuned_ppl)}
    lines = [f"domain perplexity (held-out documents): {base_ppl:.2f} -> {tuned_ppl:.2f} "
             f"({summary['domain_perplexity_change_pct']:+.1f}%)"]
    if general:
        g_base, g_tuned = (general_results[k]["metrics"]["perplexity"] for k in ("base", "tuned"))
        summary["general_perplexity_change_pct"] = _percent_change(g_base, g_tuned)
        lines.append(f"forgetting, general-text perplexity ({run.general_dataset}): {g_base:.2f} -> {g_tuned:.2f} "
                     f"({summary['general_perplexity_change_pct']:+.1f}%)")
    metrics = {
        "base_label": "base",
        "base": results["base"]["metrics"],
        "baselines": {},
        "tuned": results["tuned"]["metrics"],
        "gain": gains(results),
        "train": train_summary(trainer, train_output, runtime, objective=run.objective, peft_method=run.peft_method,
                               train_documents=None if data.streaming else len(train_docs),
                               held_out_documents=[d["name"] for d in held_docs],
                               train_blocks=None if data.streaming else len(blocks), block_size=run.block_size,
                               streaming=data.streaming, data=data.counts),
        "summary": summary,
        "newly_initialized_weights": fresh,
        "tasks": {"trained": [data.label], "held_out": [general.name] if general else []},
        "held_out_tasks": {general.name: {k: v["metrics"] for k, v in general_results.items()}} if general else {},
    }
    notes = ["## Domain adaptation and forgetting", "", *[f"- {line}" for line in lines], ""]
    metrics["held_out_benchmarks"], bench_notes = report_benchmarks(bench_base, bench_tuned)
    notes += bench_notes
    if mlm:
        notes += [f"Masked-token accuracy over whole-word masks ({run.mlm_probability:.0%} of words, fixed seed): "
                  f"{results['base']['metrics']['masked_accuracy']:.3f} -> "
                  f"{results['tuned']['metrics']['masked_accuracy']:.3f}.", ""]
    if fresh:
        notes += ["**The checkpoint lacked these weights; they started fresh (random):** " + ", ".join(fresh) + ".",
                  "For MiniLM this is the MLM head: its decoder is tied to the word embeddings, but the transform "
                  "layer (dense + LayerNorm) and the output bias are new, so the base row measures an untrained "
                  "head, not the encoder's knowledge.", ""]
    table = write_run_record(out, f"continued_pretraining ({run.objective})", metrics, [], trainer.state.log_history,
                             notes)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out domain text, run folder {out}:\n{table}\n" + "\n".join(lines) + "\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
