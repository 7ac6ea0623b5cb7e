"""Knowledge-grounded instruction tuning: every prompt carries the top-k passages retrieved from a knowledge base.

    accelerate launch recipes/grounded_sft.py --config recipes/configs/grounded_sft.yaml [--key value ...]
    python -m recipes.grounded_sft --config recipes/configs/grounded_sft.yaml
    from recipes.grounded_sft import train; train("recipes/configs/grounded_sft.yaml")

Default: questions over the Python documentation topics (`pydoc_data.topics`), built from the documentation's
own "X is Y." sentences; whole topics held out. The index holds every topic's passages, embedded with
minilm-l6 (or a contrastive run's `model/`). Evaluated on the same held-out questions: the base model without
context, the base with retrieved context, the tuned model with retrieved context; answer ROUGE-L and
groundedness (the share of answer words found in the retrieved passages).
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history, train_summary  # noqa: E402

NO_CONTEXT = "{question} Answer briefly."


@dataclass
class GroundedArguments(RunArguments):
    knowledge_base: str = field(default="pydoc-topics", metadata={
        "help": "pydoc-topics, a folder of .txt/.md files, one such file, or a .jsonl of {text, source?} passages"})
    retriever_model: str = field(default="minilm-l6", metadata={
        "help": "sentence encoder of the index: an asset, a contrastive run's model/ folder, or a Hub id"})
    top_k: int = field(default=2, metadata={"help": "passages retrieved into each prompt"})
    passage_words: int = field(default=60, metadata={"help": "words per passage when the knowledge base is chunked"})
    eval_topics: int = field(default=8, metadata={"help": "whole groups (topics) held out; eval_samples caps questions"})

    def __post_init__(self):
        super().__post_init__()
        if self.top_k < 1 or self.passage_words < 5 or self.eval_topics < 1:
            raise ConfigError("top_k and eval_topics must be at least 1, passage_words at least 5")


def _config(source):
    from trl import SFTConfig

    return parse_config(SFTConfig, source, run_cls=GroundedArguments, uses={"held_out_benchmarks"})


def _questions(name: str) -> list[dict]:
    """pydoc-qa (built from the documentation), or a .jsonl of {question, answer, group?} rows."""
    from hf_tuner.data import DataError

    if name == "pydoc-qa":
        from hf_tuner.data.pydoc_qa import pydoc_questions

        return pydoc_questions()
    path = Path(name)
    if path.suffix != ".jsonl" or not path.is_file():
        raise DataError(f"dataset_name {name!r}: pydoc-qa or an existing .jsonl of question/answer rows")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not JSON ({e.msg})") from e
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                    for k in ("question", "answer")):
                raise DataError(f"{path}:{i}: needs non-empty string fields `question` and `answer`")
            rows.append({"question": row["question"], "answer": row["answer"], "group": str(row.get("group", i))})
    return rows


def _rows(questions: list[dict], hits: list[list[dict]], with_context: bool) -> list[dict]:
    from hf_tuner.retrieval import grounded_prompt

    return [{"prompt": [{"role": "user", "content": grounded_prompt(q["question"], [p["text"] for p in h])
                         if with_context else NO_CONTEXT.format(question=q["question"])}],
             "completion": [{"role": "assistant", "content": q["answer"]}], "group": q["group"],
             "passages": [p["text"] for p in h]} for q, h in zip(questions, hits)]


def _scored(result: dict, rows: list[dict]) -> dict:
    from hf_tuner.retrieval import groundedness

    from hf_tuner.evaluation.significance import Stat

    g = [groundedness(p, r["passages"]) for p, r in zip(result["predictions"], rows)]
    result["per_example"]["groundedness"] = Stat("mean", g)  # for the paired bootstrap (report.gains)
    return {**result["metrics"], "groundedness": sum(g) / max(len(g), 1)}


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from datasets import Dataset
    from transformers import set_seed
    from trl import SFTTrainer

    from hf_tuner.adapters import peft_setup
    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.compact_loss import compact_loss_trainer
    from hf_tuner.data import split_by_group
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads
    from hf_tuner.distributed import is_main_process
    from hf_tuner.evaluation import GenerationTask, evaluate_model
    from hf_tuner.evaluation.benchmarks import from_run, report as report_benchmarks, run_on_main
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model
    from hf_tuner.retrieval import PassageIndex, load_encoder, load_knowledge_base
    from hf_tuner.training import planned_steps
    from hf_tuner.validation import check_batch

    # 1. config, questions and knowledge base, checked before any model loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as smollm2-135m-instruct, a folder or a Hub id)")
    model_path = check_model_source(mcfg.model_name_or_path)
    check_model_source(run.retriever_model)
    train_q, held_q = split_by_group(_questions(cfg.script.dataset_name or "pydoc-qa"), run.eval_topics, run.split_seed)
    random.Random(run.split_seed).shuffle(train_q)
    train_q, held_q = train_q[:run.train_samples] if run.train_samples else train_q, held_q[:run.eval_samples]
    passages = load_knowledge_base(run.knowledge_base, run.passage_words)
    check_batch(len(train_q), args, cfg.script.dataset_name or "pydoc-qa")
    peft = peft_setup(run.peft_method, model_path, "causal-lm", mcfg, run.peft_options,
                      total_steps=planned_steps(args, len(train_q)))
    benchmarks = from_run(run)  # lm-eval tasks checked (data readable) before weights load
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)

    # 2. the index: every passage embedded once; top-k for every question, training and held-out alike
    start = time.perf_counter()
    encoder, encoder_tokenizer = load_encoder(run.retriever_model)
    index = PassageIndex.build(encoder, encoder_tokenizer, passages)
    train_hits, held_hits = index.search([q["question"] for q in train_q], run.top_k), \
        index.search([q["question"] for q in held_q], run.top_k)
    answer_found = sum(any(q["answer"] in p["text"] for p in h) for q, h in zip(held_q, held_hits)) / len(held_q)
    retrieval = {"passages": len(passages), "top_k": run.top_k, "retriever": run.retriever_model,
                 "held_out_answer_in_context": answer_found, "seconds": time.perf_counter() - start}
    del encoder, index

    # 3. load the generator; evaluate the base without context and with the retrieved context
    model, tokenizer = load_model(mcfg.model_name_or_path, "causal-lm", dtype=mcfg.dtype, revision=mcfg.model_revision,
                                  quantization_config=peft.quantization)
    rows = {"no_context": _rows(held_q, held_hits, False), "context": _rows(held_q, held_hits, True)}
    metrics_names = ("rougeL", "mean_length")
    tasks = {k: GenerationTask(f"held-out {k}", v, metrics=metrics_names, system_prompt=run.system_prompt)
             for k, v in rows.items()}
    settings = DecodingSettings(max_new_tokens=run.eval_max_new_tokens, batch_size=run.eval_batch_size, seed=args.seed)
    results = {"base": evaluate_model(model, tokenizer, tasks["no_context"], settings),
               "context": evaluate_model(model, tokenizer, tasks["context"], settings)}
    bench_base = run_on_main(benchmarks, model, tokenizer, out, "base")

    # 4. train on grounded prompts: completion-only loss on the answers
    train_ds = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]}
                                  for r in _rows(train_q, train_hits, True)])
    trainer_cls = compact_loss_trainer(SFTTrainer) if run.compact_loss and not peft.prompt_learning else SFTTrainer
    trainer = trainer_cls(model=model, args=args, train_dataset=train_ds, processing_class=tokenizer,
                          peft_config=peft.config, callbacks=peft.callbacks)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 5. evaluate the tuned model with the same retrieved context
    results["tuned"] = evaluate_model(trainer.model, tokenizer, tasks["context"], settings)
    bench_tuned = run_on_main(benchmarks, trainer.model, tokenizer, out, "tuned")

    # 6. save and report
    trainer.save_model(str(out / "adapter"))
    if is_main_process():
        tokenizer.save_pretrained(out / "adapter")
    scored = {k: _scored(v, rows["no_context" if k == "base" else "context"]) for k, v in results.items()}
    metrics = {"base_label": "base, no context", "base": scored["base"],
               "baselines": {"with retrieved context": scored["context"]}, "tuned": scored["tuned"],
               "gain": gains({"with retrieved context" if k == "context" else k: v for k, v in results.items()}),
               "retrieval": retrieval,
               "train": train_summary(trainer, train_output, runtime, train_questions=len(train_q),
                                      eval_questions=len(held_q), peft_method=peft.method, peak_rss_mb=peak_rss_mb()),
               "eval_seconds": {k: v["seconds"] for k, v in results.items()}}
    notes = ["## Retrieval", "", f"{len(passages)} passages of {run.knowledge_base} (up to {run.passage_words} words), "
             f"embedded with {run.retriever_model}; top {run.top_k} by cosine for each question. The held-out answer "
             f"appears verbatim in the retrieved passages for {answer_found:.0%} of held-out questions.", "",
             "groundedness: share of the answer's words found in the retrieved passages (computed against the same "
             "passages for the no-context base). Held-out topics are never trained on.", ""]
    metrics["held_out_benchmarks"], bench_notes = report_benchmarks(bench_base, bench_tuned)
    notes += bench_notes
    examples = [{"question": q["question"], "reference": q["answer"],
                 **{k: v["predictions"][i] for k, v in results.items()}} for i, q in enumerate(held_q)]
    table = write_run_record(out, "grounded_sft", metrics, examples[:run.report_examples], trainer.state.log_history,
                             notes, generations=[{"prompt": r["prompt"][-1]["content"], **e}
                                                 for r, e in zip(rows["context"], examples)])
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out questions ({len(held_q)}), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
