import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from hf_tuner.evaluation.bias import (DEFAULT_TERMS, bias_for_model, counterfactual_texts, load_dimensions,
                                      measure_bias)


class BagOfWordsClassifier(torch.nn.Module):
    """Logits = sum of per-token weights: exactly as dependent on a token as we make it."""

    def __init__(self, vocab_size: int, positive_weights: dict[int, float]):
        super().__init__()
        self.weights = torch.nn.Embedding(vocab_size, 2)
        torch.nn.init.zeros_(self.weights.weight)
        with torch.no_grad():
            for token, w in positive_weights.items():
                self.weights.weight[token, 1] = w
        self.config = SimpleNamespace(id2label={0: "negative", 1: "positive"}, num_labels=2)

    def forward(self, input_ids, attention_mask=None, **_):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        return SimpleNamespace(logits=(self.weights(input_ids) * mask[..., None]).sum(1))


@pytest.fixture(scope="module")
def tokenizer():
    from hf_tuner.models import load_tokenizer

    return load_tokenizer("tiny-bert")


def _ids(tokenizer, texts):
    return {i for t in texts for i in tokenizer(t)["input_ids"]}


def test_gap_is_zero_for_a_model_that_ignores_the_swapped_terms(tokenizer):
    from collections import Counter

    dims = load_dimensions()
    texts = [t for d in dims for _, _, t in counterfactual_texts(d)]
    # weights on the template words only ("doctor", "engineer", ...): none on a token whose count differs
    # between the variants of any template, i.e. on what the swap changes
    swapped = set()
    for d in dims:
        rows = counterfactual_texts(d)
        for t in range(len(d.templates)):
            counts = [Counter(tokenizer(text)["input_ids"]) for i, _, text in rows if i == t]
            swapped |= {tok for c in counts for tok in c if len({c2[tok] for c2 in counts}) > 1}
    weights = {i: 0.3 * ((i % 7) - 3) for i in _ids(tokenizer, texts) - swapped}
    model = BagOfWordsClassifier(len(tokenizer), weights)
    result = bias_for_model(model, tokenizer, "classifier")
    assert set(result["dimensions"]) == {"names", "pronouns", "nationalities"}
    for dim, r in result["dimensions"].items():
        means = list(r["group_means"].values())
        assert max(means) - min(means) < 1e-6, (dim, r)  # fp32 sums; the templates do move the score, the terms do not
        assert abs(r["gap"]) < 1e-6 and r["p_value"] == 1.0 and not r["significant"]
    assert len({round(v, 6) for v in model.weights.weight[:, 1].tolist()}) > 1


def test_gap_is_large_for_a_model_built_to_depend_on_the_terms(tokenizer):
    dims = {d.name: d for d in load_dimensions()}
    rows = [row for name in ("names", "pronouns") for row in counterfactual_texts(dims[name])]
    female = [text for _, group, text in rows if group == "female"]
    male = [text for _, group, text in rows if group == "male"]
    # positive weight on tokens only female names/pronouns have: "female" texts score higher
    model = BagOfWordsClassifier(len(tokenizer), {i: 2.0 for i in _ids(tokenizer, female) - _ids(tokenizer, male)})
    result = bias_for_model(model, tokenizer, "classifier")["dimensions"]
    for dim in ("names", "pronouns"):
        r = result[dim]
        assert r["highest"] == "female" and r["gap"] > 0.1, r
        assert r["gap"] > r["null_gap_95"] and r["p_holm"] < 0.05 and r["significant"], r


def test_measure_bias_on_plain_scorers():
    dims = load_dimensions()
    flat = measure_bias(lambda texts: [0.5] * len(texts), dims)
    assert all(r["gap"] == 0 for r in flat.values())
    by_name = measure_bias(lambda texts: [1.0 if "Nigerian" in t else 0.0 for t in texts], dims)["nationalities"]
    assert by_name["highest"] == "Nigerian" and by_name["gap"] == pytest.approx(1.0)
    assert by_name["n_templates"] == 8 and by_name["n_texts"] == 8 * 8


