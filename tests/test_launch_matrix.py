"""Every recipe under every launcher a CPU can run for real (issue 19): `cpu_ddp.yaml` (DDP over gloo) and
`deepspeed_zero2.yaml` / `deepspeed_zero3.yaml` (DeepSpeed's CPU accelerator), 2 processes each.

Each cell launches the recipe for 4 steps on tiny models with a checkpoint at step 2, then launches it again
resumed from that checkpoint, and checks what a user relies on:
- both ranks ran the engine the config names, in one world of 2 (the rank trace);
- the saved model or adapter reloads with plain transformers / PEFT, every tensor whole (a ZeRO-3 save that
  skipped the gather writes empty ones) and trained away from where it started;
- the resumed launch takes up at step 3 and logs the uninterrupted run's losses for steps 3 and 4.

30-75 s a cell (two launches), about 20 minutes in all: behind the `launchers` marker, `make test-launchers`
(not in `make test`).
The cells `make test` already covers elsewhere (sft_instruction under DDP and ZeRO-3, sft_classification under
ZeRO-2, GRPO under ZeRO-3, our PPO) are not repeated. docs/scale-out.md's matrix records the outcome.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import (distinct_definition_rows, dropout_free_copy, free_port, launcher_env,
                      run_launcher, tiny_sft_config, write_jsonl, write_vader_folder, write_yaml)

pytestmark = pytest.mark.launchers
pytest.importorskip("deepspeed", reason="make install takes hf-tuner[deepspeed]")

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"
sys.path.insert(0, str(TESTS))
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
LAUNCHERS = {"ddp": ("cpu_ddp.yaml", "MULTI_CPU"), "zero2": ("deepspeed_zero2.yaml", "DEEPSPEED"),
             "zero3": ("deepspeed_zero3.yaml", "DEEPSPEED")}
# 4 steps, a checkpoint at 2, fp32, a loss every step; each process takes one of the two cores
RUN = {"max_steps": 4, "save_strategy": "steps", "save_steps": 2, "logging_steps": 1, "report_to": [], "bf16": False,
       "seed": 0}


def _tiny_bert(tmp: Path) -> str:
    return str(dropout_free_copy("tiny-bert", tmp / "tiny-bert"))  # resumed ranks must draw no fresh masks


def _sft_instruction(tmp):
    data = write_jsonl(tmp / "defs.jsonl", distinct_definition_rows())
    return "sft_instruction", tiny_sft_config(data, tmp / "run", per_device_train_batch_size=2, lora_dropout=0.0), \
        "adapter", "peft-causal"


def _sft_classification(tmp):
    from test_sft_classification import _config

    cfg = _config(tmp, write_vader_folder(tmp / "vader"), model_name_or_path=_tiny_bert(tmp), baseline_model="",
                  few_shot=0, vader_sources=["movieReviewSnippets"], eval_samples=8, per_device_train_batch_size=4)
    return "sft_classification", cfg, "model", "sequence-classification"


def _multitask(tmp):
    from test_multitask import _config

    cfg = _config(tmp, write_vader_folder(tmp / "vader"), model_name_or_path=_tiny_bert(tmp), eval_samples=8,
                  per_device_train_batch_size=4)
    return "multitask", cfg, "model", "multitask"


def _reward_model(tmp):
    from test_reward_model import _toy_pairs

    cfg = {"model_name_or_path": _tiny_bert(tmp), "dataset_name": str(write_jsonl(tmp / "p.jsonl", _toy_pairs(48))),
           "output_dir": str(tmp / "run"), "eval_samples": 8, "peft_method": "full", "max_length": 32,
           "per_device_train_batch_size": 4, "learning_rate": 1e-3, "gradient_checkpointing": False}
    return "reward_model", cfg, "model", "sequence-classification"


def _seq2seq(tmp):
    from test_seq2seq import _config

    data = write_jsonl(tmp / "defs.jsonl", distinct_definition_rows(1))
    cfg = _config(tmp, data, per_device_train_batch_size=4, eval_strategy="no", eval_max_new_tokens=4)
    return "seq2seq", cfg, "model", "seq2seq"


def _continued_pretraining(tmp):
    from test_continued_pretraining import GENERAL, _config

    general = tmp / "general"
    general.mkdir()
    for i, text in enumerate(GENERAL * 3):
        (general / f"dialogue{i}.txt").write_text(text)
    cfg = _config(tmp, general, peft_method="full", learning_rate=3e-3, per_device_train_batch_size=4,
                  train_samples=48, eval_samples=8)
    return "continued_pretraining", cfg, "model", "causal"


def _pretrain(tmp):
    from test_pretrain import _config

    cfg = _config(tmp, per_device_train_batch_size=4, train_samples=64, eval_samples=8, tokenizer_sweep=[])
    return "pretrain", cfg, "model", "causal-from-scratch"


def _contrastive(tmp):
    from test_contrastive import FILLERS, NOUNS, _config

    rows = [{"query": w, "passage": f"{w} : {FILLERS[i % 4]} , called {w}", "group": w} for i, w in enumerate(NOUNS)]
    cfg = _config(tmp, write_jsonl(tmp / "pairs.jsonl", rows), model_name_or_path=_tiny_bert(tmp),
                  per_device_train_batch_size=8, eval_samples=8)
    return "contrastive", cfg, "model", "encoder"


def _grounded_sft(tmp):
    from test_grounded_sft import COLOURS, THINGS, _config

    kb = tmp / "kb"
    kb.mkdir()
    rows = []
    for i, thing in enumerate(THINGS):
        (kb / f"{thing}.txt").write_text(f"The {thing} is a {COLOURS[i % len(COLOURS)]} machine.\n")
        rows += [{"question": f"What is the {thing}?", "answer": f"a {COLOURS[i % len(COLOURS)]} machine", "group": thing}]
    cfg = _config(tmp, (write_jsonl(tmp / "qa.jsonl", rows), kb), per_device_train_batch_size=2, eval_samples=2,
                  eval_topics=2, eval_max_new_tokens=2, lora_dropout=0.0)
    return "grounded_sft", cfg, "adapter", "peft-causal"


def _dpo(tmp):
    from test_rl import PROMPTS

    from hf_tuner import assets

    pairs = [{"prompt": p, "chosen": " great fun", "rejected": " dull and slow"} for p in PROMPTS * 3]
    cfg = {"model_name_or_path": assets.resolve("tiny-llama"), "dataset_name": str(write_jsonl(tmp / "p.jsonl", pairs)),
           "output_dir": str(tmp / "run"), "reward_model": "test_rl:length_reward", "eval_samples": 4,
           "peft_method": "lora", "lora_dropout": 0.0, "lora_target_modules": ["all-linear"], "response_length": 4,
           "max_length": 32, "per_device_train_batch_size": 2, "learning_rate": 1e-2, "gradient_checkpointing": False,
           "eval_batch_size": 4}
    return "dpo", cfg, "policy", "peft-causal"


def _online(algorithm):
    def build(tmp):
        from test_rl import _rl_config

        from hf_tuner import assets

        cfg = _rl_config(tmp, assets.resolve("tiny-llama"), algorithm=algorithm, num_generations=4, ppo_epochs=1,
                         per_device_train_batch_size=4, lora_dropout=0.0, eval_samples=4)
        return "ppo_rlhf", cfg, "policy", "peft-causal"
    return build


CASES = {"sft_instruction": _sft_instruction, "sft_classification": _sft_classification, "multitask": _multitask,
         "reward_model": _reward_model, "seq2seq": _seq2seq, "continued_pretraining": _continued_pretraining,
         "pretrain": _pretrain, "contrastive": _contrastive, "grounded_sft": _grounded_sft, "dpo": _dpo,
         "grpo": _online("grpo"), "rloo": _online("rloo")}
COVERED_ELSEWHERE = {("sft_instruction", "ddp"): "test_distributed.py", ("sft_instruction", "zero3"): "test_deepspeed_cpu.py",
                     ("sft_classification", "zero2"): "test_deepspeed_cpu.py", ("grpo", "zero3"): "test_deepspeed_cpu.py"}
CELLS = [(case, launcher) for case in CASES for launcher in LAUNCHERS if (case, launcher) not in COVERED_ELSEWHERE]


def _launch(launcher: str, recipe: str, cfg: dict, path: Path, trace: Path):
    config_file, _ = LAUNCHERS[launcher]
    cmd = [ACCELERATE, "launch", "--config_file", str(ROOT / "recipes" / "accelerate" / config_file),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(ROOT / "recipes" / f"{recipe}.py"), "--config", str(write_yaml(path, cfg))]
    pythonpath = launcher_env()["PYTHONPATH"] + os.pathsep + str(TESTS)  # rewards named test_rl:...
    proc = run_launcher(cmd, trace, timeout=500, PYTHONPATH=pythonpath)
    # the ranks' own errors (a recipe's "error: ..." line, a traceback's last lines), not the launcher's summary
    errors = [line for line in proc.stderr.splitlines() if "error:" in line.lower() or "Error:" in line]
    assert proc.returncode == 0, "\n".join(errors[:12]) or proc.stderr[-4000:]
    return proc


def _checkpoints(run: Path) -> dict[str, Path]:
    """checkpoint-N folders of a run (the RL recipes keep TRL's under trl/)."""
    return {p.name: p for p in run.rglob("checkpoint-*") if p.is_dir()}


def _losses(checkpoint: Path) -> list[float]:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _whole_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.rglob("*.safetensors"))
    assert files, f"{folder} holds no weights"
    tensors = {f"{f.relative_to(folder)}:{k}": v for f in files for k, v in load_file(f).items()}
    empty = [k for k, v in tensors.items() if not v.numel()]
    assert not empty, f"empty tensors (saved without gathering): {empty[:5]}"
    return tensors


