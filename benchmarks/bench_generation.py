"""Generation on this CPU: a roofline, and the evaluation levers measured on the demo's own prompts.

    python benchmarks/bench_generation.py [--adapter RUN/adapter] [--n 200] [--compile]

1. Machine: fp32 (and bf16) GEMM GFLOP/s and memory read GB/s, measured.
2. Roofline: prefill and decode tokens/s of the model at batch sizes 1-64, against the limit set by the
   FLOPs per token and by reading the weights once per decode step; the fraction reached.
3. Levers, on the demo's held-out prompts (the sft_instruction config's 200, zero-shot and 3-shot), for the
   base model and the LoRA-tuned one: today's harness (`model.generate`, batches of 16, adapter unmerged),
   then each lever added in turn. Per arm: seconds, generated tokens/s, greedy outputs identical to
   today's, ROUGE-L against the references.
Writes benchmarks/results/bench_generation.{json,md} (or --output).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hf_tuner.devices import cpu_supports_bf16, peak_rss_mb, set_cpu_threads

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def machine(bf16: bool) -> dict:
    out = {"cpu": cpu_name(), "bf16_native": bf16, "threads": torch.get_num_threads()}
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for dtype in (torch.float32, torch.bfloat16) if bf16 else (torch.float32,):
        x, y = a.to(dtype), b.to(dtype)
        torch.mm(x, y)
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(x, y)
        out[f"gemm_gflops_{str(dtype)[6:]}"] = 5 * 2 * 2048 ** 3 / (time.perf_counter() - start) / 1e9
    big = torch.ones(128 * 1024 * 1024)  # 512 MB, read once per sum
    big.sum()
    start = time.perf_counter()
    for _ in range(3):
        big.sum()
    out["read_gb_s"] = 3 * big.numel() * 4 / (time.perf_counter() - start) / 1e9
    return out


def model_costs(model) -> dict:
    """FLOPs per token (2 per weight of every matmul; the output layer counted once per scored token) and
    the bytes read per decode step (every weight once; a tied embedding is the output layer's matrix)."""
    cfg = model.config
    body = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n
               and "lm_head" not in n)
    head = cfg.vocab_size * cfg.hidden_size
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"body_params": body, "head_params": head, "flops_per_prefill_token": 2 * body,
            "flops_per_decode_token": 2 * (body + head), "weight_bytes": weight_bytes}


@torch.no_grad()
def roofline(model, mach: dict, costs: dict, prompt_len: int = 45, steps: int = 16) -> list[dict]:
    from transformers import DynamicCache

    from hf_tuner.generation import _cache_kwarg

    arg = _cache_kwarg(model)
    peak = mach["gemm_gflops_float32"] * 1e9
    rows = []
    for batch in (1, 2, 4, 8, 16, 32, 64):
        ids = torch.randint(100, 1000, (batch, prompt_len))
        cache = DynamicCache(config=model.config)
        start = time.perf_counter()
        logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{arg: cache}).logits
        prefill = batch * prompt_len / (time.perf_counter() - start)
        nxt = logits[:, -1].argmax(-1)[:, None]
        start = time.perf_counter()
        for _ in range(steps):
            nxt = model(input_ids=nxt, use_cache=True, logits_to_keep=1, **{arg: cache}).logits[:, -1].argmax(-1)[:, None]
        decode = batch * steps / (time.perf_counter() - start)
        prefill_limit = peak / costs["flops_per_prefill_token"]
        decode_limit = min(peak / costs["flops_per_decode_token"],
                           batch * mach["read_gb_s"] * 1e9 / costs["weight_bytes"])
        rows.append({"batch": batch, "prefill_tok_s": prefill, "prefill_limit": prefill_limit,
                     "decode_tok_s": decode, "decode_limit": decode_limit,
                     "decode_bound": "compute" if decode_limit == peak / costs["flops_per_decode_token"] else "memory"})
        print(f"batch {batch:3d}: prefill {prefill:6.0f} tok/s ({prefill / prefill_limit:4.0%} of {prefill_limit:.0f}), "
              f"decode {decode:6.1f} tok/s ({decode / decode_limit:4.0%} of {decode_limit:.0f}, "
              f"{rows[-1]['decode_bound']})", flush=True)
    return rows


