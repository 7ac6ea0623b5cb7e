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

import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.rl.ppo import PPOArguments, check_minibatches, check_ppo_launch  # noqa: E402
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

    return parse_config(TrainingArguments, source, run_cls=RLArguments, uses={"held_out_benchmarks"})


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    import copy

    from transformers import set_seed

    from hf_tuner.adapters import peft_setup
    from hf_tuner.data import data_sources
    from hf_tuner.data.preferences import chat_prompt_renderer, rl_prompts
    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.benchmarks import from_run, run_on_main
    from hf_tuner.evaluation.tasks import RewardTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model
    from hf_tuner.rl.online import finish_rl_run, reward_model_note, timed, train_ppo, train_trl
    from hf_tuner.rl.rewards import SPLIT_FIELDS, check_reward_gate, load_reward_function

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
    if run.algorithm == "ppo":
        check_minibatches(args.per_device_train_batch_size, run.num_mini_batches)
        check_ppo_launch()
    model_path = check_model_source(mcfg.model_name_or_path)
    train_prompts, held_prompts, gate_pairs = rl_prompts(
        data_sources(cfg, default="vader-sentiment"), run.vader_sources, run.eval_snippets, run.split_seed,
        run.prompt_words, run.eval_samples, run.train_prompts, render=chat_prompt_renderer(model_path))
    reward_accuracy = check_reward_gate(run.reward_model, run.min_reward_accuracy, gate_pairs,
                                        split={k: getattr(run, k) for k in SPLIT_FIELDS})
    peft = peft_setup(run.peft_method, model_path, "causal-lm", mcfg, run.peft_options, total_steps=args.max_steps)
    benchmarks = from_run(run)  # lm-eval tasks checked (data readable) before weights load
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state
    reward_fn = load_reward_function(run.reward_model)

    # 2. the policy, and the starting policy's score on the held-out prompts
    model, tokenizer = load_model(mcfg.model_name_or_path, "causal-lm", dtype=mcfg.dtype, revision=mcfg.model_revision)
    tokenizer.padding_side = "left"
    settings = DecodingSettings(max_new_tokens=run.response_length, batch_size=run.eval_batch_size, seed=args.seed)
    task = RewardTask("held-out prompts", [{"prompt": p} for p in held_prompts], reward_fn, run.temperature)
    results = {"base": evaluate_model(model, tokenizer, task, settings)}
    bench_base = run_on_main(benchmarks, model, tokenizer, out, "base")

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

    # 4. the tuned policy on the same prompts, seed and sampling; report
    task.reference_model = ref_model
    train_info = {"algorithm": run.algorithm, "runtime_s": runtime, "steps": args.max_steps,
                  "episodes": args.max_steps * args.per_device_train_batch_size, "reward_model": run.reward_model,
                  "reward_model_accuracy": reward_accuracy, "peft_method": run.peft_method,
                  "final_kl_coef": history[-1].get("kl_coef") if history else None, "train_prompts": len(train_prompts)}
    metrics, table = finish_rl_run(out, f"RLHF ({run.algorithm})", model, tokenizer, task, settings, results["base"],
                                   train_info, history, report_examples=run.report_examples,
                                   notes=reward_model_note(run.reward_model), benchmarks=benchmarks,
                                   benchmarks_base=bench_base)
    return RunResult(out, metrics, table, model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
