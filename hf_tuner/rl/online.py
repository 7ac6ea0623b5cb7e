"""Online RL loops on a prompt set: our PPO, or TRL's GRPO / RLOO, behind one call, with one history format."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

# What every algorithm logs per step, under one name each (TRL's names mapped in _from_trl). Our PPO's `kl` is
# nats per response (summed over its tokens); TRL logs a per-token mean under the same name, so it is renamed
# `kl_per_token` here and the two never share a curve.
CURVES = ["reward", "kl", "kl_per_token", "entropy", "clipfrac", "approx_kl", "vf_loss", "response_length"]
TRL_NAMES = {"reward": "reward", "kl": "kl_per_token", "entropy": "entropy", "clip_ratio/region_mean": "clipfrac",
             "completions/mean_length": "response_length"}


def train_ppo(model, tokenizer, reward_fn, prompts: list[str], args, ppo, ref_model=None, out: Path | None = None):
    """Our PPO for args.max_steps steps of per_device_train_batch_size prompts each. Returns (model, history).

    Checkpoints and resume follow the Trainer recipes (hf_tuner.checkpoints): `checkpoint-N` every save_steps
    with save_strategy "steps", `--resume_from_checkpoint latest` or `resume: auto`; SIGINT / SIGTERM save
    one after the current step and raise RunInterrupted. A resumed run repeats the uninterrupted one."""
    from tqdm.auto import tqdm

    from hf_tuner.checkpoints import RunInterrupted, StopOnSignal, resume_point
    from hf_tuner.rl.ppo import PPOTrainer

    trainer = PPOTrainer(model, tokenizer, reward_fn, args, ppo, ref_model=ref_model)
    acc = trainer.accelerator
    rng = random.Random(args.seed)
    mine = prompts[acc.process_index::acc.num_processes]  # each process rolls out its own share of prompts
    order: list[str] = []
    start = 0
    checkpoint = resume_point(args, ppo, out) if out is not None else None
    if checkpoint:
        loop = trainer.load_checkpoint(checkpoint)
        rng.setstate(_as_tuples(loop["rng"]))
        order, start = loop["order"], len(trainer.history)

    save_every = 0
    if args.save_strategy == "steps" and args.save_steps:  # a save_steps below 1 is a fraction of max_steps
        save_every = int(args.save_steps) if args.save_steps >= 1 else max(1, round(args.save_steps * args.max_steps))
    writer = _tensorboard(args, out) if acc.is_main_process else None
    stop = StopOnSignal()
    stop.install()
    bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="ppo", unit="step",
               disable=not acc.is_main_process)
    try:
        for step in bar:
            if len(order) < args.per_device_train_batch_size:
                order += rng.sample(mine, len(mine))
            batch, order = order[:args.per_device_train_batch_size], order[args.per_device_train_batch_size:]
            record = trainer.step(batch)
            bar.set_postfix(reward=f"{record['reward']:.2f}", kl=f"{record['kl']:.2f}")
            if writer is not None:
                for k, v in record.items():
                    writer.add_scalar(f"ppo/{k}", v, step + 1)
            signum, saved = stop.agreed_signal(args), None
            if out is not None and (signum or (save_every and (step + 1) % save_every == 0)):
                saved = out / f"checkpoint-{step + 1}"
                trainer.save_checkpoint(saved, {"rng": rng.getstate(), "order": order})
            if signum:
                raise RunInterrupted(signum, step + 1, saved)
    finally:
        stop.restore()
        if writer is not None:
            writer.close()
    return trainer.model, trainer.history


def _as_tuples(value):
    """random.Random state back from JSON lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list) else value


def _tensorboard(args, out: Path | None):
    if out is None or "tensorboard" not in (args.report_to or []):
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(out / "runs"))


