"""Decoding presets and batched, left-padded generation with the KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

DECODING_PRESETS: dict[str, dict] = {
    "greedy": {"do_sample": False, "num_beams": 1},
    "beam": {"do_sample": False, "num_beams": 4},
    "sampling": {"do_sample": True, "temperature": 0.7, "top_k": 0, "top_p": 1.0},
    "top_k": {"do_sample": True, "top_k": 50, "top_p": 1.0},
    "top_p": {"do_sample": True, "top_p": 0.9, "top_k": 0},
}


@dataclass
class DecodingSettings:
    strategy: str = "greedy"
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 0

    def generate_kwargs(self) -> dict:
        if self.strategy not in DECODING_PRESETS:
            raise ValueError(f"unknown decoding strategy {self.strategy!r}; known: {list(DECODING_PRESETS)}")
        return {**DECODING_PRESETS[self.strategy], "max_new_tokens": self.max_new_tokens}


def is_encoder_decoder(model) -> bool:
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


@torch.no_grad()
def generate_batched(model, tokenizer, prompts: list[str], settings: DecodingSettings, desc: str = "generate"):
    """Generate a completion for every prompt (already templated text); returns texts in input order.

    Prompts are sorted by length so each left-padded batch wastes little compute on padding.
    """
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; set one to batch generation")
    seq2seq = is_encoder_decoder(model)
    # A decoder-only prompt is already templated text; an encoder takes its usual special tokens.
    encoded = [tokenizer(p, add_special_tokens=seq2seq)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    torch.manual_seed(settings.seed)  # sampled strategies repeat for a fixed seed
    kwargs = settings.generate_kwargs()
    try:
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
                outputs[i] = tokenizer.decode(new_tokens[row], skip_special_tokens=True).strip()
    finally:
        model.train(was_training)
    return outputs
