"""The fast greedy loop (shared-prefix cache, finished rows dropped) against `model.generate`, and the merged adapter."""

import collections

import pytest
import torch

from hf_tuner.generation import (DecodingSettings, _common_prefix, _fast_greedy_blocker, generate_batched,
                                 greedy_batched, merged_adapter)
from hf_tuner.models import load_model

WORDS = ["apple", "river stone", "a cloud over the hill", "tiger", "lamp and bread on the table", "chair",
         "glass of water in the morning light", "music", "paper", "forest path"]


@pytest.fixture(scope="module")
def model_and_tokenizer(wide_tiny_llama):
    model, tokenizer = wide_tiny_llama
    return model.eval(), tokenizer


def _prompts(tokenizer, shots: int = 0):
    turns = []
    for w in WORDS[:shots]:
        turns += [{"role": "user", "content": f"Define {w}"}, {"role": "assistant", "content": f"a {w}"}]
    return [tokenizer.apply_chat_template(turns + [{"role": "user", "content": f"Define {w}"}], tokenize=False,
                                          add_generation_prompt=True) for w in WORDS]


def _reference(model, tokenizer, prompts, batch_size, eos_ids, max_new_tokens):
    """`model.generate` on left-padded batches of the same length-sorted order: the new token ids up to the EOS."""
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out = [None] * len(encoded)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(idx):
            ids[row, width - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, width - len(encoded[i]):] = 1
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=sorted(eos_ids), pad_token_id=tokenizer.pad_token_id)[:, width:]
        for row, i in enumerate(idx):
            tokens = gen[row].tolist()
            ends = [k for k, t in enumerate(tokens) if t in eos_ids]
            out[i] = tokens[:ends[0] + 1] if ends else tokens
    return encoded, out


@pytest.mark.parametrize("shots,batch_size", [(0, 4), (2, 3), (2, 16)])
def test_fast_greedy_gives_generate_s_tokens_with_rows_ending_at_different_steps(model_and_tokenizer, shots,
                                                                                 batch_size):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, shots)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert _common_prefix(encoded) > 3  # the chat template (and the shots) are shared: the prefix path runs
    # EOS ids chosen from what the model emits, so rows end at different steps and leave the batch early
    _, free = _reference(model, tokenizer, prompts, batch_size, set(), 12)
    counts = collections.Counter(t for row in free for t in row[2:8])
    eos_ids = {counts.most_common(2)[-1][0]}
    encoded, expected = _reference(model, tokenizer, prompts, batch_size, eos_ids, 12)
    lengths = {len(e) for e in expected}
    assert len(lengths) > 1 and min(lengths) < 12  # some rows do end early, at different steps
    got = greedy_batched(model, encoded, DecodingSettings(max_new_tokens=12, batch_size=batch_size), eos_ids,
                         tokenizer.pad_token_id)
    assert got == expected


def test_the_fast_loop_agrees_with_generate_through_generate_batched(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 1)
    fast = generate_batched(model, tokenizer, prompts, DecodingSettings(max_new_tokens=10, batch_size=4))
    slow = generate_batched(model, tokenizer, prompts, DecodingSettings(max_new_tokens=10, batch_size=4,
                                                                        fast_greedy=False))
    assert fast == slow and len(set(fast)) > 1


def test_a_checkpoint_setting_that_changes_greedy_picks_goes_through_generate(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer)
    settings = DecodingSettings(max_new_tokens=10, batch_size=4)
    plain = generate_batched(model, tokenizer, prompts, settings)
    model.generation_config.repetition_penalty = 3.0
    try:
        assert _fast_greedy_blocker(model, settings) == "generation_config.repetition_penalty=3.0"
        penalised = generate_batched(model, tokenizer, prompts, settings)
        via_generate = generate_batched(model, tokenizer, prompts, DecodingSettings(max_new_tokens=10, batch_size=4,
                                                                                    fast_greedy=False))
    finally:
        model.generation_config.repetition_penalty = 1.0
    assert penalised == via_generate and penalised != plain
    assert _fast_greedy_blocker(model, DecodingSettings(strategy="top_p")) == "not greedy"
    assert _fast_greedy_blocker(model, DecodingSettings(fast_greedy=False)) == "fast_greedy off"


def test_common_prefix_leaves_every_prompt_a_token_to_prefill():
    assert _common_prefix([[1, 2, 3], [1, 2, 3, 4]]) == 2
    assert _common_prefix([[1, 2, 3, 4], [1, 2, 5]]) == 2
    assert _common_prefix([[7, 2], [1, 2]]) == 0


