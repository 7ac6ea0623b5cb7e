"""Every PEFT method on every model type: it trains, saves, reloads, merges, or is refused before loading."""

import copy
import inspect
import json

import pytest
import torch
import transformers

from hf_tuner import assets
from hf_tuner.adapters import MERGEABLE_PEFT_TYPES, METHODS, PeftMethodError, peft_setup, trainable_parameters
from hf_tuner.merge import load_adapter, merge_adapter
from hf_tuner.models import load_model

MODELS = {"causal-lm": "tiny-llama", "seq2seq": "tiny-t5", "classification": "tiny-bert"}
# Small virtual-token counts and ranks keep each case well under a second.
OPTIONS = {"prompt-tuning": {"num_virtual_tokens": 4}, "prefix-tuning": {"num_virtual_tokens": 4},
           "p-tuning": {"num_virtual_tokens": 4, "encoder_hidden_size": 32}, "llama-adapter": {"adapter_len": 4}}
# What PEFT cannot do, and the words our refusal must contain.
UNSUPPORTED = {("llama-adapter", "seq2seq"): "does not fit t5", ("llama-adapter", "classification"): "does not fit bert"}
if "past_key_values" not in inspect.signature(transformers.BertModel.forward).parameters:  # transformers >= 5.24
    UNSUPPORTED[("prefix-tuning", "classification")] = "does not fit bert.*past_key_values"
CASES = [(m, t) for m in METHODS for t in MODELS]


def _batch(task: str, tokenizer) -> dict:
    texts = ["a kind of stone that is used in the house", "the river runs to the sea in spring"]
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    if task == "causal-lm":
        enc["labels"] = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    elif task == "seq2seq":
        labels = tokenizer(["stone", "river water"], padding=True, return_tensors="pt")["input_ids"]
        start = torch.full_like(labels[:, :1], tokenizer.pad_token_id)  # T5's decoder start token is pad
        enc["labels"], enc["decoder_input_ids"] = labels, torch.cat([start, labels[:, :-1]], dim=1)
    else:
        enc["labels"] = torch.tensor([0, 1])
    return dict(enc)


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():  # without labels: a reloaded AdaLoRA (inference mode) fails on its loss term
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float()


def _train_steps(model, batch, method, task, steps=4):
    torch.manual_seed(0)
    lr = 1e-3 if method == "full" else 2e-2 if task != "classification" else 3e-3
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.eval()  # no dropout: the loss on a repeated batch must fall from optimization alone
    losses = []
    for step in range(steps):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        if method == "adalora":
            model.base_model.update_and_allocate(step)
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("method,task", CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_method_trains_saves_reloads_and_merges(method, task, tmp_path):
    from peft import get_peft_model

    path = assets.resolve(MODELS[task])
    if (method, task) in UNSUPPORTED:
        with pytest.raises(PeftMethodError, match=UNSUPPORTED[(method, task)]):
            peft_setup(method, path, task, options=OPTIONS.get(method), total_steps=10)
        return
    setup = peft_setup(method, path, task, options=OPTIONS.get(method), total_steps=10)
    torch.manual_seed(0)
    model, tokenizer = load_model(path, task, quantization_config=setup.quantization)
    if setup.config is not None:
        model = get_peft_model(model, copy.deepcopy(setup.config))
    trainable, total = trainable_parameters(model)
    assert 0 < trainable <= total and (method == "full") == (trainable == total)
    batch = _batch(task, tokenizer)
    losses = _train_steps(model, batch, method, task)
    assert losses[-1] < losses[0], losses

    before = _logits(model, batch)
    model.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    if setup.config is None:  # full fine-tuning saves a whole checkpoint
        reloaded, _ = load_model(str(tmp_path / "adapter"), task)
    else:
        reloaded, _ = load_adapter(tmp_path / "adapter", quantization_config=setup.quantization)
    torch.testing.assert_close(_logits(reloaded, batch), before, rtol=1e-5, atol=1e-5)

    if setup.config is not None and setup.config.peft_type in MERGEABLE_PEFT_TYPES:
        # The merge reloads the base in full precision (never 4/8-bit), so compare against that.
        full_precision, _ = load_adapter(tmp_path / "adapter")
        merged_dir = merge_adapter(tmp_path / "adapter", tmp_path / "merged")
        merged, _ = load_model(str(merged_dir), task)
        assert not hasattr(merged, "peft_config")
        torch.testing.assert_close(_logits(merged, batch), _logits(full_precision, batch), rtol=1e-4, atol=1e-4)
        assert "base model" in (merged_dir / "README.md").read_text()


def test_conv1d_models_refuse_loha_and_lokr_before_loading(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(tmp_path)
    for method in ("loha", "lokr"):
        with pytest.raises(PeftMethodError, match=f"{method}.*does not fit gpt2.*Conv1D"):
            peft_setup(method, str(tmp_path), "causal-lm")
    assert peft_setup("lora", str(tmp_path), "causal-lm").config is not None


def test_unknown_method_and_option_are_refused(tiny_llama):
    with pytest.raises(PeftMethodError, match="unknown peft_method 'lora2'"):
        peft_setup("lora2", tiny_llama)
    with pytest.raises(PeftMethodError, match=r"has no option\(s\) \['rank'\]"):
        peft_setup("lora", tiny_llama, options={"rank": 4})


def test_text_initialised_prompt_tuning_uses_the_model_tokenizer(tiny_llama):
    setup = peft_setup("prompt-tuning", tiny_llama, options={"prompt_tuning_init_text": "Define the word"})
    assert setup.config.prompt_tuning_init == "TEXT" and setup.config.tokenizer_name_or_path == tiny_llama
    assert setup.prompt_learning and not setup.plain_loss


def test_merge_refuses_prompt_learning_and_4bit(tmp_path, tiny_llama):
    from peft import get_peft_model

    setup = peft_setup("prompt-tuning", tiny_llama, options={"num_virtual_tokens": 4})
    model, _ = load_model(tiny_llama)
    get_peft_model(model, setup.config).save_pretrained(tmp_path / "pt")
    with pytest.raises(PeftMethodError.__mro__[1], match="PROMPT_TUNING adapter has no weights to merge"):
        merge_adapter(tmp_path / "pt", tmp_path / "out")
    lora = peft_setup("lora", tiny_llama)
    get_peft_model(load_model(tiny_llama)[0], lora.config).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="never into 4- or 8-bit"):
        merge_adapter(tmp_path / "lora", tmp_path / "out", dtype="int4")
    assert json.loads((tmp_path / "lora" / "adapter_config.json").read_text())["peft_type"] == "LORA"