def _noise_scorer(seed: int, effect: dict[str, float] | None = None):
    """A fake model: a large per-template effect, independent noise per text, and no dependence on the group
    term unless `effect` plants one (a shift for texts that contain a term)."""
    rng = np.random.default_rng([seed, 7])  # a stream apart from the test's own permutations (seeded `seed`)
    effect = effect or {}

    def score(texts):
        base = {t: rng.normal(0, 2) for t in {_template_of(x) for x in texts}}
        return [base[_template_of(x)] + rng.normal(0, 1) + sum(v for term, v in effect.items() if term in x.split())
                for x in texts]

    return score


SWAPPED = {w for d in load_dimensions() for terms in d.groups.values() for t in terms for w in t.values()}


def _template_of(text: str) -> str:
    """The template a probe text came from: its words minus the swapped term (enough for these probes)."""
    return " ".join(w for w in text.replace(".", " .").split() if w not in SWAPPED)


def test_no_dependence_on_the_group_term_is_flagged_about_5_percent_of_the_time():
    """The false-positive rate of the test over many seeds, on a scorer whose only link to the text is its
    template (plus noise): about 5% per dimension, and Holm keeps the chance of flagging any dimension near
    5%. The old max - min bootstrap interval excluded 0 in every such run."""
    dims = load_dimensions()
    n_seeds = 300
    raw, family = 0, 0
    for seed in range(n_seeds):
        result = measure_bias(_noise_scorer(seed), dims, n_permutations=199, seed=seed)
        raw += sum(r["p_value"] <= 0.05 for r in result.values())
        family += any(r["significant"] for r in result.values())
        assert all(r["gap"] > 0 for r in result.values())  # the gap itself is never 0 under noise
    rate = raw / (n_seeds * len(dims))
    assert 0.03 <= rate <= 0.075, rate  # binomial sd at 900 tests: 0.007
    assert 0.015 <= family / n_seeds <= 0.085, family / n_seeds  # sd at 300 runs: 0.013


def test_a_planted_dependence_is_detected_and_attributed_to_its_pair():
    dims = load_dimensions()
    detected = 0
    for seed in range(20):
        result = measure_bias(_noise_scorer(seed, {"Nigerian": 3.0}), dims, n_permutations=199, seed=seed)
        r = result["nationalities"]
        detected += r["significant"] and r["highest"] == "Nigerian"
        pairs = {(p["a"], p["b"]): p for p in r["pairs"]}
        # every pair without Nigerian has no true difference: a corrected p-value that rarely falls below 0.05
        clean = [p["p_adjusted"] for (a, b), p in pairs.items() if "Nigerian" not in (a, b)]
        assert sum(p <= 0.05 for p in clean) <= 1
    assert detected >= 18, detected


def test_permutation_p_value_and_holm_by_hand():
    from hf_tuner.evaluation.bias import holm, permutation_test

    # two templates, two groups, one text each: 4 relabellings, two of which give the observed gap of 1
    scores = np.array([0.0, 1.0, 5.0, 6.0])
    result = permutation_test(scores, np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]), ["a", "b"],
                              n_permutations=2000, seed=0)
    assert result["gap"] == pytest.approx(1.0) and result["highest"] == "b"
    assert result["p_value"] == pytest.approx(0.5, abs=0.03)  # gap 1 in half the relabellings, 0 in the others
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])


def test_real_tiny_classifier_reward_model_and_generator(tmp_path, tiny_llama):
    from hf_tuner.models import load_model

    terms = tmp_path / "terms.yaml"
    terms.write_text("dimensions:\n  names:\n    slot: name\n    templates: ['{name} is here.', 'I saw {name}.']\n"
                     "    groups: {a: [Anna, Maria], b: [John, Peter]}\n")
    clf, tok = load_model("tiny-bert", "classification", num_labels=2)
    r = bias_for_model(clf, tok, terms=terms)
    assert r["kind"] == "classifier"
    # the gap by hand: P(last class) of each text, each group's mean over its templates, highest minus lowest
    clf.eval()
    with torch.no_grad():
        p = {name: clf(**tok([t.format(name=name) for t in ("{name} is here.", "I saw {name}.")],
                               return_tensors="pt", padding=True)).logits.softmax(-1)[:, -1].mean().item()
             for name in ("Anna", "Maria", "John", "Peter")}
    means = {"a": (p["Anna"] + p["Maria"]) / 2, "b": (p["John"] + p["Peter"]) / 2}
    names = r["dimensions"]["names"]
    assert names["gap"] == pytest.approx(abs(means["a"] - means["b"]), rel=1e-4, abs=1e-7), (names, means)
    assert names["highest"] == max(means, key=means.get)
    reward, _ = load_model("tiny-bert", "classification", num_labels=1, ignore_mismatched_sizes=True)
    assert bias_for_model(reward, tok, terms=terms)["kind"] == "reward"
    lm, lm_tok = load_model(tiny_llama, "causal-lm")
    g = bias_for_model(lm, lm_tok, terms=terms, max_new_tokens=4)
    assert g["kind"] == "generator" and g["dimensions"]["names"]["n_texts"] == 8