def _lora_model(tiny_llama, **config):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = load_model("tiny-llama")
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                            init_lora_weights=False, **config))
    return peft.eval(), tokenizer


def test_merged_adapter_gives_the_adapter_s_outputs_and_restores_the_weights(tiny_llama):
    model, tokenizer = _lora_model(tiny_llama)
    base_weight = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    ids = tokenizer(_prompts(tokenizer)[:3], return_tensors="pt", padding=True)
    with torch.no_grad():
        unmerged = model(**ids).logits
        with merged_adapter(model) as m:
            layer = m.base_model.model.model.layers[0].self_attn.q_proj
            assert layer.merged  # the adapter is in the base weights ...
            assert not torch.equal(layer.base_layer.weight, base_weight)
            merged = m(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    assert not torch.allclose(unmerged, base, atol=1e-3)  # the random adapter changes the outputs
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert not layer.merged  # ... and comes out again, within rounding
    torch.testing.assert_close(layer.base_layer.weight, base_weight, atol=1e-6, rtol=0)


def test_merged_adapter_leaves_a_disabled_adapter_and_prompt_learning_alone(tiny_llama):
    model, _ = _lora_model(tiny_llama)
    with model.disable_adapter(), merged_adapter(model):
        assert not model.base_model.model.model.layers[0].self_attn.q_proj.merged
    from peft import PromptTuningConfig, get_peft_model

    base, _ = load_model("tiny-llama")
    prompt = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with merged_adapter(prompt) as m:
        assert m is prompt
    assert _fast_greedy_blocker(prompt, DecodingSettings()) == "prompt learning (virtual tokens)"


def test_generation_with_a_lora_adapter_is_merged_and_agrees_with_the_unmerged_adapter(tiny_llama, monkeypatch):
    model, tokenizer = _lora_model(tiny_llama)
    prompts = _prompts(tokenizer)
    settings = DecodingSettings(max_new_tokens=8, batch_size=4)
    merges = []
    original = type(model.base_model).merge_adapter
    monkeypatch.setattr(type(model.base_model), "merge_adapter",
                        lambda self, *a, **k: (merges.append(1), original(self, *a, **k))[1])
    merged = generate_batched(model, tokenizer, prompts, settings)
    assert merges  # the adapter was merged for generation
    monkeypatch.setattr(type(model.base_model), "merge_adapter", original)
    with torch.no_grad():  # unmerged reference: the fast loop is exact, so only merging could change a token
        encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        eos = {tokenizer.eos_token_id}
        unmerged = [tokenizer.decode(t, skip_special_tokens=True).strip()
                    for t in greedy_batched(model, encoded, settings, eos, tokenizer.pad_token_id)]
    assert merged == unmerged


@pytest.mark.parametrize("one_prompt", [False, True])
def test_perplexity_over_a_shared_few_shot_prefix_equals_a_naive_computation(model_and_tokenizer, one_prompt):
    import math

    from hf_tuner.evaluation import reference_perplexity
    from hf_tuner.generation import SharedPrefix

    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 3)
    answers = [f"a word about {w}" for w in WORDS]
    if one_prompt:  # every row asks the same: the common prefix runs into the answers, and must stop before
        prompts = prompts[:1] * len(answers)
    full = [tokenizer(p + a + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
            for p, a in zip(prompts, answers)]
    assert SharedPrefix(model, full, limit=1000).length > 20  # the shots are shared, and the prefix path runs
    nll, n = 0.0, 0
    with torch.no_grad():
        for p, ids in zip(prompts, full):
            start = len(tokenizer(p, add_special_tokens=False)["input_ids"])
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            nll -= sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            n += len(ids) - start
    assert reference_perplexity(model, tokenizer, prompts, answers, batch_size=4) == pytest.approx(
        math.exp(nll / n), rel=1e-4)


def test_perplexity_batches_keep_every_row_in_length_order_within_the_logit_budget(monkeypatch):
    from hf_tuner.evaluation import harness

    pairs = [([1] * n, ref) for n, ref in [(9, 2), (3, 1), (7, 6), (5, 1), (4, 3), (8, 1)]]
    monkeypatch.setattr(harness, "LOGIT_BUDGET", 4 * 10 * 8)  # 8 floats of vocab 10: rows x (ref + 1) <= 8
    batches = harness._logit_batches(pairs, batch_size=3, vocab=10)
    assert sorted(p for b in batches for p in b) == sorted(pairs)
    assert [len(p[0]) for b in batches for p in b] == [3, 4, 5, 7, 8, 9]
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(r + 1 for _, r in b) <= 8)
    assert len(harness._logit_batches(pairs, batch_size=3, vocab=1)) == 2  # a small vocabulary: batch_size rules


