"""The data layer over `datasets`: every source (Parquet, Arrow, save_to_disk, Hub-style repo folders, Hub ids),
every TRL dataset type in both forms, community shapes, mixtures, streaming, held-out splits, and bad rows
named by dataset, split and row. The recipe runs at the end train tiny models from a repo folder."""

import json
from pathlib import Path

import pytest
from datasets import Dataset, DatasetDict

from conftest import WORDS, write_jsonl
from hf_tuner.data import DataError, DataSource, data_sources, held_out, load_rows, sft_row
from hf_tuner.data import SFT_COLUMNS, SFT_TYPES
from hf_tuner.data.formats import preference_row, prompt_row, text_row
from hf_tuner.data.preferences import PREFERENCE_COLUMNS, PREFERENCE_TYPES, load_preferences, rl_prompts


def _sft(src: DataSource, recipe="sft_instruction"):
    return load_rows([src], sft_row, recipe, SFT_TYPES, SFT_COLUMNS)


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


PC_STD = [{"prompt": f"Define the word '{w}'.", "completion": f"a kind of {w} that is used in the house"}
          for w in WORDS]
PC_CONV = [{"prompt": [user(r["prompt"])], "completion": [assistant(r["completion"])]} for r in PC_STD]
CHAT = [{"messages": [user(f"Hi, I am {w}."), assistant(f"Hello {w}!"), user(f"Define the word '{w}'."),
                      assistant(f"a kind of {w} that is used in the house")]} for w in WORDS]
PREF_STD = [{"prompt": f"The {w} was", "chosen": " great fun", "rejected": " dull and slow"} for w in WORDS]
PREF_IMPLICIT_CONV = [{"chosen": [user(f"Rate the {w}."), assistant("It is great.")],
                       "rejected": [user(f"Rate the {w}."), assistant("It is awful.")]} for w in WORDS]
PROMPTS_STD = [{"prompt": f"The {w} was"} for w in WORDS]
PROMPTS_CONV = [{"prompt": [user(f"Tell me about the {w}.")]} for w in WORDS]
LM_TEXT = [{"text": f"The {w} is a thing. " * 20} for w in WORDS]
LM_CHAT = [{"messages": [user(f"What is a {w}?"), assistant(f"A {w} is a thing. " * 10)]} for w in WORDS]
UNPAIRED = [{"prompt": f"The {w} was", "completion": " great", "label": True} for w in WORDS]

CONFIGS = {"pc": PC_CONV, "chat": CHAT, "pref": PREF_STD, "pref_implicit": PREF_IMPLICIT_CONV,
           "prompts": PROMPTS_STD, "lm": LM_TEXT, "labels": [{"text": f"the {w} was fine", "label": "positive"
                                                              if i % 2 else "negative"} for i, w in enumerate(WORDS)]}


def make_repo(folder: Path, configs: dict, test_rows: int = 4) -> Path:
    """A dataset repo folder as on the Hub: Parquet files per config and split, a README `configs:` block."""
    lines = ["---", "configs:"]
    for name, rows in configs.items():
        (folder / "data").mkdir(parents=True, exist_ok=True)
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, part in (("train", rows[test_rows:]), ("test", rows[:test_rows])):
            Dataset.from_list(part).to_parquet(str(folder / "data" / f"{name}-{split}.parquet"))
            lines += [f"  - split: {split}", f"    path: data/{name}-{split}.parquet"]
    (folder / "README.md").write_text("\n".join(lines + ["---", "# test data", ""]))
    return folder


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return make_repo(tmp_path_factory.mktemp("repo") / "my-dataset", CONFIGS)


# ---------------------------------------------------------------- sources
def test_repo_folder_config_and_test_split(repo):
    data = _sft(DataSource(str(repo), "pc"))
    assert len(data.train) == len(WORDS) - 4 and len(data.test) == 4
    assert data.test[0]["prompt"] == PC_CONV[0]["prompt"]
    train, held = held_out(data, None, 0)
    assert held == data.test and train == data.train  # the test split is the held-out set; nothing carved


