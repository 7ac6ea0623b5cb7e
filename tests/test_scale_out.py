"""Scale-out decisions that a CPU can check (issue 19): what FSDP/DeepSpeed checkpoints look like to our resume
logic, what the final save writes under FSDP's SHARDED_STATE_DICT, and the devices of tensors handed between
functions. The engines themselves need a GPU: benchmarks/gpu_check.sh runs them."""

import json
from pathlib import Path

import pytest
import torch

from hf_tuner.checkpoints import is_complete, last_complete_checkpoint, resolve_resume


class _Args:
    resume_from_checkpoint = None


class _Run:
    resume = "auto"


def _checkpoint(folder: Path, step: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_fsdp_sharded_checkpoints_are_complete_and_resumed(tmp_path, capsys):
    """Trainer under fsdp.yaml (SHARDED_STATE_DICT) writes pytorch_model_fsdp_0/ (torch.distributed.checkpoint,
    `.metadata` last) and no weights file; such a checkpoint is complete, `latest` and `resume: auto` pick it."""
    out = tmp_path / "run"
    ckpt = _checkpoint(out / "checkpoint-4", 4)
    (ckpt / "pytorch_model_fsdp_0").mkdir()
    (ckpt / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    (ckpt / "pytorch_model_fsdp_0" / ".metadata").write_bytes(b"x")
    (ckpt / "optimizer_0").mkdir()
    assert is_complete(ckpt)
    assert resolve_resume(_Args, _Run, out) == str(ckpt)
    assert "incomplete" not in capsys.readouterr().out
    args = type("A", (), {"resume_from_checkpoint": "latest"})
    assert resolve_resume(args, _Run, out) == str(ckpt)


def test_fsdp_shards_without_metadata_are_a_save_that_did_not_finish(tmp_path, capsys):
    out = tmp_path / "run"
    good = _checkpoint(out / "checkpoint-2", 2)
    (good / "pytorch_model_fsdp.bin").write_bytes(b"x")  # FULL_STATE_DICT checkpoint
    half = _checkpoint(out / "checkpoint-4", 4)
    (half / "pytorch_model_fsdp_0").mkdir()
    (half / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"x")
    assert is_complete(good) and not is_complete(half)
    assert last_complete_checkpoint(out) == good
    assert "checkpoint-4 is incomplete" in capsys.readouterr().out


def test_deepspeed_engine_checkpoints_are_complete(tmp_path):
    """DeepSpeed's engine.save_checkpoint writes global_stepN/*model_states.pt (ZeRO-3 with
    stage3_gather_16bit_weights_on_model_save off leaves no weights file beside it)."""
    ckpt = _checkpoint(tmp_path / "run" / "checkpoint-6", 6)
    (ckpt / "global_step6").mkdir()
    assert not is_complete(ckpt)
    (ckpt / "global_step6" / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    assert is_complete(ckpt)


@pytest.fixture
def tiny_trainer(tmp_path, tiny_llama):
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=0)
    return Trainer(model=model, args=args)


def test_final_save_under_sharded_fsdp_writes_the_weights(tmp_path, tiny_trainer, monkeypatch):
    """transformers' own save_model under an FSDP plugin set to SHARDED_STATE_DICT (fsdp.yaml) writes no
    weights; after train_resumable's switch it writes model.safetensors that plain transformers reloads.
    The FSDP engine is absent on CPU: the trainer is told it is enabled and handed accelerate's real plugin."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import AutoModelForCausalLM

    from hf_tuner.checkpoints import full_state_dict_for_final_save

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    monkeypatch.setattr(tiny_trainer, "is_fsdp_enabled", True)
    monkeypatch.setattr(tiny_trainer.accelerator.state, "fsdp_plugin", plugin, raising=False)
    tiny_trainer.save_model(str(tmp_path / "sharded"))
    assert not list((tmp_path / "sharded").glob("*.safetensors")), "transformers changed: SHARDED now saves"

    assert full_state_dict_for_final_save(tiny_trainer)
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
    tiny_trainer.save_model(str(tmp_path / "full"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "full")
    for (name, a), b in zip(tiny_trainer.model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert not full_state_dict_for_final_save(tiny_trainer)  # already full: nothing to do


def test_train_resumable_switches_before_the_recipes_save(tmp_path, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    from hf_tuner.checkpoints import train_resumable

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")

    class FakeTrainer:  # only what train_resumable touches; the save itself is tested above
        is_fsdp_enabled = True
        accelerator = type("Acc", (), {"state": type("State", (), {"fsdp_plugin": plugin})})
        args = type("Args", (), {"resume_from_checkpoint": None})
        state = type("S", (), {"global_step": 1})

        def add_callback(self, cb):
            pass

        def remove_callback(self, cb):
            pass

        def train(self, resume_from_checkpoint=None):
            assert "SHARDED" in str(plugin.state_dict_type), "checkpoints during training stay sharded"
            return "done"

    run = type("Run", (), {"resume": "never"})
    assert train_resumable(FakeTrainer(), run, tmp_path) == "done"
    assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
