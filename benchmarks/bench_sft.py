"""SFT throughput and memory: our `sft_instruction` recipe against two plain TRL `SFTTrainer` scripts.

    python benchmarks/bench_sft.py [--model smollm2-135m-instruct|tiny-llama] [--pairs 3] [--sequences 192]
                                   [--threads N]
    make bench                     # benchmarks/bench_generation.py, then this; results in runs/bench/

Three arms train the same model with LoRA (r 16, alpha 32, dropout 0.05, all linear layers) on the same
`--sequences` WordNet examples (the recipe's own split and order), one epoch, the same sequences per optimizer
step, learning rate, schedule (TRL's: linear, no warmup) and seed:
- `ours`: the recipe, with its own settings (micro-batches with gradient accumulation, no gradient
  checkpointing, length-grouped batches, its max_length, bf16 only where the CPU has it) and its own code
  (the compact loss, ...).
- `trl`: TRL's documented defaults otherwise (bf16, gradient checkpointing, max_length 1024, random sampler,
  its fused LM head), plus `use_cpu=True` on a CPU, which TRL needs there, and `bf16=False` on a CPU without
  native bf16 (AMX / AVX512-BF16), where TRL's bf16 default would emulate every matmul (`--trl_keep_bf16`
  keeps it).
- `trl_matched`: the same plain TRL script, but every `SFTConfig` field that our recipe resolves differently
  from TRL's default is set to ours (read from the recipe's own resolved config, so nothing is picked by
  hand): the same micro-batch and gradient accumulation, no gradient checkpointing,
  `train_sampling_strategy: group_by_length`, our max_length and bf16 setting, the same schedule. All a TRL
  user can set from `SFTConfig`; what is left between it and `ours` is our code.
So ours/TRL-defaults is the whole gain, TRL-matched/TRL-defaults the part any TRL user gets from settings, and
ours/TRL-matched the part that is our code; the first is the product of the other two.
Arms alternate A B C A B C (`--pairs` rounds), each in its own subprocess, so a figure is that run's own (peak
RSS of the process; peak GPU memory on a GPU) and CPU contention from other jobs falls on every arm alike.

Reported per arm: median real (non-pad) training tokens/s, the ratios, peak memory, and the loss on the same
held-out examples after training (completion tokens, fp32, one function for all arms). Also this machine's
fp32 and bf16 matmul peak (a large torch.matmul, repeated) and the training FLOP/s as a fraction of it: an
estimate, 6 x transformer-block parameters x real tokens/s (the LM head, attention scores and the skipped
weight gradients of frozen LoRA bases are left out, so it is the model's useful work, the same formula for
every arm). `--generation_json` folds bench_generation.py's lever table (per model and shots: today's harness
against its last lever) in. Writes bench_sft.json and bench_sft.md in --output_dir.

`--variant name='{"field": value}'` adds arms that run our recipe with overrides (lever measurements);
`--no_trl` leaves both TRL arms out, `--no_trl_matched` only the matched one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LORA = {"lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05}
# Our arm trains on TRL's default schedule (the recipe's own is cosine with 10% warmup), so that the held-out
# loss compares the speed levers, not two schedules; the TRL arm keeps all its defaults.
SAME_SCHEDULE = {"lr_scheduler_type": "linear", "warmup_steps": 0}


def _rows(spec: dict):
    """The recipe's own train rows (split by word, shuffled, capped) and held-out rows."""
    from recipes.sft_instruction import _check_and_load_data, _config

    # the recipe's own parsed config (not a stand-in), so its data fields and defaults are the recipe's
    cfg = _config({"model_name_or_path": spec["model"], "dataset_name": spec["dataset"],
                   "output_dir": spec["output_dir"], "overwrite_output_dir": True, "held_out_benchmarks": None,
                   "eval_samples": spec["eval_samples"], "train_samples": spec["sequences"], "split_seed": 0,
                   "report_to": ["none"]})
    train_rows, held_rows, _, _ = _check_and_load_data(cfg)
    return train_rows, held_rows


