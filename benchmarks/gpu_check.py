"""GPU smoke suite (issue 19): every scale-out path for a few steps on ONE GPU, one line per step.

    make gpu-check                     # or: python benchmarks/gpu_check.py --output_dir runs/gpu-check
    python benchmarks/gpu_check.py --only 2,4 --model tiny-llama

World size 1 everywhere (NCCL refuses two ranks on one GPU); FSDP and DeepSpeed with num_processes 1 still
wrap the model in their engines, save through them and resume through them. Each step is a subprocess with
its own time limit (--step_timeout, default 120 s) and `--ddp_timeout 90`, and prints
`PASS <step> <seconds>` or `FAIL <step> <seconds>: <the error's last line>`; results.json holds the rest.
The models: `--model shape-135m` (default) is a Llama with SmolLM2-135M's shapes and random weights over the
tiny tokenizer, built on the machine (no checkpoint has to travel there); `tiny-llama`/`tiny-bert` are
the test models; an asset name or folder works too. The reward for RL is a Python function (response
length), so no reward-model run is needed.

NOT RUN YET: no GPU was available to the session that wrote it (docs/scale-out.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ACC = ROOT / "recipes" / "accelerate"
SHAPE_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, tie_word_embeddings=True)  # SmolLM2-135M's config.json
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "chair", "glass", "music", "paper",
         "forest", "window", "garden", "silver", "candle", "mirror", "bridge", "island", "thunder"]
REWARD_MODULE = '''def length_reward(prompts, responses):
    return [min(len(r.split()), 8) / 8.0 for r in responses]
'''


def build_models(work: Path, model: str) -> tuple[str, str]:
    """(causal LM, encoder for classification) paths."""
    from hf_tuner import assets

    bert = assets.resolve("tiny-bert")
    if model != "shape-135m":
        return assets.resolve(model), bert
    target = work / "shape-135m"
    if not (target / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(assets.resolve("tiny-llama"))
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPE_135M)
        LlamaForCausalLM(config).save_pretrained(target)
        tokenizer.save_pretrained(target)
    return str(target), bert


def write_data(work: Path) -> dict:
    rows = [{"prompt": f"Define the word '{w}' ({i}).", "completion": f"a kind of {w} seen in room {i}"}
            for i in range(6) for w in WORDS]
    (work / "defs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"The {w} was"}) + "\n"
                                                for w in WORDS * 3))
    (work / "gpu_check_reward.py").write_text(REWARD_MODULE)
    vader = work / "vader"
    vader.mkdir(exist_ok=True)
    good, bad = ["great", "lovely", "superb", "wonderful"], ["awful", "boring", "dreadful", "terrible"]
    for source in ("movieReviewSnippets", "tweets"):
        lines = [f"{i + 1}\t{2.5 if i % 2 == 0 else -2.5:.3f}\tthe {WORDS[i % 20]} was "
                 f"{(good if i % 2 == 0 else bad)[i % 4]} ." for i in range(80)]
        (vader / f"{source}_GroundTruth.txt").write_text("\r\n".join(lines) + "\r\n")
    return {"defs": str(work / "defs.jsonl"), "prompts": str(work / "prompts.jsonl"), "vader": str(vader)}


def launch(config: str | None, recipe: str, args: dict, extra: list[str] = ()) -> list[str]:
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--num_processes", "1", "--num_machines", "1"]
    if config:
        cmd += ["--config_file", str(ACC / config)]
    else:
        cmd += ["--mixed_precision", "bf16", "--dynamo_backend", "no"]
    cmd += [str(ROOT / "recipes" / f"{recipe}.py")]
    for k, v in args.items():
        cmd += [f"--{k}", json.dumps(v) if isinstance(v, (list, dict)) else str(v)]
    return cmd + list(extra)


def sft_args(model, data, out, **kw):
    return {"model_name_or_path": model, "dataset_name": data["defs"], "output_dir": out, "eval_samples": 8,
            "few_shot": 0, "eval_batch_size": 8, "eval_max_new_tokens": 8, "per_device_train_batch_size": 4,
            "max_steps": 6, "learning_rate": 1e-3, "lora_r": 8, "max_length": 64, "logging_steps": 1,
            "save_strategy": "no", "report_to": "none", "gradient_checkpointing": False, "seed": 0,
            "report_examples": 1, "ddp_timeout": 90, **kw}


def rl_args(model, data, out, **kw):
    return {"model_name_or_path": model, "dataset_name": data["prompts"], "output_dir": out,
            "reward_model": "gpu_check_reward:length_reward", "eval_samples": 8, "peft_method": "lora", "lora_r": 8,
            "per_device_train_batch_size": 8, "max_steps": 3, "learning_rate": 1e-4, "response_length": 8,
            "temperature": 1.0, "ppo_epochs": 1, "num_mini_batches": 2, "eval_batch_size": 8, "logging_steps": 1,
            "report_to": "none", "seed": 0, "ddp_timeout": 90, **kw}


# ---- checks on what a step left behind, run in this process with plain transformers / PEFT ----

def reloads_adapter(folder: Path, base: str) -> str:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    weights = load_file(str(folder / "adapter_model.safetensors"))
    lora_b = [v for k, v in weights.items() if "lora_B" in k]
    if not lora_b or all(float(v.abs().sum()) == 0 for v in lora_b):
        raise AssertionError(f"{folder}: the adapter's lora_B weights are missing or all zero (nothing saved)")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: only to try the suite's plumbing
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("Define the word 'apple'.", return_tensors="pt").to(device)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    return f"adapter reloads ({len(lora_b)} lora_B tensors), generates {out.shape[1] - ids['input_ids'].shape[1]} tokens"


def reloads_model(folder: Path, task: str = "causal-lm") -> str:
    import transformers

    cls = {"causal-lm": transformers.AutoModelForCausalLM,
           "classification": transformers.AutoModelForSequenceClassification}[task]
    model = cls.from_pretrained(folder)
    empty = [n for n, p in model.named_parameters() if p.numel() == 0]
    if empty:
        raise AssertionError(f"{folder}: empty parameters after reload: {empty[:3]}")
    return f"model reloads ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters)"


def metrics_precision(out: Path) -> str:
    train = json.loads((out / "metrics.json").read_text())["train"]
    return f"metrics.json bf16={train.get('bf16')} mixed_precision={train.get('mixed_precision')}"


def steps(work: Path, model: str, bert: str, data: dict):
    """(number, name, [commands], expect_exit, check(run_dir) -> str)."""
    w = lambda name: str(work / name)  # noqa: E731
    lora = lambda name, cfg, **kw: launch(cfg, "sft_instruction", sft_args(model, data, w(name), **kw))  # noqa
    yield 1, "imports: torch, CUDA, deepspeed, trl", [[sys.executable, "-c", (
        "import torch, transformers, trl, peft, accelerate, deepspeed; assert torch.cuda.is_available(); "
        "print(torch.__version__, torch.cuda.get_device_name(0), transformers.__version__, trl.__version__, "
        "peft.__version__, accelerate.__version__, deepspeed.__version__)")]], 0, None
    yield 2, "sft_instruction LoRA (multi_gpu.yaml): adapter saves and reloads", \
        [lora("sft-lora", "multi_gpu.yaml")], 0, lambda: reloads_adapter(work / "sft-lora" / "adapter", model) + \
        "; " + metrics_precision(work / "sft-lora")
    yield 3, "ppo_rlhf LoRA and full fine-tuning (multi_gpu.yaml)", [
        launch("multi_gpu.yaml", "ppo_rlhf", rl_args(model, data, w("ppo-lora"))),
        launch("multi_gpu.yaml", "ppo_rlhf", rl_args(model, data, w("ppo-full"), peft_method="full",
                                                     learning_rate=1e-5))], 0, \
        lambda: reloads_adapter(work / "ppo-lora" / "policy", model) + "; " + reloads_model(work / "ppo-full" / "policy")
    yield 4, "fsdp.yaml (SHARDED_STATE_DICT): save, then resume", [
        lora("sft-fsdp", "fsdp.yaml", save_strategy="steps", save_steps=2, max_steps=4),
        lora("sft-fsdp", "fsdp.yaml", save_strategy="steps", save_steps=2, max_steps=6,
             resume_from_checkpoint="latest")], 0, \
        lambda: reloads_adapter(work / "sft-fsdp" / "adapter", model) + "; checkpoints: " + ", ".join(
            sorted(p.name for p in (work / "sft-fsdp").glob("checkpoint-*")))
    yield 5, "deepspeed_zero3.yaml: base evaluation on, then off", [
        lora("sft-z3-base", "deepspeed_zero3.yaml"),
        lora("sft-z3-nobase", "deepspeed_zero3.yaml", evaluate_base=False)], 0, \
        lambda: reloads_adapter(work / "sft-z3-base" / "adapter", model) + "; " + metrics_precision(work / "sft-z3-base")
    yield 6, "deepspeed_zero2.yaml: sft_classification (full)", [launch("deepspeed_zero2.yaml", "sft_classification", {
        "model_name_or_path": bert, "dataset_name": data["vader"], "output_dir": w("cls-z2"),
        "vader_sources": ["movieReviewSnippets", "tweets"], "eval_samples": 16, "few_shot": 0,
        "eval_batch_size": 8, "max_length": 32, "peft_method": "full", "per_device_train_batch_size": 8,
        "max_steps": 6, "learning_rate": 1e-4, "logging_steps": 1, "save_strategy": "no", "report_to": "none",
        "seed": 0, "ddp_timeout": 90})], 0, lambda: reloads_model(work / "cls-z2" / "model", "classification")
    yield 7, "fsdp.yaml: ppo_rlhf refused (ours), grpo runs", [
        launch("fsdp.yaml", "ppo_rlhf", rl_args(model, data, w("ppo-fsdp"))),
        launch("fsdp.yaml", "ppo_rlhf", rl_args(model, data, w("grpo-fsdp"), algorithm="grpo", num_generations=4))], \
        (2, 0), lambda: reloads_adapter(work / "grpo-fsdp" / "policy", model)
    yield 8, "QLoRA (bitsandbytes 4-bit, quant_storage = compute dtype)", \
        [lora("sft-qlora", "multi_gpu.yaml", peft_method="qlora")], 0, \
        lambda: reloads_adapter(work / "sft-qlora" / "adapter", model)
    yield 9, "bench in bf16 (make bench, quick arms)", [[sys.executable, str(ROOT / "benchmarks" / "bench_sft.py"),
                                                         "--model", model, "--pairs", "1", "--sequences", "32",
                                                         "--eval_samples", "8", "--no_trl",
                                                         "--output_dir", w("bench")]], 0, None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="runs/gpu-check")
    parser.add_argument("--model", default="shape-135m")
    parser.add_argument("--only", help="comma-separated step numbers")
    parser.add_argument("--step_timeout", type=int, default=120)
    a = parser.parse_args(argv)
    work = Path(a.output_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(work), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
           "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONUNBUFFERED": "1"}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
    sys.path.insert(0, str(ROOT))
    model, bert = build_models(work, a.model)
    data = write_data(work)
    only = {int(x) for x in a.only.split(",")} if a.only else None
    results, failed = [], 0
    for number, name, commands, expect, check in steps(work, model, bert, data):
        if only and number not in only:
            continue
        start, error, detail = time.perf_counter(), None, ""
        expected = expect if isinstance(expect, tuple) else (expect,) * len(commands)
        for i, (cmd, want) in enumerate(zip(commands, expected)):
            log = work / f"step{number}.{i}.log"
            try:
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                      timeout=a.step_timeout)
                log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
                if proc.returncode != want:
                    tail = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()][-1:] or ["(no stderr)"]
                    error = f"exit {proc.returncode} (expected {want}), {log.name}: {tail[0][:300]}"
                    break
                detail += proc.stdout.strip().splitlines()[-1][:200] + "; " if number == 1 else ""
            except subprocess.TimeoutExpired:
                error = f"over {a.step_timeout} s ({log.name})"
                break
        if error is None and check is not None:
            try:
                detail += check()
            except Exception as e:  # a failed check is this step's FAIL line, and the suite goes on
                error = f"check: {type(e).__name__}: {e}"[:400]
        seconds = time.perf_counter() - start
        failed += error is not None
        line = f"{'FAIL' if error else 'PASS'} {number} {name} {seconds:.0f}s" + (f": {error}" if error else
                                                                                  f" ({detail})" if detail else "")
        print(line, flush=True)
        results.append({"step": number, "name": name, "passed": error is None, "seconds": seconds,
                        "error": error, "detail": detail})
    (work / "results.json").write_text(json.dumps(results, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
