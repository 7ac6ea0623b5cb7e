import math

import pytest
import torch

from hf_tuner.evaluation import GenerationTask, evaluate_model, reference_perplexity
from hf_tuner.generation import DecodingSettings, generate_batched
from hf_tuner.models import load_model

PROMPTS = ["Define the word 'lamp'.", "What is a list?", "Explain the for statement in Python briefly please.",
           "Hi", "Define the word 'class' in one short sentence for a beginner."]
ANSWERS = ["a source of light", "a mutable sequence of items", "it repeats a block for each item",
           "hello there", "a template for objects"]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_llama):
    torch.manual_seed(0)
    model, tokenizer = load_model("tiny-llama")
    with torch.no_grad():  # wider weights than the default init, so greedy outputs vary from token to token
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model, tokenizer


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
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, a in zip(prompts, ANSWERS):
            p_ids = tok(p, add_special_tokens=False)["input_ids"]
            ids = tok(p + a + tok.eos_token, add_special_tokens=False)["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            for t in range(len(p_ids), len(ids)):
                nll -= logp[t - 1, ids[t]].item()
                n += 1
    expected = math.exp(nll / n)
    assert reference_perplexity(model, tok, prompts, ANSWERS, batch_size=3) == pytest.approx(expected, rel=1e-4)


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
