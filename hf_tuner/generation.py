"""Decoding presets and batched generation: a greedy loop with a shared-prefix KV cache, or `model.generate`."""

from __future__ import annotations

import copy
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from hf_tuner.distributed import parameters_sharded

DECODING_PRESETS: dict[str, dict] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4},
    "sampling": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
    "top_k": {"do_sample": True, "top_k": 50, "top_p": 1.0},
    "top_p": {"do_sample": True, "top_p": 0.9, "top_k": 0},
}
# Generation-config fields that change what greedy decoding picks. A checkpoint that sets any of them is
# decoded by `model.generate`, which applies them; the fast greedy loop below applies none.
_GREEDY_CHANGERS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
                    "bad_words_ids": None, "min_length": 0, "min_new_tokens": None, "suppress_tokens": None,
                    "begin_suppress_tokens": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
                    "sequence_bias": None, "exponential_decay_length_penalty": None, "renormalize_logits": False,
                    "stop_strings": None, "watermarking_config": None}


@dataclass
class DecodingSettings:
    strategy: str = "greedy"
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 0
    # greedy only: hf-tuner's loop (shared-prefix cache, finished rows dropped); False: `model.generate`
    fast_greedy: bool = True

    def generate_kwargs(self) -> dict:
        if self.strategy not in DECODING_PRESETS:
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; known: {list(DECODING_PRESETS)}")
        return {**DECODING_PRESETS[self.strategy], "max_new_tokens": self.max_new_tokens}


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def _fast_greedy_blocker(model, settings: DecodingSettings) -> str | None:
    """Why the fast greedy loop cannot stand in for `model.generate` here, or None when it can."""
    if settings.strategy != "greedy":
        return "not greedy"
    if not settings.fast_greedy:
        return "fast_greedy off"
    if parameters_sharded(model):  # ZeRO-3 / FSDP gather collectively: `generate(synced_gpus=...)` keeps ranks in step
        return "sharded parameters"
    if is_encoder_decoder(model):
        return "an encoder-decoder"
    if getattr(model, "active_peft_config", None) is not None and model.active_peft_config.is_prompt_learning:
        return "prompt learning (virtual tokens)"
    config = getattr(model, "generation_config", None)
    for field, default in _GREEDY_CHANGERS.items():
        value = getattr(config, field, default)
        if value not in (default, None):
            return f"generation_config.{field}={value!r}"
    return None


def _eos_ids(model, tokenizer) -> set[int]:
    """Every id that ends a response: the generation config's (one or a list), else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return set([eos] if isinstance(eos, int) else list(eos or []))


def _cache_kwarg(model) -> str:
    """The forward argument that takes the key/value cache: `cache` in transformers 5.24, `past_key_values` in
    older releases and in remote-code models (which would silently drop an argument they do not name)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _common_prefix(encoded: list[list[int]]) -> int:
    """Tokens every prompt starts with, keeping at least one token of each prompt to prefill."""
    first, n = encoded[0], min(len(e) for e in encoded) - 1
    for e in encoded[1:]:
        k = 0
        while k < n and e[k] == first[k]:
            k += 1
        n = k
    return max(n, 0)


