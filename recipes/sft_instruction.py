"""Instruction tuning: SFT with TRL's SFTTrainer and LoRA on chat-formatted prompt/completion data.

    accelerate launch recipes/sft_instruction.py --config recipes/configs/sft_instruction.yaml [--key value ...]
    python -m recipes.sft_instruction --config recipes/configs/sft_instruction.yaml
    from recipes.sft_instruction import train; train("recipes/configs/sft_instruction.yaml")

Default: SmolLM2-135M-Instruct learns to define words from WordNet glosses; held-out words never
appear in training. Base zero-shot, base few-shot and tuned are evaluated on the same prompts.
"""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunConfig, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history  # noqa: E402


def _config(source) -> RunConfig:
    from trl import SFTConfig

    return parse_config(SFTConfig, source, uses={"held_out_benchmarks"})


def _check_and_load_data(cfg: RunConfig):
    """(train rows, or a stream of them; held-out rows; held-out tasks; the loaded data's record)."""
    from hf_tuner.data import SFT_COLUMNS, SFT_TYPES, data_sources, held_out, load_examples, load_rows, sft_row

    data = load_rows(data_sources(cfg, streams=True), sft_row, "sft_instruction", SFT_TYPES, SFT_COLUMNS)
    train_rows, held_rows = held_out(data, cfg.run.eval_samples, cfg.run.split_seed)
    if data.streaming:
        if cfg.run.train_samples:
            train_rows = train_rows.take(cfg.run.train_samples)
    else:
        random.Random(cfg.run.split_seed).shuffle(train_rows)
        if cfg.run.train_samples:
            train_rows = train_rows[:cfg.run.train_samples]
    held_out_tasks = {}
    for name in cfg.run.held_out_tasks or []:
        rows = load_examples(name)
        n = min(cfg.run.eval_samples or len(held_rows), len(rows))
        held_out_tasks[name] = random.Random(cfg.run.split_seed).sample(rows, n)
    return train_rows, held_rows, held_out_tasks, data