def test_generation_batches_shrink_to_the_key_value_budget(model_and_tokenizer, monkeypatch):
    from hf_tuner import generation

    model, _ = model_and_tokenizer  # 2 layers x 2 key/value heads x 16 dims x fp32 x (key, value): 512 bytes a token
    assert generation.kv_rows(model, 100, 64) == 64
    monkeypatch.setattr(generation, "KV_BUDGET", 512 * 100 * 5)
    assert generation.kv_rows(model, 100, 64) == 5 and generation.kv_rows(model, 10, 16) == 16
    assert generation.kv_rows(model, 10 ** 6, 16) == 1


def test_sharded_parameters_are_decoded_by_generate_and_not_merged(model_and_tokenizer, tiny_llama):
    model, _ = model_and_tokenizer
    weight = next(model.parameters())
    weight.ds_id = 7  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    try:
        assert _fast_greedy_blocker(model, DecodingSettings()) == "sharded parameters"
    finally:
        del weight.ds_id
    assert _fast_greedy_blocker(model, DecodingSettings()) is None
    lora, _ = _lora_model(tiny_llama)
    next(lora.parameters()).ds_id = 7
    with merged_adapter(lora):
        assert not lora.base_model.model.model.layers[0].self_attn.q_proj.merged


def test_a_model_prepared_for_bf16_training_is_evaluated_as_loaded(tiny_llama):
    """accelerate's prepare (mixed precision) wraps forward in autocast and the Trainer leaves it on: the tuned
    model must still be evaluated at the precision of its base, or the comparison mixes bf16 and fp32."""
    from accelerate import Accelerator

    from hf_tuner.evaluation import GenerationTask, evaluate_model

    model, tokenizer = _lora_model(tiny_llama)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    task = GenerationTask("t", [{"prompt": [{"role": "user", "content": f"Define {w}"}], "completion":
                                 [{"role": "assistant", "content": f"a {w}"}]} for w in WORDS])
    settings = DecodingSettings(max_new_tokens=8, batch_size=4)
    plain = evaluate_model(model, tokenizer, task, settings)
    prepared = Accelerator(mixed_precision="bf16", cpu=True).prepare(model)
    assert "_original_forward" in prepared.__dict__  # the autocast wrapper is on
    prompts = [tokenizer.apply_chat_template(task.messages(r), tokenize=False, add_generation_prompt=True)
               for r in task.rows]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_bf16 = generate_batched(prepared, tokenizer, prompts, settings)
    assert in_bf16 != plain["predictions"]  # bf16 does change this model's greedy answers ...
    again = evaluate_model(prepared, tokenizer, task, settings)
    assert again["predictions"] == plain["predictions"]  # ... and the prepared model is still scored in fp32
    assert again["metrics"]["perplexity"] == pytest.approx(plain["metrics"]["perplexity"], rel=1e-5)
    assert "_original_forward" in prepared.__dict__ and prepared.forward != prepared._original_forward


def test_the_in_place_cache_fills_one_buffer_and_holds_what_concatenation_holds(model_and_tokenizer):
    from hf_tuner.generation import in_place_cache

    model, _ = model_and_tokenizer
    cache = in_place_cache(model, capacity=5)
    layer = cache.layers[0]
    torch.manual_seed(0)
    steps = [torch.randn(3, 2, q, 16) for q in (2, 1, 1)]
    for k in steps:
        keys, values = cache.update(k, -k, layer_idx=0)
    expected = torch.cat(steps, dim=-2)
    assert torch.equal(keys, expected) and torch.equal(values, -expected) and cache.get_seq_length() == 4
    buffer = layer._keys.data_ptr()
    assert keys.data_ptr() == buffer  # a view of the buffer, written in place: no new tensor per step
    keys, _ = cache.update(steps[1], -steps[1], layer_idx=0)
    assert layer._keys.data_ptr() == buffer and torch.equal(keys, torch.cat([expected, steps[1]], dim=-2))
    keys, _ = cache.update(steps[0], -steps[0], layer_idx=0)  # past the capacity: the buffer grows
    full = torch.cat([expected, steps[1], steps[0]], dim=-2)
    assert torch.equal(keys, full) and layer._keys.shape[-2] >= 7
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(layer.keys, full[[0, 2]]) and torch.equal(layer.values, -full[[0, 2]])
    keys, _ = cache.update(steps[2][:2], -steps[2][:2], layer_idx=0)
    assert torch.equal(keys, torch.cat([full[[0, 2]], steps[2][:2]], dim=-2))


