"""Batched, left-padded generation against one `generate` call per example, on the same prompts.

    python benchmarks/bench_generation.py [--model smollm2-135m-instruct] [--n 64] [--batch_size 16]

Prints prompts/s and generated tokens/s for both, the speedup, and how many greedy outputs agree; writes bench_generation.json.
"""

from __future__ import annotations

import argparse
import json
import time

from hf_tuner.devices import set_cpu_threads
from hf_tuner.evaluation.checkpoint_eval import held_out_split
from hf_tuner.evaluation.tasks import GenerationTask
from hf_tuner.generation import DecodingSettings, generate_batched
from hf_tuner.models import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--task", default="wordnet-definitions")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--output", default="bench_generation.json")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the available cores)")
    args = parser.parse_args()

    threads = set_cpu_threads(args.threads)
    model, tokenizer = load_model(args.model)
    _, rows = held_out_split(args.task, args.n, split_seed=0)
    task = GenerationTask("bench", rows)
    prompts = [tokenizer.apply_chat_template(task.messages(r), tokenize=False, add_generation_prompt=True)
               for r in rows]
    timings, outputs = {}, {}
    for name, batch in (("loop", 1), ("batched", args.batch_size)):
        settings = DecodingSettings(max_new_tokens=args.max_new_tokens, batch_size=batch)
        start = time.perf_counter()
        outputs[name] = generate_batched(model, tokenizer, prompts, settings, desc=name)
        timings[name] = time.perf_counter() - start
        print(f"{name:8s} batch {batch:3d}: {timings[name]:7.1f} s, {len(prompts) / timings[name]:.2f} prompts/s")
    same = sum(a == b for a, b in zip(outputs["loop"], outputs["batched"]))
    # generated tokens: the decoded outputs re-tokenized (special tokens and padding are not in them)
    new_tokens = {k: sum(len(tokenizer(o, add_special_tokens=False).input_ids) for o in v) for k, v in outputs.items()}
    result = {"model": args.model, "prompts": len(prompts), "batch_size": args.batch_size, "threads": threads,
              "max_new_tokens": args.max_new_tokens, "loop_s": timings["loop"], "batched_s": timings["batched"],
              "speedup": timings["loop"] / timings["batched"], "identical_outputs": same,
              "loop_tokens_per_s": new_tokens["loop"] / timings["loop"],
              "batched_tokens_per_s": new_tokens["batched"] / timings["batched"]}
    print(f"speedup {result['speedup']:.2f}x; identical greedy outputs {same}/{len(prompts)}")
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