def test_repo_folder_without_config_names_the_configs(repo):
    with pytest.raises(DataError, match=r"pick one among the available configs.*'pc'.*set dataset_config"):
        _sft(DataSource(str(repo)))


def test_a_split_the_config_names_must_exist(repo):
    with pytest.raises(DataError, match=r"no split 'validation' \(dataset_test_split\); it has: test, train"):
        _sft(DataSource(str(repo), "pc", test_split="validation", test_split_explicit=True))
    with pytest.raises(DataError, match=r"no split 'dev' \(dataset_train_split\)"):
        _sft(DataSource(str(repo), "pc", train_split="dev"))
    # TRL's default test split name, not set by the user: a dataset without it is carved instead
    assert _sft(DataSource(str(repo), "pc", test_split="validation")).test is None


def test_repo_folder_of_plain_files_takes_splits_from_file_names(tmp_path):
    folder = tmp_path / "plain"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", PC_STD[4:])
    write_jsonl(folder / "test.jsonl", PC_STD[:4])
    data = _sft(DataSource(str(folder)))
    assert len(data.test) == 4 and data.test[0]["completion"][0]["content"] == PC_STD[0]["completion"]


def test_save_to_disk_parquet_and_arrow(tmp_path):
    DatasetDict({"train": Dataset.from_list(PC_STD[4:]), "test": Dataset.from_list(PC_STD[:4])}).save_to_disk(
        str(tmp_path / "saved"))
    data = _sft(DataSource(str(tmp_path / "saved")))
    assert (len(data.train), len(data.test)) == (len(WORDS) - 4, 4)
    Dataset.from_list(PC_STD).save_to_disk(str(tmp_path / "one"))  # a bare Dataset folder: one train split
    assert len(_sft(DataSource(str(tmp_path / "one"))).train) == len(WORDS)
    Dataset.from_list(PC_STD).to_parquet(str(tmp_path / "d.parquet"))
    data = _sft(DataSource(str(tmp_path / "d.parquet")))
    assert data.test is None and data.train[3]["prompt"] == [user(PC_STD[3]["prompt"])]
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert len(_sft(DataSource(str(arrow))).train) == len(WORDS)


