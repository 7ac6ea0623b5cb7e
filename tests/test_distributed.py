"""Multi-process CPU training: two DDP processes over gloo train exactly as one process with the same global batch.

Runs `accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml recipes/sft_instruction.py` on tiny-llama,
and the same recipe as one process with twice the per-device batch, both with $HF_TUNER_RANK_TRACE set so each
rank records its world size, the examples it was given and the files it wrote.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import WORDS, subprocess_env, write_jsonl
from hf_tuner.config import ConfigError
from hf_tuner.distributed import TRACE_ENV, check_launch, requested_processes

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
RECIPE = str(ROOT / "recipes" / "sft_instruction.py")
STEPS = 5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, name: str, batch: int, data: Path) -> Path:
    cfg = {"model_name_or_path": "tiny-llama", "dataset_name": str(data), "output_dir": str(tmp / name),
           "eval_samples": 2, "few_shot": 0, "evaluate_base": False, "eval_batch_size": 2, "eval_max_new_tokens": 2,
           "per_device_train_batch_size": batch, "max_steps": STEPS, "learning_rate": 5e-3, "lora_r": 8,
           "lora_dropout": 0.0,  # dropout masks come from each process's own RNG: no exact match with them
           "max_length": 64, "logging_steps": 1, "save_strategy": "no", "report_to": [],
           "gradient_checkpointing": False, "bf16": False, "seed": 0, "report_examples": 1}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cmd: list[str], trace: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({TRACE_ENV: str(trace), "PYTHONPATH": subprocess_env()["PYTHONPATH"]})
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)


def _losses(run_dir: Path) -> list[float]:
    return [h["loss"] for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("ddp")
    rows = [{"prompt": f"Define the word '{w}' ({i}).", "completion": f"a kind of {w} used in room {i}"}
            for i, w in enumerate(WORDS * 3)]  # every row distinct, so fingerprints identify rows
    data = write_jsonl(tmp / "defs.jsonl", rows)
    ddp = _run([ACCELERATE, "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_ddp.yaml"),
                "--main_process_port", str(_free_port()), RECIPE, "--config", str(_config(tmp, "ddp", 2, data))],
               tmp / "trace-ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = _run([sys.executable, RECIPE, "--config", str(_config(tmp, "single", 4, data))], tmp / "trace-single")
    assert single.returncode == 0, single.stderr[-3000:]
    again = _run([sys.executable, RECIPE, "--config", str(_config(tmp, "again", 4, data))], tmp / "trace-again")
    assert again.returncode == 0, again.stderr[-3000:]
    # fsdp.yaml on CPU: accelerate drops the FSDP settings when use_cpu is on, and the recipe says so
    fsdp = _run([ACCELERATE, "launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml"),
                 "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(_free_port()),
                 RECIPE, "--config", str(_config(tmp, "fsdp", 2, data))], tmp / "trace-fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert "FSDP was asked for, but there is no CUDA" in fsdp.stderr
    read = lambda d, r: json.loads((tmp / d / f"rank{r}.json").read_text())  # noqa: E731
    return tmp, [read("trace-ddp", 0), read("trace-ddp", 1)], read("trace-single", 0)


def test_two_processes_form_one_world(runs):
    _, (r0, r1), single = runs
    assert (r0["rank"], r1["rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["torch_world_size"] == r1["torch_world_size"] == 2  # one process group, not two copies
    assert r0["distributed_type"] == r1["distributed_type"] == "MULTI_CPU"  # accelerate's name for CPU DDP
    assert single["world_size"] == single["torch_world_size"] == 1


def test_ranks_see_disjoint_data_that_makes_up_the_global_batch(runs):
    _, (r0, r1), single = runs
    # the dataloaders may collate one batch ahead of the step that uses it: look at the first STEPS
    assert min(len(r0["batches"]), len(r1["batches"]), len(single["batches"])) >= STEPS
    seen0 = {h for b in r0["batches"][:STEPS] for h in b}
    seen1 = {h for b in r1["batches"][:STEPS] for h in b}
    assert len(seen0) == len(seen1) == 2 * STEPS
    assert not seen0 & seen1
    for step in range(STEPS):  # each global batch is the single process's batch at the same step
        assert set(r0["batches"][step]) | set(r1["batches"][step]) == set(single["batches"][step]), step


def test_rank_zero_alone_writes_the_run_folder(runs):
    tmp, (r0, r1), _ = runs
    assert r1["written"] == []
    assert {"metrics.json", "report.md", "log_history.json"} <= set(r0["written"])  # traced from training on
    assert (tmp / "ddp" / "config.yaml").is_file()
    metrics = json.loads((tmp / "ddp" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == STEPS


def test_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    tmp, _, _ = runs
    ddp, single = _losses(tmp / "ddp"), _losses(tmp / "single")
    assert len(ddp) == len(single) == STEPS
    for a, b in zip(ddp, single):
        assert abs(a - b) <= 1e-4 * abs(b), (ddp, single)
    assert ddp[-1] < ddp[0]  # and it trains


def test_fsdp_config_on_cpu_runs_as_ddp_and_matches_one_process(runs):
    tmp, _, _ = runs
    traces = [json.loads((tmp / "trace-fsdp" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [t["distributed_type"] for t in traces] == ["MULTI_CPU", "MULTI_CPU"]  # not sharded: no CUDA
    assert [t["torch_world_size"] for t in traces] == [2, 2]
    assert traces[1]["written"] == []
    fsdp, single = _losses(tmp / "fsdp"), _losses(tmp / "single")
    assert len(fsdp) == STEPS
    for a, b in zip(fsdp, single):
        assert abs(a - b) <= 1e-4 * abs(b), (fsdp, single)
    assert (tmp / "fsdp" / "adapter" / "adapter_model.safetensors").is_file()


def test_same_config_and_seed_give_bit_identical_runs(runs):
    tmp, _, _ = runs
    assert _losses(tmp / "again") == _losses(tmp / "single")  # exact: two fresh processes, same seed
    grads = lambda d: [h["grad_norm"] for h in json.loads((tmp / d / "log_history.json").read_text())  # noqa: E731
                       if "grad_norm" in h]
    assert grads("again") == grads("single")


def test_cpu_flag_with_several_processes_is_refused(tmp_path, tiny_llama, monkeypatch):
    argv = ["/venv/bin/python", "/venv/bin/accelerate", "launch", "--cpu", "--num_processes", "2", "r.py"]
    assert requested_processes(argv) == 2
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match="--multi_gpu --num_processes N"):
        check_launch(argv)
    monkeypatch.setenv("WORLD_SIZE", "2")
    check_launch(argv)  # the processes did start
    assert requested_processes(["/venv/bin/python", "train.py"]) is None  # not under accelerate launch

    # end to end: the recipe exits with status 2 and says how to launch, before loading anything
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "completion": "a"} for i in range(8)])
    proc = _run([ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no", RECIPE,
                 "--config", str(_config(tmp_path, "one", 2, data))], tmp_path / "trace")
    # the recipe exits 2 with one line; accelerate's launcher then reports that with its own traceback
    assert proc.returncode != 0 and "returned non-zero exit status 2" in proc.stderr, proc.stderr[-2000:]
    assert "asked for 2 processes but this process sees world size 1" in proc.stderr
    assert 'sft_instruction.py", line' not in proc.stderr  # no traceback from the recipe itself
    assert not (tmp_path / "one").exists()


def test_ppo_two_processes_resume_from_a_checkpoint_repeats_the_run(tmp_path, tiny_llama):
    """Our PPO loop under cpu_ddp.yaml: each rank saves its own RNG state and prompt order into checkpoint-2;
    a new 2-process run resumed from it ends with the same per-step statistics and adapter weights."""
    prompts = [{"prompt": f"the {w} was {i}"} for i in range(5) for w in WORDS[:8]]
    data = write_jsonl(tmp_path / "prompts.jsonl", prompts)
    cfg = {"model_name_or_path": "tiny-llama", "dataset_name": str(data), "output_dir": str(tmp_path / "a"),
           "reward_model": "test_rl:length_reward", "eval_samples": 8, "peft_method": "lora", "lora_r": 8,
           "lora_target_modules": ["all-linear"], "per_device_train_batch_size": 4, "max_steps": 4,
           "learning_rate": 3e-3, "response_length": 8, "temperature": 1.0, "ppo_epochs": 2, "num_mini_batches": 2,
           "eval_batch_size": 8, "report_to": [], "bf16": False, "seed": 0, "num_threads": 1,
           "save_strategy": "steps", "save_steps": 2}
    recipe = str(ROOT / "recipes" / "ppo_rlhf.py")
    env = {k: v for k, v in subprocess_env().items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env["PYTHONPATH"] += os.pathsep + str(ROOT / "tests")  # the reward function lives in tests/test_rl.py
    for name, extra in (("a", {}), ("b", {"output_dir": str(tmp_path / "b"),
                                          "resume_from_checkpoint": str(tmp_path / "a" / "checkpoint-2")})):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**cfg, **extra}))
        run = subprocess.run([ACCELERATE, "launch", "--config_file", str(ROOT / "recipes/accelerate/cpu_ddp.yaml"),
                              "--main_process_port", str(_free_port()), recipe, "--config",
                              str(tmp_path / f"{name}.yaml")], env=env, capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = tmp_path / "a" / "checkpoint-2"
    assert {p.name for p in checkpoint.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    orders = [json.loads((checkpoint / f"loop_state_{r}.json").read_text())["order"] for r in (0, 1)]
    assert not set(orders[0]) & set(orders[1])  # each rank rolls out its own share of the prompts
    from safetensors.torch import load_file

    history = [json.loads((tmp_path / n / "rl_history.json").read_text()) for n in ("a", "b")]
    assert len(history[0]) == len(history[1]) == 4
    for ra, rb in zip(*history):
        for k in ("reward", "kl", "pg_loss", "vf_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["step"], k)
    wa, wb = (load_file(str(tmp_path / n / "policy" / "adapter_model.safetensors")) for n in ("a", "b"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-7)
