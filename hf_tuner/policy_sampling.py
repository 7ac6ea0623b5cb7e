"""Sampling a causal-LM policy and scoring its own samples, token by token.

RL training (`rl/ppo.py`) and RL evaluation (`evaluation/preference.py`: KL to the reference) both need the
same two halves, so they live here, below both:

- `sample_responses`: one response per prompt under an explicit `GenerationConfig` (`rollout_generation_config`)
  and nothing else. transformers fills every field we leave unset from the checkpoint's own
  `generation_config` (SmolLM2 ships one; others set `repetition_penalty`, `min_p`, `no_repeat_ngram_size`,
  `suppress_tokens` ...), which would change the sampling distribution behind the scorer's back; so during
  generation the model sees our config as its own.
- `forward_logprobs`: the log-probabilities of those responses under the distribution they were sampled
  from: logits / temperature, with every EOS id banned for the first `MIN_NEW_TOKENS` steps, as
  generation's min_new_tokens processor bans them. Nothing else is applied when sampling.

A response ends at the first of any EOS id: the tokenizer's and every id in the checkpoint's
generation config (chat models list several, e.g. <|im_end|> and <|endoftext|>).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

MIN_NEW_TOKENS = 1  # no empty responses: a reward model would score the bare prompt


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS and the generation config's (an int or a list)."""
    ids = [tokenizer.eos_token_id]
    config = getattr(_inner_model(model), "generation_config", None)
    configured = getattr(config, "eos_token_id", None)
    ids += configured if isinstance(configured, (list, tuple)) else [configured]
    return [int(i) for i in dict.fromkeys(ids) if i is not None]


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def rollout_generation_config(eos_ids: list[int], pad_id: int, response_length: int, temperature: float | None):
    """Plain sampling at `temperature` (greedy when None): no top-k/top-p/min-p, no penalties, no suppressed
    tokens; EOS banned for MIN_NEW_TOKENS steps. forward_logprobs scores exactly this distribution."""
    from transformers import GenerationConfig

    sampling = {"do_sample": True, "temperature": float(temperature), "top_k": 0, "top_p": 1.0} if temperature \
        else {"do_sample": False}
    return GenerationConfig(max_new_tokens=response_length, min_new_tokens=MIN_NEW_TOKENS, eos_token_id=list(eos_ids),
                            pad_token_id=pad_id, num_beams=1, num_return_sequences=1, repetition_penalty=1.0,
                            no_repeat_ngram_size=0, **sampling)


def _inner_model(model):
    """The transformers model under a PEFT wrapper (where generate reads its generation_config)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextmanager
def sole_generation_config(model, config):
    """Make `config` the model's own generation config while generating, so nothing of the checkpoint's
    fills the fields `config` leaves unset; restored afterwards."""
    inner = _inner_model(model)
    saved = inner.generation_config
    inner.generation_config = config
    try:
        yield config
    finally:
        inner.generation_config = saved


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: list[str], response_length: int, temperature: float | None,
                     batch_size: int = 16, seed: int | None = None):
    """Sample (or, with temperature None, greedily decode) one response per prompt.

    Returns (query ids left-padded (N, Q), query mask, response ids (N, R) padded after the first EOS,
    response mask, response texts, ended (N,) bool: an EOS was produced), the tensors on the model's device
    (where forward_logprobs and a CUDA policy take them)."""
    pad = pad_token_id(tokenizer)
    eos = eos_token_ids(model, tokenizer)
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    width = max(len(e) for e in enc)
    queries = torch.full((len(prompts), width), pad, dtype=torch.long)
    qmask = torch.zeros_like(queries)
    for i, ids in enumerate(enc):
        queries[i, width - len(ids):] = torch.tensor(ids)
        qmask[i, width - len(ids):] = 1
    if seed is not None:
        torch.manual_seed(seed)
    device = model_device(model)
    was_training = model.training
    model.eval()
    config = rollout_generation_config(eos, pad, response_length, temperature)
    chunks = []
    try:
        with sole_generation_config(model, config):
            for s in range(0, len(prompts), batch_size):
                out = model.generate(input_ids=queries[s:s + batch_size].to(device),
                                     attention_mask=qmask[s:s + batch_size].to(device), generation_config=config)
                resp = out[:, width:]
                chunks.append(torch.nn.functional.pad(resp, (0, response_length - resp.shape[1]), value=pad))
    finally:
        model.train(was_training)
    responses = torch.cat(chunks)
    is_eos = torch.isin(responses, torch.tensor(eos, dtype=responses.dtype, device=device)) if eos else \
        torch.zeros_like(responses, dtype=torch.bool)
    ended = is_eos.any(1)
    first_eos = torch.where(ended, is_eos.int().argmax(1),
                            torch.full_like(ended, response_length - 1, dtype=torch.long))
    rmask = (torch.arange(response_length, device=device)[None, :] <= first_eos[:, None]).long()
    responses = torch.where(rmask.bool(), responses, torch.full_like(responses, pad))
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return queries.to(device), qmask.to(device), responses, rmask, texts, ended


def model_device(model) -> torch.device:
    """Where a model's inputs go: its first parameter's device (a PEFT, DDP or FSDP2 wrapper's too)."""
    return next(model.parameters()).device


def forward_logprobs(model, queries, qmask, responses, rmask, temperature: float, value_head=None,
                     with_entropy: bool = False, eos_ids: list[int] | None = None):
    """Per-token log-probs of the responses (logits / temperature), plus values and entropy when asked.

    `eos_ids`: the ids sample_responses ended responses with (eos_token_ids); they are banned for the first
    MIN_NEW_TOKENS positions, as they were when sampling, so the scored policy is the sampled one.
    Position ids follow the attention mask, as in generation with left padding. The inputs move to the
    model's device (a reference model may sit elsewhere than the policy); the results are on it."""
    device = model_device(model)
    queries, qmask, responses, rmask = (t.to(device) for t in (queries, qmask, responses, rmask))
    input_ids = torch.cat([queries, responses], 1)
    attention = torch.cat([qmask, rmask], 1)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                output_hidden_states=value_head is not None, use_cache=False)
    q = queries.shape[1]
    logits = out.logits[:, q - 1:-1].float() / (temperature or 1.0)
    if eos_ids:
        banned = torch.zeros(logits.shape[1:], dtype=torch.bool, device=logits.device)
        banned[:MIN_NEW_TOKENS, torch.tensor(eos_ids, device=logits.device)] = True
        # the most negative finite value, not -inf: entropy multiplies probabilities by logits (0 * -inf = nan)
        logits = logits.masked_fill(banned, torch.finfo(logits.dtype).min)
    from trl.trainer.utils import entropy_from_logits, selective_log_softmax

    logprobs = selective_log_softmax(logits, responses) * rmask
    values = value_head(out.hidden_states[-1][:, q - 1:-1]).squeeze(-1).float() * rmask if value_head else None
    entropy = entropy_from_logits(logits) * rmask if with_entropy else None
    return logprobs, values, entropy


def reference_context(model, ref_model):
    """The reference policy: a separate frozen model, or this PEFT model with its adapter disabled."""
    if ref_model is not None:
        return ref_model, nullcontext()
    if hasattr(model, "disable_adapter"):
        return model, model.disable_adapter()
    raise ValueError("full fine-tuning needs a separate reference model (ref_model)")
