"""End-to-end runs on the real small checkpoints from the asset cache (`make assets`), a few steps each.

Marked slow: `make test-slow` (pytest -m slow) runs them; the default suite leaves them out.
"""

import os
from pathlib import Path

import pytest
import torch

from conftest import WORDS, assert_loss_falls, logged_losses, write_jsonl

pytestmark = pytest.mark.slow


def _checkpoint(name: str) -> Path:
    path = Path(os.environ["HF_TUNER_USER_CACHE"]) / name
    assert (path / "config.json").is_file(), f"{path}: missing; run `make assets`"
    return path


def test_sft_instruction_on_smollm2_loss_falls_and_adapter_reloads(tmp_path):
    from peft import AutoPeftModelForCausalLM

    from recipes.sft_instruction import train

    rows = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} that is used in the house"}
            for w in WORDS[:12]]
    data = write_jsonl(tmp_path / "defs.jsonl", rows)
    result = train({"model_name_or_path": str(_checkpoint("smollm2-135m-instruct")), "dataset_name": str(data),
                    "output_dir": str(tmp_path / "run"), "eval_samples": 2, "few_shot": 0, "eval_batch_size": 2,
                    "eval_max_new_tokens": 4, "per_device_train_batch_size": 5, "max_steps": 8,
                    "learning_rate": 3e-3, "lr_scheduler_type": "constant", "lora_r": 8, "max_length": 48,
                    "logging_steps": 1, "save_strategy": "no", "report_to": [], "gradient_checkpointing": False,
                    "bf16": False, "seed": 0, "num_threads": 2})
    losses = logged_losses(result.output_dir)
    assert_loss_falls(losses, steps=8, window=2, factor=0.7)
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"], result.metrics

    batch = result.tokenizer(["Define the word 'lamp'.", "a kind of"], return_tensors="pt", padding=True)
    result.model.eval()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(result.output_dir / "adapter").eval()
    with torch.no_grad():
        expected, got = result.model(**batch).logits, reloaded(**batch).logits
        with reloaded.disable_adapter():
            base = reloaded(**batch).logits
    assert torch.allclose(expected, got, atol=1e-4)
    assert not torch.allclose(base, got, atol=1e-3)  # the adapter changed something
