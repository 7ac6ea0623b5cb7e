"""Bad input that is not a typo, over every recipe: the state of the paths given (an output_dir that is a file, an
unwritable parent, a dataset that is not there) and values a library below us would reject later, or with a
message that names its own internals. Each is refused before any weights load, with the user's config key or
path in the message and nothing written."""

import json
import os
import stat

import pytest
import transformers

import hf_tuner.models
from conftest import NEGATIVE, NOUNS, POSITIVE, WORDS, write_jsonl, write_vader_folder
from hf_tuner.config import ConfigError
from hf_tuner.data import DataError
from recipes import (continued_pretraining, contrastive, dpo, grounded_sft, multitask, ppo_rlhf, pretrain,
                     reward_model, seq2seq, sft_classification, sft_instruction)

RUN = {"max_steps": 2, "save_strategy": "no", "report_to": [], "bf16": False, "num_threads": 1}


def length_reward(prompts, responses, **_):
    """The RL recipes' reward (`test_bad_input:length_reward`): nothing here gets far enough to call it."""
    return [float(len(r)) for r in responses]


def _definitions(tmp):
    return write_jsonl(tmp / "defs.jsonl", [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w}"}
                                            for w in WORDS * 2])


def _sft_instruction(tmp):
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(_definitions(tmp)), "eval_samples": 4,
            "few_shot": 0, "per_device_train_batch_size": 4, "max_length": 64, "peft_method": "lora"}


def _sft_classification(tmp):
    rows = [{"text": f"the {NOUNS[i % 10]} was {(POSITIVE if i % 2 else NEGATIVE)[i % 8]} ({i})",
             "label": "positive" if i % 2 else "negative"} for i in range(20)]
    return {"model_name_or_path": "tiny-bert", "dataset_name": str(write_jsonl(tmp / "labels.jsonl", rows)),
            "eval_samples": 4, "baseline_model": "", "peft_method": "lora", "per_device_train_batch_size": 4,
            "max_length": 32}


def _continued_pretraining(tmp):
    rows = [{"text": f"The {w} is described here. " * 8} for w in WORDS]
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(write_jsonl(tmp / "text.jsonl", rows)),
            "general_dataset": "", "objective": "clm", "block_size": 32, "eval_documents": 2, "eval_samples": 4,
            "peft_method": "lora", "per_device_train_batch_size": 4}


def _multitask(tmp):
    return {"model_name_or_path": "tiny-bert", "dataset_name": str(write_vader_folder(tmp / "vader", per_source=20)),
            "eval_samples": 8, "peft_method": "full", "per_device_train_batch_size": 4, "max_length": 32}


def _seq2seq(tmp):
    return {"model_name_or_path": "tiny-t5", "dataset_name": str(_definitions(tmp)), "eval_samples": 4,
            "peft_method": "lora", "per_device_train_batch_size": 4}


def _pairs(tmp, prompt=False):
    rows = [{**({"prompt": f"The {NOUNS[i % 10]} was"} if prompt else {}),
             "chosen": f"the {NOUNS[i % 10]} was {POSITIVE[i % 8]} ({i})",
             "rejected": f"the {NOUNS[i % 10]} was {NEGATIVE[i % 8]} ({i})"} for i in range(24)]
    return write_jsonl(tmp / "pairs.jsonl", rows)


def _reward_model(tmp):
    return {"model_name_or_path": "tiny-bert", "dataset_name": str(_pairs(tmp)), "eval_samples": 4,
            "peft_method": "lora", "per_device_train_batch_size": 4, "max_length": 32}


def _ppo_rlhf(tmp):
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": f"The {n} was {i}"} for i in range(3) for n in NOUNS])
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(prompts), "reward_model":
            "test_bad_input:length_reward", "eval_samples": 4, "peft_method": "lora", "per_device_train_batch_size": 4,
            "num_mini_batches": 2, "response_length": 4}


def _dpo(tmp):
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(_pairs(tmp, prompt=True)), "reward_model":
            "test_bad_input:length_reward", "eval_samples": 4, "peft_method": "lora", "per_device_train_batch_size": 4,
            "max_length": 32, "response_length": 4}


def _contrastive(tmp):
    rows = [{"query": w, "passage": f"{w}: a thing called {w}"} for w in WORDS]
    return {"model_name_or_path": "tiny-bert", "dataset_name": str(write_jsonl(tmp / "pairs.jsonl", rows)),
            "eval_samples": 4, "per_device_train_batch_size": 4, "max_length": 24}


def _grounded_sft(tmp):
    kb = tmp / "kb"
    kb.mkdir()
    rows = []
    for i, thing in enumerate(NOUNS):
        (kb / f"{thing}.txt").write_text(f"The {thing} is a machine.\n\nIt was built in town {i}.\n")
        rows += [{"question": f"What is the {thing}?", "answer": "a machine", "group": thing},
                 {"question": f"Where was the {thing} built?", "answer": f"in town {i}", "group": thing}]
    return {"model_name_or_path": "tiny-llama", "dataset_name": str(write_jsonl(tmp / "qa.jsonl", rows)),
            "knowledge_base": str(kb), "retriever_model": "tiny-bert", "eval_topics": 2, "eval_samples": 4,
            "peft_method": "lora", "per_device_train_batch_size": 4, "max_length": 128, "packing": False}


