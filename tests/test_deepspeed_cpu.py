"""DeepSpeed ZeRO-2 and ZeRO-3 for real, on DeepSpeed's CPU accelerator over gloo (issue 19).

`accelerate launch --config_file recipes/accelerate/deepspeed_zero3.yaml --num_processes 2` on a machine without
CUDA: the recipes leave use_cpu off and take ddp_backend gloo (`hf_tuner.config.apply_device_defaults`), so
accelerate starts DeepSpeed's engine instead of falling back to DDP. Each launch is set against one process
with the same global batch: the same losses, the same base and tuned evaluation, the same saved weights, which
plain transformers / PEFT reload. The ZeRO-3 base evaluation runs before any engine exists (zero.Init would
have left empty partitions). fp32 throughout (`--mixed_precision no`), so the comparisons are tight.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (distinct_definition_rows, dropout_free_copy, free_port, launcher_env, logged_losses,
                      run_launcher, tiny_sft_config, write_jsonl, write_vader_folder, write_yaml)

pytest.importorskip("deepspeed", reason="make install takes hf-tuner[deepspeed]")

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
ZERO = {stage: str(ROOT / "recipes" / "accelerate" / f"deepspeed_zero{stage}.yaml") for stage in (2, 3)}


def _launch(stage: int, recipe: str, cfg: Path, trace: Path | None = None, **env):
    proc = run_launcher([ACCELERATE, "launch", "--config_file", ZERO[stage], "--num_processes", "2",
                         "--mixed_precision", "no", "--main_process_port", str(free_port()),
                         str(ROOT / "recipes" / f"{recipe}.py"), "--config", str(cfg)], trace, timeout=400, **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _single(recipe: str, cfg: Path):
    proc = run_launcher([sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--config", str(cfg)], timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def _close_tensors(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].shape == b[k].shape and a[k].numel(), (k, a[k].shape, b[k].shape)
        assert torch.allclose(a[k].float(), b[k].float(), rtol=rtol, atol=atol), (k, (a[k] - b[k]).abs().max())


@pytest.fixture(scope="module")
def sft(tmp_path_factory, tiny_llama):
    """sft_instruction with LoRA, base evaluation on, checkpoints every 2 steps: ZeRO-3 with 2 processes (batch 2
    each), one process (batch 4), and ZeRO-3 again resumed from the first launch's checkpoint-2."""
    tmp = tmp_path_factory.mktemp("zero3")
    data = write_jsonl(tmp / "defs.jsonl", distinct_definition_rows())
    common = {"max_steps": 4, "evaluate_base": True, "save_strategy": "steps", "save_steps": 2, "lora_dropout": 0.0}
    zero3 = tiny_sft_config(data, tmp / "zero3", per_device_train_batch_size=2, **common)
    proc = _launch(3, "sft_instruction", write_yaml(tmp / "zero3.yaml", zero3), tmp / "trace")
    _single("sft_instruction", write_yaml(tmp / "one.yaml", tiny_sft_config(data, tmp / "one",
                                                                           per_device_train_batch_size=4, **common)))
    resumed = {**zero3, "output_dir": str(tmp / "resumed"), "resume_from_checkpoint": str(tmp / "zero3/checkpoint-2")}
    _launch(3, "sft_instruction", write_yaml(tmp / "resumed.yaml", resumed))
    ranks = [json.loads((tmp / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return tmp, ranks, proc


def test_zero3_runs_deepspeeds_engine_on_two_cpu_processes(sft):
    tmp, ranks, proc = sft
    assert [(r["distributed_type"], r["torch_world_size"]) for r in ranks] == [("DEEPSPEED", 2)] * 2
    assert "its CPU accelerator runs the ZeRO stage over gloo" in proc.stderr
    # each rank wrote its own ZeRO-3 partition of the weights and of the optimizer state
    names = sorted(p.name for p in (tmp / "zero3/checkpoint-4/global_step4").iterdir())
    assert names == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]


def test_zero3_trains_and_evaluates_as_one_process(sft):
    """The base evaluation runs on the whole model before the engine exists; training matches one process with
    the same global batch; the tuned evaluation runs on the ZeRO-3 engine's model."""
    tmp, _, _ = sft
    zero3, one = _metrics(tmp / "zero3"), _metrics(tmp / "one")
    assert logged_losses(tmp / "zero3") == pytest.approx(logged_losses(tmp / "one"), rel=1e-4)
    for model in ("base", "tuned"):
        assert zero3[model]["perplexity"] == pytest.approx(one[model]["perplexity"], rel=1e-4), model
    assert zero3["tuned"]["perplexity"] < zero3["base"]["perplexity"]


def test_zero3_adapter_reloads_with_plain_peft_and_equals_one_process(sft, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tmp, _, _ = sft
    zero3 = load_file(tmp / "zero3/adapter/adapter_model.safetensors")
    _close_tensors(zero3, load_file(tmp / "one/adapter/adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in zero3.items())  # trained, not the zero init
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp / "zero3/adapter")
    loaded = {k.replace(".default", ""): v for k, v in model.state_dict().items() if "lora_" in k}
    _close_tensors({f"base_model.model.{k}" if not k.startswith("base_model") else k: v for k, v in zero3.items()},
                   loaded, rtol=0, atol=0)


def test_zero3_resumes_from_its_own_checkpoint(sft):
    """Steps 3 and 4 after loading checkpoint-2's partitions give the uninterrupted run's losses (fresh or wrong
    weights would not), and the resumed run never ran step 2 (it saved no checkpoint-2 of its own)."""
    tmp, _, _ = sft
    assert sorted(p.name for p in (tmp / "resumed").glob("checkpoint-*")) == ["checkpoint-4"]
    assert logged_losses(tmp / "resumed")[2:] == pytest.approx(logged_losses(tmp / "zero3")[2:], rel=1e-5)
    state = json.loads((tmp / "resumed/checkpoint-4/trainer_state.json").read_text())
    assert state["global_step"] == 4


def test_zero3_full_fine_tuning_saves_gathered_weights(tmp_path, tiny_llama):
    """Full fine-tuning under ZeRO-3: the final save gathers the partitions (zero3_save_16bit_model) into a
    model.safetensors that plain transformers reloads, equal to one process's."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "defs.jsonl", distinct_definition_rows())
    common = {"max_steps": 3, "peft_method": "full", "learning_rate": 1e-3}
    _launch(3, "sft_instruction", write_yaml(tmp_path / "z.yaml", tiny_sft_config(
        data, tmp_path / "zero3", per_device_train_batch_size=2, **common)))
    _single("sft_instruction", write_yaml(tmp_path / "o.yaml", tiny_sft_config(
        data, tmp_path / "one", per_device_train_batch_size=4, **common)))
    zero3, one = (AutoModelForCausalLM.from_pretrained(tmp_path / run / "adapter").state_dict()
                  for run in ("zero3", "one"))
    _close_tensors(zero3, one)
    start = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    assert any(not torch.equal(zero3[k], start[k]) for k in start)  # trained, not the starting weights


def test_zero2_sequence_classification_matches_one_process(tmp_path):
    """ZeRO-2 shards the optimizer state and gradients of a full fine-tuning: the same losses and weights as one
    process. (Before `hf_tuner.training.mean_loss_across_processes`, the loss and gradients of this head came out
    twice as large with 2 processes.) Dropout off: each rank draws its own masks."""
    model = dropout_free_copy("tiny-bert", tmp_path / "tiny-bert")
    vader = write_vader_folder(tmp_path / "vader")
    cfg = {"model_name_or_path": str(model), "dataset_name": str(vader), "vader_sources": ["movieReviewSnippets"],
           "eval_samples": 8, "few_shot": 0, "baseline_model": "", "max_length": 32, "peft_method": "full",
           "max_steps": 4,
           "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0}
    _launch(2, "sft_classification", write_yaml(tmp_path / "z.yaml", {
        **cfg, "output_dir": str(tmp_path / "zero2"), "per_device_train_batch_size": 4}))
    _single("sft_classification", write_yaml(tmp_path / "o.yaml", {
        **cfg, "output_dir": str(tmp_path / "one"), "per_device_train_batch_size": 8}))
    assert logged_losses(tmp_path / "zero2") == pytest.approx(logged_losses(tmp_path / "one"), rel=1e-4)
    _close_tensors(load_file(tmp_path / "zero2/model/model.safetensors"),
                   load_file(tmp_path / "one/model/model.safetensors"))
    zero2, one = _metrics(tmp_path / "zero2"), _metrics(tmp_path / "one")
    assert zero2["tuned"]["accuracy"] == one["tuned"]["accuracy"]



def test_zero3_grpo_saves_the_gathered_policy(tmp_path, tiny_llama):
    """ppo_rlhf with algorithm: grpo (TRL's GRPOTrainer) under ZeRO-3: the recipe's own policy save (rank 0 after
    every rank gathered the partitions, `hf_tuner.distributed.gathered_state_dict`) equals the Trainer's last
    checkpoint, trained away from LoRA's zero init. Before, the GRPO config lacked ddp_backend and DeepSpeed's
    batch check failed ("train_batch_size 4 != 4 * 1 * 2")."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_rl import _rl_config

    cfg = _rl_config(tmp_path, tiny_llama, algorithm="grpo", max_steps=2, num_generations=4, ppo_epochs=1,
                     per_device_train_batch_size=4, save_strategy="steps", save_steps=1)
    cfg.pop("num_threads")  # each of the 2 processes takes one core
    path = launcher_env()["PYTHONPATH"] + os.pathsep + str(ROOT / "tests")  # the reward is tests/test_rl.py's
    proc = _launch(3, "ppo_rlhf", write_yaml(tmp_path / "grpo.yaml", cfg), PYTHONPATH=path)
    assert "its CPU accelerator runs the ZeRO stage over gloo" in proc.stderr
    run = tmp_path / "run"
    policy = load_file(run / "policy/adapter_model.safetensors")
    _close_tensors(policy, load_file(run / "trl/checkpoint-2/adapter_model.safetensors"), rtol=0, atol=0)
    names = sorted(p.name for p in (run / "trl/checkpoint-2/global_step2").iterdir())
    assert names == [f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for r in (0, 1) for kind in ("model", "optim")]
    assert max(v.abs().max().item() for k, v in policy.items() if "lora_B" in k) > 0
    assert _metrics(run)["tuned"]["kl"] != 0.0
