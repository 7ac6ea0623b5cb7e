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


# ---- devices: library code puts tensors on the model's device (a CUDA policy fed CPU tensors crashes) ----

@pytest.fixture
def tiny_policy(tiny_llama):
    from hf_tuner.models import load_model

    model, tokenizer = load_model(tiny_llama, "causal-lm")
    tokenizer.padding_side = "left"
    return model, tokenizer


def test_sampled_tensors_are_on_the_model_device(tiny_policy):
    from hf_tuner.policy_sampling import model_device, sample_responses

    model, tokenizer = tiny_policy
    q, qm, r, rm, texts, ended = sample_responses(model, tokenizer, ["a b", "c d e"], 4, 0.7, seed=0)
    assert {t.device for t in (q, qm, r, rm, ended)} == {model_device(model)}


class _LMElsewhere(torch.nn.Module):
    """A causal LM stand-in whose weights live on `device` (meta stands in for CUDA here): like a real model
    there, it refuses inputs from another device; it returns logits of the right shape on its device."""

    def __init__(self, device, vocab: int, hidden: int = 8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden, device=device)
        self.head = torch.nn.Linear(hidden, vocab, device=device)

    def forward(self, input_ids, attention_mask, position_ids, output_hidden_states=False, use_cache=False):
        for name, t in (("input_ids", input_ids), ("attention_mask", attention_mask), ("position_ids", position_ids)):
            if t.device != self.head.weight.device:
                raise RuntimeError(f"{name} on {t.device}, the model on {self.head.weight.device}")
        h = self.embed(input_ids)
        return type("Out", (), {"logits": self.head(h), "hidden_states": (h,)})


def test_forward_logprobs_moves_inputs_to_the_model_device(tiny_policy):
    """The policy (or the reference) on another device than the sampled tensors (the tuned evaluation of
    ppo/grpo/rloo/dpo on a GPU): without the move, the forward fails on mixed devices."""
    from hf_tuner.policy_sampling import forward_logprobs, sample_responses

    model, tokenizer = tiny_policy
    q, qm, r, rm, _, _ = sample_responses(model, tokenizer, ["a b", "c d e"], 4, 0.7, seed=0)
    elsewhere = _LMElsewhere("meta", model.config.vocab_size)
    value_head = torch.nn.Linear(8, 1, device="meta")
    logprobs, values, entropy = forward_logprobs(elsewhere, q, qm, r, rm, 0.7, value_head, with_entropy=True,
                                                 eos_ids=[tokenizer.eos_token_id])
    assert {t.device.type for t in (logprobs, values, entropy)} == {"meta"} and logprobs.shape == r.shape


def test_ppo_full_fine_tuning_reference_moves_to_the_accelerator_device(tiny_policy, monkeypatch):
    """PPOTrainer puts a frozen full-fine-tuning reference on the accelerator's device, as prepare() puts the
    policy (on a GPU: cuda; the accelerator's device is faked as meta to see the move on a CPU)."""
    import copy

    from accelerate import Accelerator
    from transformers import TrainingArguments

    from hf_tuner.rl.ppo import PPOArguments, PPOTrainer

    model, tokenizer = tiny_policy
    ref = copy.deepcopy(model)
    args = TrainingArguments(output_dir="/tmp/unused", use_cpu=True, report_to=[], max_steps=1,
                             per_device_train_batch_size=2)
    acc = Accelerator(cpu=True)
    monkeypatch.setattr(type(acc), "device", property(lambda self: torch.device("meta")))
    monkeypatch.setattr(acc, "prepare", lambda *objs: objs)  # the policy's own placement is prepare's business
    PPOTrainer(model, tokenizer, lambda p, r: [0.0] * len(p), args, PPOArguments(num_mini_batches=1),
               ref_model=ref, accelerator=acc)
    assert next(ref.parameters()).device.type == "meta"


# ---- saving under FSDP2: torch's fully_shard runs on CPU over gloo, so the sharding here is real ----

def _torchrun(*args, timeout=240):
    import subprocess
    import sys

    from conftest import free_port, launcher_env

    torchrun = str(Path(sys.executable).parent / "torchrun")
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), *map(str, args)]
    return subprocess.run(cmd, env=launcher_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parents[1])


@pytest.mark.parametrize("kind", ["lora", "full"])
def test_fsdp2_sharded_model_saves_gathered_weights_that_reload(tmp_path, tiny_llama, kind):
    """Two ranks, parameters really sharded (DTensor): the saved files hold the full trained weights, and plain
    transformers / PEFT reload them. A rank-0-only save_pretrained would write shards or fail."""
    worker = Path(__file__).parent / "workers" / "fsdp2_save.py"
    proc = _torchrun(worker, tiny_llama, tmp_path, kind)
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    from transformers import AutoModelForCausalLM

    if kind == "lora":
        from peft import PeftModel

        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path)
        assert any("lora_B" in n and e.abs().sum() > 0 for n, e in expected.items()), "the step trained nothing"
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    params = dict(reloaded.named_parameters())
    _same(params, expected)


