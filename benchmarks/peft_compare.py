"""Every PEFT method on the instruction task: same data, same training tokens, same evaluation.

    python benchmarks/peft_compare.py [--methods lora,ia3,...] [--max_steps 16] [--eval_samples 64]

Each method runs `recipes/sft_instruction.py` in its own process (so peak RSS is that method's own),
with the recipe's default config plus the overrides below; only the learning rate differs, set per
method family (LEARNING_RATES). The base model is evaluated once, by `hf-tuner eval`
on the same held-out split. Writes
peft_comparison.json and peft_comparison.md in --output_dir.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hf_tuner.adapters import METHODS  # noqa: E402

# Adapters with few parameters need larger steps; full fine-tuning a smaller one. Chosen from the
# methods' papers and PEFT's examples, not tuned per method here.
LEARNING_RATES = {"full": 1e-4, "ia3": 1e-2, "prompt-tuning": 3e-2, "prefix-tuning": 1e-2, "p-tuning": 1e-2,
                  "llama-adapter": 1e-2}
DEFAULT_LR = 1e-3  # the LoRA family


def run_method(method: str | None, args, out: Path) -> dict:
    """Run the recipe for one method (None: the base model alone) and read back its metrics.json."""
    run_dir = out / (method or "base")
    if method is None:  # the base model: the harness's own command, on the same held-out split
        cmd = [sys.executable, "-m", "hf_tuner.cli", "eval", "--model", args.model, "--task", args.task,
               "--eval_samples", str(args.eval_samples), "--output_dir", str(run_dir)]
    else:
        cmd = [sys.executable, "-m", "recipes.sft_instruction", "--config", args.config,
               "--output_dir", str(run_dir), "--overwrite_output_dir", "true", "--evaluate_base", "false",
               "--eval_samples", str(args.eval_samples), "--train_samples", str(args.max_steps * args.batch_size),
               "--max_steps", str(args.max_steps), "--per_device_train_batch_size", str(args.batch_size),
               "--report_to", "none", "--peft_method", method,
               "--learning_rate", str(LEARNING_RATES.get(method, DEFAULT_LR))]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        return {"method": method, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    if method is None:
        scores = json.loads((run_dir / "metrics.json").read_text())["results"]["greedy/zero_shot"]
        return {"method": "base (zero-shot)", "trainable_params": 0, "trainable_percent": 0.0, "peak_rss_mb": None,
                "train_tokens": 0, "train_tokens_per_s": None, "train_runtime_s": 0.0, "wall_s": wall,
                "learning_rate": None, "rougeL": scores["rougeL"], "perplexity": scores["perplexity"],
                "mean_length": scores["mean_length"]}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores, t = metrics["tuned"], metrics["train"]
    return {"method": method, "trainable_params": t["trainable_params"], "trainable_percent": t["trainable_percent"],
            "peak_rss_mb": t["peak_rss_mb"], "train_tokens": t["train_tokens"],
            "train_tokens_per_s": t["train_tokens_per_s"], "train_runtime_s": t["runtime_s"], "wall_s": wall,
            "learning_rate": LEARNING_RATES.get(method, DEFAULT_LR), "rougeL": scores["rougeL"],
            "perplexity": scores["perplexity"], "mean_length": scores["mean_length"]}


def markdown(rows: list[dict], args) -> str:
    head = ("| method | trainable params | % | peak RSS (MB) | train tokens/s | wall (s) | lr | ROUGE-L | "
            "perplexity |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | failed: {r['error']} |||||||| ")
            continue
        tps = f"{r['train_tokens_per_s']:.0f}" if r["train_tokens_per_s"] else "-"
        lr = f"{r['learning_rate']:g}" if r["learning_rate"] else "-"
        rss = f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-"
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['trainable_percent']:.3f} | {rss} | {tps} | {r['wall_s']:.0f} | {lr} | {r['rougeL']:.3f} | "
                     f"{r['perplexity']:.2f} |")
    return (f"# PEFT method comparison\n\n{args.model_note}: {args.max_steps} steps x batch {args.batch_size} "
            f"({args.max_steps * args.batch_size} examples, the same for every method), greedy evaluation on "
            f"{args.eval_samples} held-out words.\n\n{head}\n" + "\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="recipes/configs/sft_instruction.yaml")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="for the base row; match the config's")
    parser.add_argument("--task", default="wordnet-definitions", help="for the base row; match the config's")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--max_steps", type=int, default=16)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--output_dir", default="runs/peft-compare")
    args = parser.parse_args()
    args.model_note = f"`{args.config}` defaults ({args.model} on {args.task})"
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in [None, *methods]:
        rows.append(run_method(method, args, out))
        r = rows[-1]
        print(f"{r['method']:20s} " + (f"ROUGE-L {r['rougeL']:.3f}  ppl {r['perplexity']:.2f}  wall {r['wall_s']:.0f}s"
                                      if "error" not in r else f"FAILED: {r['error']}"), flush=True)
        (out / "peft_comparison.json").write_text(json.dumps(rows, indent=2))
        (out / "peft_comparison.md").write_text(markdown(rows, args))
    print("\n" + markdown(rows, args))


if __name__ == "__main__":
    main()