def _pretrain(tmp):
    corpus = tmp / "corpus"
    corpus.mkdir()
    for i, w in enumerate(WORDS):
        (corpus / f"{w}.txt").write_text(f"The {w} stands by the {WORDS[(i + 1) % 20]}. " * 20)
    return {"corpus": [str(corpus)], "eval_fraction": 0.1, "vocab_size": 400, "tokenizer_sweep": [300],
            "compare_tokenizers": ["tiny-llama"], "block_size": 32, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "eval_samples": 4,
            "per_device_train_batch_size": 4}


RECIPES = {"sft_instruction": (sft_instruction, _sft_instruction),
           "sft_classification": (sft_classification, _sft_classification),
           "continued_pretraining": (continued_pretraining, _continued_pretraining),
           "multitask": (multitask, _multitask), "seq2seq": (seq2seq, _seq2seq),
           "reward_model": (reward_model, _reward_model), "ppo_rlhf": (ppo_rlhf, _ppo_rlhf), "dpo": (dpo, _dpo),
           "contrastive": (contrastive, _contrastive), "grounded_sft": (grounded_sft, _grounded_sft),
           "pretrain": (pretrain, _pretrain)}
WITH_PEFT = ["sft_instruction", "sft_classification", "continued_pretraining", "seq2seq", "reward_model", "ppo_rlhf",
             "dpo", "grounded_sft"]  # the others train in full and take no peft_method but full


def config_for(name, tmp):
    """A config of recipe `name` that would run (data written under tmp), its run folder at tmp/run."""
    data = tmp / "data"
    data.mkdir(exist_ok=True)
    return {**RUN, **RECIPES[name][1](data), "output_dir": str(tmp / "run")}


def _make_file(tmp, cfg):
    (tmp / "run").write_text("not a folder")
    return {}


def _under_a_file(tmp, cfg):
    (tmp / "afile").write_text("not a folder")
    return {"output_dir": str(tmp / "afile" / "run")}


def _unwritable_parent(tmp, cfg):
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse
        locked.chmod(stat.S_IRWXU)
        pytest.skip("running as root: a read-only folder is still writable")
    return {"output_dir": str(locked / "run")}


def _missing_dataset(tmp, cfg):
    return {"corpus": [str(tmp / "no-such-corpus")]} if "corpus" in cfg else {"dataset_name": str(tmp / "no-such.jsonl")}


MISSING_DATA = {  # the loaders' own messages: each names the path given
    **{name: (DataError, "data file not found: {tmp}/no-such.jsonl")
       for name in ("sft_instruction", "sft_classification", "continued_pretraining", "seq2seq", "reward_model",
                    "ppo_rlhf", "dpo")},
    "multitask": (DataError, "dataset_name '{tmp}/no-such.jsonl': expected the asset vader-sentiment or a folder"),
    "contrastive": (DataError, "dataset_name '{tmp}/no-such.jsonl': wordnet-definitions or an existing .jsonl"),
    "grounded_sft": (DataError, "dataset_name '{tmp}/no-such.jsonl': pydoc-qa or an existing .jsonl"),
    "pretrain": (DataError, "text source '{tmp}/no-such-corpus': not pydoc-topics, chatterbot-corpus, or an existing"),
}