def _same(params, expected):
    for name, value in expected.items():
        assert torch.equal(params[name], value), name


def test_finish_rl_run_saves_the_policy_before_evaluating_it(tmp_path, tiny_policy):
    """A crash in the tuned evaluation (a device mismatch on a GPU, a reward model that fails) must not lose
    the trained policy: it is on disk before the evaluation starts, and it reloads."""
    from transformers import AutoModelForCausalLM

    from hf_tuner.evaluation.tasks import RewardTask
    from hf_tuner.generation import DecodingSettings
    from hf_tuner.rl.online import finish_rl_run

    model, tokenizer = tiny_policy

    def broken_reward(prompts, responses):
        raise RuntimeError("the reward model crashed")

    task = RewardTask("held-out prompts", [{"prompt": "a b"}], broken_reward, 0.7)
    with pytest.raises(RuntimeError, match="reward model crashed"):
        finish_rl_run(tmp_path, "t", model, tokenizer, task, DecodingSettings(max_new_tokens=2), {}, {}, [])
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_fsdp2_sharded_multitask_model_saves_gathered_weights(tmp_path):
    """MultiTaskModel.save_pretrained on every rank under FSDP2: encoder and heads gathered, reloadable."""
    from hf_tuner import assets
    from hf_tuner.multitask import MultiTaskModel

    proc = _torchrun(Path(__file__).parent / "workers" / "fsdp2_save.py", assets.resolve("tiny-bert"), tmp_path,
                     "multitask")
    assert proc.returncode == 0, proc.stderr[-4000:]
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    _same(dict(MultiTaskModel.from_pretrained(tmp_path).named_parameters()), expected)


@pytest.mark.parametrize("env", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_our_ppo_is_refused_under_fsdp_and_deepspeed_on_gpus(monkeypatch, env):
    from hf_tuner.config import ConfigError
    from hf_tuner.rl import ppo

    monkeypatch.setenv(env, "true")
    monkeypatch.setattr("hf_tuner.devices.cuda_available", lambda: True)
    with pytest.raises(ConfigError, match="multi_gpu.yaml.*grpo or rloo"):
        ppo.check_ppo_launch()
    monkeypatch.setattr("hf_tuner.devices.cuda_available", lambda: False)
    if env == "ACCELERATE_USE_FSDP":  # CPU: accelerate runs it as DDP
        ppo.check_ppo_launch()
    else:  # CPU: DeepSpeed's CPU accelerator runs the engine for real (tests/test_deepspeed_cpu.py), so refused too
        pytest.importorskip("deepspeed")
        with pytest.raises(ConfigError, match="cannot run under DeepSpeed"):
            ppo.check_ppo_launch()
    monkeypatch.setenv(env, "false")
    ppo.check_ppo_launch()


def test_trl_use_reentrant_fix_reaches_the_name_transformers_reads(tmp_path):
    """SFTTrainer's PEFT + ZeRO-3 branch (trl/trainer/sft_trainer.py, 1.16) runs
        args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {}
        args.gradient_checkpointing_kwargs["use_reentrant"] = True
    after TrainingArguments mirrored the two names; Trainer.train (5.24) reads activation_checkpointing_kwargs.
    The branch needs a DeepSpeed plugin, so its two statements are replayed here on a real SFTConfig."""
    from trl import SFTConfig

    from hf_tuner.training import sync_checkpointing_kwargs

    args = SFTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, gradient_checkpointing=True, report_to=[])
    args.gradient_checkpointing_kwargs = args.gradient_checkpointing_kwargs or {}
    args.gradient_checkpointing_kwargs["use_reentrant"] = True
    assert not (args.activation_checkpointing_kwargs or {}).get("use_reentrant"), "transformers mirrors it now"
    assert sync_checkpointing_kwargs(args)
    assert args.activation_checkpointing_kwargs == {"use_reentrant": True}
    assert not sync_checkpointing_kwargs(args)