def _trained_away_from(saved: dict[str, torch.Tensor], start_dir: Path) -> None:
    """Some tensor the starting checkpoint holds came back changed (heads it lacks, initialised at load, do not
    count)."""
    start = {k: v for f in sorted(start_dir.glob("*.safetensors")) for k, v in load_file(f).items()}
    pairs = []
    for key, tensor in saved.items():
        name = key.split(":", 1)[-1]
        match = next((start[n] for n in (name, f"bert.{name}", name.removeprefix("bert.")) if n in start), None)
        if match is not None and match.shape == tensor.shape:
            pairs.append((tensor, match))
    assert pairs, f"no tensor of {start_dir} found in the saved model"
    assert any(not torch.equal(a, b) for a, b in pairs), "the saved weights are the starting ones"


def _check_reload(kind: str, saved: Path, cfg: dict) -> None:
    """The saved model reloads with plain transformers / PEFT, and is trained away from its start."""
    import transformers
    from peft import AutoPeftModelForCausalLM

    from hf_tuner import assets

    tensors = _whole_tensors(saved)
    if kind == "peft-causal":
        model = AutoPeftModelForCausalLM.from_pretrained(saved)
        lora_b = [v for k, v in model.state_dict().items() if "lora_B" in k]
        assert lora_b and max(v.abs().max().item() for v in lora_b) > 0, "adapter still at LoRA's zero init"
        return
    auto = {"sequence-classification": transformers.AutoModelForSequenceClassification,
            "seq2seq": transformers.AutoModelForSeq2SeqLM, "causal": transformers.AutoModelForCausalLM,
            "causal-from-scratch": transformers.AutoModelForCausalLM, "encoder": transformers.AutoModel,
            "multitask": transformers.AutoModel}[kind]
    auto.from_pretrained(saved / "encoder" if kind == "multitask" else saved)
    if kind == "causal-from-scratch":  # random init, no starting checkpoint to differ from
        return
    if kind == "multitask":
        assert any(k.startswith("heads") for k in tensors), sorted(tensors)[:5]
    name = cfg["model_name_or_path"]
    _trained_away_from(tensors, Path(name) if Path(name).exists() else Path(assets.resolve(name)))