def test_csv_keeps_text_as_text(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text('prompt,completion\n"Q?", 0\n"R?",\n')
    with pytest.raises(DataError, match=r"c\.csv row 3: `completion` is empty"):
        _sft(DataSource(str(path)))
    path.write_text('prompt,completion\n"Q?", 0\n')
    assert _sft(DataSource(str(path))).train[0]["completion"][0]["content"] == " 0"


def test_hub_id_offline_names_the_fix():
    with pytest.raises(DataError, match=r"is a Hub id, but this machine is offline.*hf download some-org/some-data "
                                        r"--repo-type dataset --local-dir DIR"):
        _sft(DataSource("some-org/some-data"))


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        _sft(DataSource(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.xlsx").write_text("hi")
    with pytest.raises(DataError, match="unsupported file type '.xlsx'"):
        _sft(DataSource(str(tmp_path / "x.xlsx")))


# ---------------------------------------------------------------- types x formats
def test_prompt_completion_standard_and_conversational(tmp_path):
    std = _sft(DataSource(str(write_jsonl(tmp_path / "s.jsonl", PC_STD)))).train
    conv = _sft(DataSource(str(write_jsonl(tmp_path / "c.jsonl", PC_CONV)))).train
    assert [r["prompt"] for r in std] == [r["prompt"] for r in conv]
    assert [r["completion"] for r in std] == [r["completion"] for r in conv]


def test_multi_turn_messages_keep_every_turn_and_evaluate_the_last():
    row = sft_row(CHAT[0], "row 0")
    assert row["turns"] == 2 and row["prompt"] == CHAT[0]["messages"][:3]
    assert row["completion"] == CHAT[0]["messages"][3:]


def test_preference_types_standard_conversational_explicit_implicit(tmp_path):
    std = load_rows([DataSource(str(write_jsonl(tmp_path / "p.jsonl", PREF_STD)))], preference_row, "reward_model",
                    PREFERENCE_TYPES, PREFERENCE_COLUMNS).train
    assert std[0]["prompt"] == "The apple was" and std[0]["chosen"] == " great fun"
    implicit = load_rows([DataSource(str(write_jsonl(tmp_path / "i.jsonl", PREF_IMPLICIT_CONV)))], preference_row,
                         "reward_model", PREFERENCE_TYPES, PREFERENCE_COLUMNS).train
    assert implicit[0]["prompt"] == [user("Rate the apple.")]  # the shared turn, as TRL's extract_prompt finds it
    assert implicit[0]["chosen"] == [assistant("It is great.")]
    explicit = [{"prompt": r["chosen"][:1], "chosen": r["chosen"][1:], "rejected": r["rejected"][1:]}
                for r in PREF_IMPLICIT_CONV]
    conv = load_rows([DataSource(str(write_jsonl(tmp_path / "e.jsonl", explicit)))], preference_row,
                     "reward_model", PREFERENCE_TYPES, PREFERENCE_COLUMNS).train
    assert [r["prompt"] for r in conv] == [r["prompt"] for r in implicit]


def test_prompt_only_standard_and_conversational(tmp_path):
    std = write_jsonl(tmp_path / "s.jsonl", PROMPTS_STD)
    train, held, _ = rl_prompts(str(std), None, 0, 0, 4, 4)
    assert len(held) == 4 and set(train) | set(held) == {r["prompt"] for r in PROMPTS_STD}
    conv = write_jsonl(tmp_path / "c.jsonl", PROMPTS_CONV)
    rendered = rl_prompts(str(conv), None, 0, 0, 4, 4, render=lambda m: "<chat>" + m[-1]["content"])[0]
    assert rendered and all(p.startswith("<chat>Tell me about") for p in rendered)


def test_language_modelling_text_and_messages(tmp_path):
    rows = load_rows([DataSource(str(write_jsonl(tmp_path / "t.jsonl", LM_TEXT + LM_CHAT)))], text_row,
                     "continued_pretraining", {"language_modeling": ""}, ("text", "messages", "name", "where")).train
    assert rows[0]["text"].startswith("The apple") and json.loads(rows[-1]["messages"])[0]["role"] == "user"


@pytest.mark.parametrize("rows, recipe, kinds, message", [
    (UNPAIRED, "sft_instruction", SFT_TYPES, r"sft_instruction takes prompt_completion, language_modeling rows, but "
                                             r"found a unpaired_preference dataset .*taken by: none yet"),
    (PREF_STD, "sft_instruction", SFT_TYPES, r"found a preference dataset.*taken by: reward_model, dpo"),
    (PROMPTS_STD, "sft_instruction", SFT_TYPES, r"found a prompt_only dataset.*taken by: ppo_rlhf"),
    (PC_STD, "reward_model", PREFERENCE_TYPES, r"reward_model takes preference, prompt_only rows"),
])
def test_a_recipe_refuses_a_type_it_cannot_use_and_names_what_it_takes(tmp_path, rows, recipe, kinds, message):
    with pytest.raises(DataError, match=message):
        load_rows([DataSource(str(write_jsonl(tmp_path / "d.jsonl", rows)))], sft_row, recipe, kinds, SFT_COLUMNS)


# ---------------------------------------------------------------- other shapes
def test_alpaca_sharegpt_and_a_column_mapping(tmp_path):
    alpaca = [{"instruction": "Define the word.", "input": w, "output": f"a kind of {w}"} for w in WORDS[:3]]
    a = _sft(DataSource(str(write_jsonl(tmp_path / "a.jsonl", alpaca)))).train
    assert a[0]["prompt"] == [user("Define the word.\n\napple")] and a[0]["completion"] == [assistant("a kind of apple")]
    sharegpt = [{"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": f"Define {w}."},
                                   {"from": "gpt", "value": f"a {w}"}]} for w in WORDS[:3]]
    s = _sft(DataSource(str(write_jsonl(tmp_path / "s.jsonl", sharegpt)))).train
    assert [m["role"] for m in s[0]["prompt"]] == ["system", "user"] and s[0]["completion"] == [assistant("a apple")]
    qa = [{"question": f"Define {w}.", "answer": f"a {w}"} for w in WORDS[:3]]
    mapped = _sft(DataSource(str(write_jsonl(tmp_path / "q.jsonl", qa)), columns={"prompt": "question",
                                                                                    "completion": "answer"})).train
    assert mapped[1]["prompt"] == [user("Define river.")]
    with pytest.raises(DataError, match=r"dataset_columns: .*q\.jsonl has no column 'query' \(for 'prompt'\); "
                                        r"its columns: question, answer"):
        _sft(DataSource(str(tmp_path / "q.jsonl"), columns={"prompt": "query", "completion": "answer"}))


# ---------------------------------------------------------------- bad rows, named with split and row
@pytest.mark.parametrize("config, bad, fn, kinds, message", [
    ("pc", {"prompt": [user("x")], "completion": [{"role": "robot", "content": "y"}]}, sft_row, SFT_TYPES,
     r"my-dataset \(pc\) split train row 2: `completion\[0\]\.role` is 'robot'"),
    ("chat", {"messages": [user("x"), assistant("y"), user("z")]}, sft_row, SFT_TYPES,
     r"split train row 2: the last message must be the assistant's answer"),
    ("pref", {"prompt": "p", "chosen": "same", "rejected": "same"}, preference_row, PREFERENCE_TYPES,
     r"split train row 2: `chosen` and `rejected` are the same text"),
    ("prompts", {"prompt": "   "}, prompt_row, {"prompt_only": ""}, r"split train row 2: `prompt` is empty"),
    ("lm", {"text": ""}, text_row, {"language_modeling": ""}, r"split test row 2: `text` is empty"),
])
def test_bad_rows_in_each_shape_name_dataset_split_and_row(tmp_path, config, bad, fn, kinds, message):
    rows = list(CONFIGS[config])
    test_rows = 4
    rows.insert(2 if "split test" in message else test_rows + 2, bad)  # row 2 of the split named
    folder = make_repo(tmp_path / "my-dataset", {config: rows}, test_rows=test_rows)
    columns = ("prompt", "completion", "chosen", "rejected", "text", "messages", "group", "where")
    with pytest.raises(DataError, match=message):
        load_rows([DataSource(str(folder), config)], fn, "recipe", kinds, columns)


# ---------------------------------------------------------------- held-out carve, mixtures, streaming
def test_carve_fits_a_small_dataset_when_eval_samples_is_unset(tmp_path, capsys):
    rows = [{"prompt": f"Define the word '{w}{i}'.", "completion": "a thing"} for i in range(3) for w in WORDS]
    data = _sft(DataSource(str(write_jsonl(tmp_path / "d.jsonl", rows))))
    train, held = held_out(data, None, 0)
    assert len(held) == 6  # 10% of 60 distinct prompts
    assert "no test split" in capsys.readouterr().out
    assert not {r["group"] for r in held} & {r["group"] for r in train}


def test_mixture_counts_rows_per_source_and_honours_weights(repo, tmp_path):
    from hf_tuner.config import parse_config
    from trl import SFTConfig

    extra = write_jsonl(tmp_path / "extra.jsonl", PC_STD)
    cfg = parse_config(SFTConfig, {"dataset_mixture": {"datasets": [
        {"id": str(repo), "config": "pc", "split": "train"},
        {"id": str(extra), "weight": 0.5}]}, "output_dir": str(tmp_path / "o")})
    sources = data_sources(cfg)
    data = load_rows(sources, sft_row, "sft_instruction", SFT_TYPES, SFT_COLUMNS)
    assert data.counts == {f"{repo} (pc)": {"train": len(WORDS) - 4, "test": 4},
                           str(extra): {"train": len(WORDS) // 2, "test": 0}}
    assert len(data.train) == len(WORDS) - 4 + len(WORDS) // 2 and len(data.test) == 4
    assert {r["source"] for r in data.train} == {f"{repo} (pc)", str(extra)}
    with pytest.raises(DataError, match=r"dataset_mixture.datasets\[0\].weight: 2 must lie in \(0, 1\]"):
        data_sources(parse_config(SFTConfig, {"dataset_mixture": {"datasets": [{"id": str(extra), "weight": 2}]},
                                              "output_dir": str(tmp_path / "o")}))


def test_streaming_checks_rows_as_they_are_read(tmp_path):
    from hf_tuner.data.loader import STREAM_BATCH

    good = [{"prompt": f"Define '{w}{i}'.", "completion": "a thing"} for i in range(20) for w in WORDS]
    rows = good[:STREAM_BATCH] + [{"prompt": "x", "completion": "  "}] + good[STREAM_BATCH:]
    data = _sft(DataSource(str(write_jsonl(tmp_path / "d.jsonl", rows)), streaming=True))
    assert data.streaming and data.counts == {}
    train, held = held_out(data, 4, 0)
    assert [r["prompt"] for r in held] == [[user(r["prompt"])] for r in good[:4]]
    seen = []
    with pytest.raises(DataError, match=rf"d\.jsonl row {STREAM_BATCH + 1}: `completion` is empty"):
        for r in train:
            seen.append(r)
    assert len(seen) == STREAM_BATCH - 4  # the rows before the bad one's batch came through, then it was refused


def test_vader_still_builds_pairs(tmp_path):
    from conftest import write_vader_folder

    folder = write_vader_folder(tmp_path / "vader")
    train, held = load_preferences([DataSource(str(folder))], ["movieReviewSnippets"], train_pairs=50, eval_pairs=10,
                                   eval_snippets=10, seed=0)
    assert len(train) == 50 and len(held) == 10


def test_fields_a_recipe_does_not_use_are_named_and_reset(tmp_path, capsys):
    from trl import SFTConfig

    from hf_tuner.config import parse_config

    cfg = parse_config(SFTConfig, {"eval_strategy": "epoch", "dataset_text_field": "content", "seed": 3,
                                   "output_dir": str(tmp_path / "o")})
    out = capsys.readouterr().out
    assert "warning: `eval_strategy: epoch` is not used by this recipe" in out
    assert "warning: `dataset_text_field: content` is not used" in out and "`seed" not in out
    assert cfg.training.eval_strategy == "no" and cfg.training.dataset_text_field == "text"
    kept = parse_config(SFTConfig, {"eval_strategy": "epoch", "output_dir": str(tmp_path / "o")},
                        uses={"eval_strategy"})
    assert kept.training.eval_strategy == "epoch"


def test_a_recipe_that_cannot_stream_refuses_dataset_streaming(tmp_path):
    from recipes.reward_model import train

    data = write_jsonl(tmp_path / "p.jsonl", PREF_STD)
    with pytest.raises(DataError, match="dataset_streaming: this recipe reads its data into memory; "
                                        "continued_pretraining and sft_instruction stream"):
        train({"model_name_or_path": "tiny-bert", "dataset_name": str(data), "dataset_streaming": True,
               "output_dir": str(tmp_path / "run")})
    assert not (tmp_path / "run").exists()


def test_eval_rebuilds_a_runs_held_out_rows_from_its_config(repo):
    from hf_tuner.evaluation.checkpoint_eval import held_out_split

    _, held = held_out_split(str(repo), None, 0, {"dataset_config": "pc", "dataset_test_split": "test"})
    assert [r["prompt"] for r in held] == [r["prompt"] for r in PC_CONV[:4]]  # the run's test split
