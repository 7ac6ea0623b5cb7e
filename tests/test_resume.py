"""Faults: a run killed with SIGKILL resumes from its last complete checkpoint and ends where an uninterrupted
run ends; a half-written checkpoint is never picked; SIGTERM saves a checkpoint and exits saying how to resume;
SIGINT finishes the step and saves, and a second SIGINT stops at once. (Ranks agreeing on the stop step:
tests/test_distributed.py.)"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import distinct_definition_rows, subprocess_env, tiny_sft_config, write_jsonl, write_yaml
from hf_tuner.checkpoints import is_complete, last_complete_checkpoint, resolve_resume
from hf_tuner.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "sft_instruction.py")
STEPS = 24


def _config(tmp: Path, data: Path, method: str) -> Path:
    cfg = tiny_sft_config(data, tmp / "run", max_steps=STEPS, peft_method=method, save_strategy="steps",
                          save_steps=4, num_threads=1)
    return write_yaml(tmp / "config.yaml", cfg)


def _cmd(config: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, RECIPE, "--config", str(config), "--output_dir", str(out), *extra]


def _env() -> dict:
    return subprocess_env()


def _kill_after_checkpoint(cmd: list[str], out: Path, step: int) -> int:
    """Start the run, SIGKILL it as soon as checkpoint-<step> is complete; return the exit status."""
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if is_complete(out / f"checkpoint-{step}"):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    return proc.returncode


def _final_state(out: Path, weights: str) -> tuple[list[float], dict]:
    history = json.loads((out / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h], load_file(out / "adapter" / weights)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume-data")
    return write_jsonl(tmp / "defs.jsonl", distinct_definition_rows())


WEIGHTS = {"lora": "adapter_model.safetensors", "full": "model.safetensors"}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_llama, data):
    """method -> (config, run folder) of a run that was never stopped, made once per method."""
    made = {}

    def run(method: str):
        if method not in made:
            tmp = tmp_path_factory.mktemp(f"whole-{method}")
            config = _config(tmp, data, method)
            done = subprocess.run(_cmd(config, tmp / "whole"), env=_env(), cwd=ROOT, capture_output=True, text=True,
                                  timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            made[method] = config, tmp / "whole"
        return made[method]

    return run


def _resume_and_compare(config: Path, broken: Path, whole: Path, method: str) -> str:
    again = subprocess.run(_cmd(config, broken, "--resume_from_checkpoint", "latest"), env=_env(), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    losses, tensors = _final_state(whole, WEIGHTS[method])
    resumed_losses, resumed_tensors = _final_state(broken, WEIGHTS[method])
    assert len(resumed_losses) == len(losses) == STEPS
    assert resumed_losses[-1] == pytest.approx(losses[-1], rel=1e-5, abs=1e-5)
    assert resumed_tensors.keys() == tensors.keys()
    for name, t in tensors.items():
        torch.testing.assert_close(resumed_tensors[name], t, rtol=1e-5, atol=1e-5, msg=name)
    return again.stdout


@pytest.mark.parametrize("method", ["lora", "full"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, uninterrupted, method):
    config, whole = uninterrupted(method)
    broken = tmp_path / "broken"
    assert _kill_after_checkpoint(_cmd(config, broken), broken, 8) == -signal.SIGKILL
    assert not (broken / "adapter").exists(), "the run finished before it was killed"
    resumed_from = last_complete_checkpoint(broken)
    assert resumed_from is not None and int(resumed_from.name.split("-")[1]) < STEPS
    stdout = _resume_and_compare(config, broken, whole, method)
    assert f"resuming from {resumed_from}" in stdout


# Runs a recipe with Trainer's RNG-state save replaced by a SIGKILL at one step: the process dies inside a
# checkpoint save, after the weights and optimizer are written and before the RNG and trainer states are.
KILL_DURING_SAVE = """
import os, runpy, signal, sys
from transformers import Trainer
original = Trainer._save_rng_state
def dying(self, output_dir):
    if self.state.global_step == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, output_dir)