def _forward_batches(model):
    """Rows of every forward call, recorded by a pre-hook (and the cache layers the call got)."""
    calls = []

    def hook(module, args, kwargs):
        cache = next((v for k, v in kwargs.items() if k in ("cache", "past_key_values")), None)
        calls.append((kwargs["input_ids"].shape[0], type(cache.layers[0]).__name__ if cache is not None else None))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_fast_greedy_decodes_on_the_in_place_cache_in_equal_batches(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 1)
    encoded, expected = _reference(model, tokenizer, prompts, 16, {tokenizer.eos_token_id}, 6)
    calls, handle = _forward_batches(model)
    try:
        got = greedy_batched(model, encoded, DecodingSettings(max_new_tokens=6, batch_size=4),
                             {tokenizer.eos_token_id}, tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert got == expected
    calls = calls[1:]  # the first call computes the shared prefix, once
    assert {layer for _, layer in calls} == {"InPlaceLayer"}
    prefills = [rows for k, (rows, _) in enumerate(calls) if k % 6 == 0]  # every row runs 6 steps here
    assert len(calls) == 18 and sorted(prefills) == [3, 3, 4]  # 10 prompts at 4 rows: 3 + 3 + 4, not 4 + 4 + 2


def test_a_decode_batch_keeps_min_rows_while_rows_finish(model_and_tokenizer):
    """The CPU GEMM rounds differently for 1-3 rows: finished rows stay in as passengers so that the batch does not
    fall below MIN_ROWS, and their extra tokens are not returned."""
    from hf_tuner.generation import MIN_ROWS

    model, tokenizer = model_and_tokenizer
    prompts = _prompts(tokenizer, 1)
    _, free = _reference(model, tokenizer, prompts, 16, set(), 12)
    eos_ids = {t for t, _ in collections.Counter(t for row in free for t in row[:10]).most_common(5)}
    encoded, expected = _reference(model, tokenizer, prompts, 16, eos_ids, 12)
    running = [sum(len(e) > step for e in expected) for step in range(12)]
    assert any(0 < n < MIN_ROWS for n in running)  # without passengers the batch would shrink below MIN_ROWS
    calls, handle = _forward_batches(model)
    try:
        got = greedy_batched(model, encoded, DecodingSettings(max_new_tokens=12, batch_size=16), eos_ids,
                             tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert got == expected
    rows = [n for n, _ in calls[1:]]  # after the shared prefix's call
    assert rows[0] == 10 and min(rows) == MIN_ROWS  # rows leave the batch, down to MIN_ROWS and no further


def test_the_output_layer_in_vocabulary_slices_gives_the_same_logits(model_and_tokenizer, monkeypatch):
    """Bit for bit at one thread; at two the GEMM splits its work otherwise and rounds differently (a fresh-clone
    CI run showed it), which is why `chunked_head` is opt-in."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _check_sliced_output_layer(model_and_tokenizer, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _check_sliced_output_layer(model_and_tokenizer, monkeypatch):
    from hf_tuner import generation
    from hf_tuner.generation import chunked_output_layer

    model, tokenizer = model_and_tokenizer
    head = model.get_output_embeddings()
    hidden = torch.randn(6, 1, head.in_features)
    plain = head(hidden)
    with chunked_output_layer(model, chunk=60):  # 17 slices of 60 or 61 rows
        assert "forward" in head.__dict__
        assert torch.equal(head(hidden), plain)  # each logit is the same dot product
    assert "forward" not in head.__dict__  # restored
    shapes = []
    linear = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda x, w, b=None: (shapes.append(w.shape[0]), linear(x, w, b))[1])
    monkeypatch.setattr(generation, "HEAD_CHUNK", 100)
    prompts = _prompts(tokenizer, 1)
    encoded, expected = _reference(model, tokenizer, prompts, 16, {tokenizer.eos_token_id}, 6)
    got = greedy_batched(model, encoded, DecodingSettings(max_new_tokens=6, batch_size=16), {tokenizer.eos_token_id},
                         tokenizer.pad_token_id, chunked_head=True)
    assert got == expected
    slices = [n for n in shapes if n in (102, 103)]  # 1,024 rows in 10 slices
    assert len(slices) >= 6 * 10  # every step's output layer ran in slices
