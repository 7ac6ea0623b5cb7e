"""RLHF: tune a policy against a reward model with PPO (ours), or GRPO / RLOO (TRL), and a KL leash.

    accelerate launch recipes/ppo_rlhf.py --config recipes/configs/ppo_rlhf.yaml [--key value ...]
    python -m recipes.ppo_rlhf --config recipes/configs/ppo_rlhf.yaml --algorithm grpo
    from recipes.ppo_rlhf import train; train("recipes/configs/ppo_rlhf.yaml")

Default: SmolLM2-135M-Instruct with LoRA continues the opening words of movie-review snippets; the
reward model from `recipes/reward_model.py` (MiniLM, its own tokenizer) scores the text for positivity.
Before RL starts the reward model must rank held-out pairs well enough (`min_reward_accuracy`). The
held-out prompts open snippets the reward model never saw (same `eval_snippets` and `split_seed`).
Base and tuned policy are sampled on the same prompts with the same seed: mean reward, its standard
error, KL to the reference (the adapter-disabled base), distinct-n and length.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.rl.ppo import PPOArguments  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main  # noqa: E402

ALGORITHMS = ("ppo", "grpo", "rloo")


@dataclass
class RLArguments(RunArguments, PPOArguments):
    algorithm: str = field(default="ppo", metadata={"help": "ppo (ours), grpo or rloo (TRL)"})
    reward_model: str = field(default="runs/reward_model", metadata={
        "help": "a reward_model run folder, a scalar-head model (asset, folder, Hub id), or module:function"})
    min_reward_accuracy: float = field(default=0.7, metadata={"help": "gate: least held-out pairwise accuracy"})
    prompt_words: int = field(default=4, metadata={"help": "words of each snippet's opening used as the prompt"})
    train_prompts: int | None = field(default=None, metadata={"help": "cap on training prompts"})
    eval_snippets: int = field(default=1000, metadata={"help": "held-out snippets (match the reward model's run)"})
    vader_sources: list[str] | None = field(default=None, metadata={"help": "vader files (default: movie reviews)"})
    num_generations: int = field(default=4, metadata={"help": "grpo/rloo: completions per prompt"})

    def __post_init__(self):
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise ConfigError(f"algorithm: {self.algorithm!r} is not one of {', '.join(ALGORITHMS)}")


def _config(source):
    from transformers import TrainingArguments

    return parse_config(TrainingArguments, source, run_cls=RLArguments)


def _prompts(cfg) -> tuple[list[str], list[str], list[dict]]:
    """(train prompts, held-out prompts, held-out pairs for the gate): openings of vader snippets, or the
    `prompt` column of a local file (1 in 5 prompts held out)."""
    from hf_tuner.data import split_by_group
    from hf_tuner.data.files import DataError, _read_rows
    from hf_tuner.data.preferences import opening, rating_pairs, vader_snippet_split

    run, name = cfg.run, cfg.script.dataset_name or "vader-sentiment"
    if Path(name).suffix in (".jsonl", ".json", ".csv"):
        rows = [{"prompt": r.get("prompt"), "group": r.get("prompt")} for _, r in _read_rows(Path(name))]
        bad = [i for i, r in enumerate(rows, 1) if not isinstance(r["prompt"], str) or not r["prompt"].strip()]
        if bad:
            raise DataError(f"{name}: row(s) {bad[:5]} have no text `prompt`")
        train, held = split_by_group(rows, max(1, min(run.eval_samples, len(rows) // 5)), run.split_seed)
        return [r["prompt"] for r in train], [r["prompt"] for r in held][:run.eval_samples], []
    train, held = vader_snippet_split(name, run.vader_sources, run.eval_snippets, run.split_seed)
    long_enough = [r for r in held if len(r["text"].split()) > run.prompt_words + 2]
    held_prompts = sorted({opening(r["text"], run.prompt_words) for r in long_enough})
    train_prompts = sorted({opening(r["text"], run.prompt_words) for r in train
                            if len(r["text"].split()) > run.prompt_words + 2} - set(held_prompts))
    import random

    random.Random(run.split_seed).shuffle(held_prompts)
    pairs = rating_pairs(held, 300, 1.0, run.split_seed + 1)
    return train_prompts[:run.train_prompts] if run.train_prompts else train_prompts, held_prompts[:run.eval_samples], pairs


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    import copy

    from hf_tuner.adapters import peft_setup
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.report import write_run_record
    from hf_tuner.evaluation.tasks import RewardTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model
    from hf_tuner.rl.online import plot_curves, save_history, timed, train_ppo, train_trl
    from hf_tuner.rl.rewards import check_reward_gate, load_reward_function

    # 1. config, prompts and the reward gate, before the policy loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as smollm2-135m-instruct, a folder or a Hub id)")
    if args.max_steps <= 0:
        raise ConfigError("max_steps: RL runs count steps (rollout batches); set max_steps > 0")
    if run.algorithm != "ppo" and args.per_device_train_batch_size % run.num_generations:
        raise ConfigError(f"per_device_train_batch_size={args.per_device_train_batch_size} must be a multiple of "
                          f"num_generations={run.num_generations} for {run.algorithm}")
    model_path = check_model_source(mcfg.model_name_or_path)
    train_prompts, held_prompts, gate_pairs = _prompts(cfg)
    reward_accuracy = check_reward_gate(run.reward_model, run.min_reward_accuracy, gate_pairs)
    peft = peft_setup(run.peft_method, model_path, "causal-lm", mcfg, run.peft_options, total_steps=args.max_steps)
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    reward_fn = load_reward_function(run.reward_model)

    # 2. the policy, and the starting policy's score on the held-out prompts
    model, tokenizer = load_model(mcfg.model_name_or_path, "causal-lm", dtype=mcfg.dtype, revision=mcfg.model_revision)
    tokenizer.padding_side = "left"
    settings = DecodingSettings(max_new_tokens=run.response_length, batch_size=run.eval_batch_size, seed=args.seed)
    task = RewardTask("held-out prompts", [{"prompt": p} for p in held_prompts], reward_fn, run.temperature)
    results = {"base": evaluate_model(model, tokenizer, task, settings)}

    # 3. RL: with an adapter the reference is the adapter-disabled base; full tuning keeps a frozen copy
    ref_model = copy.deepcopy(model).eval() if peft.config is None else None
    if run.algorithm == "ppo":
        if peft.config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft.config)
        (model, history), runtime = timed(train_ppo, model, tokenizer, reward_fn, train_prompts, args, run,
                                          ref_model, out)
    else:
        (model, history), runtime = timed(train_trl, run.algorithm, model, tokenizer, reward_fn, train_prompts,
                                          args, run, peft.config, run.num_generations, out)

    # 4. the tuned policy on the same prompts, seed and sampling
    task.reference_model = ref_model
    results["tuned"] = evaluate_model(model, tokenizer, task, settings)
    base, tuned = results["base"]["metrics"], results["tuned"]["metrics"]
    gain = tuned["mean_reward"] - base["mean_reward"]
    se = math.sqrt(base["reward_se"] ** 2 + tuned["reward_se"] ** 2)
    model.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    save_history(out, history)
    plot_curves(history, out / "rl_curves.png", f"{run.algorithm}: per-step statistics")
    metrics = {"base_label": "base (starting policy)", "base": base, "baselines": {}, "tuned": tuned,
               "train": {"algorithm": run.algorithm, "runtime_s": runtime, "steps": args.max_steps,
                         "episodes": args.max_steps * args.per_device_train_batch_size,
                         "reward_gain": gain, "gain_se": se, "gain_over_2se": gain > 2 * se,
                         "reward_model_accuracy": reward_accuracy, "final_kl_coef": history[-1].get("kl_coef"),
                         "peft_method": run.peft_method, "peak_rss_mb": peak_rss_mb(),
                         "train_prompts": len(train_prompts), "eval_prompts": len(held_prompts)},
               "eval_seconds": {k: v["seconds"] for k, v in results.items()}}
    notes = ["## RL curves", "", "![rl curves](rl_curves.png)", "",
             f"Reward gain {gain:+.3f} (standard error of the difference {se:.3f}; "
             f"{'more' if gain > 2 * se else 'not more'} than twice it). KL is to the reference policy, in nats "
             "per response, estimated on the policy's own samples.", ""]
    examples = [{"prompt": p, "base": results["base"]["predictions"][i], "base reward": f"{results['base']['rewards'][i]:.2f}",
                 "tuned": results["tuned"]["predictions"][i], "tuned reward": f"{results['tuned']['rewards'][i]:.2f}"}
                for i, p in enumerate(held_prompts[:run.report_examples])]
    table = write_run_record(out, f"RLHF ({run.algorithm})", metrics, examples, [], notes)
    print(f"\nHeld-out prompts ({len(held_prompts)}), run folder {out}:\n{table}\n")
    return RunResult(out, metrics, table, model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
