"""DPO: tune a policy directly on preference pairs (TRL's DPOTrainer), evaluated like the RL recipes.

    accelerate launch recipes/dpo.py --config recipes/configs/dpo.yaml [--key value ...]
    python -m recipes.dpo --config recipes/configs/dpo.yaml
    from recipes.dpo import train; train("recipes/configs/dpo.yaml")

Default: the reward model's human-rating pairs (vader movie snippets, chosen = the more positive),
written as prompt + chosen/rejected continuations; SmolLM2-135M-Instruct with LoRA, whose reference is
the adapter-disabled base. No reward model is needed to train: it only scores the held-out prompts,
the same ones, with the same seed and sampling, as `recipes/ppo_rlhf.py`, so the runs compare.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch recipes/x.py): make `recipes` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_tuner.config import ConfigError, RunArguments, parse_config, prepare_output_dir  # noqa: E402
from hf_tuner.runs import RunResult, recipe_main  # noqa: E402


@dataclass
class DPOArguments(RunArguments):
    reward_model: str = field(default="runs/reward_model", metadata={
        "help": "scores the held-out prompts: a reward_model run folder, a scalar-head model, or module:function"})
    train_pairs: int = field(default=4000, metadata={"help": "training pairs drawn (vader), or a cap (files)"})
    eval_snippets: int = field(default=1000, metadata={"help": "vader: held-out snippets (match the reward model)"})
    min_gap: float = field(default=1.0, metadata={"help": "vader: least rating difference that makes a pair"})
    vader_sources: list[str] | None = field(default=None, metadata={"help": "vader files (default: movie reviews)"})
    prompt_words: int = field(default=4, metadata={"help": "words of a snippet's opening used as the prompt"})
    response_length: int = field(default=20, metadata={"help": "new tokens sampled per held-out prompt"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature of the evaluation"})


def _config(source):
    from trl import DPOConfig

    return parse_config(DPOConfig, source, run_cls=DPOArguments, uses={"held_out_benchmarks"})


def train(config=None) -> RunResult:
    """Run the recipe. `config`: a YAML path, a dict of fields, argv (list), or None for sys.argv."""
    import copy

    from datasets import Dataset
    from transformers import set_seed
    from trl import DPOTrainer

    from hf_tuner.adapters import peft_setup
    from hf_tuner.checkpoints import train_resumable
    from hf_tuner.data import data_sources
    from hf_tuner.data.preferences import as_continuations, is_vader, load_preferences, rl_prompts, with_prompt
    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.evaluation.benchmarks import from_run, run_on_main
    from hf_tuner.evaluation.tasks import RewardTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.models import check_model_source, load_model
    from hf_tuner.rl.online import finish_rl_run, reward_model_note
    from hf_tuner.rl.rewards import load_reward_function
    from hf_tuner.training import planned_steps
    from hf_tuner.validation import check_batch

    # 1. config and data, before anything loads
    cfg = _config(config)
    run, args, mcfg = cfg.run, cfg.training, cfg.model
    if not mcfg.model_name_or_path:
        raise ConfigError("model_name_or_path is required (an asset such as smollm2-135m-instruct, a folder or a Hub id)")
    model_path = check_model_source(mcfg.model_name_or_path)
    sources = data_sources(cfg, default="vader-sentiment")
    dataset_name = " + ".join(s.label() for s in sources)
    pairs, held_pairs = load_preferences(sources, run.vader_sources, run.train_pairs, run.eval_samples,
                                         run.eval_snippets, run.min_gap, run.split_seed)
    if not is_vader(sources[0].name) or len(sources) > 1:  # any preference data: the prompts of its held-out pairs
        pairs, held_pairs = [with_prompt(p) for p in pairs], [with_prompt(p) for p in held_pairs]
        if not all(p["prompt"] for p in pairs + held_pairs):
            raise ConfigError(f"dataset_name {dataset_name}: DPO needs a prompt on every row (explicit, or shared by "
                              "chosen and rejected)")
        held_prompts = list({json.dumps(p["prompt"]): p["prompt"] for p in held_pairs}.values())
    else:  # vader: snippets as continuations; held-out prompts open snippets never trained on
        pairs = as_continuations(pairs, run.prompt_words, run.split_seed)
        _, held_prompts, _ = rl_prompts(dataset_name, run.vader_sources, run.eval_snippets, run.split_seed,
                                        run.prompt_words, run.eval_samples)
    held_keys = {json.dumps(p) for p in held_prompts}
    dropped = sum(json.dumps(p["prompt"]) in held_keys for p in pairs)
    pairs = [p for p in pairs if json.dumps(p["prompt"]) not in held_keys]  # no held-out prompt is trained on
    if dropped:
        print(f"note: {dropped} training pair(s) dropped: their prompt is a held-out prompt")
    check_batch(len(pairs), args, dataset_name)
    peft = peft_setup(run.peft_method, model_path, "causal-lm", mcfg, run.peft_options,
                      total_steps=planned_steps(args, len(pairs)))
    benchmarks = from_run(run)  # lm-eval tasks checked (data readable) before weights load
    out = prepare_output_dir(args, run)
    cfg.save(out / "config.yaml")
    set_cpu_threads(run.num_threads)
    set_seed(args.seed)  # heads and adapters initialise from the seed, not the process's random state
    reward_fn = load_reward_function(run.reward_model)

    # 2. the policy and the starting policy's score on the held-out prompts
    model, tokenizer = load_model(mcfg.model_name_or_path, "causal-lm", dtype=mcfg.dtype, revision=mcfg.model_revision)
    tokenizer.padding_side = "left"
    settings = DecodingSettings(max_new_tokens=run.response_length, batch_size=run.eval_batch_size, seed=args.seed)
    render = lambda p: p if isinstance(p, str) else tokenizer.apply_chat_template(  # noqa: E731
        p, tokenize=False, add_generation_prompt=True)
    task = RewardTask("held-out prompts", [{"prompt": render(p)} for p in held_prompts], reward_fn, run.temperature)
    base = evaluate_model(model, tokenizer, task, settings)
    bench_base = run_on_main(benchmarks, model, tokenizer, out, "base")

    # 3. DPO: with an adapter, TRL's reference is the adapter-disabled base (no second copy)
    reference = copy.deepcopy(model).eval() if peft.config is None else None  # for the KL of a full fine-tune
    dataset = Dataset.from_list([{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs])
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft.config, callbacks=peft.callbacks)
    start = time.perf_counter()
    train_resumable(trainer, run, out)
    runtime = time.perf_counter() - start
    task.reference_model = reference
    history = [{"step": h["step"], "loss": h["loss"], "reward_margin": h.get("rewards/margins")}
               for h in trainer.state.log_history if "loss" in h]

    # 4. the tuned policy on the same prompts; report
    train_info = {"algorithm": "dpo", "runtime_s": runtime, "steps": trainer.state.global_step,
                  "train_pairs": len(pairs), "held_out_prompts_dropped_from_train": dropped, "beta": args.beta, "reward_model": run.reward_model,
                  "peft_method": run.peft_method}
    metrics, table = finish_rl_run(out, "DPO", trainer.model, tokenizer, task, settings, base, train_info, history,
                                   trainer.state.log_history, run.report_examples, reward_model_note(run.reward_model),
                                   benchmarks=benchmarks, benchmarks_base=bench_base)
    return RunResult(out, metrics, table, trainer.model, tokenizer)


def main(argv: list[str] | None = None) -> None:
    recipe_main(train, argv)


if __name__ == "__main__":
    main()
