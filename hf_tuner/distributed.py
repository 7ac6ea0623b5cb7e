"""Multi-process launches: what was asked for, what started, and who writes.

Verified on CPU machines (see ../shared/STACK.md):
- `accelerate launch --cpu --num_processes 2` quietly starts ONE process (no WORLD_SIZE in its environment);
- a MULTI_CPU config expects mpirun;
- `--multi_gpu --num_processes 2` (or a MULTI_GPU yaml such as recipes/accelerate/cpu_ddp.yaml) starts two
  processes over gloo, but TrainingArguments must say use_cpu=True, or each process trains its own copy with
  world size 1.
`check_launch` refuses the first trap; `hf_tuner.config.apply_device_defaults` sets use_cpu for the last.
"""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

log = logging.getLogger(__name__)

FIX = ("on a machine without CUDA, start CPU processes with `accelerate launch --multi_gpu --num_processes N` "
       "or `--config_file recipes/accelerate/cpu_ddp.yaml` (DDP over gloo)")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 writes run folders, reports and checkpoints; the others only train and evaluate."""
    return rank() == 0


def wait_for_everyone() -> None:
    """A barrier when a process group is up (TrainingArguments starts it); nothing on one process."""
    import torch.distributed as dist

    if world_size() > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def _launcher_argv() -> list[str] | None:
    """The parent process's command line when it is `accelerate launch`, else None."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    argv = [a for a in raw.decode(errors="replace").split("\0") if a]
    head = argv[:3]
    if not any("accelerate" in Path(a).name for a in head) or not ("launch" in argv or head[-1].endswith("launch")):
        return None
    return argv


def _flag(argv: list[str], name: str) -> str | None:
    for i, a in enumerate(argv):
        if a == name and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(name + "="):
            return a.split("=", 1)[1]
    return None


def requested_processes(argv: list[str] | None = None) -> int | None:
    """How many processes `accelerate launch` was asked for (flag, then its config file), or None."""
    import yaml

    argv = _launcher_argv() if argv is None else argv
    if argv is None:
        return None
    value = _flag(argv, "--num_processes")
    if value is None:
        config = _flag(argv, "--config_file")
        path = Path(config) if config else Path(os.environ.get(
            "HF_HOME", Path.home() / ".cache" / "huggingface")) / "accelerate" / "default_config.yaml"
        try:
            value = (yaml.safe_load(path.read_text()) or {}).get("num_processes")
        except (OSError, yaml.YAMLError):
            return None
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def env_flag(name: str) -> bool:
    """An environment switch as accelerate writes them ("true", or "1")."""
    return os.environ.get(name, "").lower() in ("1", "true")


def sharding_engine() -> str | None:
    """"FSDP" or "DeepSpeed" under an `accelerate launch` with such a config (it sets ACCELERATE_USE_FSDP or
    ACCELERATE_USE_DEEPSPEED), else None."""
    return next((name for env, name in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed"))
                 if env_flag(env)), None)


def deepspeed_launch() -> bool:
    """True under an `accelerate launch` with a DeepSpeed config (it sets ACCELERATE_USE_DEEPSPEED)."""
    return env_flag("ACCELERATE_USE_DEEPSPEED")


def deepspeed_on_cpu() -> bool:
    """A DeepSpeed launch on a machine without CUDA, with deepspeed installed: DeepSpeed's CPU accelerator then
    runs ZeRO-2/ZeRO-3 for real over gloo, provided TrainingArguments says use_cpu=false (use_cpu=true makes
    accelerate run plain DDP and drop the DeepSpeed config) and ddp_backend=gloo (accelerate finds no backend of
    its own without CUDA). `hf_tuner.config.apply_device_defaults` sets both."""
    import importlib.util

    from hf_tuner.devices import cuda_available

    return deepspeed_launch() and not cuda_available() and importlib.util.find_spec("deepspeed") is not None


def check_launch(argv: list[str] | None = None) -> None:
    """Refuse a launch that asked for several processes but runs as one; say how to launch instead."""
    from hf_tuner.errors import ConfigError

    from hf_tuner.devices import cuda_available

    engine = sharding_engine()
    if deepspeed_on_cpu():
        log.warning("DeepSpeed without CUDA: its CPU accelerator runs the ZeRO stage over gloo (slow next to "
                    "DDP on a CPU; useful to check a config before a GPU run)")
    elif engine and not cuda_available():
        hint = (" Install DeepSpeed (pip install 'hf-tuner[deepspeed]') to run its CPU accelerator instead."
                if engine == "DeepSpeed" else "")
        log.warning("%s was asked for, but there is no CUDA: with use_cpu=true accelerate runs the processes as "
                    "plain DDP over gloo (MULTI_CPU) and ignores the %s settings. Training is correct, not "
                    "sharded.%s", engine, engine, hint)
    asked = requested_processes(argv)
    if asked and asked > 1 and world_size() == 1:
        cmd = " ".join(shlex.quote(a) for a in (argv or _launcher_argv() or []))
        raise ConfigError(f"accelerate launch asked for {asked} processes but this process sees world size 1, so "
                          f"every process would train alone (`{cmd}`): {FIX}")


