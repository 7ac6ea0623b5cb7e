"""Peer check: our PPO (hf_tuner/rl/ppo.py) against TRL 1.12.0's PPOTrainer, the last TRL that shipped PPO.

    python benchmarks/ppo_vs_trl112.py [--steps 50] [--seeds 3] [--output_dir runs/bench/ppo_vs_trl112]
    make bench-ppo-peer

A benchmark, never a test and never a runtime dependency: TRL 1.12.0 lives in its own throwaway venv
($HF_TUNER_CACHE/venv-trl112, made on first use with the same torch and transformers as ours).

The setting is the same for both, run by run (same seed):
- policy: tiny-llama (random 2-layer Llama, hidden 64), full fine-tuning, a frozen copy as reference;
- reward: a seeded random tiny Llama sequence classifier on the policy's tokenizer. TRL 1.12 needs the policy
  and reward model to share one tokenizer, so the reward is a fixed function of the text both can optimise;
  ours re-tokenizes the decoded text, as it does for any reward model;
- prompts: the 4-word openings of the vader movie-review snippets (the ppo_rlhf default), 16 per update;
- PPO: 4 epochs x 2 minibatches per rollout, kl_coef 0.05, clip 0.2/0.2, vf_coef 0.1, gamma 1, lambda 0.95,
  temperature 0.7, 16 new tokens, truncation after EOS, linear lr decay from 3e-3 (a random policy is nearly
  uniform: at 3e-4 neither trainer moved the reward in 30 updates), AdamW eps 1e-5, no grad clipping (TRL 1.12's
  PPO does not clip).
Differences that remain: TRL's value model is a second network (initialised from the reward model, as in its
example); ours is a linear head on the policy. Sampling consumes the random stream differently, so curves
agree in trend, not token for token.

Reported: the reward curve of each (mean over seeds), median step time, and the final policies' mean reward
on 64 held-out prompts (4 samples each, same seed for all), base vs ours vs TRL. Writes ppo_vs_trl112.json,
ppo_vs_trl112.md and reward_curves.png into --output_dir.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

HERE = Path(__file__).resolve().parent
SETTINGS = {"batch_size": 16, "num_mini_batches": 2, "ppo_epochs": 4, "response_length": 16, "temperature": 0.7,
            "kl_coef": 0.05, "cliprange": 0.2, "cliprange_value": 0.2, "vf_coef": 0.1, "gamma": 1.0, "lam": 0.95}


def trl112_python(venv: Path) -> Path:
    """The throwaway venv's python, created once: the CPU torch wheel first, then TRL 1.12.0."""
    import transformers

    python = venv / "bin" / "python"
    if python.exists():
        return python
    print(f"creating {venv} with trl==1.12.0 (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}"], check=True)
    subprocess.run(pip + [f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}",
                          "trl==1.12.0", "accelerate", "datasets"], check=True)
    return python


