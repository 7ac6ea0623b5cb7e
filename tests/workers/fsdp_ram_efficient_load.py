"""One rank of tests/test_scale_out.py::test_ranks_above_zero_get_rank_zeros_new_head (run by torchrun, gloo):
load tiny-llama with a new sequence-classification head through models.load_pretrained under the environment
fsdp.yaml's cpu_ram_efficient_loading sets, and write what this rank holds."""
import json
import sys

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
from hf_tuner import assets  # noqa: E402
from hf_tuner.models import load_pretrained  # noqa: E402

torch.manual_seed(dist.get_rank())  # a different random head on each rank, as different seeds would give
model = load_pretrained(assets.resolve("tiny-llama"), "classification", num_labels=2)
tensors = dict(model.named_parameters())
out = {"meta": [n for n, t in tensors.items() if t.device.type == "meta"],
       "score": model.score.weight.flatten().tolist() if model.score.weight.device.type != "meta" else None}
with open(f"{sys.argv[1]}/rank{dist.get_rank()}.json", "w") as f:
    json.dump(out, f)
dist.destroy_process_group()
