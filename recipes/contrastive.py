"""Contrastive embedding tuning: an encoder learns to put a query next to its passage (InfoNCE, in-batch negatives).

    accelerate launch recipes/contrastive.py --config recipes/configs/contrastive.yaml [--key value ...]
    python -m recipes.contrastive --config recipes/configs/contrastive.yaml
    from recipes.contrastive import train; train("recipes/configs/contrastive.yaml")

Default: MiniLM-L6 (mean pooling) on WordNet: a word against the gloss of its synset, one pair per synset,
held-out synsets never trained on. Base vs tuned: recall@1, recall@10 and MRR of each held-out word's gloss
among all held-out glosses. The run folder's `model/` loads with `AutoModel` (+ mean pooling).
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


@dataclass
class ContrastiveArguments(RunArguments):
    peft_method: str = field(default="full", metadata={"help": "full: the whole encoder trains (the only method here)"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature (cosine / temperature)"})
    symmetric: bool = field(default=False, metadata={"help": "also score passage -> query (CLIP-style)"})
    max_length: int = field(default=64, metadata={"help": "tokens per query or passage; longer ones are truncated"})

    def __post_init__(self):
        super().__post_init__()
        if self.peft_method != "full":
            raise ConfigError(f"peft_method: contrastive trains the full encoder; got {self.peft_method!r}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature: must be positive, got {self.temperature}")


def _config(source):
    from transformers import TrainingArguments

    return parse_config(TrainingArguments, source, run_cls=ContrastiveArguments)


def _read_pairs(name: str) -> list[dict]:
    """wordnet-definitions, or a .jsonl of {"query", "passage", "group"?} rows (group: the split unit)."""
    from hf_tuner import assets
    from hf_tuner.data import DataError

    if name == "wordnet-definitions":
        from hf_tuner.data.wordnet_synsets import word_gloss_pairs

        return word_gloss_pairs(assets.resolve(name))
    path = Path(name)
    if path.suffix != ".jsonl" or not path.is_file():
        raise DataError(f"dataset_name {name!r}: wordnet-definitions or an existing .jsonl of query/passage rows")
    rows = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not JSON ({e.msg})") from e
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip()
                                                for k in ("query", "passage")):
            raise DataError(f"{path}:{i}: needs non-empty string fields `query` and `passage`")
        rows.append({"query": row["query"], "passage": row["passage"], "group": str(row.get("group", row["passage"]))})
    return rows


def _data(cfg):
    from hf_tuner.data import split_by_group

    run = cfg.run
    rows = _read_pairs(cfg.script.dataset_name or "wordnet-definitions")
    train_rows, held_rows = split_by_group(rows, run.eval_samples, run.split_seed)
    random.Random(run.split_seed).shuffle(train_rows)
    held_rows = list({r["group"]: r for r in held_rows}.values())  # one pair per group: one gold passage each
    return train_rows[:run.train_samples] if run.train_samples else train_rows, held_rows[:run.eval_samples]


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from datasets import Dataset
    from transformers import set_seed

    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.contrastive import ContrastiveTrainer, PairCollator, evaluate_retrieval
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads
    from hf_tuner.distributed import is_main_process
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.models import check_model_source, load_encoder
    from hf_tuner.validation import check_batch

    # 1. config and data, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as minilm-l6, a folder or a Hub id)")
    check_model_source(mcfg.model_name_or_path)
    train_rows, held_rows = _data(cfg)
    check_batch(len(train_rows), args, cfg.script.dataset_name or "wordnet-definitions")
    args.remove_unused_columns = False  # the collator tokenizes the raw query/passage text
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)

    # 2. load the bare encoder: the embedding is its mean-pooled last hidden state
    model, tokenizer = load_encoder(mcfg.model_name_or_path, revision=mcfg.model_revision)

    # 3. evaluate the base encoder: every held-out query against every held-out passage
    results = {"base": evaluate_retrieval(model, tokenizer, held_rows, run.eval_batch_size, run.max_length)}

    # 4. train: InfoNCE, the other passages of the batch are the negatives
    trainer = ContrastiveTrainer(model=model, args=args, temperature=run.temperature, symmetric=run.symmetric,
                                 train_dataset=Dataset.from_list([{"query": r["query"], "passage": r["passage"]}
                                                                  for r in train_rows]),
                                 data_collator=PairCollator(tokenizer, run.max_length), processing_class=tokenizer)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 5. evaluate the tuned encoder on the same rows
    results["tuned"] = evaluate_retrieval(trainer.model, tokenizer, held_rows, run.eval_batch_size, run.max_length)

    # 6. save (AutoModel-loadable) and report
    trainer.save_model(str(out / "model"))
    if is_main_process():
        tokenizer.save_pretrained(out / "model")
    metrics = {"base_label": "base (pretrained encoder)", "base": results["base"]["metrics"], "baselines": {},
               "tuned": results["tuned"]["metrics"], "gain": gains(results),
               "train": train_summary(trainer, train_output, runtime, train_pairs=len(train_rows),
                                      eval_pairs=len(held_rows), temperature=run.temperature,
                                      peak_rss_mb=peak_rss_mb()),
               "eval_seconds": {k: v["seconds"] for k, v in results.items()}}
    notes = [f"Retrieval: each of {len(held_rows)} held-out queries against all {len(held_rows)} held-out passages "
             "(cosine of mean-pooled embeddings); recall@k is the share whose own passage ranks in the top k, "
             "MRR the mean of 1/rank. Held-out groups are never trained on.", "",
             "Load the tuned encoder: `AutoModel.from_pretrained(RUN/model)`, then mean-pool the last hidden state "
             "over the attention mask and L2-normalise.", ""]
    examples = [{"query": r["query"], "gold passage": r["passage"],
                 **{f"{k} top-1": held_rows[v["top"][i][0]]["passage"] for k, v in results.items()}}
                for i, r in enumerate(held_rows[:run.report_examples])]
    table = write_run_record(out, "contrastive", metrics, examples, trainer.state.log_history, notes)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out retrieval ({len(held_rows)} pairs), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