def held_out_loss(model, tokenizer, rows: list[dict], batch_size: int = 16) -> float:
    """Mean negative log-likelihood of the completion tokens (chat template applied), fp32, no autocast."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    examples = []
    for r in rows:
        prompt = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)
        ids = tokenizer(full, add_special_tokens=False).input_ids
        n_prompt = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        examples.append((ids, n_prompt))
    nll, count = 0.0, 0
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            labels = torch.full_like(input_ids, -100)
            for j, (ids, n_prompt) in enumerate(chunk):
                input_ids[j, :len(ids)] = torch.tensor(ids)
                mask[j, :len(ids)] = 1
                labels[j, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
            logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits.float()
            targets = labels[:, 1:].to(device)
            nll += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), targets.reshape(-1),
                                                     ignore_index=-100, reduction="sum").item()
            count += int((targets != -100).sum())
    return nll / count


def _block_parameters(model) -> int:
    """Parameters of the transformer blocks (LoRA included): what every token's forward and backward cross."""
    return sum(p.numel() for n, p in model.named_parameters() if ".layers." in n)


def _peak_memory_mb() -> tuple[float, str]:
    import torch

    from hf_tuner.devices import peak_rss_mb

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20, "GPU"
    return peak_rss_mb(), "RSS"


def _our_config(spec: dict) -> dict:
    """The recipe's config for our arm: its YAML, with what every arm shares set from the spec."""
    import yaml

    config = yaml.safe_load((REPO / "recipes/configs/sft_instruction.yaml").read_text())
    # the same `batch_size` sequences per optimizer step as TRL's arm, in the recipe's own micro-batches
    micro = min(config["per_device_train_batch_size"], spec["batch_size"])
    if spec["batch_size"] % micro:
        raise SystemExit(f"--batch_size {spec['batch_size']} is not a multiple of the recipe's micro-batch {micro}")
    config.update({"model_name_or_path": spec["model"], "dataset_name": spec["dataset"],
                   "output_dir": spec["output_dir"], "overwrite_output_dir": True, "evaluate_base": False,
                   "held_out_benchmarks": None,  # the bench times training, not the demo's benchmark table
                   "few_shot": 0, "eval_samples": spec["eval_samples"], "eval_max_new_tokens": 8,
                   "train_samples": spec["sequences"], "num_train_epochs": 1, "max_steps": -1,
                   "per_device_train_batch_size": micro, "gradient_accumulation_steps": spec["batch_size"] // micro,
                   "learning_rate": spec["learning_rate"],
                   "seed": spec["seed"], "report_to": ["none"], "logging_steps": 5, **LORA, **SAME_SCHEDULE,
                   **({"num_threads": spec["threads"]} if spec.get("threads") else {}), **spec.get("overrides", {})})
    return config


def worker_ours(spec: dict) -> dict:
    import yaml

    from recipes.sft_instruction import train

    result = train(_our_config(spec))
    resolved = yaml.safe_load((result.output_dir / "config.yaml").read_text())
    _, held_rows = _rows(spec)
    t = result.metrics["train"]
    memory, kind = _peak_memory_mb()
    return {"tokens": t["train_tokens"], "runtime_s": t["runtime_s"], "tokens_per_s": t["train_tokens_per_s"],
            "steps": t["steps"], "train_loss": t["train_loss"], "bf16": t["bf16"],
            "eval_loss": held_out_loss(result.model, result.tokenizer, held_rows),
            "peak_memory_mb": memory, "memory_kind": kind, "block_params": _block_parameters(result.model),
            "config": {k: resolved.get(k) for k in ("per_device_train_batch_size", "gradient_accumulation_steps",
                                                    "gradient_checkpointing", "train_sampling_strategy", "packing",
                                                    "compact_loss", "bf16", "max_length", "lr_scheduler_type")}}


