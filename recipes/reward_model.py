"""Reward model from pairwise human preferences (TRL's RewardTrainer, Bradley-Terry loss).

    accelerate launch recipes/reward_model.py --config recipes/configs/reward_model.yaml [--key value ...]
    python -m recipes.reward_model --config recipes/configs/reward_model.yaml
    from recipes.reward_model import train; train("recipes/configs/reward_model.yaml")

Default: MiniLM-L6 with a scalar head learns the ratings of ~20 human raters per movie-review snippet
(vader ground truth): two snippets whose mean ratings differ by >= 1.0 make a pair, chosen = the more
positive. Held-out pairs are built from held-out snippets only. Also reads preference files
(`chosen`/`rejected`, `prompt`+`chosen`/`rejected`, or `prompt`+`ranking`), such as `hf-tuner label` writes.
The run folder's `model/` is what `recipes/ppo_rlhf.py` takes as `reward_model`.
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
class RewardArguments(RunArguments):
    train_pairs: int = field(default=4000, metadata={"help": "training pairs drawn (vader), or a cap (files)"})
    eval_snippets: int = field(default=1000, metadata={"help": "vader: snippets held out before pairing"})
    min_gap: float = field(default=1.0, metadata={"help": "vader: least rating difference that makes a pair"})
    vader_sources: list[str] | None = field(default=None, metadata={"help": "vader files (default: movie reviews)"})
    bias_terms: str | None = field(default=None, metadata={
        "help": "counterfactual bias probes (default: hf_tuner/evaluation/bias_terms.yaml)"})


def _config(source):
    from trl import RewardConfig

    return parse_config(RewardConfig, source, run_cls=RewardArguments)


def _as_text(pair: dict, tokenizer) -> dict:
    """A conversational pair as the text the reward model reads: the chat template, or the turns' text for an
    encoder with none. Standard pairs pass as they are."""
    from hf_tuner.data.formats import flatten

    if not isinstance(pair["chosen"], list):
        return pair

    def text(side):
        conversation = (pair["prompt"] or []) + pair[side]
        return tokenizer.apply_chat_template(conversation, tokenize=False) if tokenizer.chat_template \
            else flatten(conversation)

    return {**pair, "prompt": "", "chosen": text("chosen"), "rejected": text("rejected")}


def _tokenized(pairs, tokenizer, max_length: int):
    """Pre-tokenized chosen_ids/rejected_ids: RewardTrainer's raw-text path appends an EOS, and MiniLM has none.
    Long texts are truncated, not dropped (RewardTrainer drops what is over max_length); we count them."""
    from datasets import Dataset

    def ids(p, side):
        text = f"{p['prompt']} {p[side]}".strip()
        return tokenizer(text, truncation=True, max_length=max_length)["input_ids"]

    pairs = [_as_text(p, tokenizer) for p in pairs]
    rows = [{"chosen_ids": ids(p, "chosen"), "rejected_ids": ids(p, "rejected")} for p in pairs]
    truncated = sum(len(r["chosen_ids"]) == max_length or len(r["rejected_ids"]) == max_length for r in rows)
    return Dataset.from_list(rows), truncated


def plot_rewards(chosen: list[float], rejected: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(chosen, bins=30, alpha=0.6, label="chosen (more positive)")
    ax.hist(rejected, bins=30, alpha=0.6, label="rejected")
    ax.set_xlabel("reward")
    ax.set_ylabel("held-out texts")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    from peft import get_peft_model
    from transformers import set_seed
    from trl import RewardTrainer

    from hf_tuner.adapters import peft_setup
    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.data import data_sources
    from hf_tuner.data.preferences import load_preferences
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads
    from hf_tuner.distributed import is_main_process
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.bias import bias_for_model, bias_section, check_bias_terms
    from hf_tuner.evaluation.report import gains, write_run_record
    from hf_tuner.evaluation.tasks import PreferenceTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model
    from hf_tuner.training import planned_steps
    from hf_tuner.validation import check_batch

    # 1. config and data, checked before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as minilm-l6, a folder or a Hub id)")
    model_path = check_model_source(mcfg.model_name_or_path)
    sources = data_sources(cfg, default="vader-sentiment")
    train_pairs, held_pairs = load_preferences(sources, run.vader_sources, run.train_pairs, run.eval_samples,
                                               run.eval_snippets, run.min_gap, run.split_seed)
    check_batch(len(train_pairs), args, " + ".join(s.label() for s in sources))
    check_bias_terms(run.bias_terms)
    peft = peft_setup(run.peft_method, model_path, "classification", mcfg, run.peft_options,
                      total_steps=planned_steps(args, len(train_pairs)))
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state

    # 2. load: a scalar head (num_labels=1) on the encoder, new and random
    model, tokenizer = load_model(mcfg.model_name_or_path, "classification", dtype=mcfg.dtype, num_labels=1,
                                  revision=mcfg.model_revision, quantization_config=peft.quantization,
                                  ignore_mismatched_sizes=True)  # a classifier's own head gives way to a scalar one
    task = PreferenceTask("held-out pairs", [_as_text(p, tokenizer) for p in held_pairs])
    settings = DecodingSettings(batch_size=run.eval_batch_size, seed=args.seed)
    results = {"base": evaluate_model(model, tokenizer, task, settings)}
    bias = {"base (untrained head)": bias_for_model(model, tokenizer, "reward", run.bias_terms)}

    # 3. train
    if peft.config is not None:
        model = get_peft_model(model, peft.config)
    dataset, truncated = _tokenized(train_pairs, tokenizer, args.max_length)
    trainer = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                            callbacks=peft.callbacks)
    start = time.perf_counter()
    train_output = train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start

    # 4. evaluate, save, report
    results["tuned"] = evaluate_model(trainer.model, tokenizer, task, settings)
    bias["tuned"] = bias_for_model(trainer.model, tokenizer, "reward", run.bias_terms)
    trainer.save_model(str(out / "model"))
    if is_main_process():
        plot_rewards(results["tuned"]["chosen"], results["tuned"]["rejected"], out / "reward_distribution.png",
                     f"tuned reward model on {len(held_pairs)} held-out pairs")
    metrics = {"base_label": "base (untrained head)", "base": results["base"]["metrics"], "baselines": {},
               "tuned": results["tuned"]["metrics"], "gain": gains(results),
               "train": train_summary(trainer, train_output, runtime, train_pairs=len(train_pairs),
                                      eval_pairs=len(held_pairs), truncated_pairs=truncated,
                                      peft_method=run.peft_method, peak_rss_mb=peak_rss_mb()),
               "eval_seconds": {k: v["seconds"] for k, v in results.items()}, "bias": bias}
    notes = ["## Reward distribution (held-out)", "", "![rewards](reward_distribution.png)", "",
             f"Pairs: {len(train_pairs)} train, {len(held_pairs)} held-out (from texts never trained on); "
             f"{truncated} training pairs truncated at max_length={args.max_length}.", "", *bias_section(bias)]
    examples = [{"chosen": p["chosen"], "rejected": p["rejected"], "tuned scores": results["tuned"]["predictions"][i]}
                for i, p in enumerate(task.rows[:run.report_examples])]
    table = write_run_record(out, "reward_model", metrics, examples, trainer.state.log_history, notes)
    save_log_history(out, trainer.state.log_history)
    print(f"\nHeld-out pairs ({len(held_pairs)}), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