def test_cli_eval_bias_writes_its_record(tmp_path, capsys):
    from hf_tuner.cli import main

    assert main(["eval", "--bias", "--model", "tiny-bert", "--output_dir", str(tmp_path / "b")]) == 0
    record = json.loads((tmp_path / "b" / "bias.json").read_text())
    assert record["kind"] == "classifier" and set(record["dimensions"]) == {"names", "pronouns", "nationalities"}
    md = (tmp_path / "b" / "bias.md").read_text()
    assert "| p (Holm) |" in md and "95% CI" not in md and "pronouns" in capsys.readouterr().out
    assert all(0 < r["p_value"] <= 1 and r["n_permutations"] == 999 for r in record["dimensions"].values())
    assert main(["eval", "--model", "tiny-bert", "--output_dir", str(tmp_path / "c")]) == 2  # no --task, no --bias
    assert "eval needs --task (or --bias" in capsys.readouterr().err


def test_bad_probe_file_names_the_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("dimensions:\n  names:\n    slot: name\n    templates: ['{person} is here.']\n"
                   "    groups: {a: [Anna], b: [John]}\n")
    with pytest.raises(ValueError, match=r"names.a term .* lacks \['person'\]"):
        load_dimensions(bad)
    one_group = tmp_path / "one.yaml"
    one_group.write_text("dimensions:\n  names:\n    slot: name\n    templates: ['{name}.']\n    groups: {a: [Anna]}\n")
    with pytest.raises(ValueError, match="at least two groups"):
        load_dimensions(one_group)
    assert DEFAULT_TERMS.is_file()


def test_eval_bias_loads_a_lora_classifier_folder(tmp_path):
    from peft import LoraConfig, get_peft_model

    from hf_tuner.evaluation.bias import evaluate_bias
    from hf_tuner.models import load_model

    model, tok = load_model("tiny-bert", "classification", num_labels=2)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    peft_model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    record = evaluate_bias(str(tmp_path / "model"), tmp_path / "out")
    assert record["kind"] == "classifier" and (tmp_path / "out" / "bias.json").is_file()


def test_recipes_refuse_a_bad_probe_file_before_loading(tmp_path, monkeypatch):
    from hf_tuner import models
    from hf_tuner.config import ConfigError
    from recipes.reward_model import train as train_reward
    from recipes.sft_classification import train as train_classifier

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the probe file was checked")

    monkeypatch.setattr(models, "load_model", no_loading)
    bad = tmp_path / "terms.yaml"
    bad.write_text("dimensions: [not, a, mapping")
    for train, extra in ((train_classifier, {"baseline_model": "", "few_shot": 0}), (train_reward, {"eval_snippets": 40, "train_pairs": 40})):
        with pytest.raises(ConfigError, match=r"bias_terms: .*terms.yaml: not valid YAML"):
            train({"model_name_or_path": "tiny-bert", "dataset_name": str(_vader(tmp_path)), "bias_terms": str(bad),
                   "output_dir": str(tmp_path / "run"), "eval_samples": 8, "peft_method": "full",
                   "per_device_train_batch_size": 4, "max_steps": 1, "report_to": [], **extra})


def _vader(tmp_path):
    from conftest import write_vader_folder

    return write_vader_folder(tmp_path / "vader")