def test_qlora_stores_4bit_weights_in_the_compute_dtype_and_trains(tiny_llama):
    """bnb_4bit_quant_storage = compute dtype, so FSDP2 / ZeRO-3 see one floating dtype to shard; the packed
    weights load, run and take LoRA gradients on this CPU."""
    from peft import LoraConfig, get_peft_model

    from hf_tuner.adapters import quantization_for
    from hf_tuner.models import load_model

    q = quantization_for("qlora")
    assert q.bnb_4bit_quant_storage == q.bnb_4bit_compute_dtype
    model, _ = load_model(tiny_llama, "causal-lm", quantization_config=q)
    packed = model.model.layers[0].self_attn.q_proj.weight
    assert packed.dtype == q.bnb_4bit_compute_dtype, packed.dtype
    from hf_tuner.adapters import trainable_parameters

    plain, _ = load_model(tiny_llama, "causal-lm")
    assert trainable_parameters(model)[1] == trainable_parameters(plain)[1]  # 4-bit values counted, not storage
    model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    ids = torch.randint(3, 100, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_metrics_report_the_precision_the_launch_trained_in(tmp_path, tiny_llama, monkeypatch):
    """`accelerate launch` with a yaml saying mixed_precision: bf16 (multi_gpu, fsdp, deepspeed) sets
    ACCELERATE_MIXED_PRECISION; TrainingArguments(bf16=False) then trains in bf16. metrics.json says so."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    from hf_tuner.runs import train_summary

    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    AcceleratorState._reset_state(True)
    try:
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], max_steps=1)
        trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args)
        assert trainer.args.bf16 is False and trainer.accelerator.mixed_precision == "bf16"
        summary = train_summary(trainer, type("Out", (), {"training_loss": 1.0}), 1.0)
    finally:
        AcceleratorState._reset_state(True)  # the state is a process-wide singleton
    assert summary["bf16"] is True and summary["mixed_precision"] == "bf16"


def test_base_model_loads_whole_after_a_zero3_training_config(tiny_llama):
    """Under deepspeed_zero3.yaml, TrainingArguments registers its DeepSpeed config and transformers would load
    every later model inside deepspeed.zero.Init (empty partitions: the base evaluation's generate fails; here,
    without deepspeed installed, the load itself fails). load_model loads whole weights that generate."""
    from transformers.integrations import deepspeed as hf_deepspeed

    from hf_tuner.generation import DecodingSettings, generate_batched
    from hf_tuner.models import load_model

    class Zero3Config:  # what TrainingArguments registers (HfTrainerDeepSpeedConfig); only is_zero3 is read
        config = {"zero_optimization": {"stage": 3}}

        def is_zero3(self):
            return True

    registered = Zero3Config()
    hf_deepspeed.set_hf_deepspeed_config(registered)
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        model, tokenizer = load_model(tiny_llama, "causal-lm")
        assert hf_deepspeed.is_deepspeed_zero3_enabled(), "the training config is left in place"
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
    assert all(p.dim() > 0 and p.numel() > 0 for p in model.parameters())
    tokenizer.padding_side = "left"
    assert len(generate_batched(model, tokenizer, ["a b"], DecodingSettings(max_new_tokens=2))) == 1


def test_loaded_models_go_to_this_ranks_gpu_except_under_fsdp(monkeypatch):
    from hf_tuner.models import evaluation_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert evaluation_device() == torch.device("cuda", 3)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert evaluation_device() == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert evaluation_device() == torch.device("cpu")


def test_load_model_places_the_model_on_the_evaluation_device(tiny_llama, monkeypatch):
    """The base evaluation runs where load_model put the model: on a GPU machine cuda:LOCAL_RANK (faked here
    as meta, the only other device a CPU has)."""
    import hf_tuner.models as models

    monkeypatch.setattr(models, "evaluation_device", lambda: torch.device("meta"))
    model, _ = models.load_model(tiny_llama, "causal-lm")
    assert {p.device.type for p in model.parameters()} == {"meta"}


@pytest.mark.parametrize("cls", ["TrainingArguments", "SFTConfig"])
def test_bf16_follows_the_launchers_mixed_precision(tmp_path, monkeypatch, cls):
    """An accelerate yaml with mixed_precision: bf16 and a recipe whose bf16 is false: the Trainer would train
    in bf16 (DDP/FSDP) or refuse the DeepSpeed config (ZeRO); parse_config turns bf16 on, so both agree."""
    import transformers
    import trl

    from hf_tuner.config import parse_config

    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    training_cls = getattr(transformers, cls, None) or getattr(trl, cls)
    cfg = parse_config(training_cls, {"output_dir": str(tmp_path), "bf16": False})
    assert cfg.training.bf16 is True and cfg.training.mixed_precision == "bf16"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    cfg = parse_config(training_cls, {"output_dir": str(tmp_path), "bf16": False})
    assert cfg.training.bf16 is False and cfg.training.mixed_precision == "no"


def test_planned_steps_count_the_global_batch_of_every_process(monkeypatch):
    from hf_tuner.training import planned_steps

    args = type("A", (), {"max_steps": -1, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 2,
                          "num_train_epochs": 1})
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert planned_steps(args, 64) == 8
    monkeypatch.setenv("WORLD_SIZE", "2")  # the ranks split the data: half the steps
    assert planned_steps(args, 64) == 4


def test_trainable_parameters_count_zero3_partitions_whole():
    """Under zero.Init a parameter's own numel() is 0 (its partition); DeepSpeed keeps the size in ds_numel.
    Full fine-tuning printed a trainable percentage of 0 / 0."""
    from hf_tuner.adapters import trainable_parameters

    model = torch.nn.Linear(4, 3)
    for p in model.parameters():
        p.ds_numel, p.data = p.numel(), torch.empty(0)  # what zero.Init leaves on each rank
    assert trainable_parameters(model) == (15, 15)


def test_every_rank_resumes_from_rank_zeros_choice(tmp_path, monkeypatch):
    """Rank 1 sees no complete checkpoint (its node-local disk, a save not yet visible): it still resumes from
    rank 0's. Only the collective is faked: rank 0's choice arrives as broadcast_object_list delivers it."""
    import torch.distributed as dist

    from hf_tuner import checkpoints

    chosen = str(_checkpoint(tmp_path / "rank0" / "checkpoint-4", 4))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "broadcast_object_list", lambda box, src: box.__setitem__(0, ("ok", chosen)))
    monkeypatch.setenv("RANK", "1")
    args = type("A", (), {"resume_from_checkpoint": "latest"})
    assert checkpoints.resume_point(args, _Run, tmp_path / "rank1-empty") == chosen
    monkeypatch.setattr(dist, "broadcast_object_list",
                        lambda box, src: box.__setitem__(0, ("error", "resume_from_checkpoint: no complete")))
    from hf_tuner.config import ConfigError

    with pytest.raises(ConfigError, match="no complete"):
        checkpoints.resume_point(args, _Run, tmp_path / "rank1-empty")


def test_slurm_script_derives_port_and_gpus_quotes_arguments_and_picks_deepspeeds_launcher(tmp_path):
    """multi_node.slurm with srun and scontrol replaced by stubs: the command each node would run."""
    import os
    import shlex
    import subprocess

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "srun").write_text('#!/bin/bash\nshift\nprintf "%s\\n" "$3"\n')  # srun --kill-on-bad-exit=1 bash -c CMD
    (tmp_path / "scontrol").write_text("#!/bin/bash\necho node1\necho node2\n")
    for f in ("srun", "scontrol"):
        (tmp_path / f).chmod(0o755)
    inherited = {k: v for k, v in os.environ.items()  # a launcher's variables from earlier tests stay out
                 if not k.startswith(("SLURM_", "MASTER_", "GPUS_", "ACCEL", "RECIPE", "CONFIG", "TORCH_ELASTIC"))}
    env = {**inherited, "PATH": f"{tmp_path}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n[1-2]",
           "SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_GPUS_ON_NODE": "4",
           "ACCEL_CONFIG": "recipes/accelerate/deepspeed_zero3.yaml"}
    proc = subprocess.run(["bash", "recipes/accelerate/multi_node.slurm", "--run_name", "two words"], env=env,
                          cwd=root, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    argv = shlex.split(out.replace("$SLURM_PROCID", "0"))
    assert argv[argv.index("--num_processes") + 1] == "8"
    assert argv[argv.index("--main_process_port") + 1] == str(20000 + 4242 % 30000)
    assert argv[argv.index("--deepspeed_multinode_launcher") + 1] == "standard"
    assert argv[-2:] == ["--run_name", "two words"]


@pytest.mark.parametrize("ram_efficient", ["true", "false"])
def test_ranks_above_zero_get_rank_zeros_new_head(tmp_path, tiny_llama, ram_efficient):
    """fsdp.yaml says fsdp_cpu_ram_efficient_loading: true. transformers 5.24 then leaves the keys a checkpoint
    lacks (a new classification head) on the meta device on ranks > 0, for FSDP to broadcast at prepare time;
    the base evaluation comes first and cannot run on a meta weight. `models.load_pretrained` fills them from
    rank 0: two processes over gloo hold the same real head, each seeded differently."""
    import subprocess
    import sys

    from conftest import free_port, launcher_env

    torchrun = str(Path(sys.executable).parent / "torchrun")
    worker = Path(__file__).parent / "workers" / "fsdp_ram_efficient_load.py"
    env = launcher_env(ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING=ram_efficient, OMP_NUM_THREADS="1")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), str(worker),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["meta"] for r in ranks] == [[], []]
    if ram_efficient == "true":
        assert ranks[1]["score"] == ranks[0]["score"]  # rank 0's head, not rank 1's own draw
    else:  # nothing to fill: each rank keeps its own initialisation (FSDP is not loading anything here)
        assert ranks[1]["score"] != ranks[0]["score"]
