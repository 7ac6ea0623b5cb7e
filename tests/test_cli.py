import json
import subprocess
import sys

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from conftest import REPO, subprocess_env

PREDS = ["the cat sat on the mat", "", "une phrase en français", "a dog"]
REFS = ["the cat is on the mat", "an empty answer", "une phrase française", "a dog"]


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "hf_tuner.cli", *args], cwd=REPO, capture_output=True, text=True,
                          env=subprocess_env())


@pytest.fixture
def files(tmp_path):
    p, r = tmp_path / "p.txt", tmp_path / "r.txt"
    p.write_text("\n".join(PREDS) + "\n")
    r.write_text("\n".join(REFS) + "\n")
    return p, r


def test_score_agrees_with_sacrebleu_and_rouge_score(files):
    p, r = files
    proc = _cli("score", "--predictions", str(p), "--references", str(r),
                "--metrics", "bleu,rouge1,rouge2,rougeL,exact_match")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert list(got) == ["bleu", "rouge1", "rouge2", "rougeL", "exact_match"]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(PREDS, [REFS]).score, abs=1e-6)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    for k in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(ref, pred)[k].fmeasure for pred, ref in zip(PREDS, REFS)) / len(PREDS)
        assert got[k] == pytest.approx(expected, abs=1e-6)
    assert got["exact_match"] == pytest.approx(0.25)


def test_score_labels(tmp_path):
    p, r = tmp_path / "p.txt", tmp_path / "r.txt"
    p.write_text("pos\nneg\npos\nmid\n")
    r.write_text("pos\nneg\nneg\nmid\n")
    proc = _cli("score", "--predictions", str(p), "--references", str(r), "--metrics", "accuracy,f1",
                "--average", "macro")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["accuracy"] == pytest.approx(0.75)
    assert got["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


@pytest.mark.parametrize("pred_text, metrics, message", [
    ("a\nb\n", "bleu", "has 2 lines but"),
    ("", "bleu", "empty file"),
    ("a\nb\nc\nd\n", "bleu,meteor", "unknown metric"),
])
def test_score_errors_are_clear(tmp_path, files, pred_text, metrics, message):
    _, r = files
    p = tmp_path / "bad.txt"
    p.write_text(pred_text)
    proc = _cli("score", "--predictions", str(p), "--references", str(r), "--metrics", metrics)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_compare_puts_runs_in_one_table(tmp_path):
    for name, tuned in [("run_a", 0.30), ("run_b", 0.40)]:
        d = tmp_path / name
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "base": {"rougeL": 0.1, "rouge1": 0.12}, "baselines": {"few_shot_3": {"rougeL": 0.15, "rouge1": 0.2}},
            "tuned": {"rougeL": tuned, "rouge1": tuned + 0.05}, "train": {"runtime_s": 1.0}}))
    out = tmp_path / "cmp" / "comparison.md"
    proc = _cli("compare", str(tmp_path / "run_a"), str(tmp_path / "run_b"), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "| run_b: tuned | 0.450 | 0.400 |" in proc.stdout
    assert "| run_a: base (few_shot_3) |" in out.read_text()
    assert out.with_suffix(".png").exists()
    proc = _cli("compare", str(tmp_path / "nope"))
    assert proc.returncode == 2 and "no metrics.json" in proc.stderr


def test_eval_command_tabulates_decoding_strategies(tmp_path, tiny_llama):
    from conftest import WORDS, write_jsonl

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Define the word '{w}'.", "completion": f"a {w}"}
                                              for w in WORDS])
    out = tmp_path / "eval"
    proc = _cli("eval", "--model", "tiny-llama", "--task", str(data), "--baselines", "zero_shot,few_shot_2",
                "--decoding", "greedy,top_p", "--eval_samples", "4", "--max_new_tokens", "4",
                "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr
    record = json.loads((out / "metrics.json").read_text())
    assert set(record["results"]) == {"greedy/zero_shot", "top_p/zero_shot", "greedy/few_shot_2", "top_p/few_shot_2"}
    for m in record["results"].values():
        assert {"rougeL", "bleu", "distinct_2", "seconds_per_example"} <= set(m)
    assert "| greedy/few_shot_2 |" in (out / "report.md").read_text()
    proc = _cli("eval", "--model", "tiny-llama", "--task", str(data), "--decoding", "nucleus",
                "--output_dir", str(tmp_path / "e2"))
    assert proc.returncode == 2 and "unknown decoding strategy" in proc.stderr


def test_eval_of_a_run_uses_the_runs_held_out_split_and_refuses_another(tmp_path, tiny_llama, capsys):
    """A larger --eval_samples (or another --split_seed) than the run's rebuilt a held-out set with training
    rows in it. The config.yaml beside the adapter decides; a flag that contradicts it is refused."""
    import yaml
    from peft import LoraConfig, get_peft_model

    from conftest import WORDS, write_jsonl
    from hf_tuner.cli import main
    from hf_tuner.evaluation.checkpoint_eval import evaluate_checkpoint, held_out_split
    from hf_tuner.models import load_model

    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Define the word '{w}'.", "completion": f"a {w}"}
                                              for w in WORDS])
    run = tmp_path / "run"
    model, tok = load_model(tiny_llama, "causal-lm")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({"dataset_name": str(data), "eval_samples": 3, "split_seed": 5,
                                                     "system_prompt": "Be brief."}))
    record = evaluate_checkpoint(tiny_llama, str(data), tmp_path / "e1", adapter=str(run / "adapter"),
                                 max_new_tokens=2)
    assert record["split"] == {"eval_samples": 3, "split_seed": 5, "from_run_config": str(run / "config.yaml")}
    assert record["system_prompt"] == "Be brief." and record["eval_examples"] == 3
    held = held_out_split(str(data), 3, 5)[1]
    prompts = json.loads((tmp_path / "e1" / "predictions.json").read_text())["prompts"]
    assert prompts == [r["prompt"][-1]["content"] for r in held]  # exactly the rows the run held out
    assert main(["eval", "--model", tiny_llama, "--adapter", str(run / "adapter"), "--task", str(data),
                 "--eval_samples", "8", "--output_dir", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err
    assert "--eval_samples 8 (the run used 3)" in err and "would score rows the model trained on" in err
    with pytest.raises(ValueError, match=r"--split_seed 0 \(the run used 5\)"):
        evaluate_checkpoint(tiny_llama, str(data), tmp_path / "e3", adapter=str(run / "adapter"), split_seed=0)
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e3").exists()
    # the same values spelled out pass; another task than the run's is not its split to guard
    assert evaluate_checkpoint(tiny_llama, str(data), tmp_path / "e4", adapter=str(run / "adapter"), eval_samples=3,
                               split_seed=5, max_new_tokens=2)["eval_examples"] == 3
    other = write_jsonl(tmp_path / "other.jsonl", [{"prompt": f"Spell '{w}'.", "completion": w} for w in WORDS])
    record = evaluate_checkpoint(tiny_llama, str(other), tmp_path / "e5", adapter=str(run / "adapter"),
                                 eval_samples=4, max_new_tokens=2)
    assert record["split"]["from_run_config"] is None and record["eval_examples"] == 4
