"""Every recipe trains from a Hub-style local repo folder on the types it serves, chosen by dataset_config, with
the repo's test split as the held-out set; multi-turn rows carry loss on every assistant turn; streaming runs
train with max_steps. Tiny models, a few steps each."""

import json

import pytest
from datasets import Dataset

from conftest import WORDS, assert_loss_falls, logged_losses, write_jsonl
from hf_tuner.config import ConfigError
from hf_tuner.data import DataError
from test_data_sources import CHAT, CONFIGS, LM_TEXT, PC_STD, PROMPTS_CONV, make_repo

COMMON = {"save_strategy": "no", "report_to": [], "bf16": False, "seed": 0, "num_threads": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("repo") / "my-dataset",
                     {**CONFIGS, "chat": CHAT * 2, "prompts_conv": PROMPTS_CONV})


def _sft(tmp_path, **overrides):
    return {"model_name_or_path": "tiny-llama", "output_dir": str(tmp_path / "run"), "few_shot": 0,
            "eval_batch_size": 4, "eval_max_new_tokens": 4, "per_device_train_batch_size": 4, "max_steps": 12,
            "learning_rate": 1e-2, "lora_r": 8, "max_length": 64, "gradient_checkpointing": False, **COMMON,
            **overrides}


def test_multi_turn_rows_carry_loss_on_every_assistant_turn(tiny_llama):
    from hf_tuner.data import sft_row
    from hf_tuner.models import load_tokenizer
    from recipes.sft_instruction import _train_dataset

    tokenizer = load_tokenizer(tiny_llama)
    rows = [sft_row(r, f"row {i}") for i, r in enumerate(CHAT[:2])]
    dataset, pretokenized = _train_dataset(rows, None, tokenizer, 128)
    assert pretokenized
    labelled = tokenizer.decode([t for t in dataset[0]["labels"] if t != -100])
    assert "Hello apple!" in labelled and "a kind of apple that is used in the house" in labelled  # both answers
    assert "Hi, I am apple." not in labelled and "Define the word" not in labelled  # no user turn


def test_sft_instruction_from_a_repo_folder_multi_turn_with_its_test_split(tmp_path, repo, tiny_llama, capsys):
    from recipes.sft_instruction import train

    result = train(_sft(tmp_path, dataset_name=str(repo), dataset_config="chat", dataset_test_split="test"))
    assert "the dataset's test split (4 rows" in capsys.readouterr().out
    assert result.metrics["train"]["eval_examples"] == 4
    held = [json.loads(line)["prompt"] for line in (result.output_dir / "generations.jsonl").read_text().splitlines()]
    assert held == [CHAT[i]["messages"][2]["content"] for i in range(4)]  # the last user turn of each test row
    losses = logged_losses(result.output_dir)
    assert_loss_falls(losses, window=3)


def test_sft_instruction_streams_with_max_steps(tmp_path, tiny_llama):
    from recipes.sft_instruction import train

    data = write_jsonl(tmp_path / "d.jsonl", PC_STD * 5)
    with pytest.raises(ConfigError, match="dataset_streaming: a stream has no length; set max_steps"):
        train(_sft(tmp_path, dataset_name=str(data), dataset_streaming=True, max_steps=-1, num_train_epochs=1))
    result = train(_sft(tmp_path, dataset_name=str(data), dataset_streaming=True, eval_samples=4, max_steps=6,
                        train_sampling_strategy="sequential"))
    assert result.metrics["train"]["steps"] == 6 and result.metrics["train"]["eval_examples"] == 4
    assert result.metrics["train"]["train_examples"] is None  # a stream's length is never read


def test_continued_pretraining_from_a_repo_folder_and_a_stream(tmp_path, repo, tiny_llama):
    from recipes.continued_pretraining import train

    cfg = {"model_name_or_path": "tiny-llama", "dataset_name": str(repo), "dataset_config": "lm",
           "general_dataset": "", "output_dir": str(tmp_path / "run"), "block_size": 32, "eval_documents": 2,
           "eval_samples": 8, "eval_batch_size": 8, "lora_r": 8, "per_device_train_batch_size": 8, "max_steps": 8,
           "learning_rate": 1e-2, **COMMON}
    result = train(cfg)
    assert [d.split("/")[-1] for d in result.metrics["train"]["held_out_documents"]] == [
        "my-dataset (lm) split test row 0", "my-dataset (lm) split test row 1"]  # the repo's test split
    assert result.metrics["tuned"]["perplexity"] < result.metrics["base"]["perplexity"]
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(r["text"] for r in LM_TEXT))  # one document per paragraph
    streamed = train({**cfg, "dataset_name": str(text), "dataset_config": None, "dataset_streaming": True,
                      "output_dir": str(tmp_path / "stream")})
    assert streamed.metrics["train"]["streaming"] and streamed.metrics["train"]["steps"] == 8
    assert streamed.metrics["tuned"]["perplexity"] < streamed.metrics["base"]["perplexity"]