def build_reward_model(policy_dir: Path, target: Path, seed: int = 1) -> None:
    """A tiny Llama sequence classifier with the policy's tokenizer; the score head is scaled so rewards spread
    over about +-2, like the sentiment reward model's."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    if (target / "config.json").exists():
        return
    config = AutoConfig.from_pretrained(policy_dir)
    config.num_labels = 1
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    torch.nn.init.normal_(model.score.weight, std=0.3)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(policy_dir).save_pretrained(target)


def reward_function(reward_dir: Path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(reward_dir, padding_side="right")
    model = AutoModelForSequenceClassification.from_pretrained(reward_dir, num_labels=1).eval()

    @torch.no_grad()
    def score(prompts: list[str], responses: list[str]) -> list[float]:
        enc = tokenizer([p + r for p, r in zip(prompts, responses)], padding=True, add_special_tokens=False,
                        return_tensors="pt")
        return model(**enc).logits[:, 0].tolist()

    return score


def run_ours(spec: dict, reward_fn) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_tuner.rl.ppo import PPOArguments, PPOTrainer

    torch.manual_seed(spec["seed"])
    s = spec["settings"]
    tokenizer = AutoTokenizer.from_pretrained(spec["policy"], padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"])
    ref = AutoModelForCausalLM.from_pretrained(spec["policy"])
    args = SimpleNamespace(use_cpu=True, bf16=False, learning_rate=s["learning_rate"], weight_decay=0.0,
                           lr_scheduler_type="linear", max_steps=s["steps"], max_grad_norm=None)
    ppo = PPOArguments(response_length=s["response_length"], temperature=s["temperature"],
                       ppo_epochs=s["ppo_epochs"], num_mini_batches=s["num_mini_batches"], kl_coef=s["kl_coef"],
                       cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"],
                       gamma=s["gamma"], lam=s["lam"])
    trainer = PPOTrainer(policy, tokenizer, reward_fn, args, ppo, ref_model=ref)
    prompts, n = spec["prompts"], s["batch_size"]
    gen = torch.Generator().manual_seed(spec["seed"])  # TRL's dataloader also shuffles with the seed
    order = torch.randperm(len(prompts), generator=gen).tolist()
    start = time.perf_counter()
    for step in range(s["steps"]):
        idx = [order[(step * n + i) % len(order)] for i in range(n)]
        trainer.step([prompts[i] for i in idx])
    seconds = time.perf_counter() - start
    out = Path(spec["out"])
    trainer.model.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    history = [{k: r[k] for k in ("step", "reward", "kl", "clipfrac", "entropy", "seconds")} for r in trainer.history]
    return {"history": history, "train_seconds": seconds}


def held_out_reward(policy_dir, prompts: list[str], reward_fn, temperature: float, length: int, samples: int):
    """Mean reward and its standard error over `samples` sampled responses per held-out prompt (seed 0)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_tuner.rl.ppo import sample_responses

    tokenizer = AutoTokenizer.from_pretrained(policy_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(policy_dir)
    many = [p for p in prompts for _ in range(samples)]
    texts = sample_responses(model, tokenizer, many, length, temperature, batch_size=64, seed=0)[4]
    scores = reward_fn(many, texts)
    per_prompt = [statistics.fmean(scores[i:i + samples]) for i in range(0, len(scores), samples)]
    return statistics.fmean(per_prompt), statistics.stdev(per_prompt) / len(per_prompt) ** 0.5


def mean_curve(runs: list[dict], key: str) -> list[float]:
    return [statistics.fmean(r["history"][i][key] for r in runs) for i in range(min(len(r["history"]) for r in runs))]


def plot(curves: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("PPO update")
    ax.set_ylabel("mean rollout reward")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    from hf_tuner import assets
    from hf_tuner.data.preferences import rl_prompts
    from hf_tuner.devices import peak_rss_mb, set_cpu_threads

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--output_dir", default="runs/bench/ppo_vs_trl112")
    parser.add_argument("--venv", default=str(assets.cache_dir() / "venv-trl112"))
    args = parser.parse_args()

    threads = set_cpu_threads()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    python = trl112_python(Path(args.venv))
    policy_dir = assets.fetch("tiny-llama", log=lambda m: None)
    build_reward_model(policy_dir, out / "reward_model")
    reward_fn = reward_function(out / "reward_model")
    train_prompts, held_prompts, _ = rl_prompts("vader-sentiment", None, 1000, 0, 4, 64)
    settings = {**SETTINGS, "steps": args.steps, "learning_rate": args.learning_rate}

    runs: dict[str, list[dict]] = {"ours": [], "trl112": []}
    for seed in range(args.seeds):
        for name in ("trl112", "ours"):  # alternate, so drift in machine load hits both
            run_dir = out / f"{name}-seed{seed}"
            spec = {"policy": str(policy_dir), "reward": str(out / "reward_model"), "prompts": train_prompts,
                    "settings": settings, "seed": seed, "threads": threads, "out": str(run_dir)}
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"{name} seed {seed} ...", flush=True)
            if name == "ours":
                result = run_ours(spec, reward_fn)
            else:
                (run_dir / "spec.json").write_text(json.dumps(spec))
                env = {**os.environ, "PYTHONPATH": ""}
                subprocess.run([str(python), str(HERE / "_trl112_ppo_worker.py"), str(run_dir / "spec.json")],
                               check=True, env=env)
                result = json.loads((run_dir / "history.json").read_text())
            result["held_out"] = held_out_reward(run_dir / "policy", held_prompts, reward_fn,
                                                 settings["temperature"], settings["response_length"], 4)
            runs[name].append(result)
            print(f"  {result['train_seconds']:.1f} s, final rollout reward {result['history'][-1]['reward']:.3f}, "
                  f"held-out {result['held_out'][0]:.3f} +- {result['held_out'][1]:.3f}", flush=True)

    base = held_out_reward(policy_dir, held_prompts, reward_fn, settings["temperature"], settings["response_length"], 4)
    summary = {"settings": settings, "seeds": args.seeds, "threads": threads, "base_held_out_reward": base[0],
               "base_held_out_se": base[1], "peak_rss_mb": peak_rss_mb()}
    for name, rs in runs.items():
        step_times = [h["seconds"] for r in rs for h in r["history"][1:]]  # the first step includes warm-up
        summary[name] = {
            "median_step_seconds": statistics.median(step_times),
            "reward_first5": statistics.fmean(mean_curve(rs, "reward")[:5]),
            "reward_last5": statistics.fmean(mean_curve(rs, "reward")[-5:]),
            "kl_last5": statistics.fmean(mean_curve(rs, "kl")[-5:]),
            "held_out_reward": statistics.fmean(r["held_out"][0] for r in rs),
            "held_out_reward_per_seed": [r["held_out"][0] for r in rs],
            "reward_curve": mean_curve(rs, "reward"), "kl_curve": mean_curve(rs, "kl")}
    plot({"ours": summary["ours"]["reward_curve"], "TRL 1.12 PPOTrainer": summary["trl112"]["reward_curve"]},
         out / "reward_curves.png")
    (out / "ppo_vs_trl112.json").write_text(json.dumps(summary, indent=1))
    rows = ["| | ours | TRL 1.12 |", "|---|---|---|"]
    for key, label in (("reward_first5", "rollout reward, updates 1-5"), ("reward_last5", "rollout reward, last 5"),
                       ("kl_last5", "KL to reference, last 5 (nats)"), ("held_out_reward", "held-out reward (64 prompts x 4)"),
                       ("median_step_seconds", "median seconds per update")):
        rows.append(f"| {label} | {summary['ours'][key]:.3f} | {summary['trl112'][key]:.3f} |")
    text = "\n".join([f"# PPO peer check: ours vs TRL 1.12.0 ({args.seeds} seeds x {args.steps} updates)", "",
                      f"Held-out reward of the starting policy: {base[0]:.3f} (SE {base[1]:.3f}).", "", *rows, "",
                      "![reward curves](reward_curves.png)", ""])
    (out / "ppo_vs_trl112.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