# SFTConfig fields that only name, log or store a run: never copied into the matched arm
BOOKKEEPING = {"output_dir", "run_name", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step",
               "report_to", "save_strategy", "save_steps", "disable_tqdm", "overwrite_output_dir",
               # deprecated aliases, mirrored from activation_checkpointing(_kwargs) by TrainingArguments
               "gradient_checkpointing", "gradient_checkpointing_kwargs"}


def matched_settings(spec: dict, trl_base: dict) -> dict:
    """Every SFTConfig field that our recipe resolves differently from SFTConfig's default (built with
    `trl_base`), with our value: the recipe's own resolution (YAML, spec, its CPU bf16 choice), not a list
    picked by hand."""
    from trl import SFTConfig

    from recipes.sft_instruction import _config

    ours = _config({**_our_config({**spec, "overrides": {}}), "output_dir": trl_base["output_dir"]}).training
    ours_d, default_d = ours.to_dict(), SFTConfig(**trl_base).to_dict()
    return {k: v for k, v in ours_d.items()
            if k not in BOOKKEEPING and k not in trl_base and v != default_d.get(k)}


def _train_trl(spec: dict, args, record: dict) -> dict:
    """A plain TRL script: SFTTrainer with `args` on the recipe's rows (prompt/completion), LoRA as our arm."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTTrainer

    from hf_tuner import assets

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    train_rows, held_rows = _rows(spec)
    dataset = Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in train_rows])
    peft_config = LoraConfig(r=LORA["lora_r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=assets.resolve(spec["model"]), args=args, train_dataset=dataset,
                         peft_config=peft_config)
    start = time.perf_counter()
    output = trainer.train()
    runtime = time.perf_counter() - start
    tokens = trainer._total_train_tokens  # TRL's own count of attention-mask (real) tokens, logged as num_tokens
    memory, kind = _peak_memory_mb()
    return {"tokens": tokens, "runtime_s": runtime, "tokens_per_s": tokens / runtime,
            "steps": trainer.state.global_step, "train_loss": output.training_loss, "bf16": bool(args.bf16),
            "eval_loss": held_out_loss(trainer.model, trainer.processing_class, held_rows),
            "peak_memory_mb": memory, "memory_kind": kind, "block_params": _block_parameters(trainer.model),
            "config": {"per_device_train_batch_size": args.per_device_train_batch_size,
                       "gradient_accumulation_steps": args.gradient_accumulation_steps,
                       "gradient_checkpointing": args.gradient_checkpointing,
                       "train_sampling_strategy": args.train_sampling_strategy, "packing": args.packing,
                       "bf16": args.bf16, "max_length": args.max_length,
                       "lr_scheduler_type": str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)),
                       **record}}


def _trl_base(spec: dict) -> dict:
    """What both TRL arms set: the run's bookkeeping, the shared training budget, and use_cpu (TRL needs it on a
    CPU)."""
    import torch

    return {"output_dir": spec["output_dir"], "use_cpu": not torch.cuda.is_available(), "num_train_epochs": 1,
            "learning_rate": spec["learning_rate"], "seed": spec["seed"], "report_to": "none",
            "save_strategy": "no"}


def worker_trl(spec: dict) -> dict:
    """A plain TRL script: SFTConfig's defaults except what every arm must share."""
    import torch
    from trl import SFTConfig

    from hf_tuner.devices import cpu_supports_bf16

    # TRL's bf16 default on a CPU without AMX/AVX512-BF16 runs every matmul emulated (measured on an AMD EPYC
    # without them: bf16 matmul 0.0009 TFLOP/s against fp32's 0.08), hours for this bench: unless
    # --trl_keep_bf16, the TRL arm then trains in fp32 like ours, and the report says so
    extra = {}
    if not torch.cuda.is_available() and not cpu_supports_bf16() and not spec.get("trl_keep_bf16"):
        extra["bf16"] = False
    # the same sequences per optimizer step as the other arms, in one batch (TRL's default accumulation is 1)
    args = SFTConfig(**_trl_base(spec), **extra, per_device_train_batch_size=spec["batch_size"])
    return _train_trl(spec, args, {"bf16_turned_off": "bf16" in extra})