# ---- a record of what each rank saw and wrote, for the multi-process tests (off unless asked) ----

TRACE_ENV = "HF_TUNER_RANK_TRACE"


def trace_ranks(trainer, output_dir: Path) -> None:
    """With $HF_TUNER_RANK_TRACE set to a folder, each rank writes rank<N>.json there when it exits:
    its world size, a fingerprint of every training example it was given (per step), and every file under
    `output_dir` it opened for writing from Python (an audit hook sees each `open`). The hook does not see
    native writers (safetensors, torch.save): tests/workers/rank_watch.py checks those on the file system."""
    import atexit
    import hashlib
    import json
    import sys

    import torch

    folder = os.environ.get(TRACE_ENV)
    if not folder:
        return
    out, written, batches = str(Path(output_dir).resolve()), [], []

    def audit(event, args):
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            path, mode = os.path.abspath(os.fsdecode(args[0])), args[1] or "r"
            if path.startswith(out) and any(m in str(mode) for m in "wax+"):
                written.append(os.path.relpath(path, out))

    sys.addaudithook(audit)
    collate = trainer.data_collator

    def traced(examples):
        batch = collate(examples)
        ids = batch.get("input_ids") if isinstance(batch, dict) else None  # TRL's online trainers pass raw rows
        if isinstance(ids, torch.Tensor):
            mask = batch.get("attention_mask")
            rows = [row[m.bool()] if mask is not None else row for row, m in zip(ids, mask if mask is not None else ids)]
            batches.append([hashlib.sha1(r.numpy().tobytes()).hexdigest()[:16] for r in rows])
        return batch

    trainer.data_collator = traced

    torch_world = _torch_world_size()
    kind = str(trainer.accelerator.distributed_type).split(".")[-1]  # NO, MULTI_GPU, FSDP, DEEPSPEED ...

    def dump():
        record = {"rank": rank(), "world_size": world_size(), "torch_world_size": torch_world, "distributed_type": kind,
                  "batches": batches, "written": sorted(set(written))}
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"rank{rank()}.json").write_text(json.dumps(record))

    atexit.register(dump)


def _torch_world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# ---- loading under FSDP's cpu_ram_efficient_loading ----

