"""Sequence classification: fine-tune an encoder with a classification head (transformers Trainer).

    accelerate launch recipes/sft_classification.py --config recipes/configs/sft_classification.yaml [--key value ...]
    python -m recipes.sft_classification --config recipes/configs/sft_classification.yaml
    from recipes.sft_classification import train; train("recipes/configs/sft_classification.yaml")

Default: MiniLM-L6 learns the polarity of human-rated movie-review snippets (vader ground truth:
positive if the mean rating > 0, rows with |rating| < 0.5 dropped). Held-out snippets never appear in
training. Baselines on the same rows: the untrained head (chance), and zero-shot and few-shot prompting
of a causal LM that answers with a label word -- in-context learning vs fine-tuning.
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
from hf_tuner.data.vader import POLARITY_LABELS, VaderArguments  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main, save_log_history, train_summary  # noqa: E402

PROMPT = ("Is the sentiment of this movie review snippet positive or negative? "
          "Answer with one word: positive or negative.")


@dataclass
class ClassificationArguments(RunArguments, VaderArguments):
    max_length: int = field(default=64, metadata={"help": "tokens per text; longer texts are truncated"})
    baseline_model: str | None = field(
        default="smollm2-135m-instruct",
        metadata={"help": "causal LM prompted zero-shot and few-shot with label words (empty: no LM baselines)"})
    labels: list[str] = field(default_factory=lambda: list(POLARITY_LABELS), metadata={
        "help": "the label set; a .jsonl/.json/.csv dataset_name has `text` and `label` columns from it"})
    bias_terms: str | None = field(default=None, metadata={
        "help": "counterfactual bias probes (default: hf_tuner/evaluation/bias_terms.yaml)"})


def _config(source):
    from transformers import TrainingArguments

    return parse_config(TrainingArguments, source, run_cls=ClassificationArguments)


def _data(cfg):
    """(train rows, held-out rows) {text, label}: vader's polarity, or any source the loader reads with `text` and
    `label` columns (the dataset's test split is the held-out set when it has one)."""
    from functools import partial

    from hf_tuner.data import data_sources, held_out, load_rows, split_by_group
    from hf_tuner.data.formats import labelled_row
    from hf_tuner.data.preferences import is_vader
    from hf_tuner.data.vader import polarity_rows, read_ground_truth

    run = cfg.run
    sources = data_sources(cfg, default="vader-sentiment")
    if len(sources) == 1 and is_vader(sources[0].name):
        if run.labels != POLARITY_LABELS:
            raise ConfigError(f"labels: the vader data has the labels {POLARITY_LABELS}, got {run.labels}")
        rows = polarity_rows(read_ground_truth(sources[0].name, run.vader_sources), run.min_abs_rating)
        train_rows, held_rows = split_by_group(rows, run.eval_samples, run.split_seed)
    else:
        # classification rows are no TRL type: `text` makes them look like language modelling to the detector
        data = load_rows(sources, partial(labelled_row, labels=run.labels), "sft_classification",
                         {"language_modeling": "text + label"}, ("text", "label", "group", "where"))
        train_rows, held_rows = held_out(data, run.eval_samples, run.split_seed)
    random.Random(run.split_seed).shuffle(train_rows)
    return train_rows[:run.train_samples] if run.train_samples else train_rows, held_rows[:run.eval_samples]


def _train_dataset(rows, tokenizer, max_length: int, labels: list[str]):
    from datasets import Dataset

    ds = Dataset.from_list([{"text": r["text"], "label": labels.index(r["label"])} for r in rows])
    return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True,
                  remove_columns=["text"])


