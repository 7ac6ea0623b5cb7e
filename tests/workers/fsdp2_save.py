"""Worker for tests/test_scale_out.py, started by torchrun with 2 CPU processes over gloo: torch's FSDP2
(`fully_shard`, one unit per decoder layer, as fsdp.yaml asks) really shards tiny-llama (full or LoRA), one
optimizer step runs, and `save_pretrained_gathered` writes the model. Rank 0 writes the gathered full
parameters to expected.pt for the test to compare with what plain transformers/PEFT reload.

argv: MODEL_DIR OUT_DIR full|lora|multitask"""

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_tuner.distributed import is_main_process, save_pretrained_gathered


def main(model_dir: str, out: str, kind: str) -> None:
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo")
    torch.manual_seed(0)
    if kind == "multitask":  # hf_tuner.multitask: an encoder with one head per task (tiny-bert here)
        from hf_tuner.multitask import MultiTaskModel, TaskSpec

        model, _ = MultiTaskModel.from_encoder(model_dir, [TaskSpec("sentiment", "classification", ["neg", "pos"])])
        layers = model.encoder.encoder.layer
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    if kind == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if kind != "multitask":
        layers = model.get_base_model().model.layers if kind == "lora" else model.model.layers
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert all(isinstance(p, DTensor) for p in model.parameters()), "not sharded"
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(dist.get_rank()))
    if kind == "multitask":
        result = model(input_ids=ids, attention_mask=torch.ones_like(ids), task_ids=torch.zeros(2, dtype=torch.long),
                    labels=torch.tensor([0, 1]))
    else:
        result = model(input_ids=ids, labels=ids)
    result.loss.backward()
    optimizer.step()
    if kind == "multitask":
        model.save_pretrained(out)  # collective itself
    else:
        save_pretrained_gathered(model, out)
    full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if is_main_process():
        torch.save(full, f"{out}/expected.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