def _adapter_merged_or_disabled(model) -> bool:
    """Already merged, or inside `disable_adapter()` (the base model is wanted): nothing to merge."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = next((m for m in model.modules() if isinstance(m, BaseTunerLayer)), None)
    return layer is None or layer.merged or layer.disable_adapters


@contextmanager
def merged_adapter(model):
    """Run a LoRA-family PeftModel with its adapter merged into the base weights (PEFT's merge_adapter), and
    unmerge afterwards. Generation then runs one matmul per layer instead of three; the base weights come back
    within rounding (W + BA - BA). Quantized, sharded and prompt-learning models are left as they are."""
    tuner = getattr(model, "base_model", None)
    can = (hasattr(tuner, "merge_adapter") and hasattr(model, "active_peft_config")
           and not model.active_peft_config.is_prompt_learning
           and not getattr(model, "is_quantized", False)
           and not getattr(getattr(model, "config", None), "quantization_config", None)
           and not parameters_sharded(model)
           and not _adapter_merged_or_disabled(model))
    if not can:
        yield model
        return
    try:
        tuner.merge_adapter()
    except ValueError as e:  # PEFT refuses some layouts (e.g. an adapter on tied embeddings): run unmerged
        print(f"note: evaluating with the adapter unmerged: {e}".split("\n")[0], file=sys.stderr)
        yield model
        return
    try:
        yield model
    finally:
        tuner.unmerge_adapter()


@contextmanager
def unwrapped_forward(model):
    """Run `model` without the autocast wrapper that accelerate's `prepare` puts on `model.forward` under mixed
    precision (its original is kept as `model._original_forward`). The Trainer leaves it on after training, so
    a tuned model would otherwise be evaluated in bf16 while its base, loaded plainly, was evaluated in fp32."""
    wrapped, original = model.__dict__.get("forward"), model.__dict__.get("_original_forward")
    if wrapped is None or original is None:
        yield model
        return
    model.forward = original
    try:
        yield model
    finally:
        model.forward = wrapped


@contextmanager
def for_inference(model):
    """The model as every evaluation runs it: the adapter merged where it can be, at the precision it was loaded in."""
    with unwrapped_forward(model), merged_adapter(model):
        yield model


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: list[str], settings: DecodingSettings, desc: str = "generate",
                     stats: dict | None = None):
    """Generate a completion for every prompt (already templated text); returns texts in input order.

    Prompts are sorted by length so each batch wastes little compute on padding. Greedy decoding of a
    decoder-only model runs `greedy_batched` (same tokens as `model.generate`, faster); anything else runs
    `model.generate` with the preset. `stats`, when given, receives prompts, new_tokens (up to each
    response's end), seconds and tokens_per_s.
    """
    start = time.perf_counter()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set one to batch generation")
    seq2seq = is_encoder_decoder(model)
    # A decoder-only prompt is already templated text; an encoder takes its usual special tokens.
    encoded = [tokenizer(p, add_special_tokens=seq2seq)["input_ids"] for p in prompts]
    was_training = model.training
    model.eval()
    try:
        with for_inference(model):
            if _fast_greedy_blocker(model, settings) is None and encoded:
                new_tokens = greedy_batched(model, encoded, settings, _eos_ids(model, tokenizer), pad_id, desc)
            else:
                new_tokens = _generate(model, encoded, settings, pad_id, seq2seq, desc)
    finally:
        model.train(was_training)
    if stats is not None:
        ends = _eos_ids(model, tokenizer) | {pad_id}
        produced = sum(next((k + 1 for k, t in enumerate(row) if t in ends), len(row)) for row in new_tokens)
        seconds = time.perf_counter() - start
        stats.update(prompts=len(prompts), new_tokens=produced, seconds=seconds,
                     tokens_per_s=produced / max(seconds, 1e-9))
    return [tokenizer.decode(t, skip_special_tokens=True).strip() for t in new_tokens]


def _generate(model, encoded, settings, pad_id, seq2seq, desc):
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list = [None] * len(encoded)
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)  # sampled strategies repeat for a fixed seed
    kwargs = settings.generate_kwargs()
    for start in tqdm(range(0, len(order), settings.batch_size), desc=desc, unit="batch", leave=False):
        idx = order[start:start + settings.batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            # Decoder-only: left padding, so generation continues from the last real token. Encoder-decoder:
            # right padding, as in training (BERT-style encoders use absolute positions from the left).
            begin = 0 if seq2seq else width - len(ids)
            input_ids[row, begin:begin + len(ids)] = torch.tensor(ids)
            attention[row, begin:begin + len(ids)] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             pad_token_id=pad_id, **kwargs)
        new_tokens = out if seq2seq else out[:, width:]  # an encoder-decoder returns decoder tokens only
        for row, i in enumerate(idx):
            outputs[i] = new_tokens[row].tolist()
    return outputs


KV_BUDGET = 512 * 2 ** 20  # bytes of key/value cache per generation batch (every row holds its copy of the prefix)


def kv_rows(model, length: int, batch_size: int) -> int:
    """`batch_size`, or fewer rows where `length` tokens of cache per row would pass KV_BUDGET (long few-shot
    prompts; larger models)."""
    config = getattr(model, "config", None)
    layers, heads = getattr(config, "num_hidden_layers", None), getattr(config, "num_key_value_heads", None)
    if not layers or not heads:
        return batch_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * layers * heads * head_dim * next(model.parameters()).element_size()
    return max(1, min(batch_size, KV_BUDGET // (per_token * length)))


def _in_place_layer_class():
    from transformers.cache_utils import DynamicLayer

    class InPlaceLayer(DynamicLayer):
        """A full-attention layer's cache in a buffer allocated once for the whole generation: each step writes its
        key/value in place and attention reads a view of the filled part. `DynamicLayer` concatenates the whole
        cache into a new tensor at every step of every layer instead. The view holds the same numbers in the same
        shape as that concatenation, so attention computes the same values."""

        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity

        def lazy_initialization(self, key_states, value_states) -> None:
            self.device = key_states.device
            batch, heads, _, dim = key_states.shape
            self._keys = key_states.new_empty((batch, heads, self.capacity, dim))
            self._values = value_states.new_empty((batch, heads, self.capacity, value_states.shape[-1]))
            self.keys, self.values = self._keys[:, :, :0], self._values[:, :, :0]
            self.is_initialized = True

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, q = self.keys.shape[-2], key_states.shape[-2]
            if n + q > self._keys.shape[-2]:  # past the planned length (a caller that did not size it): grow
                room = max(2 * self._keys.shape[-2], n + q) - n
                self._keys, self._values = (torch.cat([t, t.new_empty(t.shape[:2] + (room,) + t.shape[3:])], dim=-2)
                                            for t in (self.keys, self.values))
            self._keys[:, :, n:n + q].copy_(key_states)
            self._values[:, :, n:n + q].copy_(value_states)
            self.keys, self.values = self._keys[:, :, :n + q], self._values[:, :, :n + q]
            return self.keys, self.values

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self._keys = self._keys.repeat_interleave(repeats, dim=0)
                self._values = self._values.repeat_interleave(repeats, dim=0)
                n = self.keys.shape[-2]
                self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            """Keep the rows `indices` (ascending): they move to the front of the same buffers, filled part only."""
            if self.is_initialized:
                n, m = self.keys.shape[-2], len(indices)
                self._keys[:m, :, :n] = self.keys[indices]
                self._values[:m, :, :n] = self.values[indices]
                self._keys, self._values = self._keys[:m], self._values[:m]
                self.keys, self.values = self._keys[:, :, :n], self._values[:, :, :n]

    return InPlaceLayer


def in_place_cache(model, capacity: int):
    """A DynamicCache whose full-attention layers fill buffers of `capacity` tokens in place (see InPlaceLayer), or
    None where the model's cache has other layer kinds (sliding windows, linear attention, ...)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    cache = DynamicCache(config=model.config)
    if not cache.layers or any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    layer_class = _in_place_layer_class()
    cache.layers = [layer_class(capacity) for _ in cache.layers]
    return cache


class SharedPrefix:
    """The key/value cache of the tokens every prompt starts with (chat template, system prompt, few-shot
    turns), computed once; `batch` lays out rows that continue it. `transformers` has no batched form of
    this: its prefix-cache recipe (`past_key_values=` a copied prompt cache) takes one shared prompt, not
    rows of different lengths after it."""

    def __init__(self, model, encoded: list[list[int]], limit: int | None = None):
        from transformers import DynamicCache

        self.model, self.device, self.arg = model, next(model.parameters()).device, _cache_kwarg(model)
        self.length = min(_common_prefix(encoded), limit if limit is not None else len(encoded[0]))
        self.cache = None
        if self.length:
            self.cache = DynamicCache(config=model.config)
            model(input_ids=torch.tensor([encoded[0][:self.length]], device=self.device), use_cache=True,
                  logits_to_keep=1, **{self.arg: self.cache})

    def batch(self, rows: list[list[int]], pad_id: int, new_tokens: int | None = None) -> dict:
        """Model inputs for `rows` (whole prompts; the prefix is cut off here): each row's own tokens
        left-padded after the prefix, the attention mask over prefix + padding + tokens, position ids that
        continue the prefix, and a copy of the prefix cache per row. Every real token sees exactly what it
        sees in the full left-padded prompt. `new_tokens`: the cache is an `in_place_cache` with room for the
        prompts and that many generated tokens, where the model allows one."""
        from transformers import DynamicCache

        n = self.length
        suffixes = [r[n:] for r in rows]
        width = max(len(s) for s in suffixes)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), n + width), dtype=torch.long)
        attention[:, :n] = 1
        positions = torch.ones((len(rows), width), dtype=torch.long)  # padding: any position, it is masked
        for row, ids in enumerate(suffixes):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, n + width - len(ids):] = 1
            positions[row, width - len(ids):] = torch.arange(n, n + len(ids))
        cache = None if new_tokens is None else in_place_cache(self.model, n + width + new_tokens)
        if cache is not None:
            if self.cache is not None:  # the prefix, written once into each row of the buffers
                for layer, (keys, values, _) in zip(cache.layers, self.cache):
                    layer.update(keys.expand(len(rows), -1, -1, -1), values.expand(len(rows), -1, -1, -1))
        elif self.cache is not None:
            cache = copy.deepcopy(self.cache)
            cache.batch_repeat_interleave(len(rows))
        else:
            cache = DynamicCache(config=self.model.config)
        return {"input_ids": input_ids.to(self.device), "attention_mask": attention.to(self.device),
                "position_ids": positions.to(self.device), "use_cache": True, self.arg: cache}