def fill_meta_from_rank0(model) -> list[str]:
    """Give ranks > 0 rank 0's values for the tensors transformers left on the meta device; the names filled.

    Under `fsdp.yaml` (`fsdp_cpu_ram_efficient_loading: true`), transformers 5.24 loads the checkpoint's weights
    on every rank, but on ranks > 0 it leaves every *missing* key on the meta device (a new classification or
    reward head, `score.weight`), counting on FSDP to broadcast rank 0's values when the Trainer prepares the
    model. The base evaluation runs before that, on each rank's share of the prompts, and a forward with a meta
    weight cannot run (checked with 2 processes over gloo: rank 1's `score.weight` was on meta). Collective
    under that environment only: every rank must load at the same point (every load goes through
    `models.load_pretrained`)."""
    import torch
    import torch.distributed as dist

    ram_efficient = env_flag("ACCELERATE_USE_FSDP") and env_flag("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if not ram_efficient or world_size() < 2 or not (dist.is_available() and dist.is_initialized()):
        return []
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    mine = [name for name, t in tensors.items() if t.device.type == "meta"]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    names = sorted(set().union(*everyone))
    if not names:
        return []
    if rank() == 0 and mine:
        raise RuntimeError(f"rank 0 holds meta tensors after loading ({mine[:3]}...): nothing to fill them from")
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        current = getattr(module, attr)
        if current.device.type == "meta":  # a real tensor of the same shape, then rank 0's values into it
            real = torch.empty(current.shape, dtype=current.dtype, device="cpu")
            if isinstance(current, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(real, requires_grad=current.requires_grad))
            else:
                module.register_buffer(attr, real, persistent=attr not in module._non_persistent_buffers_set)
            current = getattr(module, attr)
        # NCCL moves GPU tensors only (a process group of "cuda:nccl,cpu:gloo" takes CPU ones too)
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if dist.get_backend() == "nccl" \
            else current.device
        with torch.no_grad():
            values = current.data.to(device)
            dist.broadcast(values, src=0)
            current.data.copy_(values)
    if hasattr(model, "tie_weights"):  # a tied output layer follows its input embedding again
        model.tie_weights()
    return names


# ---- saving a model that an engine shards: gather on every rank, rank 0 writes ----

def gathered_state_dict(model) -> dict | None:
    """The full state dict of a model whose parameters an engine shards, gathered from every rank; None when
    nothing is sharded (save_pretrained reads the parameters itself). Call it on every rank: it is collective.

    - FSDP2 (`fully_shard`): the parameters are DTensor shards; torch's get_model_state_dict gathers them
      (full_state_dict, offloaded to the CPU; rank 0 gets the tensors, the others an empty dict).
    - DeepSpeed ZeRO-3: each parameter is an empty partition (`ds_id`); each one is gathered in turn, so at most
      one full parameter is on the GPU at a time. Under PEFT only the trainable ones (what the adapter file
      holds), not the frozen base.
    A rank-0-only `save_pretrained` would write DTensor shards (FSDP2) or empty tensors (ZeRO-3)."""
    params = list(model.named_parameters())
    if any(hasattr(p, "ds_id") for _, p in params):
        import deepspeed

        adapter = hasattr(model, "peft_config")
        state = {}
        for name, p in params:
            if adapter and not p.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if is_main_process():
                    state[name] = p.detach().cpu().clone()
        if not adapter and is_main_process():  # buffers are not partitioned
            state.update({k: v.detach().cpu().clone() for k, v in model.named_buffers()})
        return state
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for _, p in params):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def save_pretrained_gathered(model, path, tokenizer=None) -> None:
    """`model.save_pretrained(path)` (and the tokenizer's) under any launcher: the weights gathered on every
    rank first (gathered_state_dict), rank 0 writing. Call it on every rank. The files reload with plain
    transformers / PEFT."""
    state = gathered_state_dict(model)
    if is_main_process():
        model.save_pretrained(path, **({"state_dict": state} if state is not None else {}))
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    wait_for_everyone()


# ---- evaluation split across ranks: each rank runs its share, every rank gets every row back ----

def parameters_sharded(model) -> bool:
    """Whether an engine shards the model's parameters across the ranks (FSDP's flat parameters, FSDP2's DTensors,
    DeepSpeed ZeRO-3's partitions): then every forward gathers them collectively, and every rank must run the same
    forwards."""
    if any(module.__class__.__name__ == "FullyShardedDataParallel" for module in model.modules()):
        return True
    return any(hasattr(p, "ds_id") or type(p).__name__ in ("DTensor", "FlatParameter") for p in model.parameters())


class EvalShard:
    """This process's share of an evaluation: rank `rank` of `world`. `rows(n)` picks every world-th item
    (rows, or whole batches of rows) from `rank`, so the shares differ by at most one; `gather_rows` puts every
    rank's outputs back in item order, on every rank. With world 1 both hand back what they are given, and
    nothing is communicated."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    def __repr__(self) -> str:
        return f"EvalShard(rank={self.rank}, world={self.world})"

    def rows(self, n: int) -> list[int]:
        return list(range(self.rank, n, self.world))

    def all_gather(self, obj) -> list:
        """`obj` from every rank, in rank order. Collective: every rank must call it, in the same order."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        parts = [None] * self.world
        dist.all_gather_object(parts, obj)
        return parts

    def gather_rows(self, n: int, indices: list[int], values: list) -> list:
        """The n values of all ranks in item order (this rank holds `values` for `indices`). Collective."""
        if self.world == 1:
            return list(values)
        missing = object()
        out = [missing] * n
        for idx, vals in self.all_gather((list(indices), list(values))):
            for i, v in zip(idx, vals):
                out[i] = v
        lost = [i for i, v in enumerate(out) if v is missing]
        if lost:
            raise RuntimeError(f"evaluation over {self.world} ranks: no rank returned items {lost[:10]} of {n}")
        return out


SINGLE = EvalShard()


def evaluation_shard(model) -> EvalShard:
    """How `evaluate_model` splits its rows: by rank when torch.distributed is up with several ranks, else
    SINGLE (one process evaluates everything, as before).

    A model whose parameters an engine shards (FSDP, FSDP2, DeepSpeed ZeRO-3) is evaluated whole on every rank,
    as before: each of its forwards is a collective, so every rank must run the same number of them, and greedy
    generation stops a batch when its rows end, which depends on the rows. Padding the shares to equal length
    would not make the generation steps equal. Plain DDP and unwrapped models have no collective in a forward."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    if parameters_sharded(model):
        return SINGLE
    return EvalShard(dist.get_rank(), dist.get_world_size())
