import json

import pytest
import torch

from conftest import assert_loss_falls, logged_losses
from hf_tuner.config import ConfigError
from hf_tuner.tokenizer_training import tokens_per_word, train_tokenizer
from recipes.pretrain import train


@pytest.fixture(scope="module")
def texts():
    from pydoc_data.topics import topics

    docs = [t for _, t in sorted(topics.items()) if t.strip()]
    return docs[:30], docs[30:34]


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_trained_tokenizer_round_trips_text(kind, texts, tmp_path):
    from transformers import AutoTokenizer

    train_texts, held = texts
    tok = train_tokenizer(train_texts, kind, vocab_size=600)
    assert len(tok) <= 600 and tok.eos_token == "<|im_end|>"
    sample = "def f(x):\n    return x + 1  # a for loop, with  two spaces"
    for text in [sample, held[0][:2000]]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids  # every character of these texts occurs in the training text
        assert tok.decode(ids) == text
    if kind == "bpe":  # byte-level: any character survives, even ones never seen in training
        assert tok.decode(tok("naïve – ok ✓", add_special_tokens=False)["input_ids"]) == "naïve – ok ✓"
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded(sample)["input_ids"] == tok(sample)["input_ids"]


def test_a_larger_vocabulary_needs_fewer_tokens_per_word(texts):
    train_texts, held = texts
    small, large = (train_tokenizer(train_texts, "bpe", v) for v in (400, 3000))
    assert tokens_per_word(large, held) < tokens_per_word(small, held)
    assert tokens_per_word(large, held) > 1.0  # words of code and punctuation split


def _config(tmp_path, **overrides):
    cfg = {"corpus": ["pydoc-topics"], "eval_fraction": 0.05, "output_dir": str(tmp_path / "run"),
           "vocab_size": 800, "tokenizer_sweep": [400], "compare_tokenizers": ["tiny-llama"], "block_size": 64,
           "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
           "num_key_value_heads": 2, "eval_samples": 24, "eval_batch_size": 8, "train_samples": 600,
           "per_device_train_batch_size": 16, "max_steps": 40, "learning_rate": 3e-3, "lr_scheduler_type": "constant",
           "logging_steps": 1, "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0, "num_threads": 1,
           "sample_prompts": ["The for statement"], "sample_tokens": 8}
    cfg.update(overrides)
    return cfg


def test_pretraining_lowers_the_loss_and_the_model_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train(_config(tmp_path))
    losses = logged_losses(result.output_dir)
    assert_loss_falls(losses, steps=40, window=5, by=0.5)
    m = result.metrics
    assert m["tuned"]["perplexity"] < m["base"]["perplexity"] / 2, m
    assert m["base"]["perplexity"] > 300  # random init: about the vocabulary size
    assert [r["vocab_size"] for r in m["tokenizer"]][:2] == [800, 400] and m["tokenizer"][2]["tokenizer"] == "tiny-llama"
    report = (result.output_dir / "report.md").read_text()
    assert "tokens per word" in report and "The for statement" in report
    model = AutoModelForCausalLM.from_pretrained(result.output_dir / "model")
    tok = AutoTokenizer.from_pretrained(result.output_dir / "model")
    assert model.config.num_hidden_layers == 2 and len(tok) == 800
    batch = tok(["The while statement"], return_tensors="pt")
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, result.model(**batch).logits, atol=1e-5)


def test_bad_config_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_name_or_path"):
        train(_config(tmp_path, model_name_or_path="tiny-llama"))
    with pytest.raises(ConfigError, match="tokenizer_kind"):
        train(_config(tmp_path, tokenizer_kind="wordpiece"))
    with pytest.raises(ConfigError, match="num_attention_heads"):
        train(_config(tmp_path, hidden_size=66))


def test_cli_tokenizer_train(tmp_path, capsys):
    from transformers import AutoTokenizer

    from hf_tuner.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    from pydoc_data.topics import topics

    for i, (name, text) in enumerate(sorted(topics.items())[:12]):
        (corpus / f"{i:02d}.txt").write_text(text)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab_size", "500", "--output_dir", str(out),
                 "--eval_fraction", "0.2", "--compare", "tiny-llama", "--sweep", "300"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["vocab_size"] for r in report["rows"]][:2] == [500, 300] and report["held_out_documents"] == 2
    assert len(AutoTokenizer.from_pretrained(out)) == 500 and "tokens per word" in capsys.readouterr().out
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--output_dir", str(out)]) == 2
    assert f"output_dir {out} already exists and is not empty" in capsys.readouterr().err