# (case, recipes, overrides or a function (tmp, config) -> overrides, error, message; {tmp}: the test's folder)
KINDS = [
    # the state of the paths given
    ("output_dir is a file", list(RECIPES), _make_file, ConfigError,
     "output_dir {tmp}/run exists and is not a folder"),
    ("output_dir under a file", list(RECIPES), _under_a_file, ConfigError,
     "output_dir {tmp}/afile/run: {tmp}/afile is a file, so no folder can be made under it"),
    ("output_dir's parent unwritable", list(RECIPES), _unwritable_parent, ConfigError,
     "output_dir {tmp}/locked/run: {tmp}/locked is not writable by this user"),
    *[("dataset missing", [name], _missing_dataset, error, message) for name, (error, message) in MISSING_DATA.items()],
    ("knowledge base missing", ["grounded_sft"], lambda tmp, cfg: {"knowledge_base": str(tmp / "no-kb")}, DataError,
     "text source '{tmp}/no-kb': not pydoc-topics"),
    # values a library below us rejects late (after the weights load), or in its own words
    ("learning_rate negative", list(RECIPES), {"learning_rate": -1e-3}, ConfigError,
     "learning_rate: must be positive, got -0.001"),
    ("per_device_train_batch_size 0", list(RECIPES), {"per_device_train_batch_size": 0}, ConfigError,
     "per_device_train_batch_size: must be positive, got 0"),
    ("seed negative", list(RECIPES), {"seed": -1}, ConfigError,  # numpy: "Seed must be between 0 and 2**32 - 1"
     "seed: must be a whole number from 0 to 2**32 - 1, got -1"),
    ("weight_decay negative", list(RECIPES), {"weight_decay": -0.1}, ConfigError,  # torch, building the optimizer
     "weight_decay: must be 0 or more, got -0.1"),
    ("max_grad_norm negative", list(RECIPES), {"max_grad_norm": -1.0}, ConfigError,  # clipping silently off
     "max_grad_norm: must be 0 or more, got -1.0"),
    ("eval_batch_size 0", list(RECIPES), {"eval_batch_size": 0}, ConfigError,  # range() arg 3 must not be zero
     "eval_batch_size: must be positive, got 0"),
    ("train_samples negative", list(RECIPES), {"train_samples": -3}, ConfigError,  # [: -3] dropped rows silently
     "train_samples: must be 0 or more, got -3"),
    ("max_length 0", ["sft_instruction", "sft_classification", "multitask", "reward_model", "dpo", "contrastive",
                      "grounded_sft"], {"max_length": 0}, ConfigError, "max_length: must be positive, got 0"),
    ("block_size 0", ["continued_pretraining", "pretrain"], {"block_size": 0}, ConfigError,
     "block_size: must be positive, got 0"),
    ("max_source_length 0", ["seq2seq"], {"max_source_length": 0}, ConfigError,
     "max_source_length: must be positive, got 0"),
    ("eval_max_new_tokens 0", ["sft_instruction", "seq2seq", "grounded_sft", "dpo", "ppo_rlhf"],
     {"eval_max_new_tokens": 0}, ConfigError, "eval_max_new_tokens: must be positive, got 0"),
    ("response_length 0", ["ppo_rlhf", "dpo"], {"response_length": 0}, ConfigError,
     "response_length: must be positive, got 0"),
    ("sampling temperature 0", ["ppo_rlhf", "dpo"], {"temperature": 0.0}, ConfigError,
     "temperature: must be positive, got 0.0"),
    # PEFT took these and failed while building the adapter ("peft_method 'lora' does not fit llama"), or never
    ("lora_r 0", WITH_PEFT, {"lora_r": 0}, ConfigError, "lora_r: must be a whole number of at least 1, got 0"),
    ("lora_alpha negative", WITH_PEFT, {"lora_alpha": -16}, ConfigError, "lora_alpha: must be positive, got -16"),
    ("lora_alpha 0", ["sft_instruction"], {"lora_alpha": 0}, ConfigError, "lora_alpha: must be positive, got 0"),
    ("lora_dropout above 1", WITH_PEFT, {"lora_dropout": 1.5}, ConfigError,
     "lora_dropout: a dropout probability, from 0 up to (not including) 1; got 1.5"),
    ("peft_options r 0", ["sft_instruction", "reward_model"], {"peft_options": {"r": 0}}, ConfigError,
     "peft_options.r: must be a whole number of at least 1, got 0"),
    ("lora_target_modules not in the model", ["sft_instruction", "seq2seq"],
     {"lora_target_modules": ["no_such_proj"]}, ConfigError, "lora_target_modules: peft_method 'lora' does not fit"),
]
CASES = [(name, case, change, error, message) for case, names, change, error, message in KINDS for name in names]


@pytest.fixture
def no_weights(monkeypatch):
    """Any weight loading fails the test (and pretrain's first costly step, training its tokenizer)."""
    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the bad input was refused")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))
    monkeypatch.setattr(hf_tuner.models, "load_model", refuse)
    monkeypatch.setattr(hf_tuner.models, "load_seq2seq_model", refuse)
    monkeypatch.setattr("hf_tuner.tokenizer_training.train_tokenizer", refuse)


@pytest.mark.parametrize("name, case, change, error, message", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_bad_input_is_refused_before_weights_load(tmp_path, no_weights, name, case, change, error, message):
    config = config_for(name, tmp_path)
    config.update(change(tmp_path, config) if callable(change) else change)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "data" not in p.parts)
    with pytest.raises(error) as caught:
        RECIPES[name][0].train(config)
    assert message.format(tmp=tmp_path) in str(caught.value)
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if "data" not in p.parts)
    assert after == before, "a refused run must write nothing"
    if (tmp_path / "locked").exists():
        (tmp_path / "locked").chmod(stat.S_IRWXU)  # let pytest clean it up


def test_an_unwritable_parent_is_refused_as_a_user_sees_it(tmp_path, no_weights, monkeypatch):
    """The check itself, where the suite runs as root (which may write into a read-only folder): os.access
    answers as it would for an ordinary user."""
    real = os.access
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(locked) and
                        mode & os.W_OK else real(p, mode, **kw))
    config = {**config_for("contrastive", tmp_path), "output_dir": str(locked / "deeper" / "run")}
    with pytest.raises(ConfigError, match=f"output_dir {locked}/deeper/run: {locked} is not writable by this user"):
        contrastive.train(config)
    assert not any(locked.iterdir())
