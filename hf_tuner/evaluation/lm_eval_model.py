"""lm-eval's HFLM with a cheaper model call for log-likelihood requests; lm-eval still scores everything.

`HFLM._loglikelihood_tokens` runs the model on every (context + continuation) row of a batch, right-padded,
takes the log-softmax over the whole vocabulary at every position, and then reads only the continuation's
positions. On a multiple-choice task each item's context is run once per choice, and the output layer and
the log-softmax cover the long context for nothing (batch x length x vocabulary floats: the demo's peak
memory). `_model_call` is HFLM's documented point of extension; here it returns, for each row, the same
logits at the positions lm-eval reads, computed as follows:
- each distinct context (all of a row but the positions lm-eval scores) runs once per batch, left-padded,
  and its key/value cache is copied to the rows that continue it;
- the rows' scored tokens then run on that cache, with position ids that continue their context;
- the output has only the last positions (`logits_to_keep`), as many as the row lengths require, so
  lm-eval's own slicing (`inplen + logits.shape[0] - padding_len_inp`, meant for virtual tokens) still
  lands on the scored positions.
The arithmetic is lm-eval's; tests/test_benchmarks.py checks the numbers against lm-eval's own command.

Sharing needs the choices of an item in one batch. lm-eval orders requests by the length of context + continuation,
which on a large run scatters an item's choices among other items' (its choices differ in length), so each batch
held many contexts, once each. The requests are ordered by context instead (longest first, then each context's
choices together): `_ContextFirst` below, lm-eval's own `Collator` with only that sort key changed.
"""

from __future__ import annotations

import torch
from lm_eval.models import huggingface as lm_eval_hf
from lm_eval.models.huggingface import HFLM
from lm_eval.models.utils import Collator


def context_first(req) -> tuple:
    """Sort key of a log-likelihood request (strings, context ids, continuation ids): the longest contexts first,
    each context's continuations together, longest first."""
    _, context, continuation = req
    return -len(context), tuple(context), -len(continuation)


class _ContextFirst(Collator):
    """lm-eval's Collator for HFLM's log-likelihood requests, ordered by `context_first` (HFLM passes its sort key
    as an inner function, so the class is what can be swapped; generation's Collator is left alone)."""

    def __init__(self, arr, sort_fn=lambda x: x, group_fn=lambda x: x[1], group_by=None):
        super().__init__(arr, sort_fn=context_first if group_by != "gen_kwargs" else sort_fn, group_fn=group_fn,
                         group_by=group_by)


class PrefixSharingHFLM(HFLM):
    _rows: dict | None = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
        # The model input of each request, as HFLM builds it, and the most positions it will read there
        rows: dict[tuple, int] = {}
        for _, context, continuation in requests:
            key = tuple((context + continuation)[-(self.max_length + 1):][:-1])
            rows[key] = max(rows.get(key, 0), len(continuation))
        self._rows = rows
        # "auto" batch sizes are found on the first (longest) request, which context_first does not keep first
        swap = self.batch_size != "auto" and override_bs is None
        if swap:
            lm_eval_hf.Collator = _ContextFirst
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._rows = None
            lm_eval_hf.Collator = Collator

    def _find(self, ids: list[int]) -> tuple[int, int] | None:
        """(input length, positions scored) of one right-padded row: HFLM pads with token id 0, which a row
        can also end with, so the padding is taken back one token at a time until the row is known."""
        n = len(ids)
        while n and ids[n - 1] == 0:
            n -= 1
        for length in range(max(n, 1), len(ids) + 1):
            scored = self._rows.get(tuple(ids[:length]))
            if scored is not None:
                return length, scored
        return None

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self._rows is None or attn_mask is not None or labels is not None or self.backend != "causal":
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        ids = inps.tolist()
        found = [self._find(r) for r in ids]
        if any(f is None or f[0] - f[1] < 1 for f in found):  # unknown row, or no context left: HFLM's call
            return super()._model_call(inps)
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            scored = self._scored_logits(ids, found)
        padded = inps.shape[1]
        keep = max(padded - length + n for length, n in found)
        out = scored[0].new_zeros((len(ids), keep, scored[0].shape[-1]))
        for row, ((length, n), logits) in enumerate(zip(found, scored)):
            end = keep - padded + length  # where lm-eval reads: out[row, end - n : end]
            out[row, end - n:end] = logits
        return out

    def _scored_logits(self, ids: list[list[int]], found: list[tuple[int, int]]) -> list[torch.Tensor]:
        """Each row's logits at its `n` scored positions: contexts once, then the rows' own tokens."""
        from transformers import DynamicCache

        from hf_tuner.generation import _cache_kwarg

        model, device, arg = self.model, self.device, _cache_kwarg(self.model)
        contexts: dict[tuple, int] = {}
        group = [contexts.setdefault(tuple(r[:length - n]), len(contexts)) for r, (length, n) in zip(ids, found)]
        prefixes = list(contexts)
        width = max(len(p) for p in prefixes)
        prefix_ids = torch.zeros((len(prefixes), width), dtype=torch.long)
        prefix_mask = torch.zeros_like(prefix_ids)
        prefix_pos = torch.zeros_like(prefix_ids)
        for g, p in enumerate(prefixes):
            prefix_ids[g, width - len(p):] = torch.tensor(p)
            prefix_mask[g, width - len(p):] = 1
            prefix_pos[g, width - len(p):] = torch.arange(len(p))
        cache = DynamicCache(config=model.config)
        model(input_ids=prefix_ids.to(device), attention_mask=prefix_mask.to(device),
              position_ids=prefix_pos.to(device), use_cache=True, logits_to_keep=1, **{arg: cache})
        cache.batch_select_indices(torch.tensor(group, device=device))  # each row gets its context's cache
        n_max = max(n for _, n in found)
        suffix_ids = torch.zeros((len(ids), n_max), dtype=torch.long)
        suffix_mask = torch.zeros_like(suffix_ids)
        suffix_pos = torch.ones_like(suffix_ids)
        for row, (r, (length, n)) in enumerate(zip(ids, found)):
            suffix_ids[row, n_max - n:] = torch.tensor(r[length - n:length])
            suffix_mask[row, n_max - n:] = 1
            suffix_pos[row, n_max - n:] = torch.arange(length - n, length)
        mask = torch.cat([prefix_mask[torch.tensor(group)], suffix_mask], dim=1)
        logits = model(input_ids=suffix_ids.to(device), attention_mask=mask.to(device),
                       position_ids=suffix_pos.to(device), use_cache=True, logits_to_keep=n_max,
                       **{arg: cache}).logits
        return [logits[row, n_max - n:] for row, (_, n) in enumerate(found)]
