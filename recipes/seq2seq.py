"""Encoder-decoder fine-tuning with transformers' Seq2SeqTrainer (TRL's SFTTrainer cannot train T5).

    accelerate launch recipes/seq2seq.py --config recipes/configs/seq2seq.yaml [--key value ...]
    python -m recipes.seq2seq --config recipes/configs/seq2seq.yaml --model_name_or_path t5-small
    from recipes.seq2seq import train; train("recipes/configs/seq2seq.yaml")

Any seq2seq checkpoint (a Hub id such as t5-small, or a local folder) loads as it is. No pretrained
seq2seq checkpoint installs offline, so the default warm-starts a BERT2BERT EncoderDecoderModel from
MiniLM-L6 (its decoder's cross-attention starts fresh) and trains it on the WordNet definitions task;
held-out words never appear in training. ROUGE and BLEU come from the shared harness, base vs tuned,
on the same held-out words; the trainer's own evaluation uses predict_with_generate.
"""

from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history, train_summary  # noqa: E402


@dataclass
class Seq2SeqArguments(RunArguments):
    max_source_length: int = field(default=32, metadata={"help": "source tokens; longer sources are truncated"})
    max_target_length: int = field(default=48, metadata={"help": "target tokens; longer targets are truncated"})
    trainer_eval_samples: int = field(
        default=64, metadata={"help": "held-out rows the trainer evaluates (with generation) during training"})


def _config(source):
    from transformers import Seq2SeqTrainingArguments

    cfg = parse_config(Seq2SeqTrainingArguments, source, run_cls=Seq2SeqArguments, uses={"eval_strategy"})
    cfg.training.predict_with_generate = True  # the trainer's evaluation generates, as the harness does
    cfg.training.generation_max_length = cfg.training.generation_max_length or cfg.run.eval_max_new_tokens
    return cfg


def _data(cfg):
    """(train rows, held-out rows) of prompt/completion data (a multi-turn row: its last answer given the turns
    before); the dataset's test split is the held-out set when it has one."""
    from hf_tuner.data import SFT_COLUMNS, SFT_TYPES, data_sources, held_out, load_rows, sft_row

    run = cfg.run
    data = load_rows(data_sources(cfg), sft_row, "seq2seq", SFT_TYPES, SFT_COLUMNS)
    train_rows, held_rows = held_out(data, run.eval_samples, run.split_seed)
    random.Random(run.split_seed).shuffle(train_rows)
    return train_rows[:run.train_samples] if run.train_samples else train_rows, held_rows[:run.eval_samples]


def _source(row: dict) -> str:
    return "\n".join(m["content"] for m in row["prompt"] if m["role"] == "user")


def _tokenized(rows, tokenizer, run):
    from datasets import Dataset

    ds = Dataset.from_list([{"source": _source(r), "target": r["completion"][-1]["content"]} for r in rows])
    return ds.map(lambda b: tokenizer(b["source"], text_target=b["target"], truncation=True,
                                      max_length=run.max_source_length), batched=True,
                  remove_columns=["source", "target"]).map(
        lambda b: {"labels": [ids[:run.max_target_length] for ids in b["labels"]]}, batched=True)


def _generation_metrics(tokenizer):
    """compute_metrics for the trainer's predict_with_generate evaluation: ROUGE-L and BLEU from the harness metrics."""
    import numpy as np

    from hf_tuner.evaluation.metrics import text_metrics

    def compute(prediction):
        preds, labels = prediction.predictions, prediction.label_ids
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        decoded = [t.strip() for t in tokenizer.batch_decode(preds, skip_special_tokens=True)]
        refs = [t.strip() for t in tokenizer.batch_decode(labels, skip_special_tokens=True)]
        return text_metrics(decoded, refs, ("rougeL", "bleu"))

    return compute


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from peft import get_peft_model
    from transformers import AutoConfig, DataCollatorForSeq2Seq, Seq2SeqTrainer
    from transformers import set_seed

    from hf_tuner.adapters import peft_setup
    from hf_tuner.checkpoints import train_resumable

    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.evaluation import GenerationTask, evaluate_model
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_seq2seq_model
    from hf_tuner.training import planned_steps
    from hf_tuner.validation import check_batch

    # 1. config, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (a seq2seq checkpoint such as t5-small, or an encoder "
                          "such as minilm-l6 to warm-start)")
    model_path = check_model_source(mcfg.model_name_or_path)
    train_rows, held_rows = _data(cfg)
    check_batch(len(train_rows), args, cfg.script.dataset_name)
    peft = None
    if run.peft_method != "full":
        if not AutoConfig.from_pretrained(model_path).is_encoder_decoder:
            raise ConfigError(f"peft_method: {run.peft_method!r} cannot tune a warm-started BERT2BERT model: its "
                              "cross-attention is new and must train in full. Use peft_method full, or a seq2seq "
                              "checkpoint (t5-small, flan-t5-base) for adapters.")
        peft = peft_setup(run.peft_method, model_path, "seq2seq", mcfg, run.peft_options,
                          total_steps=planned_steps(args, len(train_rows)))
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state

    # 2. load (or warm-start) the encoder-decoder
    model, tokenizer, how = load_seq2seq_model(mcfg.model_name_or_path, dtype=mcfg.dtype, revision=mcfg.model_revision,
                                               quantization_config=peft.quantization if peft else None)

    # 3. evaluate the base model through the harness
    task = GenerationTask("held-out", held_rows)
    decoding = DecodingSettings(max_new_tokens=run.eval_max_new_tokens, batch_size=run.eval_batch_size, seed=args.seed)
    results = {"base": evaluate_model(model, tokenizer, task, decoding)}

    # 4. train
    if peft is not None:
        model = get_peft_model(model, peft.config)
        how += f", {peft.method} adapter"
    eval_rows = held_rows[:run.trainer_eval_samples] if args.eval_strategy != "no" else []
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=_tokenized(train_rows, tokenizer, run),
                             eval_dataset=_tokenized(eval_rows, tokenizer, run) if eval_rows else None,
                             processing_class=tokenizer, data_collator=DataCollatorForSeq2Seq(tokenizer, model=model),
                             compute_metrics=_generation_metrics(tokenizer) if eval_rows else None,
                             callbacks=peft.callbacks if peft else None)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 5. evaluate the tuned model: same rows, same decoding
    results["tuned"] = evaluate_model(trainer.model, tokenizer, task, decoding)

    # 6. report
    trainer.save_model(str(out / "model"))
    metrics = {
        "base_label": "base (untrained)" if "warm start" in how else "base (zero-shot)",
        "base": results["base"]["metrics"],
        "baselines": {},
        "tuned": results["tuned"]["metrics"],
        "gain": gains(results),
        "train": train_summary(trainer, train_output, runtime, model=how, train_examples=len(train_rows),
                               eval_examples=len(held_rows)),
        "eval_seconds": {k: v["seconds"] for k, v in results.items()},
    }
    notes = [f"Model: {how}."]
    if "warm start" in how:
        notes.append("The base row is the warm-started model before training: its cross-attention is random, so it "
                     "cannot yet condition on the source; it is a floor, not a zero-shot baseline.")
    examples = [{"source": _source(r), "reference": results["base"]["references"][i],
                 **{k: v["predictions"][i] for k, v in results.items()}}
                for i, r in enumerate(held_rows[:run.report_examples])]
    table = write_run_record(out, "seq2seq", metrics, examples, trainer.state.log_history, notes + [""])
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out comparison ({len(held_rows)} examples), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
