import os
import tempfile

# Tests run offline, on tiny models built into a private cache, whatever the user's cache holds.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
# The user's asset cache (real checkpoints, `make assets`), kept for the tests marked slow.
os.environ.setdefault("HF_TUNER_USER_CACHE", os.environ.get("HF_TUNER_CACHE", os.path.expanduser("~/.cache/hf-tuner")))
os.environ.setdefault("HF_TUNER_TEST_CACHE", tempfile.mkdtemp(prefix="hf-tuner-test-cache-"))
os.environ["HF_TUNER_CACHE"] = os.environ["HF_TUNER_TEST_CACHE"]

import json  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NETBLOCK = Path(__file__).resolve().parent / "netblock"
sys.path.insert(0, str(NETBLOCK))
import sitecustomize  # noqa: E402,F401  (blocks non-loopback connections in this process)

assert sitecustomize.__file__.startswith(str(NETBLOCK)), sitecustomize.__file__


def subprocess_env(**extra) -> dict:
    """Environment for a recipe or launcher started by a test: the repo importable, the network blocked."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(NETBLOCK), str(REPO)]), **extra}


LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launcher_env(**extra) -> dict:
    """subprocess_env for `accelerate launch` / `torchrun`: without the rank variables of a launch this
    process may itself run under, which the launcher's children would otherwise inherit."""
    return {k: v for k, v in subprocess_env(**extra).items() if k not in LAUNCHER_VARIABLES}


def run_launcher(cmd: list[str], trace: Path | None = None, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    """Run a launcher (or a recipe) in its own process group, with launcher_env and, when `trace` is given,
    $HF_TUNER_RANK_TRACE set to it: on a timeout (ranks that disagree wait for each other until gloo gives up)
    the ranks are stopped with it, not left behind."""
    from hf_tuner.distributed import TRACE_ENV

    env = launcher_env(**({TRACE_ENV: str(trace)} if trace else {}), **env)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def free_port() -> int:
    """A loopback TCP port nothing listens on now (for a launcher's rendezvous or a test server)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def logged_losses(run_dir: Path, name: str = "log_history.json") -> list[float]:
    """The training losses a run folder's log history holds, in step order."""
    return [h["loss"] for h in json.loads((Path(run_dir) / name).read_text()) if "loss" in h]


def assert_loss_falls(losses: list[float], steps: int | None = None, window: int = 1, by: float = 0.0,
                      factor: float = 1.0) -> None:
    """As many logged losses as steps (when given), and the mean of the last `window` losses below `factor`
    times the mean of the first `window`, less `by`."""
    if steps is not None:
        assert len(losses) == steps, losses
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    assert last < factor * first - by, losses


# A short, quiet recipe run: a loss every step, no checkpoints, no TensorBoard, fp32, seeded.
QUICK_RUN = {"logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0}


def tiny_sft_config(data: Path, output_dir: Path, **overrides) -> dict:
    """recipes/sft_instruction.py on tiny-llama for a few steps: LoRA r=8, no base evaluation, two held-out
    items with two new tokens each."""
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(data), "output_dir": str(output_dir),
            "eval_samples": 2, "few_shot": 0, "evaluate_base": False, "eval_batch_size": 2, "eval_max_new_tokens": 2,
            "per_device_train_batch_size": 4, "max_steps": 5, "learning_rate": 5e-3, "lora_r": 8, "max_length": 64,
            "gradient_checkpointing": False, "report_examples": 1, **QUICK_RUN, **overrides}


def write_yaml(path: Path, cfg: dict) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_run_files(run_dir: Path, names) -> None:
    """Every file a finished run folder must hold (paths relative to it), each one non-empty."""
    missing = [n for n in names if not (Path(run_dir) / n).is_file() or not (Path(run_dir) / n).stat().st_size]
    assert not missing, f"{run_dir} lacks {missing}"


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    from hf_tuner import assets

    return assets.resolve("tiny-llama")


@pytest.fixture(scope="module")
def wide_tiny_llama(tiny_llama):
    """(model, tokenizer) of tiny-llama with wider weights than the default init, so greedy outputs vary from
    token to token."""
    import torch

    from hf_tuner.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama")
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model, tokenizer


def dropout_free_copy(asset: str, target: Path) -> Path:
    """A copy of a tiny model asset with dropout off, for comparisons across processes or batch layouts (each
    rank, and each micro-batch, would draw its own masks)."""
    import shutil

    from hf_tuner import assets

    shutil.copytree(assets.resolve(asset), target)
    config = json.loads((target / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (target / "config.json").write_text(json.dumps(config))
    return target


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "chair", "glass", "music",
         "paper", "forest", "window", "garden", "silver", "candle", "mirror", "bridge", "island", "thunder"]


def distinct_definition_rows(repeat: int = 3) -> list[dict]:
    """prompt/completion rows in which every row differs (the index is in both), so a row's tokens identify it."""
    return [{"prompt": f"Define the word '{w}' ({i}).", "completion": f"a kind of {w} used in room {i}"}
            for i, w in enumerate(WORDS * repeat)]


@pytest.fixture
def definitions_file(tmp_path) -> Path:
    """A small prompt/completion file with a few patterns a tiny model can start to learn."""
    rows = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} that is used in the house"}
            for w in WORDS * 2]
    return write_jsonl(tmp_path / "defs.jsonl", rows)


POSITIVE = ["great", "wonderful", "lovely", "superb", "brilliant", "charming", "delightful", "excellent"]
NEGATIVE = ["awful", "terrible", "boring", "dreadful", "horrible", "dull", "painful", "miserable"]
NOUNS = ["film", "plot", "cast", "story", "ending", "script", "music", "scene", "acting", "movie"]
VADER_STYLES = {"movieReviewSnippets": "the {noun} was {adj} .", "tweets": "omg my {noun} is so {adj} lol",
                "amazonReviewSnippets": "this product {noun} is {adj} , would buy",
                "nytEditorialSnippets": "officials said the {noun} appeared {adj} in the city"}


def write_vader_folder(path: Path, per_source: int = 60) -> Path:
    """Tiny files in the vader ground-truth layout: polarity from the adjective, source from the style,
    a few near-neutral rows (to be dropped) and one duplicated snippet (must stay on one side of a split)."""
    import random

    rng = random.Random(0)
    path.mkdir(parents=True, exist_ok=True)
    for source, style in VADER_STYLES.items():
        lines = []
        for i in range(per_source):
            positive = i % 2 == 0
            adj = rng.choice(POSITIVE if positive else NEGATIVE)
            rating = rng.uniform(1.0, 3.5) * (1 if positive else -1)
            if i % 10 == 9:
                rating = 0.2  # near-neutral: dropped by polarity
            lines.append(f"{i + 1}\t{rating:.3f}\t{style.format(noun=rng.choice(NOUNS), adj=adj)}")
        lines.append(f"{per_source + 1}\t2.000\t{style.format(noun='film', adj='great')}")  # a duplicate text
        (path / f"{source}_GroundTruth.txt").write_text("\r\n".join(lines) + "\r\n")
    return path