def _confusion(task, result, model_is_classifier: bool) -> list[list[int]]:
    from hf_tuner.evaluation.metrics import confusion_counts

    # A causal LM's answers are free text: map them back to labels the way the harness scored them.
    predicted = result["predictions"] if model_is_classifier else [task.parse_label(t) for t in result["predictions"]]
    return confusion_counts([str(p) for p in predicted], result["references"], task.labels)


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from peft import get_peft_model
    from transformers import DataCollatorWithPadding, Trainer
    from transformers import set_seed

    from hf_tuner.adapters import peft_setup
    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.bias import bias_for_model, bias_section, check_bias_terms
    from hf_tuner.evaluation.report import gains, plot_confusion_matrix, write_run_record
    from hf_tuner.evaluation.tasks import ClassificationTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model, load_tokenizer
    from hf_tuner.prompts import PromptTemplate
    from hf_tuner.training import planned_steps
    from hf_tuner.validation import check_batch, check_lengths

    # 1. config, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as minilm-l6, a folder or a Hub id)")
    model_path = check_model_source(mcfg.model_name_or_path)
    if run.baseline_model:
        check_model_source(run.baseline_model)
    train_rows, held_rows = _data(cfg)
    check_batch(len(train_rows), args, cfg.script.dataset_name or "vader-sentiment")
    check_bias_terms(run.bias_terms)
    if not run.truncation:
        tokenizer = load_tokenizer(model_path, revision=mcfg.model_revision)
        check_lengths([(r.get("where", r["text"][:40]), len(tokenizer(r["text"]).input_ids)) for r in train_rows],
                      run.max_length)
    peft = peft_setup(run.peft_method, model_path, "classification", mcfg, run.peft_options,
                      total_steps=planned_steps(args, len(train_rows)))
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state

    # 2. load: the classification head is new (random) on top of the pretrained encoder
    labels = run.labels
    model, tokenizer = load_model(mcfg.model_name_or_path, "classification", dtype=mcfg.dtype,
                                  revision=mcfg.model_revision, num_labels=len(labels),
                                  quantization_config=peft.quantization,
                                  id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})

    # 3. evaluate the base: the untrained head, and label-word prompting of a causal LM (same held-out rows)
    task = ClassificationTask("held-out", held_rows, labels=labels, template=PromptTemplate(instruction=PROMPT if labels == POLARITY_LABELS else
                                                      f"Classify this text. Answer with one word: {' or '.join(labels)}."))
    settings = DecodingSettings(max_new_tokens=run.eval_max_new_tokens, batch_size=run.eval_batch_size, seed=args.seed)
    results = {"base": evaluate_model(model, tokenizer, task, settings)}
    confusion = {"labels": labels, "base": _confusion(task, results["base"], True)}
    bias = {"base (untrained head)": bias_for_model(model, tokenizer, "classifier", run.bias_terms)}
    if run.baseline_model:
        lm, lm_tokenizer = load_model(run.baseline_model, "causal-lm")
        lm_tasks = {"zero_shot": task}
        if run.few_shot:
            lm_tasks[f"few_shot_{run.few_shot}"] = task.with_shots(run.few_shot, train_rows, run.split_seed)
        for name, t in lm_tasks.items():
            results[name] = evaluate_model(lm, lm_tokenizer, t, settings)
            confusion[name] = _confusion(t, results[name], False)
        del lm

    # 4. train
    if peft.config is not None:
        model = get_peft_model(model, peft.config)  # SEQ_CLS: the new head trains in full beside the adapter
    trainer = Trainer(model=model, args=args, train_dataset=_train_dataset(train_rows, tokenizer, run.max_length, labels),
                      processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=peft.callbacks)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 5. evaluate the tuned model
    results["tuned"] = evaluate_model(trainer.model, tokenizer, task, settings)
    confusion["tuned"] = _confusion(task, results["tuned"], True)
    bias["tuned"] = bias_for_model(trainer.model, tokenizer, "classifier", run.bias_terms)

    # 6. report
    trainer.save_model(str(out / "model"))  # the full model, or the adapter plus the head
    plot_confusion_matrix(confusion["tuned"], labels, out / "confusion_matrix.png", "tuned: held-out confusion")
    baseline_names = [k for k in results if k not in ("base", "tuned")]
    metrics = {
        "base_label": "base (untrained head)",
        "base": results["base"]["metrics"],
        "baselines": {f"{run.baseline_model} {k}": results[k]["metrics"] for k in baseline_names},
        "tuned": results["tuned"]["metrics"],
        "gain": gains({f"{run.baseline_model} {k}" if k in baseline_names else k: v for k, v in results.items()}),
        "train": train_summary(trainer, train_output, runtime, train_examples=len(train_rows),
                               eval_examples=len(held_rows), peft_method=run.peft_method),
        "eval_seconds": {k: v["seconds"] for k, v in results.items()},
        "confusion_matrix": confusion, "bias": bias,
    }
    notes = ["## Confusion matrices", "", "Rows: true label; columns: predicted (" + ", ".join(labels) + "). An LM answer "
             "that names no label counts as wrong in the metrics but sits in no cell here (see `unparsed`).", "",
             *[f"- {k}: {v}" for k, v in confusion.items() if k != "labels"], "",
             "![confusion matrix](confusion_matrix.png)", "", *bias_section(bias)]
    examples = [{"text": r["text"], "label": r["label"], **{k: v["predictions"][i] for k, v in results.items()}}
                for i, r in enumerate(held_rows[:run.report_examples])]
    table = write_run_record(out, "sft_classification", metrics, examples, trainer.state.log_history, notes)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out comparison ({len(held_rows)} examples), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
