"""Multi-process CPU training: two DDP processes over gloo train exactly as one process with the same global batch.

Runs `accelerate launch --config_file recipes/accelerate/cpu_ddp.yaml recipes/sft_instruction.py` on tiny-llama,
and the same recipe as one process with twice the per-device batch, both with $HF_TUNER_RANK_TRACE set so each
rank records its world size, the examples it was given and the files it opened from Python. Two more launches,
with checkpoints, a SIGINT on rank 1 alone and a resume, check on the file system who wrote the run folder.
"""

import json
import os
import signal
import stat
import sys
from pathlib import Path

import pytest
import torch

from conftest import (WORDS, distinct_definition_rows, free_port, launcher_env, logged_losses, run_launcher,
                      tiny_sft_config, write_jsonl, write_yaml)
from hf_tuner.config import ConfigError
from hf_tuner.distributed import TRACE_ENV, check_launch, requested_processes

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
RECIPE = str(ROOT / "recipes" / "sft_instruction.py")
CPU_DDP = str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml")
STEPS = 5


def _config(tmp: Path, name: str, batch: int, data: Path, **overrides) -> Path:
    cfg = tiny_sft_config(data, tmp / name, **{
        "per_device_train_batch_size": batch, "max_steps": STEPS,
        "lora_dropout": 0.0,  # dropout masks come from each process's own RNG: no exact match with them
        **overrides})
    return write_yaml(tmp / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("ddp")
    data = write_jsonl(tmp / "defs.jsonl", distinct_definition_rows())  # fingerprints identify rows
    ddp = run_launcher([ACCELERATE, "launch", "--config_file", CPU_DDP,
                "--main_process_port", str(free_port()), RECIPE, "--config", str(_config(tmp, "ddp", 2, data))],
               tmp / "trace-ddp")
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = run_launcher([sys.executable, RECIPE, "--config", str(_config(tmp, "single", 4, data))], tmp / "trace-single")
    assert single.returncode == 0, single.stderr[-3000:]
    again = run_launcher([sys.executable, RECIPE, "--config", str(_config(tmp, "again", 4, data))], tmp / "trace-again")
    assert again.returncode == 0, again.stderr[-3000:]
    # fsdp.yaml on CPU: accelerate drops the FSDP settings when use_cpu is on, and the recipe says so
    fsdp = run_launcher([ACCELERATE, "launch", "--config_file", str(ROOT / "recipes/accelerate/fsdp.yaml"),
                 "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
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


def test_rank_zero_alone_opens_run_files_from_python(runs):
    """The Python `open()` audit of trace_ranks. It cannot see safetensors' or torch.save's native writes: the
    file-system check below (test_only_rank_zero_writes_..._on_the_file_system) is the one that covers them."""
    tmp, (r0, r1), _ = runs
    assert r1["written"] == []
    assert {"metrics.json", "report.md", "log_history.json"} <= set(r0["written"])  # traced from training on
    assert (tmp / "ddp" / "config.yaml").is_file()
    metrics = json.loads((tmp / "ddp" / "metrics.json").read_text())
    assert metrics["train"]["steps"] == STEPS


def test_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    tmp, _, _ = runs
    ddp, single = logged_losses(tmp / "ddp"), logged_losses(tmp / "single")
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
    fsdp, single = logged_losses(tmp / "fsdp"), logged_losses(tmp / "single")
    assert len(fsdp) == STEPS
    for a, b in zip(fsdp, single):
        assert abs(a - b) <= 1e-4 * abs(b), (fsdp, single)
    assert (tmp / "fsdp" / "adapter" / "adapter_model.safetensors").is_file()


def test_same_config_and_seed_give_bit_identical_runs(runs):
    tmp, _, _ = runs
    assert logged_losses(tmp / "again") == logged_losses(tmp / "single")  # exact: two fresh processes, same seed
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
    proc = run_launcher([ACCELERATE, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
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
    path = launcher_env()["PYTHONPATH"] + os.pathsep + str(ROOT / "tests")  # the reward is in tests/test_rl.py
    for name, extra in (("a", {}), ("b", {"output_dir": str(tmp_path / "b"),
                                          "resume_from_checkpoint": str(tmp_path / "a" / "checkpoint-2")})):
        write_yaml(tmp_path / f"{name}.yaml", {**cfg, **extra})
        run = run_launcher([ACCELERATE, "launch", "--config_file", CPU_DDP, "--main_process_port", str(free_port()),
                    recipe, "--config", str(tmp_path / f"{name}.yaml")], PYTHONPATH=path)
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


# ---- who wrote the run folder, read from the file system; SIGINT on one rank; checkpoints across a resume ----
# tests/workers/rank_watch.py marks what each rank creates (its own group as root, else its own umask) and has
# rank 0 count, with inotify, every close-after-write and rename in the run folder by any process. Launch 1:
# rank 1 alone gets SIGINT during step 3 (after checkpoint-2); both ranks must stop after step 3 and save
# checkpoint-3. Launch 2 resumes it to step 4 (checkpoint-4, then the final adapter and the report).

WATCH = str(ROOT / "tests" / "workers" / "rank_watch.py")
WATCH_STEPS = 4
SIGNAL_STEP = 3
CHECKPOINTS = {"stopped": (2, 3), "resumed": (4,)}  # save_steps 2, and the step the signal stopped at
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


@pytest.fixture(scope="module")
def watched(tmp_path_factory, tiny_llama):
    tmp = tmp_path_factory.mktemp("rank-writes")
    data = write_jsonl(tmp / "defs.jsonl", distinct_definition_rows())
    config = _config(tmp, "run", 2, data, max_steps=WATCH_STEPS, save_strategy="steps", save_steps=2)
    out = tmp / "run"
    out.mkdir()  # watched from the start (an empty folder is not an occupied one)
    launches = {}
    for name, extra, env in (("stopped", [], {"HF_TUNER_TEST_SIGINT": f"1:{SIGNAL_STEP}"}),
                             ("resumed", ["--resume_from_checkpoint", "latest"], {})):
        record = tmp / f"record-{name}"
        proc = run_launcher([ACCELERATE, "launch", "--config_file", CPU_DDP, "--main_process_port", str(free_port()),
                     WATCH, RECIPE, "--config", str(config), *extra],
                    HF_TUNER_WATCH_DIR=str(out), HF_TUNER_WATCH_RECORD=str(record), OMP_NUM_THREADS="1", **env)
        ranks = [json.loads((record / f"rank{r}.json").read_text()) if (record / f"rank{r}.json").is_file() else None
                 for r in (0, 1)]
        assert all(ranks), f"{name}: a rank left no record\n{proc.stderr[-3000:]}"
        launches[name] = proc, ranks
    return out, launches


def test_sigint_on_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(watched):
    out, launches = watched
    proc, ranks = launches["stopped"]
    assert [r["exit_status"] for r in ranks] == [128 + signal.SIGINT] * 2, proc.stderr[-3000:]
    # only rank 1 took the signal; rank 0 learnt of it through the all-reduce and stopped after the same step
    assert proc.stdout.count("SIGINT received: saving a checkpoint after this step") == 1, proc.stdout[-2000:]
    stopped = f"SIGINT received: stopped at step {SIGNAL_STEP}, checkpoint saved to {out / f'checkpoint-{SIGNAL_STEP}'}"
    assert proc.stderr.count(stopped) == 2, proc.stderr[-3000:]  # each rank names the checkpoint rank 0 finished
    assert "resume with: accelerate launch" in proc.stderr
    written = set(ranks[0]["counts"])
    assert f"checkpoint-{SIGNAL_STEP}/trainer_state.json" in written  # saved by the stop, before the exit
    assert not any(p.startswith(("checkpoint-4", "adapter", "metrics")) for p in written)  # and nothing after it

    proc, ranks = launches["resumed"]
    assert proc.returncode == 0 and [r["exit_status"] for r in ranks] == [0, 0], proc.stderr[-3000:]
    assert f"resuming from {out / f'checkpoint-{SIGNAL_STEP}'}" in proc.stdout
    history = json.loads((out / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == list(range(1, WATCH_STEPS + 1))


def _creator(path: Path, ranks: list[dict]) -> int | None:
    """The rank whose mark the file or folder carries (None: no rank's, or it cannot be told)."""
    st = path.stat()
    if ranks[0]["by"] == "gid":
        return next((r["rank"] for r in ranks if r["gid"] == st.st_gid), None)
    if not st.st_mode & 0o600 == 0o600:
        return None
    if st.st_mode & 0o077 == 0:
        return None  # created with an explicit 0600 (safetensors' temporary file): either rank's
    return 0 if st.st_mode & stat.S_IROTH else 1


def _writes(seen: dict) -> int:
    """Writes of one file: a close after writing, or a rename onto it (safetensors renames its temporary file
    while still open, so its one write is both)."""
    return max(seen["close_write"], seen["moved_to"])


def test_only_rank_zero_writes_the_run_folder_checked_on_the_file_system(watched):
    """Every file of the run folder, as the kernel saw it: created by rank 0 and written once (or as many times
    as rank 0 writes it), except rank 1's own RNG state in each checkpoint (Trainer saves one per rank). Native
    writers (safetensors, torch.save) are seen as well as Python's."""
    out, launches = watched
    records = {name: ranks for name, (_, ranks) in launches.items()}
    assert all(not r[0]["overflow"] and r[0]["watched_late"] == [] for r in records.values())  # no event lost
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    folders = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_dir())
    every_checkpoint = [n for ns in CHECKPOINTS.values() for n in ns]
    rank1_own = {f"checkpoint-{n}/rng_state_1.pth" for n in every_checkpoint}

    # who created what: rank 1 its RNG files (and, first to get there, maybe a checkpoint folder), rank 0 the rest
    ranks = records["resumed"]
    creators = {f: _creator(out / f, ranks) for f in files}
    assert {f for f, r in creators.items() if r == 1} == rank1_own, creators  # the mark works: rank 1's are seen
    unknown = sorted(f for f, r in creators.items() if r is None)
    if ranks[0]["by"] == "gid":
        assert not unknown, unknown
    else:  # without root, a 0600 file cannot be told apart: only safetensors files are made so
        assert all(f.endswith(".safetensors") for f in unknown), unknown
    assert {d for d in folders if _creator(out / d, ranks) == 1} <= {f"checkpoint-{n}" for n in every_checkpoint}

    # how often: once, but config.yaml each launch, the model card TRL rewrites at each checkpoint, and the
    # adapter's tokenizer files that the recipe saves again after Trainer.save_model saved them
    for name, (_, ranks) in launches.items():
        counts = {f: _writes(seen) for f, seen in ranks[0]["counts"].items()}
        assert set(counts) <= set(files), sorted(set(counts) - set(files))  # no temporary or deleted file
        expected = {"config.yaml": 1, "README.md": len(CHECKPOINTS[name])}
        if name == "resumed":
            expected.update({f"adapter/{t}": 2 for t in TOKENIZER_FILES})
        wrong = {f: n for f, n in counts.items() if n != expected.get(f, 1) and f not in rank1_own}
        wrong.update({f: n for f, n in counts.items() if f in rank1_own and n > 1})
        assert not wrong, (name, wrong)
    launched = [set(r[0]["counts"]) for r in records.values()]
    twice = (launched[0] & launched[1]) - {"config.yaml", "README.md"}
    assert not twice, twice  # the resumed launch rewrote nothing of the stopped one
    assert set(files) - launched[0] - launched[1] <= rank1_own  # no file was written unseen

    # no per-rank duplicates and no half-written checkpoint: each one complete, the same files, loadable
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_tuner import assets
    from hf_tuner.checkpoints import is_complete

    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("checkpoint", "incomplete"))) == \
        [f"checkpoint-{n}" for n in every_checkpoint]
    contents = {n: sorted(p.name for p in (out / f"checkpoint-{n}").iterdir()) for n in every_checkpoint}
    assert all(c == contents[2] for c in contents.values()), contents
    assert [f for f in contents[2] if any(ch.isdigit() for ch in f)] == ["rng_state_0.pth", "rng_state_1.pth"]
    assert not [f for f in files if (out / f).stat().st_size == 0], "an empty file"
    base = assets.resolve("tiny-llama")
    for n in every_checkpoint:
        folder = out / f"checkpoint-{n}"
        assert is_complete(folder)
        assert json.loads((folder / "trainer_state.json").read_text())["global_step"] == n
        torch.load(folder / "optimizer.pt", weights_only=True)
        for r in (0, 1):
            torch.load(folder / f"rng_state_{r}.pth", weights_only=False)
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), folder)
    final, last = (load_file(str(d / "adapter_model.safetensors")) for d in (out / "adapter", out / "checkpoint-4"))
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