def test_reward_model_from_a_repo_folder_of_conversational_implicit_pairs(tmp_path, repo):
    from recipes.reward_model import train

    result = train({"model_name_or_path": "tiny-bert", "dataset_name": str(repo), "dataset_config": "pref_implicit",
                    "output_dir": str(tmp_path / "run"), "peft_method": "full", "max_length": 32,
                    "per_device_train_batch_size": 8, "max_steps": 12, "learning_rate": 1e-3,
                    "gradient_checkpointing": False, **COMMON})
    assert result.metrics["train"]["eval_pairs"] == 4  # the repo's test split
    assert result.metrics["tuned"]["pairwise_accuracy"] == 1.0 > result.metrics["base"]["pairwise_accuracy"] - 1


def test_dpo_from_a_repo_folder(tmp_path, repo, tiny_llama):
    from recipes.dpo import train

    result = train({"model_name_or_path": tiny_llama, "dataset_name": str(repo), "dataset_config": "pref",
                    "output_dir": str(tmp_path / "dpo"), "reward_model": "test_rl:length_reward",
                    "lora_target_modules": ["all-linear"], "response_length": 6, "max_length": 32,
                    "per_device_train_batch_size": 4, "max_steps": 6, "learning_rate": 1e-2, "eval_batch_size": 4,
                    "gradient_checkpointing": False, **COMMON})
    assert result.metrics["train"]["eval_prompts"] == 4  # the test split's prompts
    losses = logged_losses(result.output_dir, "rl_history.json")
    assert losses[-1] < losses[0], losses


def test_ppo_from_a_repo_folder_of_conversational_prompts(tmp_path, repo, tiny_llama):
    from recipes.ppo_rlhf import train

    result = train({"model_name_or_path": tiny_llama, "dataset_name": str(repo), "dataset_config": "prompts_conv",
                    "output_dir": str(tmp_path / "run"), "reward_model": "test_rl:length_reward",
                    "lora_r": 8, "lora_target_modules": ["all-linear"], "per_device_train_batch_size": 8,
                    "max_steps": 2, "response_length": 6, "ppo_epochs": 1, "num_mini_batches": 1,
                    "eval_batch_size": 4, **COMMON})
    assert result.metrics["train"]["eval_prompts"] == 4
    generations = (result.output_dir / "generations.jsonl").read_text()
    assert "<|im_start|>user\\nTell me about the apple." in generations  # rendered with the chat template


def test_classification_and_seq2seq_from_save_to_disk_and_parquet(tmp_path, repo):
    from recipes.seq2seq import train as seq2seq
    from recipes.sft_classification import train as classify

    result = classify({"model_name_or_path": "tiny-bert", "dataset_name": str(repo), "dataset_config": "labels",
                       "output_dir": str(tmp_path / "cls"), "baseline_model": "", "few_shot": 0, "peft_method": "full",
                       "max_length": 32, "per_device_train_batch_size": 8, "max_steps": 4, **COMMON})
    assert result.metrics["train"]["eval_examples"] == 4
    from datasets import DatasetDict

    DatasetDict({"train": Dataset.from_list(PC_STD[4:]), "test": Dataset.from_list(PC_STD[:4])}).save_to_disk(
        str(tmp_path / "saved"))
    result = seq2seq({"model_name_or_path": "tiny-t5", "dataset_name": str(tmp_path / "saved"),
                      "output_dir": str(tmp_path / "s2s"), "eval_batch_size": 4, "eval_max_new_tokens": 4,
                      "peft_method": "full", "per_device_train_batch_size": 8, "max_steps": 4, **COMMON})
    assert result.metrics["train"]["eval_examples"] == 4


def test_bad_rows_are_refused_before_any_weights_load(tmp_path, repo, monkeypatch):
    import hf_tuner.models
    from recipes.sft_instruction import train

    monkeypatch.setattr(hf_tuner.models, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    rows = CHAT[:8] + [{"messages": [{"role": "assistant", "content": "x"}]}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(DataError, match=r"bad\.parquet split train row 8: `messages` needs at least one message"):
        train(_sft(tmp_path, dataset_name=str(tmp_path / "bad.parquet")))
    assert not (tmp_path / "run").exists()


def test_sft_instruction_on_a_mixture_reports_rows_per_source(tmp_path, repo, tiny_llama):
    from recipes.sft_instruction import train

    extra = write_jsonl(tmp_path / "extra.jsonl", [{"question": f"What is a {w}?", "answer": f"a {w}"} for w in WORDS])
    mixture = {"datasets": [{"id": str(repo), "config": "pc", "test_split": "test"},
                            {"id": str(extra), "weight": 0.5, "columns": {"prompt": "question", "completion": "answer"}}]}
    result = train(_sft(tmp_path, dataset_mixture=mixture, max_steps=4))
    data = result.metrics["train"]["data"]
    assert data[str(extra)] == {"train": 10, "test": 0, "trained": 10}
    assert data[f"{repo} (pc)"] == {"train": 16, "test": 4, "trained": 16}
    assert f"| {extra} | 10 | 10 | 0 |" in (result.output_dir / "report.md").read_text()
    saved = (result.output_dir / "config.yaml").read_text()
    assert "dataset_mixture:" in saved and "weight: 0.5" in saved  # the mixture is part of the run's record
