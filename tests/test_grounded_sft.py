import json
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_loss_falls, assert_run_files, logged_losses, write_jsonl
from hf_tuner.config import ConfigError
from hf_tuner.data import DataError
from hf_tuner.retrieval import PassageIndex, chunk_text, groundedness, load_knowledge_base
from recipes.grounded_sft import train

THINGS = ["zorblax", "quintar", "velmora", "drisket", "plonkett", "yarrow", "brumble", "cassivan", "dulmont",
          "fennick", "gorrin", "halvet"]
COLOURS = ["red", "green", "blue", "amber", "violet", "silver"]


class BagOfTokens(torch.nn.Module):
    """An encoder whose token vectors are one-hot: mean pooling gives token frequencies, so the cosine is plain
    word overlap, and the passage sharing the query's rare words must come first."""

    def __init__(self, vocab_size: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab_size, vocab_size)
        with torch.no_grad():
            self.embed.weight.copy_(torch.eye(vocab_size))

    def forward(self, input_ids, attention_mask=None, **_):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


def test_retrieval_returns_the_planted_passage():
    from hf_tuner.models import load_tokenizer

    tokenizer = load_tokenizer("tiny-llama")
    passages = load_knowledge_base("pydoc-topics", max_words=60)[:300]
    planted = "The zorblax protocol was invented by Quentin Flarp in 1987 to count marmots."
    kb = passages + [{"id": len(passages), "source": "planted", "text": planted}]
    index = PassageIndex.build(BagOfTokens(len(tokenizer)), tokenizer, kb)
    hits = index.search(["Who invented the zorblax protocol to count marmots?", "what does a for statement do"], k=3)
    assert hits[0][0]["text"] == planted and hits[0][0]["score"] > hits[0][1]["score"]
    assert all(h["source"] != "planted" for h in hits[1])
    assert [len(h) for h in hits] == [3, 3]


def test_chunking_and_groundedness():
    text = "Title\n*****\n\n" + " ".join(f"w{i}" for i in range(130)) + "\n\nshort para here.\n"
    chunks = chunk_text(text, max_words=60)
    assert chunks[0] == "Title" and [len(c.split()) for c in chunks[1:]] == [60, 60, 13]
    assert groundedness("the blue Cat", ["a cat is blue"]) == pytest.approx(2 / 3)
    assert groundedness("", ["x"]) == 0.0


def test_text_chunking_lives_in_data_which_loads_no_models():
    """data/ takes a tokenizer and loads no models: the chunker lives in data/text.py, retrieval re-exports it."""
    import subprocess
    import sys

    import hf_tuner.data.text
    import hf_tuner.retrieval

    assert hf_tuner.retrieval.chunk_text is hf_tuner.data.text.chunk_text
    code = ("import sys, hf_tuner.data.text; "
            "print(sorted(m for m in sys.modules if m in ('hf_tuner.retrieval', 'hf_tuner.models')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_no_data_module_imports_a_model_layer():
    import ast
    from pathlib import Path

    import hf_tuner.data

    upper = ("hf_tuner.retrieval", "hf_tuner.models", "hf_tuner.adapters", "hf_tuner.evaluation", "hf_tuner.rl")
    found = [(path.name, node.module) for path in Path(hf_tuner.data.__file__).parent.glob("*.py")
             for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(upper)]
    assert not found, found


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("grounded")
    kb = root / "kb"
    kb.mkdir()
    rows = []
    for i, thing in enumerate(THINGS):
        colour = COLOURS[i % len(COLOURS)]
        (kb / f"{thing}.txt").write_text(f"The {thing} is a {colour} machine.\n\nIt was built in town {i}.\n")
        rows.append({"question": f"What is the {thing}?", "answer": f"a {colour} machine", "group": thing})
        rows.append({"question": f"Where was the {thing} built?", "answer": f"in town {i}", "group": thing})
    return write_jsonl(root / "qa.jsonl", rows), kb


def _config(tmp_path, data, **overrides):
    qa, kb = data
    cfg = {"model_name_or_path": "tiny-llama", "dataset_name": str(qa), "knowledge_base": str(kb),
           "retriever_model": "tiny-bert", "output_dir": str(tmp_path / "run"), "top_k": 2, "eval_topics": 3,
           "eval_samples": 6, "eval_batch_size": 6, "eval_max_new_tokens": 6, "peft_method": "lora", "lora_r": 8,
           "max_length": 256, "per_device_train_batch_size": 6, "max_steps": 25, "learning_rate": 3e-3,
           "lr_scheduler_type": "constant", "logging_steps": 1, "save_strategy": "no", "report_to": [],
           "bf16": False, "seed": 0, "num_threads": 1, "gradient_checkpointing": False, "packing": False}
    cfg.update(overrides)
    return cfg


def test_recipe_trains_on_grounded_prompts_and_reports_three_conditions(tmp_path, data):
    result = train(_config(tmp_path, data))
    losses = logged_losses(result.output_dir)
    assert_loss_falls(losses, window=5, by=0.3)
    m = result.metrics
    for part in (m["base"], m["baselines"]["with retrieved context"], m["tuned"]):
        assert {"rougeL", "groundedness"} <= set(part) and 0 <= part["groundedness"] <= 1
    assert m["retrieval"]["passages"] == len(THINGS)  # both paragraphs of a file fit one passage
    assert m["train"]["eval_questions"] == 6
    assert_run_files(result.output_dir, ("metrics.json", "report.md", "generations.jsonl",
                                         "adapter/adapter_config.json"))
    first = json.loads((result.output_dir / "generations.jsonl").read_text().splitlines()[0])
    assert "Passages:\n[1] " in first["prompt"] and {"base", "context", "tuned"} <= set(first)
    assert "groundedness" in (result.output_dir / "report.md").read_text()


def test_bad_input_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match="top_k"):
        train(_config(tmp_path, data, top_k=0))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(DataError, match=r"bad.jsonl:1: needs non-empty"):
        train(_config(tmp_path, data, dataset_name=str(bad)))
    with pytest.raises(DataError, match="knowledge-base row"):
        train(_config(tmp_path, data, knowledge_base=str(write_jsonl(tmp_path / "kb.jsonl", [{"title": "x"}]))))