Trainer._save_rng_state = dying
sys.argv[0] = {recipe!r}
runpy.run_path({recipe!r}, run_name="__main__")
"""


def test_a_kill_during_a_checkpoint_save_leaves_the_previous_one_usable(tmp_path, uninterrupted):
    config, whole = uninterrupted("lora")
    script = tmp_path / "die_while_saving.py"
    script.write_text(KILL_DURING_SAVE.format(step=8, recipe=RECIPE))
    broken = tmp_path / "broken"
    proc = subprocess.run([sys.executable, str(script), *_cmd(config, broken)[2:]], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    half = broken / "checkpoint-8"
    assert (half / WEIGHTS["lora"]).exists() and not is_complete(half)  # died mid-save
    assert last_complete_checkpoint(broken) == broken / "checkpoint-4"
    stdout = _resume_and_compare(config, broken, whole, "lora")
    assert f"resuming from {broken / 'checkpoint-4'}" in stdout
    assert (broken / "incomplete-checkpoint-8" / WEIGHTS["lora"]).exists(), "the half-written save is kept aside"


def _fake_checkpoint(folder: Path, step: int, weights: bool = True, state: str | None = None) -> Path:
    folder.mkdir(parents=True)
    if weights:
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    if state is not None:
        (folder / "trainer_state.json").write_text(state)
    return folder


def test_half_written_checkpoints_are_never_picked(tmp_path):
    out = tmp_path / "run"
    good = _fake_checkpoint(out / "checkpoint-4", 4, state=json.dumps({"global_step": 4}))
    _fake_checkpoint(out / "checkpoint-8", 8, state='{"global_step": 8, "log_hist')  # killed writing the state
    _fake_checkpoint(out / "checkpoint-12", 12, weights=False)  # killed writing the weights
    _fake_checkpoint(out / "checkpoint-16", 16, state=json.dumps({"global_step": 4}))  # copied by hand: wrong step
    assert last_complete_checkpoint(out) == good

    class Args:
        resume_from_checkpoint = "latest"

    class Run:
        resume = "never"

    assert resolve_resume(Args, Run, out) == str(good)
    Args.resume_from_checkpoint = str(out / "checkpoint-8")
    with pytest.raises(ConfigError, match="checkpoint-8 is not a complete checkpoint"):
        resolve_resume(Args, Run, out)
    Args.resume_from_checkpoint = None
    assert resolve_resume(Args, Run, out) is None  # resume: never
    Run.resume = "auto"
    assert resolve_resume(Args, Run, out) == str(good)
    assert resolve_resume(Args, Run, tmp_path / "empty") is None  # auto with nothing to resume: start fresh
    Args.resume_from_checkpoint = "latest"
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        resolve_resume(Args, Run, tmp_path / "empty")


def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(tmp_path, tiny_llama, data):
    config = _config(tmp_path, data, "lora")
    out = tmp_path / "stopped"
    cmd = _cmd(config, out)
    proc = subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not is_complete(out / "checkpoint-4") and proc.poll() is None:
        time.sleep(0.02)  # training is under way
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    saved = last_complete_checkpoint(out)
    assert saved is not None, stderr[-3000:]
    step = int(saved.name.split("-")[1])
    assert 0 < step < STEPS
    assert f"SIGTERM received: stopped at step {step}, checkpoint saved to {saved}" in stderr
    assert "resume with: accelerate launch" in stderr and "--resume_from_checkpoint latest" in stderr
    assert "Traceback" not in stderr

    again = subprocess.run(cmd + ["--resume_from_checkpoint", "latest"], env=_env(), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h][-1] == STEPS


# ---- SIGINT in process: the first signal finishes the step, saves and stops; the second stops at once ----

def _signalling_trainer(tmp_path, tiny_llama, at_step: int, times: int):
    """A plain Trainer on tiny-llama for 8 steps (no periodic checkpoints) that sends itself `times` SIGINTs
    at the start of step `at_step`, as a user's Ctrl-C (once, or twice in a row) would arrive."""
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    class SignalDuring(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == at_step - 1:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)

    torch.manual_seed(0)
    ids = torch.randint(5, 200, (16, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[], max_steps=8,
                             per_device_train_batch_size=2, save_strategy="no", logging_steps=1, learning_rate=1e-3)
    return Trainer(model=AutoModelForCausalLM.from_pretrained(tiny_llama), args=args,
                   train_dataset=[{"input_ids": r, "labels": r} for r in ids], callbacks=[SignalDuring()])


class _Run:
    resume = "never"


def test_sigint_finishes_the_step_saves_a_checkpoint_and_stops(tmp_path, tiny_llama, capsys):
    from hf_tuner.checkpoints import RunInterrupted, train_resumable

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = _signalling_trainer(tmp_path, tiny_llama, at_step=3, times=1)
    with pytest.raises(RunInterrupted) as stopped:
        train_resumable(trainer, _Run, tmp_path / "out")
    saved = tmp_path / "out" / "checkpoint-3"
    assert (stopped.value.signum, stopped.value.step, stopped.value.checkpoint) == (signal.SIGINT, 3, saved)
    assert stopped.value.exit_code == 130
    assert str(stopped.value) == f"SIGINT received: stopped at step 3, checkpoint saved to {saved}"
    assert "saving a checkpoint after this step, then stopping" in capsys.readouterr().out
    assert trainer.state.global_step == 3 and is_complete(saved)  # the step in progress finished, then the save
    assert json.loads((saved / "trainer_state.json").read_text())["global_step"] == 3
    reloaded = load_file(saved / "model.safetensors")
    for name, p in trainer.model.state_dict().items():
        if name in reloaded:
            assert torch.equal(reloaded[name], p), name
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # handlers given back


def test_a_second_sigint_stops_at_once_without_saving(tmp_path, tiny_llama):
    from hf_tuner.checkpoints import train_resumable

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    trainer = _signalling_trainer(tmp_path, tiny_llama, at_step=3, times=2)
    with pytest.raises(KeyboardInterrupt):
        train_resumable(trainer, _Run, tmp_path / "out")
    assert trainer.state.global_step == 2  # step 3 never finished
    assert not list((tmp_path / "out").glob("checkpoint-*"))
    # neither signal is left with the stopped run's handler (in a notebook, a later SIGTERM must still end it)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