def worker_trl_matched(spec: dict) -> dict:
    """The same plain TRL script, with every SFTConfig setting that our recipe resolves differently set to ours."""
    from trl import SFTConfig

    base = _trl_base(spec)
    matched = matched_settings(spec, base)
    args = SFTConfig(**base, **matched)
    return _train_trl(spec, args, {"matched_fields": matched})


def worker_matmul(spec: dict) -> dict:
    """Best sustained FLOP/s of a large square matmul, fp32 and bf16 (median of `repeats` timed calls)."""
    import torch

    from hf_tuner.devices import cpu_supports_bf16, set_cpu_threads

    threads = set_cpu_threads(spec.get("threads"))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = {"n": spec["matmul_n"], "threads": threads, "device": device}
    for dtype in (torch.float32, torch.bfloat16):
        n, repeats = spec["matmul_n"], spec["matmul_repeats"]
        if dtype == torch.bfloat16 and device == "cpu" and not cpu_supports_bf16():
            # emulated bf16 runs near 1/80 of fp32 here: a 4096 matmul would take minutes per call
            n, repeats = min(n, 1024), min(repeats, 3)
            out["bfloat16_n"] = n
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(2):
            torch.matmul(a, b)
        times = []
        for _ in range(repeats):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            torch.matmul(a, b)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        name = str(dtype).removeprefix("torch.")
        out[f"{name}_tflops_median"] = 2 * n**3 / statistics.median(times) / 1e12
        out[f"{name}_tflops_best"] = 2 * n**3 / min(times) / 1e12
    return out


WORKERS = {"ours": worker_ours, "trl": worker_trl, "trl_matched": worker_trl_matched,
           "matmul": worker_matmul}


def run_worker(kind: str, spec: dict, out: Path, name: str) -> dict:
    result_file = out / f"{name}.json"
    # --threads: the same OpenMP thread count for every arm (on a CPU shared with other jobs, 2 OpenMP threads
    # on 2 busy cores spin-wait on each other; one thread each is steadier)
    env = {**os.environ, **({"OMP_NUM_THREADS": str(spec["threads"])} if spec.get("threads") else {})}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--spec", json.dumps(spec),
           "--result", str(result_file)]
    start = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w") as f:  # streamed, so a slow run can be watched
        proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed (exit {proc.returncode}); log in {log}:\n" + log.read_text()[-3000:])
    result = json.loads(result_file.read_text())
    result["wall_s"] = time.perf_counter() - start
    return result


def summarise(runs: list[dict], peak_tflops: float | None) -> dict:
    med = lambda key: statistics.median(r[key] for r in runs)  # noqa: E731
    tps = med("tokens_per_s")
    flops = 6 * runs[0]["block_params"] * tps
    return {"tokens_per_s": tps, "tokens_per_s_runs": [r["tokens_per_s"] for r in runs],
            "eval_loss": med("eval_loss"), "eval_loss_runs": [r["eval_loss"] for r in runs],
            "peak_memory_mb": med("peak_memory_mb"), "memory_kind": runs[0]["memory_kind"],
            "train_tokens": runs[0]["tokens"], "steps": runs[0]["steps"], "runtime_s": med("runtime_s"),
            "train_loss": med("train_loss"), "bf16": runs[0]["bf16"], "config": runs[0]["config"],
            "est_train_tflops": flops / 1e12,
            "fraction_of_matmul_peak": flops / (peak_tflops * 1e12) if peak_tflops else None}


RATIOS = {"ours/trl": "the whole gain", "trl_matched/trl": "settings any TRL user can set",
          "ours/trl_matched": "our code (the compact loss, ...)"}


def ratios(summary: dict) -> dict:
    """Tokens/s ratios between the arms present; ours/trl = ours/trl_matched x trl_matched/trl."""
    return {key: summary[a]["tokens_per_s"] / summary[b]["tokens_per_s"]
            for key in RATIOS for a, b in [key.split("/")] if a in summary and b in summary}