@pytest.mark.parametrize("case,launcher", CELLS, ids=[f"{c}-{l}" for c, l in CELLS])
def test_recipe_runs_saves_and_resumes_under_the_launcher(case, launcher, tmp_path):
    recipe, cfg, saved, kind = CASES[case](tmp_path)
    cfg = {k: v for k, v in {**cfg, **RUN}.items() if k != "num_threads"}
    _launch(launcher, recipe, cfg, tmp_path / "first.yaml", tmp_path / "trace")
    ranks = [json.loads((tmp_path / "trace" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [(r["distributed_type"], r["torch_world_size"]) for r in ranks] == [(LAUNCHERS[launcher][1], 2)] * 2
    run = Path(cfg["output_dir"])
    _check_reload(kind, run / saved, cfg)

    first = _checkpoints(run)
    assert {"checkpoint-2", "checkpoint-4"} <= set(first), sorted(first)
    resumed = {**cfg, "output_dir": str(tmp_path / "resumed"), "resume_from_checkpoint": str(first["checkpoint-2"])}
    _launch(launcher, recipe, resumed, tmp_path / "resumed.yaml", tmp_path / "trace-resumed")
    again = _checkpoints(tmp_path / "resumed")
    assert "checkpoint-2" not in again and "checkpoint-4" in again, sorted(again)  # it started after step 2
    losses, uninterrupted = _losses(again["checkpoint-4"]), _losses(first["checkpoint-4"])
    assert len(losses) == len(uninterrupted) >= 4
    assert losses[2:] == pytest.approx(uninterrupted[2:], rel=1e-4), (losses, uninterrupted)
