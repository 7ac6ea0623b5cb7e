"""Security defaults: no remote code, no pickle weights, torch.load only with weights_only=True, no secret in
any file a run writes, and no network access from the test suite."""

import ast
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hf_tuner.models as models
from conftest import REPO, WORDS, subprocess_env, write_jsonl
from hf_tuner.assets import AssetError
from recipes import sft_instruction


@pytest.fixture(autouse=True)
def safe_loading():
    models.configure_loading()  # each test starts from the defaults and leaves them behind
    yield
    models.configure_loading()


def _copy(tiny_llama: str, dest: Path) -> Path:
    shutil.copytree(tiny_llama, dest)
    return dest


def _plant_remote_code(folder, base_class: str, auto_class: str, marker):
    """A checkpoint whose config maps `auto_class` to its own module, which writes `marker` when imported."""
    (folder / "modeling_evil.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        f"from transformers import {base_class}\n\nclass EvilModel({base_class}):\n    pass\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {auto_class: "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return marker


def test_remote_code_runs_only_when_the_config_turns_it_on(tmp_path, tiny_llama, capsys):
    folder = _copy(tiny_llama, tmp_path / "remote")
    marker = _plant_remote_code(folder, "LlamaForCausalLM", "AutoModelForCausalLM", tmp_path / "remote-code-ran")

    try:
        models.load_model(str(folder), "causal-lm")
    except ValueError as e:  # transformers may refuse outright instead of using its own Llama class
        assert "trust_remote_code" in str(e)
    assert not marker.exists(), "a checkpoint's own code ran without trust_remote_code"

    models.configure_loading(trust_remote_code=True)
    assert "trust_remote_code is on" in capsys.readouterr().out
    model, _ = models.load_model(str(folder), "causal-lm")
    assert marker.exists() and type(model).__name__ == "EvilModel"


def test_config_leaves_trust_remote_code_off_unless_asked(tmp_path):
    from trl import SFTConfig

    from hf_tuner.config import parse_config

    parse_config(SFTConfig, {"output_dir": str(tmp_path / "a")})
    assert models.TRUST_REMOTE_CODE is False and models.ALLOW_PICKLE is False
    parse_config(SFTConfig, {"output_dir": str(tmp_path / "b"), "trust_remote_code": True})
    assert models.TRUST_REMOTE_CODE is True


def test_pickle_weights_are_refused_unless_allowed(tmp_path, tiny_llama):
    folder = _copy(tiny_llama, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(AssetError, match=r"holds only pickle weights \(pytorch_model.bin\).*allow_pickle_weights"):
        models.check_model_source(str(folder))
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Define '{w}'.", "completion": w} for w in WORDS])
    with pytest.raises(AssetError, match="holds only pickle weights"):  # a recipe refuses it at its first step
        sft_instruction.train({"model_name_or_path": str(folder), "dataset_name": str(data), "eval_samples": 2,
                               "output_dir": str(tmp_path / "run"), "max_steps": 1, "report_to": []})
    assert not (tmp_path / "run").exists()

    models.configure_loading(allow_pickle=True)
    model, _ = models.load_model(str(folder), "causal-lm")
    assert model.config.model_type == "llama"


def test_every_torch_load_in_our_code_uses_weights_only():
    calls = []
    for path in [*REPO.glob("hf_tuner/**/*.py"), *REPO.glob("recipes/**/*.py"), *REPO.glob("benchmarks/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords)
                calls.append((f"{path.relative_to(REPO)}:{node.lineno}", safe))
    assert all(safe for _, safe in calls), [where for where, safe in calls if not safe]


def test_no_secret_reaches_the_run_folder_or_the_output(tmp_path, tiny_llama, monkeypatch, capfd):
    env_secret, config_secret = "hf_envSECRETenv1234567890", "hf_cfgSECRETcfg0987654321"
    monkeypatch.setenv("HF_TOKEN", env_secret)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Define '{w}'.", "completion": f"a {w}"} for w in WORDS])
    result = sft_instruction.train({
        "model_name_or_path": "tiny-llama", "dataset_name": str(data), "output_dir": str(tmp_path / "run"),
        "eval_samples": 2, "few_shot": 0, "eval_max_new_tokens": 2, "per_device_train_batch_size": 4, "max_steps": 2,
        "save_strategy": "steps", "save_steps": 1, "report_to": ["tensorboard"], "bf16": False,
        "hub_token": config_secret, "logging_steps": 1})
    written = [p for p in result.output_dir.rglob("*") if p.is_file()]
    assert any(p.name == "training_args.bin" for p in written)  # Trainer pickles the arguments: checked too
    assert any(p.name == "config.yaml" for p in written)
    for path in written:
        content = path.read_bytes()
        for secret in (env_secret, config_secret):
            assert secret.encode() not in content, f"{secret} written to {path}"
    out, err = capfd.readouterr()
    assert env_secret not in out + err and config_secret not in out + err


def test_network_is_blocked_in_tests_and_their_subprocesses():
    with pytest.raises(OSError, match="network access is blocked"):
        socket.create_connection(("192.0.2.1", 443), timeout=1)  # TEST-NET-1: never routable anyway
    with socket.socket() as server:  # loopback stays open (gloo, local servers)
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        socket.create_connection(server.getsockname(), timeout=5).close()
    for resolve in (lambda: socket.getaddrinfo("example.com", 443), lambda: socket.gethostbyname("example.com"),
                    lambda: socket.create_connection(("huggingface.co", 443), timeout=1)):
        with pytest.raises(OSError, match="network access is blocked in tests: resolve"):  # no DNS query either
            resolve()
    assert socket.getaddrinfo("localhost", 80) and socket.getaddrinfo("127.0.0.1", 80)
    code = "import socket\nfor a in [('192.0.2.1', 443), ('example.com', 443)]:\n    try:\n" \
           "        socket.create_connection(a, timeout=1)\n    except OSError as e:\n        print(e)\n"
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True, text=True,
                          timeout=60)
    assert "blocked in tests: connect" in proc.stdout and "blocked in tests: resolve 'example.com'" in proc.stdout, \
        proc.stdout + proc.stderr


# ---------------------------------------------------------------- every encoder load goes through hf_tuner.models
# recipes/contrastive.py, hf_tuner/multitask.py (both ways in) and hf_tuner/retrieval.py load a bare AutoModel.
# Each must refuse what models.load_model refuses and honour trust_remote_code, as load_model does.
class _Loaded(Exception):
    """Raised where the contrastive recipe would start its base evaluation: the encoder has loaded."""

    def __init__(self, model):
        super().__init__("loaded")
        self.model = model


@pytest.fixture(scope="module")
def tiny_bert() -> str:
    from hf_tuner import assets

    return assets.resolve("tiny-bert")


def _load_contrastive(folder: Path, tmp_path: Path, monkeypatch, trust: bool):
    import hf_tuner.contrastive
    from recipes import contrastive

    def stop(model, *args, **kwargs):
        raise _Loaded(model)

    monkeypatch.setattr(hf_tuner.contrastive, "evaluate_retrieval", stop)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"query": w, "passage": f"the word {w}"} for w in WORDS[:12]])
    try:
        contrastive.train({"model_name_or_path": str(folder), "dataset_name": str(pairs), "eval_samples": 4,
                           "per_device_train_batch_size": 4, "max_steps": 1, "save_strategy": "no", "report_to": [],
                           "output_dir": str(tmp_path / f"run-{trust}"), "trust_remote_code": trust})
    except _Loaded as loaded:
        return loaded.model
    raise AssertionError("the contrastive recipe never reached its base evaluation")


def _load_multitask_encoder(folder: Path, tmp_path: Path, monkeypatch, trust: bool):
    from hf_tuner.multitask import MultiTaskModel, TaskSpec

    models.configure_loading(trust_remote_code=trust)
    model, _ = MultiTaskModel.from_encoder(str(folder), [TaskSpec("sentiment", "classification", ["neg", "pos"])])
    return model.encoder


def _load_multitask_saved(folder: Path, tmp_path: Path, monkeypatch, trust: bool):
    """A saved multi-task model folder whose encoder/ is `folder` (heads and multitask.json written beside it)."""
    from safetensors.torch import save_file

    from hf_tuner.multitask import CONFIG_FILE, HEADS_FILE, MultiTaskModel

    saved = tmp_path / f"multitask-{trust}"
    saved.mkdir()
    shutil.copytree(folder, saved / "encoder")
    hidden = json.loads((folder / "config.json").read_text())["hidden_size"]
    save_file({"sentiment.weight": torch.zeros(2, hidden), "sentiment.bias": torch.zeros(2)}, str(saved / HEADS_FILE))
    (saved / CONFIG_FILE).write_text(json.dumps({"tasks": [{"name": "sentiment", "kind": "classification",
                                                            "labels": ["neg", "pos"]}], "dropout": 0.0}))
    models.configure_loading(trust_remote_code=trust)
    return MultiTaskModel.from_pretrained(saved).encoder


def _load_retriever(folder: Path, tmp_path: Path, monkeypatch, trust: bool):
    from hf_tuner.retrieval import load_encoder

    models.configure_loading(trust_remote_code=trust)
    return load_encoder(str(folder))[0]


ENCODER_LOADS = {"contrastive recipe": _load_contrastive, "MultiTaskModel.from_encoder": _load_multitask_encoder,
                 "MultiTaskModel.from_pretrained": _load_multitask_saved, "retrieval.load_encoder": _load_retriever}


@pytest.mark.parametrize("load", ENCODER_LOADS.values(), ids=ENCODER_LOADS.keys())
def test_encoder_loads_refuse_pickle_only_checkpoints(tmp_path, tiny_bert, monkeypatch, load):
    folder = _copy(tiny_bert, tmp_path / "pickled")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(AssetError, match=r"holds only pickle weights \(pytorch_model.bin\)"):
        load(folder, tmp_path, monkeypatch, False)


@pytest.mark.parametrize("load", ENCODER_LOADS.values(), ids=ENCODER_LOADS.keys())
def test_encoder_loads_read_safetensors_only(tmp_path, tiny_bert, monkeypatch, load):
    """A stray .safetensors file gets a folder past the pickle-only check; the weights must still not come from
    the pickle beside it (use_safetensors=True unless allow_pickle_weights)."""
    folder = _copy(tiny_bert, tmp_path / "mixed")
    torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
    (folder / "model.safetensors").rename(folder / "unrelated.safetensors")
    with pytest.raises(OSError, match=r"no file named model\.safetensors found"):
        load(folder, tmp_path, monkeypatch, False)


@pytest.mark.parametrize("load", ENCODER_LOADS.values(), ids=ENCODER_LOADS.keys())
def test_encoder_loads_follow_trust_remote_code(tmp_path, tiny_bert, monkeypatch, load):
    # a name of its own per case: transformers caches a checkpoint's code as a module named after its folder
    folder = _copy(tiny_bert, tmp_path / f"remote_{load.__name__.strip('_')}")
    marker = _plant_remote_code(folder, "BertModel", "AutoModel", tmp_path / "remote-code-ran")

    for name in ("off", "on"):
        (tmp_path / name).mkdir()
    off = load(folder, tmp_path / "off", monkeypatch, False)
    assert type(off).__name__ == "BertModel" and not marker.exists(), "remote code ran with trust_remote_code off"
    on = load(folder, tmp_path / "on", monkeypatch, True)
    assert type(on).__name__ == "EvilModel" and marker.exists(), "trust_remote_code: true did not reach the load"
