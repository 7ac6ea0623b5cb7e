import pytest

from conftest import (NEGATIVE, NOUNS, POSITIVE, assert_loss_falls, assert_run_files, logged_losses, write_jsonl,
                      write_vader_folder)
from hf_tuner.data import DataError
from hf_tuner.data.preferences import load_preferences, rating_pairs, read_preference_file
from recipes.reward_model import train


def _toy_pairs(n=96):
    """Separable preferences: the chosen text praises, the rejected one pans."""
    return [{"chosen": f"the {NOUNS[i % 10]} was {POSITIVE[i % 8]} and {POSITIVE[(i // 8) % 8]}",
             "rejected": f"the {NOUNS[(i + 3) % 10]} was {NEGATIVE[i % 8]} and {NEGATIVE[(i // 8) % 8]}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rm")
    data = write_jsonl(tmp / "prefs.jsonl", _toy_pairs())
    cfg = {"model_name_or_path": "tiny-bert", "dataset_name": str(data), "output_dir": str(tmp / "run"),
           "eval_samples": 16, "peft_method": "full", "max_length": 32, "per_device_train_batch_size": 8,
           "max_steps": 40, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
           "gradient_checkpointing": False, "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0,
           "num_threads": 2}
    return train(cfg)


def test_reward_model_learns_a_separable_preference_set(finished_run):
    metrics = finished_run.metrics
    assert metrics["tuned"]["pairwise_accuracy"] == 1.0
    assert metrics["tuned"]["mean_margin"] > metrics["base"]["mean_margin"] + 1.0
    losses = logged_losses(finished_run.output_dir)
    assert_loss_falls(losses, window=5, by=0.3)
    assert_run_files(finished_run.output_dir, ("metrics.json", "report.md", "reward_distribution.png",
                                               "model/config.json"))
    assert set(metrics["bias"]) == {"base (untrained head)", "tuned"}  # counterfactual bias checks, both models
    assert metrics["bias"]["tuned"]["kind"] == "reward" and "names" in metrics["bias"]["tuned"]["dimensions"]
    assert "Counterfactual bias checks" in (finished_run.output_dir / "report.md").read_text()


def test_saved_reward_model_scores_like_the_one_in_memory(finished_run):
    from hf_tuner.rl.rewards import RewardModel, load_reward_function

    texts = ["the film was great and lovely", "the plot was awful and dull"]
    in_memory = RewardModel(finished_run.model, finished_run.tokenizer).score_texts(texts)
    reloaded = load_reward_function(str(finished_run.output_dir))  # a run folder resolves to its model/
    assert reloaded.score_texts(texts) == pytest.approx(in_memory, abs=1e-5)
    assert in_memory[0] > in_memory[1]


def test_ranking_rows_expand_into_all_ordered_pairs(tmp_path):
    path = write_jsonl(tmp_path / "ranked.jsonl", [
        {"prompt": "p1", "ranking": ["best", "middle", "worst"], "annotator": "a", "timestamp": "t"},
        {"prompt": "p2", "chosen": "yes", "rejected": "no"}])
    rows = read_preference_file(path)
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("best", "middle"), ("best", "worst"), ("middle", "worst"), ("yes", "no")]


@pytest.mark.parametrize("row, message", [
    ({"chosen": "a"}, "row 2: missing column(s) `rejected`"),
    ({"chosen": "a", "rejected": ""}, "row 2: `rejected` is empty"),
    ({"prompt": "p", "ranking": ["only one"]}, "row 2: `ranking` must be a list of at least two"),
    ({"chosen": "same", "rejected": "same"}, "row 2: `chosen` and `rejected` are the same text"),
])
def test_bad_preference_rows_are_named(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"chosen": "good", "rejected": "bad"}, row])
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_preference_file(path)


def test_vader_pairs_respect_the_gap_and_never_cross_the_split(tmp_path):
    folder = write_vader_folder(tmp_path / "vader", per_source=80)
    train_pairs, held = load_preferences(str(folder), ["movieReviewSnippets"], train_pairs=200, eval_pairs=20,
                                         eval_snippets=20, min_gap=1.0, seed=0)
    assert train_pairs and held
    assert all(p["gap"] >= 1.0 for p in train_pairs + held)
    train_texts = {t for p in train_pairs for t in (p["chosen"], p["rejected"])}
    held_texts = {t for p in held for t in (p["chosen"], p["rejected"])}
    assert not train_texts & held_texts
    rows = [{"text": f"t{i}", "rating": r, "group": f"t{i}"} for i, r in enumerate([-2.0, 0.0, 2.0])]
    pairs = rating_pairs(rows, 10, 1.5, 0)
    assert {(p["chosen"], p["rejected"]) for p in pairs} == {("t2", "t0"), ("t1", "t0"), ("t2", "t1")}
