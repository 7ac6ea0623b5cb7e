"""Runs that survive faults: resume from the last complete checkpoint, and stop cleanly on SIGINT / SIGTERM.

Trainer writes a checkpoint folder in place (weights, optimizer, scheduler, RNG states, then
trainer_state.json last), so a run killed during a save leaves a half-written `checkpoint-N`, and
`get_last_checkpoint` would pick it. We pick the newest checkpoint whose trainer_state.json parses and
names the folder's own step, with its weights present: that file is written last, so it proves the rest.
"""

from __future__ import annotations

import json
import re
import signal
import threading
from pathlib import Path

from transformers import TrainerCallback

from hf_tuner.config import ConfigError
from hf_tuner.devices import release_memory

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json",
            "pytorch_model.bin", "adapter_model.bin",
            "pytorch_model_fsdp.bin")  # FSDP with FULL_STATE_DICT (accelerate's save_fsdp_model)
# FSDP with SHARDED_STATE_DICT saves the model through torch.distributed.checkpoint into `pytorch_model_fsdp_N/`
# (accelerate's FSDP_MODEL_NAME), whose `.metadata` is written once every rank's shards are; Trainer.save_model
# writes no weights file beside it. DeepSpeed writes its engine state into `global_stepN/` (and a `latest` file).
_FSDP_SHARDED = re.compile(r"^pytorch_model_fsdp_\d+$")
_DEEPSPEED = re.compile(r"^global_step\d+$")
RESUME_LATEST = ("latest", "true", "last")


class RunInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint: `checkpoint` is where to resume from."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint could be saved"
        super().__init__(f"{name} received: stopped at step {step}, {where}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def is_complete(folder: Path) -> bool:
    """A checkpoint folder that a save finished writing (see the module docstring)."""
    m = _CHECKPOINT.match(folder.name)
    if not m or not folder.is_dir():
        return False
    try:
        state = json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return False
    return state.get("global_step") == int(m.group(1)) and has_weights(folder)


def has_weights(folder: Path) -> bool:
    """Model weights in any form a Trainer checkpoint holds them: safetensors/bin files (DDP, one process, FSDP
    FULL_STATE_DICT), an FSDP SHARDED_STATE_DICT folder whose save finished, or a DeepSpeed engine folder."""
    if any((folder / w).is_file() for w in _WEIGHTS):
        return True
    for sub in folder.iterdir():
        if sub.is_dir() and _FSDP_SHARDED.match(sub.name) and (sub / ".metadata").is_file():
            return True
        if sub.is_dir() and _DEEPSPEED.match(sub.name) and any(sub.glob("*model_states.pt")):
            return True
    return False


def checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """All `checkpoint-N` folders, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CHECKPOINT.match(p.name))]
    return sorted(found)


def last_complete_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; newer half-written ones are skipped with a message."""
    for step, folder in reversed(checkpoints(output_dir)):
        if is_complete(folder):
            return folder
        print(f"note: {folder} is incomplete (the run stopped while saving it); skipping it")
    return None


def set_aside_incomplete(output_dir: Path, keep: Path) -> None:
    """Rename half-written checkpoints newer than `keep` to `incomplete-checkpoint-N` (rank 0 only): Trainer
    would otherwise save into them again and count them when rotating. They are kept for inspection."""
    from hf_tuner.distributed import is_main_process

    if not is_main_process():
        return
    keep_step = int(_CHECKPOINT.match(keep.name).group(1))
    for step, folder in checkpoints(output_dir):
        if step > keep_step and not is_complete(folder):
            target = folder.with_name(f"incomplete-{folder.name}")
            n = 1
            while target.exists():
                target, n = folder.with_name(f"incomplete-{folder.name}.{n}"), n + 1
            folder.rename(target)
            print(f"note: moved the incomplete {folder.name} aside to {target.name}")


def resolve_resume(training, run, output_dir: Path) -> str | None:
    """The checkpoint to resume from, or None to start fresh.

    `resume_from_checkpoint`: `latest` (or `true`) picks the last complete checkpoint in output_dir and
    fails if there is none; a path must be a complete checkpoint. `resume: auto` resumes from the last
    complete checkpoint when there is one and starts fresh otherwise."""
    asked = training.resume_from_checkpoint
    if asked and str(asked).lower() in RESUME_LATEST:
        found = last_complete_checkpoint(output_dir)
        if found is None:
            raise ConfigError(f"resume_from_checkpoint: no complete checkpoint in {output_dir} to resume from")
        return str(found)
    if asked:
        path = Path(asked)
        if not is_complete(path):
            raise ConfigError(f"resume_from_checkpoint: {path} is not a complete checkpoint folder "
                              "(checkpoint-N with trainer_state.json and weights: a weights file, an FSDP "
                              "pytorch_model_fsdp_N/ folder or a DeepSpeed global_stepN/ folder)")
        return str(path)
    if run.resume == "auto":
        found = last_complete_checkpoint(output_dir)
        return str(found) if found else None
    return None


class StopOnSignal(TrainerCallback):
    """SIGINT / SIGTERM: finish the current step, save a checkpoint and stop (a second signal stops at once).

    In a multi-process launch the flag is all-reduced every step, so every rank stops at the same step
    even when the signal reached only some of them (otherwise the others would wait forever)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: the user means it
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step, then stopping "
              "(send it again to stop at once)", flush=True)

    def install(self) -> None:
        """Take over SIGINT / SIGTERM (main thread only: Python delivers signals there)."""
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handle)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        self.install()

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.agreed_signal(args)
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def agreed_signal(self, args) -> int:
        """The signal to stop on, the same on every rank (0: none); call it at the same point on all ranks."""
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum or 0
        flag = torch.tensor([self.signum or 0], device=args.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def resume_point(training, run, output_dir: Path) -> str | None:
    """resolve_resume on rank 0, its choice sent to every rank (each rank looking for itself could see a
    checkpoint another rank is still writing, or none on a node-local disk, and resume from another step),
    then the half-written checkpoints newer than the chosen one set aside."""
    checkpoint = agreed(lambda: resolve_resume(training, run, output_dir))
    if checkpoint:
        if Path(checkpoint).parent.resolve() == output_dir.resolve():
            set_aside_incomplete(output_dir, Path(checkpoint))
        print(f"resuming from {checkpoint}")
    return checkpoint


def agreed(choose):
    """`choose()` on rank 0, its result (or its ConfigError) broadcast to every rank of the process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return choose()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box = [("ok", choose())]
        except ConfigError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def train_resumable(trainer, run, output_dir: Path):
    """`trainer.train()` resuming as configured, stopping cleanly on SIGINT / SIGTERM (raises RunInterrupted)."""
    from hf_tuner.distributed import trace_ranks
    from hf_tuner.training import mean_loss_across_processes, sync_checkpointing_kwargs

    trace_ranks(trainer, output_dir)  # only with $HF_TUNER_RANK_TRACE set (the multi-process tests)
    sync_checkpointing_kwargs(trainer.args)  # TRL's PEFT + ZeRO-3 use_reentrant fix, where transformers reads it
    mean_loss_across_processes(trainer)  # heads whose loss is a plain mean are not scaled by the process count
    checkpoint = resume_point(trainer.args, run, output_dir)
    stop = StopOnSignal()
    trainer.add_callback(stop)
    try:
        result = trainer.train(resume_from_checkpoint=checkpoint)
    finally:
        trainer.remove_callback(stop)
        stop.restore()  # a second signal's KeyboardInterrupt skips on_train_end, which restores them otherwise
        full_state_dict_for_final_save(trainer)
        release_memory()  # the evaluations that follow start from what they need, not from training's peak
    if stop.signum:
        raise RunInterrupted(stop.signum, trainer.state.global_step, last_complete_checkpoint(output_dir))
    return result


def full_state_dict_for_final_save(trainer) -> bool:
    """Under FSDP with SHARDED_STATE_DICT (recipes/accelerate/fsdp.yaml: cheap, resumable checkpoints),
    `Trainer.save_model` writes no weights at all: transformers 5.24 saves only when the plugin says
    FULL_STATE_DICT. Once training is over, switch to FULL_STATE_DICT, as accelerate's
    `set_state_dict_type` documents ("user trains with sharded, but final save is with full"), so the
    recipes' final `save_model` gathers the weights (on every rank; rank 0 writes) into files that plain
    transformers/PEFT reload. True when it switched."""
    if not getattr(trainer, "is_fsdp_enabled", False):
        return False
    plugin = trainer.accelerator.state.fsdp_plugin
    if "FULL_STATE_DICT" in str(plugin.state_dict_type):
        return False
    plugin.state_dict_config = plugin.optim_state_dict_config = None  # the sharded ones would stay otherwise
    plugin.set_state_dict_type("FULL_STATE_DICT")
    return True