def generation_summary(path: Path) -> dict:
    """bench_generation.py's lever rows, per model and shots: today's harness (its first arm) against the last
    exact arm (every greedy output identical to today's) and the last arm of all (rounding levers too)."""
    g = json.loads(path.read_text())
    if "levers" not in g:
        raise SystemExit(f"{path}: no `levers` in it: not the output of today's benchmarks/bench_generation.py "
                         "(its --output is a path stem; give --generation_json STEM.json)")
    groups: dict[tuple, list[dict]] = {}
    for row in g["levers"]:
        groups.setdefault((row["model"], row["shots"]), []).append(row)
    keep = ("arm", "seconds", "tokens_per_s", "speedup", "identical", "prompts", "rougeL")
    return {"source": str(path), "model": g.get("model"), "date": g.get("date"), "command": g.get("command"),
            "cpu": g.get("machine", {}).get("cpu"), "threads": g.get("machine", {}).get("threads"),
            "rows": [{"model": m, "shots": shots, "today": {k: rows[0][k] for k in keep},
                      "last": {k: [r for r in rows if r["identical"] == r["prompts"]][-1][k] for k in keep},
                      "last_any": {k: rows[-1][k] for k in keep}} for (m, shots), rows in groups.items()]}


def _rounding(row: dict) -> str:
    """The last arm of all, where it is a rounding lever past the last exact one (older JSON: no last_any)."""
    last = row.get("last_any", row["last"])
    if last["arm"] == row["last"]["arm"]:
        return ""
    return (f"{last['arm']}: {last['speedup']:.2f}x, {last['identical']}/{last['prompts']} identical, "
            f"ROUGE-L {last['rougeL']:.4f}")


def _settings(a: dict) -> str:
    c = a["config"]
    micro, accum = c.get("per_device_train_batch_size"), c.get("gradient_accumulation_steps") or 1
    return (f"{micro} x {accum} | {'on' if c.get('gradient_checkpointing') else 'off'} | "
            f"{c.get('train_sampling_strategy') or 'random'} | {c.get('max_length')} | "
            f"{'bf16' if c.get('bf16') else 'fp32'} | {'compact (ours)' if c.get('compact_loss') else 'TRL'}")