def _train_dataset(rows, system_prompt: str | None, tokenizer, max_length: int) -> tuple:
    """TRL's conversational prompt/completion rows (completion-only loss); when any row has earlier assistant
    turns (or the data streams in), conversations pre-tokenized with every assistant turn labelled."""
    from datasets import Dataset

    from hf_tuner.data.chat_masks import tokenized_conversations

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if isinstance(rows, list) and all(r["turns"] == 1 for r in rows):
        return Dataset.from_list([{"prompt": system + r["prompt"], "completion": r["completion"]} for r in rows]), False
    rows = Dataset.from_list(rows) if isinstance(rows, list) else rows
    return tokenized_conversations(rows, tokenizer, max_length, system_prompt), True


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from transformers import set_seed
    from trl import SFTTrainer

    from hf_tuner.adapters import peft_setup, trainable_parameters
    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.compact_loss import compact_loss_trainer
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads
    from hf_tuner.distributed import is_main_process
    from hf_tuner.evaluation import GenerationTask, evaluate_model
    from hf_tuner.evaluation.benchmarks import from_run, report as report_benchmarks, run_on_main
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model, load_tokenizer
    from hf_tuner.progress import RunClock
    from hf_tuner.training import planned_steps, plain_loss_trainer
    from hf_tuner.validation import check_batch, check_lengths

    # 1. config, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as smollm2-135m-instruct, a folder or a Hub id)")
    model_path = check_model_source(mcfg.model_name_or_path)
    train_rows, held_rows, held_out_tasks, data = _check_and_load_data(cfg)
    if data.streaming:
        if args.max_steps <= 0:
            raise ConfigError("dataset_streaming: a stream has no length; set max_steps")
        if not run.truncation:
            raise ConfigError("truncation: false checks every row's length before training, which a stream cannot; "
                              "keep truncation on with dataset_streaming")
    else:
        check_batch(len(train_rows), args, data.label)
    if not run.truncation:  # tokenizer only: the rows as the trainer will see them, chat template included
        tokenizer = load_tokenizer(model_path, revision=mcfg.model_revision)
        system = [{"role": "system", "content": run.system_prompt}] if run.system_prompt else []
        check_lengths([(r.get("where", cfg.script.dataset_name), len(tokenizer(tokenizer.apply_chat_template(
            system + r["prompt"] + r["completion"], tokenize=False), add_special_tokens=False).input_ids))
            for r in train_rows], args.max_length)
    multi_turn = next((r for r in train_rows if r["turns"] > 1), None) if not data.streaming else None
    if multi_turn is not None:  # the chat template must render turn by turn to find every answer (tokenizer only)
        from hf_tuner.data.chat_masks import assistant_spans

        assistant_spans(load_tokenizer(model_path, revision=mcfg.model_revision),
                        multi_turn["prompt"] + multi_turn["completion"], multi_turn["where"])
    peft = peft_setup(run.peft_method, model_path, "causal-lm", mcfg, run.peft_options,
                      total_steps=planned_steps(args, None if data.streaming else len(train_rows)))
    if peft.prompt_learning and args.packing:
        print(f"note: packing turned off: {peft.method} prepends virtual tokens and would lose sequence boundaries")
        args.packing = False
    if args.packing and args.packing_strategy == "wrapped":
        print("warning: packing_strategy wrapped lets sequences attend across their boundaries; "
              "bfd (the default) keeps them apart")
    benchmarks = from_run(run)  # lm-eval tasks checked (data readable) before weights load
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state

    # 2. load
    model, tokenizer = load_model(mcfg.model_name_or_path, "causal-lm", dtype=mcfg.dtype,
                                  revision=mcfg.model_revision, attn_implementation=mcfg.attn_implementation,
                                  quantization_config=peft.quantization,
                                  gradient_checkpointing=args.gradient_checkpointing)
    if not tokenizer.chat_template:
        raise ConfigError(f"{mcfg.model_name_or_path} has no chat template; instruction SFT needs one")

    # 3. evaluate the base model: zero-shot and few-shot, same prompts and decoding as the tuned model
    task = GenerationTask("held-out", held_rows, system_prompt=run.system_prompt)
    decoding = DecodingSettings(max_new_tokens=run.eval_max_new_tokens, batch_size=run.eval_batch_size,
                                seed=args.seed)
    other_tasks = {name: GenerationTask(name, rows, system_prompt=run.system_prompt)
                   for name, rows in held_out_tasks.items()}
    results, other = {}, {name: {} for name in other_tasks}
    few_name = f"few_shot_{run.few_shot}"
    phases = ([*(["base"] + [f"{n} base" for n in other_tasks] + ([few_name] if run.few_shot else []))]
              if run.evaluate_base else []) + (["benchmarks base"] if benchmarks and run.evaluate_base else [])
    phases += ["train", "tuned", *[f"{n} tuned" for n in other_tasks]]
    phases += ["benchmarks tuned"] if benchmarks and run.evaluate_base else []
    clock = RunClock(phases, like={"tuned": "base", "benchmarks tuned": "benchmarks base",
                                   **{f"{n} tuned": f"{n} base" for n in other_tasks}}, enabled=is_main_process())
    if run.evaluate_base:
        results["base"] = clock.evaluation("base", evaluate_model(model, tokenizer, task, decoding))
        for name, t in other_tasks.items():
            other[name]["base"] = clock.evaluation(f"{name} base", evaluate_model(model, tokenizer, t, decoding))["metrics"]
        if run.few_shot:
            few = task.with_shots(run.few_shot, train_rows, run.split_seed)
            results[few_name] = clock.evaluation(few_name, evaluate_model(model, tokenizer, few, decoding))
    bench_base = run_on_main(benchmarks, model, tokenizer, out, "base") if run.evaluate_base else None
    if bench_base:
        clock.done("benchmarks base", bench_base["seconds"], ", ".join(bench_base["tasks"]))

    # 4. train: completion-only loss on the chat-templated answers
    args.include_num_input_tokens_seen = "non_padding"
    trainer_cls = plain_loss_trainer(SFTTrainer) if peft.plain_loss else SFTTrainer
    if run.compact_loss and not peft.plain_loss and not peft.prompt_learning:  # virtual tokens shift positions
        trainer_cls = compact_loss_trainer(SFTTrainer)
    train_dataset, _ = _train_dataset(train_rows, run.system_prompt, tokenizer, args.max_length)
    trainer = trainer_cls(model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
                          peft_config=peft.config, callbacks=[*peft.callbacks, clock.callback()])
    trainable, total = trainable_parameters(trainer.model)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start
    clock.done("train", runtime, f"{trainer.state.global_step} steps")

    # 5. evaluate the tuned model
    results["tuned"] = clock.evaluation("tuned", evaluate_model(trainer.model, tokenizer, task, decoding))
    for name, t in other_tasks.items():
        other[name]["tuned"] = clock.evaluation(f"{name} tuned", evaluate_model(trainer.model, tokenizer, t,
                                                                                decoding))["metrics"]

    bench_tuned = run_on_main(benchmarks, trainer.model, tokenizer, out, "tuned") if bench_base else None
    if bench_tuned:
        clock.done("benchmarks tuned", bench_tuned["seconds"], ", ".join(bench_tuned["tasks"]))

    # 6. report
    trainer.save_model(str(out / "adapter"))  # rank 0 only, as every write below
    if is_main_process():
        tokenizer.save_pretrained(out / "adapter")
    metrics = {
        "base": results["base"]["metrics"] if "base" in results else {},
        "baselines": {k: v["metrics"] for k, v in results.items() if k not in ("base", "tuned")},
        "tuned": results["tuned"]["metrics"],
        "gain": gains(results),
        "train": {"runtime_s": runtime, "train_loss": train_output.training_loss,
                  "steps": trainer.state.global_step,
                  "train_examples": None if data.streaming else len(train_rows),
                  "eval_examples": len(held_rows), "data": data.counts,
                  "train_tokens": trainer.state.num_input_tokens_seen,
                  "train_tokens_per_s": trainer.state.num_input_tokens_seen / runtime,
                  "bf16": bool(args.bf16), "peft_method": peft.method,
                  "trainable_params": trainable, "trainable_percent": 100 * trainable / total,
                  "peak_rss_mb": peak_rss_mb()},
        "eval_seconds": {k: v["seconds"] for k, v in results.items()},
        "eval_tokens_per_s": {k: v["generation"]["tokens_per_s"] for k, v in results.items() if "generation" in v},
        "tasks": {"trained": [data.label], "held_out": list(other)},
        "held_out_tasks": other,
    }
    generations = [{"prompt": r["prompt"][-1]["content"],
                    "reference": task.reference(r),
                    **{k: v["predictions"][i] for k, v in results.items()}}
                   for i, r in enumerate(held_rows)]
    notes = []
    if len(data.counts) > 1:  # a mixture: rows per source, as loaded and as trained (after train_samples)
        from collections import Counter

        trained = Counter(r.get("source") for r in train_rows)
        for k, v in data.counts.items():
            v["trained"] = trained.get(k, 0)
        notes = ["## Data", "", "| source | train rows | trained | test rows |", "|---|---:|---:|---:|",
                 *[f"| {k} | {v['train']} | {v['trained']} | {v['test']} |" for k, v in data.counts.items()], ""]
    metrics["held_out_benchmarks"], bench_notes = report_benchmarks(bench_base, bench_tuned)
    notes += bench_notes
    table = write_run_record(out, "sft_instruction", metrics, generations[:run.report_examples],
                             trainer.state.log_history, notes, generations=generations)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out comparison ({len(held_rows)} examples), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