def train_trl(algorithm: str, model, tokenizer, reward_fn, prompts: list[str], args, ppo, peft_config,
              num_generations: int, out: Path):
    """GRPO or RLOO through TRL, on the same prompts, reward and sampling settings as our PPO.

    Budgets match PPO's in episodes: max_steps generation rounds of per_device_train_batch_size completions
    (prompts x num_generations), each reused for ppo_epochs optimizer steps (TRL's num_iterations)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from hf_tuner.checkpoints import train_resumable

    config_cls, trainer_cls = {"grpo": (GRPOConfig, GRPOTrainer), "rloo": (RLOOConfig, RLOOTrainer)}[algorithm]
    shared = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed",
              "logging_steps", "use_cpu", "ddp_backend", "bf16", "lr_scheduler_type", "weight_decay", "max_grad_norm",
              "report_to", "resume_from_checkpoint")
    # one of our steps is ppo_epochs of TRL's (num_iterations), so save_steps scales the same way
    config = config_cls(output_dir=str(out / "trl"), save_strategy=args.save_strategy,
                        save_steps=args.save_steps * (ppo.ppo_epochs if args.save_steps >= 1 else 1),
                        gradient_checkpointing=False,
                        num_generations=num_generations, max_completion_length=ppo.response_length,
                        temperature=ppo.temperature, top_k=0, top_p=1.0, beta=ppo.kl_coef, epsilon=ppo.cliprange,
                        num_iterations=ppo.ppo_epochs, max_steps=args.max_steps * ppo.ppo_epochs,
                        **{k: getattr(args, k) for k in shared})

    def sentiment_reward(prompts, completions, **_):  # TRL logs a reward function under its __name__
        return reward_fn(prompts, completions)

    trainer = trainer_cls(model=model, reward_funcs=sentiment_reward, args=config, processing_class=tokenizer,
                          train_dataset=Dataset.from_dict({"prompt": prompts}), peft_config=peft_config)
    train_resumable(trainer, ppo, out / "trl")  # ppo: the recipe's run arguments
    history = [{"step": h["step"], **{ours: h[theirs] for theirs, ours in TRL_NAMES.items() if theirs in h}}
               for h in trainer.state.log_history if "reward" in h]
    return trainer.model, history


def plot_curves(history: list[dict], path: Path, title: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [c for c in CURVES if any(c in h for h in history)]
    if not names:
        return False
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.6))
    for ax, name in zip(axes if len(names) > 1 else [axes], names):
        points = [(h["step"], h[name]) for h in history if name in h]
        ax.plot(*zip(*points), marker=".")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def save_history(out: Path, history: list[dict]) -> None:
    (out / "rl_history.json").write_text(json.dumps(history, indent=2))


def finish_rl_run(out: Path, title: str, model, tokenizer, task, settings, base: dict, train_info: dict,
                  history: list[dict], log_history: list[dict] | None = None, report_examples: int = 5,
                  notes: list[str] | None = None, benchmarks=None, benchmarks_base: dict | None = None):
    """Save the tuned policy (first, so that a failure in the evaluation never loses it; gathered on every rank
    under FSDP2 / ZeRO-3, rank 0 writing), evaluate it on the base's prompts (same seed and sampling), and
    write metrics.json and report.md. The gain is judged against the standard error of the difference.
    benchmarks / benchmarks_base: the run's held-out lm-eval benchmarks and the base's results; the tuned policy
    is scored on them too and the report gains the base-vs-tuned table. Call it on every rank."""
    from hf_tuner.devices import peak_rss_mb
    from hf_tuner.evaluation import evaluate_model
    from hf_tuner.distributed import is_main_process, save_pretrained_gathered
    from hf_tuner.evaluation.report import write_run_record

    save_pretrained_gathered(model, out / "policy", tokenizer)
    tuned = evaluate_model(model, tokenizer, task, settings)
    from hf_tuner.evaluation.benchmarks import paired, report as report_benchmarks, run_on_main

    bench_tuned = run_on_main(benchmarks, model, tokenizer, out, "tuned") if benchmarks_base else None
    bench_metrics, bench_lines = report_benchmarks(benchmarks_base, bench_tuned)
    b, t = base["metrics"], tuned["metrics"]
    # base and tuned answer the same prompts, in the same order: the SE of the gain is the paired one (the SE of
    # the per-prompt differences), not sqrt(se_b^2 + se_t^2), which treats them as independent samples
    gain, se = paired(base["rewards"], tuned["rewards"])
    judge = f"judge_{task.judge}" if task.judge and f"judge_{task.judge}" in t else None
    judged = {}
    if judge:  # the same prompts and samples, scored by a judge the policy was not trained against
        j_gain, j_se = paired(base["judge_scores"], tuned["judge_scores"])
        judged = {f"{judge}_gain": j_gain, f"{judge}_gain_se": j_se, f"{judge}_gain_over_2se": j_gain > 2 * j_se}
    has_curves = False
    if is_main_process():
        save_history(out, history)
        has_curves = plot_curves(history, out / "rl_curves.png", f"{title}: per-step statistics")
    metrics = {"base_label": "base (starting policy)", "base": b, "baselines": {}, "tuned": t,
               "train": {**train_info, "reward_gain": gain, "gain_se": se, "gain_over_2se": gain > 2 * se, **judged,
                         "peak_rss_mb": peak_rss_mb(), "eval_prompts": len(task.rows)},
               "eval_seconds": {"base": base["seconds"], "tuned": tuned["seconds"]},
               "held_out_benchmarks": bench_metrics}
    lines = [*(notes or []), *(["## RL curves", "", "![rl curves](rl_curves.png)", ""] if has_curves else []),
             f"Reward gain {gain:+.3f}, paired standard error (over the same prompts) {se:.3f}: "
             f"{'more' if gain > 2 * se else 'not more'} than twice it. KL is to the reference policy in nats per "
             "response, estimated on the policy's own samples.", ""]
    if judge:
        lines += [f"Independent judge ({JUDGE_NAMES.get(task.judge, task.judge)}, which the policy was not trained "
                  f"against): {b[judge]:.3f} -> {t[judge]:.3f}, gain {judged[f'{judge}_gain']:+.3f}, standard error "
                  f"{judged[f'{judge}_gain_se']:.3f}: {'more' if judged[f'{judge}_gain_over_2se'] else 'not more'} "
                  "than twice it. A reward gain the judge does not share may be over-optimisation of the reward "
                  "model.", ""]
    lines += bench_lines
    examples, generations = [], []
    for i, row in enumerate(task.rows):
        g = {"prompt": row["prompt"], "base": base["predictions"][i], "tuned": tuned["predictions"][i],
             "base_reward": base["rewards"][i], "tuned_reward": tuned["rewards"][i]}
        e = {"prompt": row["prompt"], "base": base["predictions"][i], "base reward": f"{base['rewards'][i]:.2f}",
             "tuned": tuned["predictions"][i], "tuned reward": f"{tuned['rewards'][i]:.2f}"}
        if judge:
            g.update({f"base_{judge}": base["judge_scores"][i], f"tuned_{judge}": tuned["judge_scores"][i]})
            e.update({f"base {task.judge}": f"{base['judge_scores'][i]:.2f}",
                      f"tuned {task.judge}": f"{tuned['judge_scores'][i]:.2f}"})
        generations.append(g)
        if i < report_examples:
            examples.append(e)
    table = write_run_record(out, title, metrics, examples, log_history or [], lines, generations)
    print(f"\nHeld-out prompts ({len(task.rows)}), run folder {out}:\n{table}\n")
    return metrics, table


JUDGE_NAMES = {"vader": "VADER compound sentiment of the response, -1..1"}


def reward_model_note(reward_model: str) -> list[str]:
    """A report section on the reward model, when it is a reward_model run folder."""
    metrics_file = Path(reward_model).expanduser() / "metrics.json"
    if not metrics_file.is_file():
        return [f"Reward: `{reward_model}`.", ""]
    m = json.loads(metrics_file.read_text())
    t, b = m["tuned"], m["base"]
    return ["## Reward model", "", f"`{reward_model}`: held-out pairwise accuracy {b['pairwise_accuracy']:.3f} "
            f"(untrained head) -> {t['pairwise_accuracy']:.3f}, mean margin {t['mean_margin']:.3f}, "
            f"{m['train'].get('eval_pairs', '?')} held-out pairs.", ""]


def timed(fn, *a, **kw):
    start = time.perf_counter()
    result = fn(*a, **kw)
    return result, time.perf_counter() - start
