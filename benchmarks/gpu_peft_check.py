"""LoRA vs QLoRA on a CUDA GPU in bf16: training tokens/s and peak GPU memory (a benchmark, not a test).

    python benchmarks/gpu_peft_check.py --shape smollm2-135m --shape smollm2-1.7b --steps 30

The weights are random, built from the model's config on the GPU machine (checkpoints do not travel
there, and speed and memory do not depend on weight values); the adapters and the NF4 quantization come
from hf_tuner.adapters, as the recipes build them. A fixed batch is trained on repeatedly, so the loss
must fall: a check that the adapter really trains, not a quality figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

# Llama shapes of the SmolLM2 family (from their config.json files).
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
}


def run(shape: str, method: str, steps: int, batch: int, seq: int, folder: str) -> dict:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_tuner.adapters import build_peft_config, quantization_for, trainable_parameters

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    quant = quantization_for(method)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": 0})
    if quant is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, build_peft_config(method, "CAUSAL_LM"))
    trainable, total = trainable_parameters(model)
    loaded_mb = torch.cuda.memory_allocated() / 2**20  # the model as loaded: where 4-bit weights save memory
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g).cuda()
    losses, times = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    timed = sorted(times[3:])  # the first steps warm up kernels and the allocator
    step_s = timed[len(timed) // 2]
    result = {"shape": shape, "method": method, "trainable_params": trainable, "total_params": total,
              "tokens_per_s": batch * seq / step_s, "median_step_s": step_s,
              "loaded_mb": loaded_mb,
              "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20, "loss_first": losses[0], "loss_last": losses[-1]}
    del model, optimizer
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", action="append", choices=list(SHAPES))
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--output", default="gpu_peft_check.json")
    a = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark is for a GPU machine")
    from transformers import LlamaConfig, LlamaForCausalLM

    results = []
    for shape in a.shape or ["smollm2-135m"]:
        with tempfile.TemporaryDirectory() as folder:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**SHAPES[shape])).to(torch.bfloat16).save_pretrained(folder)
            for method in a.methods.split(","):
                r = run(shape, method, a.steps, a.batch, a.seq, folder)
                results.append(r)
                print(f"{shape:14s} {method:6s} batch {a.batch} trainable {r['trainable_params'] / 1e6:7.2f}M  "
                      f"{r['tokens_per_s']:9.0f} tok/s  model {r['loaded_mb']:6.0f} MiB  peak {r['peak_gpu_mb']:6.0f} MiB  "
                      f"loss {r['loss_first']:.2f} -> {r['loss_last']:.2f}", flush=True)
    device = torch.cuda.get_device_name(0)
    with open(a.output, "w") as f:
        json.dump({"device": device, "batch": a.batch, "seq": a.seq, "steps": a.steps, "results": results}, f, indent=2)
    print(f"{device}; batch {a.batch} x {a.seq} tokens, bf16 autocast; written to {a.output}")


if __name__ == "__main__":
    main()
