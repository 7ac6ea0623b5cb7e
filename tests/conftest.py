import os
import tempfile

# Tests run offline, on tiny models built into a private cache, whatever the user's cache holds.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_TUNER_TEST_CACHE", tempfile.mkdtemp(prefix="hf-tuner-test-cache-"))
os.environ["HF_TUNER_CACHE"] = os.environ["HF_TUNER_TEST_CACHE"]

import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_llama() -> str:
    from hf_tuner import assets

    return assets.resolve("tiny-llama")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WORDS = ["apple", "river", "stone", "cloud", "tiger", "lamp", "bread", "chair", "glass", "music",
         "paper", "forest", "window", "garden", "silver", "candle", "mirror", "bridge", "island", "thunder"]


@pytest.fixture
def definitions_file(tmp_path) -> Path:
    """A small prompt/completion file with a few patterns a tiny model can start to learn."""
    rows = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} that is used in the house"}
            for w in WORDS * 2]
    return write_jsonl(tmp_path / "defs.jsonl", rows)