def demo_prompts(n: int, shots: int, tokenizer, config: str):
    """The sft_instruction demo's held-out prompts and references (its config, its split, its shots)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from hf_tuner.evaluation.harness import _prompt_text
    from hf_tuner.evaluation.tasks import GenerationTask
    from recipes import sft_instruction

    cfg = sft_instruction._config(config)
    cfg.run.eval_samples = n
    train_rows, held_rows, _, _ = sft_instruction._check_and_load_data(cfg)
    task = GenerationTask("held-out", held_rows, system_prompt=cfg.run.system_prompt)
    if shots:
        task = task.with_shots(shots, train_rows, cfg.run.split_seed)
    return [_prompt_text(tokenizer, task.messages(r)) for r in held_rows], [task.reference(r) for r in held_rows]


def arms(lora: bool, bf16: bool, compile_: bool, batch: int, large: int) -> list[tuple[str, dict]]:
    """Cumulative levers: each arm adds one to the one before."""
    out = [("today: model.generate, batch 16", {"fast": False, "batch": 16, "merge": False}),
           ("+ shared-prefix cache, finished rows leave", {"fast": True, "batch": 16, "merge": False,
                                                          "in_place": False, "chunked_head": False}),
           (f"+ batch {batch}", {"fast": True, "batch": batch, "merge": False, "in_place": False,
                                 "chunked_head": False}),
           ("+ cache written in place", {"fast": True, "batch": batch, "merge": False, "chunked_head": False}),
           ("+ output layer in vocabulary slices", {"fast": True, "batch": batch, "merge": False})]
    if large > batch:
        out.append((f"+ batch {large} (KV budget {KV_BUDGET_LARGE >> 20} MB)",
                    {"fast": True, "batch": large, "merge": False, "kv_budget": KV_BUDGET_LARGE}))
    if lora:
        out.append(("+ LoRA merged into the weights", {**out[-1][1], "merge": True}))
    last = dict(out[-1][1])
    if bf16:
        out.append(("+ bf16 autocast (rounding)", {**last, "bf16": True}))
    if compile_:
        out.append(("+ torch.compile (rounding; compile time included)", {**last, "compile": True}))
    return out


KV_BUDGET_LARGE = 1024 * 2 ** 20  # the large-batch arm: every zero-shot demo prompt in one batch


@torch.no_grad()
def run_arm(model, tokenizer, prompts: list[str], spec: dict, max_new_tokens: int) -> tuple[list[str], float]:
    from contextlib import ExitStack

    from hf_tuner import generation
    from hf_tuner.generation import DecodingSettings, _eos_ids, _generate, greedy_batched, merged_adapter

    settings = DecodingSettings(max_new_tokens=max_new_tokens, batch_size=spec["batch"])
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with ExitStack() as stack:
        if spec.get("merge"):
            stack.enter_context(merged_adapter(model))
        if spec.get("bf16"):
            stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
        forward = model.forward
        if spec.get("compile"):
            model.forward = torch.compile(forward, dynamic=True)
        budget = generation.KV_BUDGET
        generation.KV_BUDGET = spec.get("kv_budget", budget)
        start = time.perf_counter()
        try:
            if spec["fast"]:
                tokens = greedy_batched(model, encoded, settings, _eos_ids(model, tokenizer), pad, desc="fast",
                                        in_place=spec.get("in_place", True),
                                        chunked_head=spec.get("chunked_head", True))
            else:
                tokens = _generate(model, encoded, settings, pad, False, desc="generate")
        finally:
            model.forward = forward
            generation.KV_BUDGET = budget
        seconds = time.perf_counter() - start
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in tokens], seconds


def levers(model, tokenizer, label: str, prompt_sets: dict, args, bf16: bool) -> list[dict]:
    from hf_tuner.evaluation.metrics import text_metrics

    rows = []
    lora = hasattr(model, "peft_config")
    for shots, (prompts, references) in prompt_sets.items():
        today = None
        for name, spec in arms(lora, bf16 and args.bf16, args.compile, args.batch_size, args.large_batch_size):
            outputs, seconds = run_arm(model, tokenizer, prompts, spec, args.max_new_tokens)
            tokens = sum(len(tokenizer(o, add_special_tokens=False).input_ids) for o in outputs)
            today = today or (outputs, seconds, tokens)
            rouge = text_metrics(outputs, references, ["rougeL"])["rougeL"]
            row = {"model": label, "shots": shots, "arm": name, "seconds": seconds, "tokens": tokens,
                   "tokens_per_s": tokens / seconds, "speedup": today[1] / seconds,
                   "identical": sum(a == b for a, b in zip(outputs, today[0])), "prompts": len(prompts),
                   "rougeL": rouge, "peak_rss_mb": peak_rss_mb()}
            rows.append(row)
            print(f"{label:5s} {shots}-shot {name:50s} {seconds:6.1f} s {row['tokens_per_s']:6.1f} tok/s "
                  f"x{row['speedup']:.2f}  identical {row['identical']}/{len(prompts)}  ROUGE-L {rouge:.4f}",
                  flush=True)
    return rows


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# Generation on {m['cpu']}, {m['threads']} threads", "",
             f"Command: `{result['command']}` ({result['date']}).", "",
             "## Machine", "", "| measure | value |", "|---|---:|",
             *[f"| {k} | {v:.1f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()], "",
             "## Roofline", "",
             f"Model {result['model']}: {result['costs']['flops_per_decode_token'] / 1e9:.3f} GFLOP per decoded "
             f"token, {result['costs']['weight_bytes'] / 1e6:.0f} MB of weights read per decode step. Limits: "
             "prefill = GEMM peak / FLOPs per token; decode = the lower of that and batch x read bandwidth / "
             "weight bytes.", "",
             "| batch | prefill tok/s | of limit | decode tok/s | of limit | decode bound by |",
             "|---:|---:|---:|---:|---:|---|",
             *[f"| {r['batch']} | {r['prefill_tok_s']:.0f} | {r['prefill_tok_s'] / r['prefill_limit']:.0%} | "
               f"{r['decode_tok_s']:.1f} | {r['decode_tok_s'] / r['decode_limit']:.0%} | {r['decode_bound']} |"
               for r in result["roofline"]], "",
             "## Levers on the demo's held-out prompts", "",
             "Each arm adds one lever to the arm above it. `identical`: greedy outputs equal to today's harness, "
             "token for token.", "",
             "| model | shots | arm | seconds | tokens/s | speedup | identical | ROUGE-L |",
             "|---|---:|---|---:|---:|---:|---:|---:|",
             *[f"| {r['model']} | {r['shots']} | {r['arm']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
               f"{r['speedup']:.2f}x | {r['identical']}/{r['prompts']} | {r['rougeL']:.4f} |"
               for r in result["levers"]], ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--adapter", help="a LoRA adapter folder (a demo run's RUN/adapter); without it, the "
                                          "tuned arms use a fresh random LoRA (r=16, all linear layers)")
    parser.add_argument("--config", default="recipes/configs/sft_instruction.yaml")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--shots", default="0,3")
    parser.add_argument("--batch_size", type=int, default=64, help="the larger batch of the batch-size lever")
    parser.add_argument("--large_batch_size", type=int, default=256,
                        help="the batch of the large-batch lever, under a KV budget of KV_BUDGET_LARGE (0: no such arm)")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the bf16 lever where the CPU has native bf16")
    parser.add_argument("--compile", action="store_true", help="also measure torch.compile (slow to compile)")
    parser.add_argument("--skip_roofline", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "bench_generation"))
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: the available cores)")
    args = parser.parse_args()

    from hf_tuner.models import load_model

    set_cpu_threads(args.threads)
    bf16 = cpu_supports_bf16()
    mach = machine(bf16)
    print(json.dumps(mach), flush=True)
    model, tokenizer = load_model(args.model)
    model.eval()
    costs = model_costs(model)
    result = {"command": "python benchmarks/bench_generation.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if v not in (None, False) and k != "output"),
              "date": time.strftime("%Y-%m-%d"), "model": args.model, "machine": mach, "costs": costs,
              "roofline": [] if args.skip_roofline else roofline(model, mach, costs)}
    prompt_sets = {int(s): demo_prompts(args.n, int(s), tokenizer, args.config) for s in args.shots.split(",")}
    result["levers"] = levers(model, tokenizer, "base", prompt_sets, args, bf16)
    from peft import LoraConfig, PeftModel, get_peft_model

    if args.adapter:
        tuned = PeftModel.from_pretrained(model, args.adapter).eval()
    else:
        torch.manual_seed(0)
        tuned = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")).eval()
        with torch.no_grad():  # a small random update, so the adapter changes outputs without wrecking them
            for name, p in tuned.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 1e-3)
    result["levers"] += levers(tuned, tokenizer, "lora", prompt_sets, args, bf16)
    result["peak_rss_mb"] = peak_rss_mb()
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(f"wrote {out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
