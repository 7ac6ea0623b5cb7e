import math

import numpy as np
import pytest
import torch

from hf_tuner.evaluation import GenerationTask, evaluate_model, reference_perplexity
from hf_tuner.generation import DecodingSettings, generate_batched

PROMPTS = ["Define the word 'lamp'.", "What is a list?", "Explain the for statement in Python briefly please.",
           "Hi", "Define the word 'class' in one short sentence for a beginner."]
ANSWERS = ["a source of light", "a mutable sequence of items", "it repeats a block for each item",
           "hello there", "a template for objects"]


@pytest.fixture(scope="module")
def model_and_tokenizer(wide_tiny_llama):
    return wide_tiny_llama


def _chat(tokenizer, text):
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                         add_generation_prompt=True)


def test_batched_greedy_generation_equals_one_by_one(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [_chat(tok, p) for p in PROMPTS]
    settings = DecodingSettings(max_new_tokens=8, batch_size=4)
    batched = generate_batched(model, tok, prompts, settings)
    single = [generate_batched(model, tok, [p], DecodingSettings(max_new_tokens=8, batch_size=1))[0]
              for p in prompts]
    assert batched == single
    assert any(batched)


def test_perplexity_equals_a_naive_per_example_computation(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [_chat(tok, p) for p in PROMPTS]
    rows = []
    with torch.no_grad():
        for p, a in zip(prompts, ANSWERS):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            ids = tok(p + a + tok.eos_token, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            rows.append((-sum(logp[t - 1, ids[t]].item() for t in range(len(p_ids), len(ids))), len(ids) - len(p_ids)))
    expected = math.exp(sum(r[0] for r in rows) / sum(r[1] for r in rows))
    per_row = []  # each row's own log-loss and token count, in prompt order (the paired bootstrap's input)
    assert reference_perplexity(model, tok, prompts, ANSWERS, batch_size=3, per_row=per_row) == pytest.approx(
        expected, rel=1e-4)
    assert len({n for _, n in rows}) > 1  # rows of different lengths: batches are in length order, not prompt order
    assert [n for _, n in per_row] == [n for _, n in rows]
    assert [x for x, _ in per_row] == pytest.approx([x for x, _ in rows], rel=1e-4)


def test_evaluate_model_and_few_shot_from_train_only(model_and_tokenizer):
    model, tok = model_and_tokenizer
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": a}],
             "group": p} for p, a in zip(PROMPTS, ANSWERS)]
    held, train = rows[:2], rows[2:]
    task = GenerationTask("t", held)
    few = task.with_shots(2, train + held, seed=0)  # held-out rows offered by mistake are never drawn
    assert all(s["group"] not in {r["group"] for r in held} for s in few.shots)
    msgs = few.messages(held[0])
    assert [m["role"] for m in msgs] == ["user", "assistant", "user", "assistant", "user"]
    result = evaluate_model(model, tok, few, DecodingSettings(max_new_tokens=4, batch_size=2))
    assert set(result["metrics"]) >= {"rouge1", "rougeL", "bleu", "perplexity", "mean_length"}
    assert len(result["predictions"]) == 2 and result["references"] == ANSWERS[:2]
    # what each example adds to each metric gives back the metric (significance.Stat, for the paired bootstrap)
    from hf_tuner.evaluation.significance import value

    per = result["per_example"]
    assert set(per) == {"rouge1", "rouge2", "rougeL", "rougeLsum", "bleu", "perplexity"}
    assert {m: float(value(s, np.ones((1, 2)))[0]) for m, s in per.items()} == pytest.approx(
        {m: result["metrics"][m] for m in per}, rel=1e-5)


# ---- classification: from a classifier's logits, and from a causal LM's label word
from hf_tuner.evaluation.tasks import ClassificationTask  # noqa: E402
from hf_tuner.prompts import PromptTemplate, baseline_shots, draw_shots  # noqa: E402

TEXTS = [("a wonderful, moving film", "positive"), ("dull and far too long", "negative"),
         ("the best thing this year", "positive"), ("a tedious mess", "negative"),
         ("warm and funny", "positive"), ("i walked out early", "negative")]


def test_classifier_logits_path_matches_a_direct_argmax(tiny_llama):
    from hf_tuner.models import load_model

    model, tok = load_model("tiny-bert", "classification")
    rows = [{"text": t, "label": lab} for t, lab in TEXTS]
    task = ClassificationTask("sentiment", rows, labels=["negative", "positive"])
    result = evaluate_model(model, tok, task, DecodingSettings(batch_size=4))
    with torch.no_grad():
        ids = model(**tok([t for t, _ in TEXTS], padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    assert result["predictions"] == [task.labels[i] for i in ids]
    expected_acc = sum(task.labels[i] == lab for i, (_, lab) in zip(ids, TEXTS)) / len(TEXTS)
    assert result["metrics"]["accuracy"] == pytest.approx(expected_acc)
    assert set(result["metrics"]) >= {"accuracy", "precision", "recall", "f1"}


def test_label_words_from_a_causal_lm(model_and_tokenizer, monkeypatch):
    model, tok = model_and_tokenizer
    rows = [{"text": t, "label": lab} for t, lab in TEXTS[:4]]
    train = [{"text": t, "label": lab} for t, lab in TEXTS[4:]]
    task = ClassificationTask("sentiment", rows, labels=["negative", "positive"],
                              template=PromptTemplate(instruction="Is this review positive or negative?",
                                                      task="Review: {text}", output_format="Answer in one word.",
                                                      context="You are a film critic."))
    few = task.with_shots(2, train, seed=0)
    assert sorted(s["label"] for s in few.shots) == ["negative", "positive"]  # balanced shots
    msgs = few.messages(rows[0])
    assert msgs[0] == {"role": "system", "content": "You are a film critic."}
    assert msgs[1]["content"].startswith("Is this review positive or negative?\n\nReview: ")
    assert msgs[2]["content"] in ("negative", "positive")
    assert task.parse_label("Positive, clearly. Not negative.") == "positive"
    assert task.parse_label("no idea") is None
    result = evaluate_model(model, tok, few, DecodingSettings(max_new_tokens=3, batch_size=2))
    assert len(result["predictions"]) == 4 and 0 <= result["metrics"]["accuracy"] <= 1
    # scored from known answers: the first label word counts, a non-word is unparsed and wrong
    import hf_tuner.evaluation.harness as harness

    answers = ["Positive!", "positive, not negative", "nope, negatively", "Negative."]  # references: +, -, +, -
    monkeypatch.setattr(harness, "generate_batched", lambda *a, **k: answers)
    known = evaluate_model(model, tok, few, DecodingSettings(max_new_tokens=3, batch_size=2))
    assert known["predictions"] == answers
    assert known["metrics"]["accuracy"] == 0.5 and known["metrics"]["unparsed"] == 1.0


def test_shot_builders_use_train_rows_only_and_repeat():
    train = [{"text": f"t{i}", "label": i % 2, "group": f"g{i}"} for i in range(20)]
    a = draw_shots(train, 3, seed=1, exclude_groups={"g0", "g1", "g2"})
    assert a == draw_shots(train, 3, seed=1, exclude_groups={"g0", "g1", "g2"})
    assert not {s["group"] for s in a} & {"g0", "g1", "g2"}
    assert [baseline_shots(b) for b in ("zero_shot", "one_shot", "few_shot_5")] == [0, 1, 5]
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_shots("many_shot")
    with pytest.raises(ValueError, match="needs field 'title'"):
        PromptTemplate(task="{title}").user_text({"text": "x"})


def test_decoding_presets_and_seeded_sampling(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [_chat(tok, p) for p in PROMPTS[:3]]
    for strategy in ("greedy", "beam", "sampling", "top_k", "top_p"):
        out = generate_batched(model, tok, prompts, DecodingSettings(strategy=strategy, max_new_tokens=5, seed=7))
        assert len(out) == 3
    s1 = generate_batched(model, tok, prompts, DecodingSettings(strategy="top_p", max_new_tokens=6, seed=7))
    s2 = generate_batched(model, tok, prompts, DecodingSettings(strategy="top_p", max_new_tokens=6, seed=7))
    assert s1 == s2
    with pytest.raises(ValueError, match="unknown decoding strategy"):
        DecodingSettings(strategy="nucleus").generate_kwargs()


def test_balanced_shots_are_shuffled_with_the_seed():
    """Balanced k-shot prompts keep both classes, but their order comes from the seed: in sorted class order
    the shot nearest the question was always the same class."""
    from hf_tuner.prompts import draw_shots

    train = [{"text": f"t{i}", "label": ["negative", "positive"][i % 2], "group": f"g{i}"} for i in range(40)]
    orders = {tuple(s["label"] for s in draw_shots(train, 4, seed, balance_key="label")) for seed in range(30)}
    assert all(sorted(o) == ["negative", "negative", "positive", "positive"] for o in orders)  # still balanced
    assert {o[-1] for o in orders} == {"negative", "positive"}  # either class can come last
    assert len(orders) >= 4
    odd = [draw_shots(train, 3, seed, balance_key="label") for seed in range(30)]  # the extra shot's class varies
    assert {max(("negative", "positive"), key=[s["label"] for s in shots].count) for shots in odd} == \
        {"negative", "positive"}
    assert draw_shots(train, 4, 5, balance_key="label") == draw_shots(train, 4, 5, balance_key="label")


@pytest.mark.parametrize("text, expected", [
    ("No.", "no"), ("no, it is not", "no"), ("Yes", "yes"), ("I'm not sure", None), ("I know nothing", None),
    ("nope, yes", "yes"), ("Not yet: yes!", "yes"), ("yesterday", None), ("(yes)", "yes"), ("NO", "no"),
])
def test_label_words_match_whole_words(text, expected):
    from hf_tuner.evaluation.tasks import ClassificationTask

    assert ClassificationTask("yn", [], labels=["yes", "no"]).parse_label(text) == expected


def test_multi_word_label_words_match_whole_words():
    from hf_tuner.evaluation.tasks import ClassificationTask

    task = ClassificationTask("s", [], labels=[0, 1], label_words={0: "not spam", 1: "spam"})
    assert task.parse_label("This is not spam.") == 0
    assert task.parse_label("spammy, but spam") == 1
    assert task.parse_label("antispam") is None