# Vocabulary rows per GEMM of the output layer in the greedy loop. One GEMM over a 49k-row vocabulary packs the
# whole 113 MB matrix for a few dozen rows of input, out of cache; slices of 1,024 rows (2.4 MB) stay in cache, and
# the layer took 14% less time per token at 50 rows, 6% at 200 (one thread, SmolLM2-135M). Every logit is still
# the dot product of the same row and column: bit for bit at one thread (very thin slices, 8 rows or fewer, take a
# GEMM path that rounds differently, so the slices are of equal sizes near HEAD_CHUNK, never a thin remainder), but
# not at two, where the GEMM splits its work otherwise. So it is opt-in (`greedy_batched(chunked_head=True)`).
HEAD_CHUNK = 1024


@contextmanager
def chunked_output_layer(model, chunk: int | None = None):
    """Run the model's output layer (a plain bias-free `nn.Linear`) as GEMMs over slices of about `chunk`
    vocabulary rows, concatenated; any other output layer (an adapter on it, a bias, a vocabulary of fewer than
    two slices) is left as it is."""
    chunk = chunk or HEAD_CHUNK
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    slices = round(head.out_features / chunk) if isinstance(head, torch.nn.Linear) else 0
    if type(head) is not torch.nn.Linear or head.bias is not None or slices < 2 or "forward" in head.__dict__:
        yield model
        return
    weight = head.weight
    bounds = [k * weight.shape[0] // slices for k in range(slices + 1)]

    def forward(hidden):
        return torch.cat([torch.nn.functional.linear(hidden, weight[a:b]) for a, b in zip(bounds, bounds[1:])],
                         dim=-1)

    head.forward = forward
    try:
        yield model
    finally:
        del head.forward


# Fewest rows a decode batch keeps: the CPU GEMM takes another code path for 1-3 rows and rounds differently, so
# a prompt's last tokens would not be computed as in `model.generate`'s batch (which keeps every row to the end).
# Finished rows stay in as passengers (their tokens are dropped) until the batch ends.
MIN_ROWS = 4


@torch.no_grad()
def greedy_batched(model, encoded: list[list[int]], settings: DecodingSettings, eos_ids: set[int], pad_id: int,
                   desc: str = "generate", in_place: bool = True, chunked_head: bool = False) -> list[list[int]]:
    """Greedy decoding of token-id prompts with a decoder-only model: the new token ids of each, in input order.

    Written here because `model.generate` offers none of the things that make it fast:
    - the prompts' common prefix is run once (`SharedPrefix`) and its cache copied into every batch;
    - the cache is written in place (`in_place_cache`) instead of concatenated anew at every step;
    - a row that has ended (an EOS id or max_new_tokens) leaves the batch, with its cache rows (down to MIN_ROWS);
    - optionally (`chunked_head`), the output layer in vocabulary slices that stay in cache;
    - batches are as large as `settings.batch_size` and the KV budget allow, and of equal sizes.
    The arithmetic is the same as `model.generate`'s greedy search, so the tokens agree with it (rounding can
    differ with the batch shapes; benchmarks/bench_generation.py counts the outputs that differ).
    `in_place` off: the concatenating cache (for benchmarks). `chunked_head` on: the output layer in vocabulary
    slices, bit for bit the one GEMM at one thread only (at two the GEMM splits its work otherwise and rounds
    differently, seen on a fresh-clone CI run), so it is off unless asked for.
    """
    prefix = SharedPrefix(model, encoded)
    device = prefix.device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    outputs: list[list[int]] = [[] for _ in encoded]
    eos = torch.tensor(sorted(eos_ids), device=device, dtype=torch.long)
    bar = tqdm(total=len(encoded), desc=desc, unit="prompt", leave=False)
    with chunked_output_layer(model) if chunked_head else nullcontext():
        _greedy_loop(model, prefix, encoded, order, outputs, settings, eos, pad_id, bar, in_place)
    bar.close()
    return outputs


def _greedy_loop(model, prefix, encoded, order, outputs, settings, eos, pad_id, bar, in_place):
    device, start_time, produced = prefix.device, time.perf_counter(), 0
    rows = kv_rows(model, max(len(e) for e in encoded) + settings.max_new_tokens, settings.batch_size)
    batches = -(-len(order) // rows)  # of equal sizes: 200 prompts at 64 rows run as 4 x 50, not 64, 64, 64, 8
    bounds = [k * len(order) // batches for k in range(batches + 1)]
    for start, end in zip(bounds, bounds[1:]):
        idx = order[start:end]
        inputs = prefix.batch([encoded[i] for i in idx], pad_id, settings.max_new_tokens if in_place else None)
        cache = inputs.pop(prefix.arg)
        input_ids, attention, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        alive = list(idx)  # prompt index of each row still in the batch; -1: a finished row kept as a passenger
        for step in range(settings.max_new_tokens):
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{prefix.arg: cache}).logits[:, -1]
            next_ids = logits.argmax(-1)
            for row, token in zip(alive, next_ids.tolist()):
                if row >= 0:
                    outputs[row].append(token)
            done = torch.isin(next_ids, eos) | torch.tensor([row < 0 for row in alive], device=device)
            finished = sum(row >= 0 for row in alive) - int((~done).sum())
            produced += sum(row >= 0 for row in alive)
            if step == settings.max_new_tokens - 1 or bool(done.all()):
                bar.update(sum(row >= 0 for row in alive))
                break
            bar.update(finished)
            if bool(done.any()):  # finished rows leave the batch, with their cache rows
                flags = done.tolist()
                keep = [k for k, d in enumerate(flags) if not d]
                keep = sorted(keep + [k for k, d in enumerate(flags) if d][:max(0, min(MIN_ROWS, len(alive)) - len(keep))])
                alive = [-1 if flags[k] else alive[k] for k in keep]
                if len(keep) < len(flags):
                    keep = torch.tensor(keep, device=device)
                    cache.batch_select_indices(keep)
                    next_ids, attention, positions = next_ids[keep], attention[keep], positions[keep]
            input_ids = next_ids[:, None]
            attention = torch.cat([attention, attention.new_ones((len(alive), 1))], dim=-1)
            positions = positions[:, -1:] + 1
        bar.set_postfix_str(f"{produced / (time.perf_counter() - start_time):.0f} tok/s", refresh=False)