def markdown(result: dict) -> str:
    arms = result["arms"]
    mem = arms["ours"]["memory_kind"] if "ours" in arms else "RSS"
    trl = arms.get("trl", {}).get("tokens_per_s")
    matched = arms.get("trl_matched", {}).get("tokens_per_s")
    lines = [f"| arm | real tokens/s (median of {result['pairs']}) | vs TRL defaults | vs TRL matched | "
             f"held-out loss | peak {mem} (MB) | est. TFLOP/s | of matmul peak |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, a in arms.items():
        vs = lambda ref: f"{a['tokens_per_s'] / ref:.2f}x" if ref else "-"  # noqa: E731
        frac = f"{100 * a['fraction_of_matmul_peak']:.0f}%" if a["fraction_of_matmul_peak"] else "-"
        lines.append(f"| {name} | {a['tokens_per_s']:,.0f} | {vs(trl)} | {vs(matched)} | {a['eval_loss']:.4f} | "
                     f"{a['peak_memory_mb']:,.0f} | {a['est_train_tflops']:.3f} | {frac} |")
    settings = ["| arm | micro-batch x accumulation | gradient checkpointing | sampler | max_length | "
                "precision | loss |", "|---|---|---|---|---:|---|---|",
                *[f"| {name} | {_settings(a)} |" for name, a in arms.items()]]
    split = [f"- {key.replace('/', ' / ')}: **{value:.2f}x**, {RATIOS[key]}"
             for key, value in result.get("ratios", {}).items()]
    m = result["matmul"]
    matched_fields = arms.get("trl_matched", {}).get("config", {}).get("matched_fields")
    text = (f"# SFT throughput: hf-tuner `sft_instruction` vs TRL `SFTTrainer`, defaults and matched\n\n"
            f"`{result['command']}` on {result['machine']}. {result['model']} + LoRA r16, {result['sequences']} "
            f"WordNet sequences, {result['batch_size']} per optimizer step, lr {result['learning_rate']}, one "
            f"epoch, seed {result['seed']}, {result['threads'] or 'default'} CPU threads per arm; arms alternated "
            "A B C A B C, each run in its own process. `trl` is TRL's defaults; `trl_matched` is the same TRL "
            "script with every SFTConfig setting our recipe resolves differently set to ours" +
            (" (" + ", ".join(f"`{k}={v}`" for k, v in matched_fields.items()) + ")" if matched_fields else "") +
            ", so what is left between it and `ours` is our code." +
            (" This CPU has no native bf16, so the TRL-defaults arm trains in fp32 (its bf16 default turned off, "
             "as ours does by itself)." if arms.get("trl", {}).get("config", {}).get("bf16_turned_off") else "") +
            "\n\n" + "\n".join(lines) + "\n\n" + ("Where the gain comes from (tokens/s ratios):\n\n" +
                                                   "\n".join(split) + "\n\n" if split else "") +
            "\n".join(settings) +
            f"\n\nMatmul peak ({m['n']}x{m['n']}, {m['threads']} threads, median): fp32 "
            f"{m['float32_tflops_median']:.2f} TFLOP/s, bf16 {m['bfloat16_tflops_median']:.4f} TFLOP/s"
            + (f" (at {m['bfloat16_n']}x{m['bfloat16_n']}: no native bf16 on this CPU)" if "bfloat16_n" in m else "")
            + ". Training "
            "FLOP/s is an estimate: 6 x transformer-block parameters x real tokens/s, against the peak of the "
            "precision the arm trains in.\n")
    if "generation" in result:
        g = result["generation"]
        rows = ["| model | shots | today: tokens/s | last exact arm | tokens/s | speedup | identical | ROUGE-L today | "
                "ROUGE-L last | last arm of all (rounding) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|---|",
                *[f"| {r['model']} | {r['shots']} | {r['today']['tokens_per_s']:.1f} | {r['last']['arm']} | "
                  f"{r['last']['tokens_per_s']:.1f} | {r['last']['speedup']:.2f}x | "
                  f"{r['last']['identical']}/{r['last']['prompts']} | {r['today']['rougeL']:.4f} | "
                  f"{r['last']['rougeL']:.4f} | " + _rounding(r) + " |" for r in g["rows"]]]
        text += (f"\nGeneration ({g['source']}: {g['model']}, {g['threads']} threads, {g['date']}), greedy, on the "
                 "demo's held-out prompts: today's harness (`model.generate`, batches of 16) against the last of "
                 "bench_generation.py's cumulative levers; `identical`: greedy outputs equal to today's, token "
                 "for token.\n\n" + "\n".join(rows) + "\n")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dataset", default="wordnet-definitions")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=192)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--eval_samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--threads", type=int, help="torch CPU threads for every arm (default: each arm's own)")
    parser.add_argument("--matmul_n", type=int, default=4096)
    parser.add_argument("--matmul_repeats", type=int, default=10)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=JSON",
                        help="an extra arm: our recipe with these field overrides")
    parser.add_argument("--no_trl", action="store_true", help="leave both TRL arms out")
    parser.add_argument("--no_trl_matched", action="store_true", help="leave the matched TRL arm out")
    parser.add_argument("--trl_keep_bf16", action="store_true",
                        help="keep TRL's bf16 default even on a CPU without native bf16 (very slow there)")
    parser.add_argument("--generation_json", help="bench_generation.py output to fold into the table")
    parser.add_argument("--output_dir", default="runs/bench")
    parser.add_argument("--worker", choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
        result = WORKERS[args.worker](json.loads(args.spec))
        Path(args.result).write_text(json.dumps(result, indent=2))
        return

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = {k: getattr(args, k) for k in ("model", "dataset", "sequences", "batch_size", "learning_rate",
                                          "eval_samples", "seed", "matmul_n", "matmul_repeats", "threads",
                                          "trl_keep_bf16")}
    # name -> (worker, our recipe's overrides)
    arms = {"ours": ("ours", {})} | {v.split("=", 1)[0]: ("ours", json.loads(v.split("=", 1)[1]))
                                     for v in args.variant}
    if not args.no_trl:
        arms["trl"] = ("trl", {})
        if not args.no_trl_matched:
            arms["trl_matched"] = ("trl_matched", {})
    start = time.perf_counter()
    runs: dict[str, list[dict]] = {name: [] for name in arms}
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        for i in range(args.pairs):
            for name, (kind, overrides) in arms.items():  # A B C A B C: every arm once per round
                arm_spec = {**spec, "output_dir": f"{tmp}/{name}-{i}", "overrides": overrides}
                r = run_worker(kind, arm_spec, out, f"{name}-{i}")
                runs[name].append(r)
                print(f"round {i + 1}/{args.pairs} {name:12s} {r['tokens_per_s']:8.0f} real tokens/s  "
                      f"held-out loss {r['eval_loss']:.4f}  peak {r['memory_kind']} {r['peak_memory_mb']:.0f} MB  "
                      f"wall {r['wall_s']:.0f} s", flush=True)
    matmul = run_worker("matmul", spec, out, "matmul")
    print(f"matmul peak: fp32 {matmul['float32_tflops_median']:.2f}, bf16 {matmul['bfloat16_tflops_median']:.2f} "
          "TFLOP/s", flush=True)
    peak = lambda r: matmul["bfloat16_tflops_median" if r[0]["bf16"] else "float32_tflops_median"]  # noqa: E731
    summary = {name: summarise(rs, peak(rs)) for name, rs in runs.items()}
    import platform

    import torch

    machine = (torch.cuda.get_device_name() if torch.cuda.is_available() else
               f"CPU ({platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores"
               f"{', AMX/AVX512-BF16' if __import__('hf_tuner.devices').devices.cpu_supports_bf16() else ''})")
    result = {"command": " ".join(["python", "benchmarks/bench_sft.py", *sys.argv[1:]]), "machine": machine,
              **{k: spec[k] for k in ("model", "sequences", "batch_size", "learning_rate", "seed", "threads")},
              "pairs": args.pairs, "arms": summary, "matmul": matmul, "runs": runs,
              "bench_wall_s": time.perf_counter() - start}
    for name in ("trl", "trl_matched"):
        if name in summary:
            o, t = summary["ours"], summary[name]
            result.update({"ours_tokens_per_s": o["tokens_per_s"], f"{name}_tokens_per_s": t["tokens_per_s"],
                           "ours_eval_loss": o["eval_loss"], f"{name}_eval_loss": t["eval_loss"],
                           f"eval_loss_rel_diff{'' if name == 'trl' else '_vs_trl_matched'}":
                               o["eval_loss"] / t["eval_loss"] - 1,
                           "ours_peak_rss_mb": o["peak_memory_mb"], f"{name}_peak_rss_mb": t["peak_memory_mb"],
                           "ours_fraction_of_matmul_peak": o["fraction_of_matmul_peak"],
                           f"{name}_fraction_of_matmul_peak": t["fraction_of_matmul_peak"]})
    result["ratios"] = ratios(summary)
    if "ours/trl" in result["ratios"]:
        result["ratio"] = result["ratios"]["ours/trl"]  # the ratio of earlier results, under its old key
    if args.generation_json:
        if Path(args.generation_json).exists():
            result["generation"] = generation_summary(Path(args.generation_json))
        else:
            print(f"warning: --generation_json {args.generation_json} does not exist; no generation figures",
                  flush=True)
    (out / "bench_sft.json").write_text(json.dumps(result, indent=2))
    (out / "bench_sft.md").write_text(markdown(result))
    print("\n" + markdown(result))


if __name__ == "__main__":
    main()
