"""Generations to label: candidates for ranking, or base and tuned answers for blind A/B (`hf-tuner generate`).

Prompts are user messages, put through the model's chat template (with an optional system prompt) when it
has one, as the harness does. Sampled presets give `samples` candidates each, seeds seed, seed+1, ...;
deterministic ones (greedy, beam) give one. With an adapter, `compare_base` writes the same prompts
answered by the base (adapter disabled) and by the tuned model, under the same decoding and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

from hf_tuner.data.files import SUFFIXES, DataError, _read_rows, _text
from hf_tuner.generation import DECODING_PRESETS, DecodingSettings, generate_batched, is_encoder_decoder


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a .txt file (one per line) or a .jsonl/.json/.csv file with a `prompt` column; repeats dropped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path}")
    if path.suffix == ".txt":
        prompts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif path.suffix in SUFFIXES:
        prompts = []
        for i, raw in _read_rows(path):
            if not isinstance(raw, dict):
                raise DataError(f"{path} row {i}: expected an object with a `prompt` column")
            prompts.append(_text(raw.get("prompt"), f"{path} row {i}", "prompt"))
    else:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .txt or one of {sorted(SUFFIXES)}")
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return list(dict.fromkeys(prompts))


def _templated(tokenizer, model, prompts: list[str], system_prompt: str | None) -> list[str]:
    from hf_tuner.evaluation.harness import _prompt_text

    if not tokenizer.chat_template and not is_encoder_decoder(model):
        return prompts  # a base model without a chat template continues the text as it is
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return [_prompt_text(tokenizer, system + [{"role": "user", "content": p}], model) for p in prompts]


def check_decoding(decoding: list[str]) -> None:
    unknown = [d for d in decoding if d not in DECODING_PRESETS]
    if unknown or not decoding:
        raise ValueError(f"unknown decoding preset(s) {unknown}; known: {', '.join(DECODING_PRESETS)}")


def generate_candidates(model: str, prompts: list[str], adapter: str | None = None, decoding=("top_p",),
                        samples: int = 2, max_new_tokens: int = 64, batch_size: int = 8, seed: int = 0,
                        system_prompt: str | None = None, compare_base: bool = False) -> list[dict]:
    """Rows {"prompt", "candidates": [{"text", "source"}]}; with compare_base, rows {"prompt", "base", "tuned"}."""
    from hf_tuner.evaluation.checkpoint_eval import load_for_eval

    check_decoding(list(decoding))
    if samples < 1:
        raise ValueError(f"samples={samples}: need at least 1")
    if compare_base and not adapter:
        raise ValueError("--compare_base needs --adapter: the base answers come from the model with it disabled")
    net, tokenizer = load_for_eval(model, adapter)
    texts = _templated(tokenizer, net, prompts, system_prompt)
    name = Path(adapter).parent.name + "/adapter" if adapter else Path(model).name
    if compare_base:
        settings = DecodingSettings(decoding[0], max_new_tokens, batch_size, seed)
        with net.disable_adapter():
            base = generate_batched(net, tokenizer, texts, settings, desc="generate base")
        tuned = generate_batched(net, tokenizer, texts, settings, desc="generate tuned")
        return [{"prompt": p, "base": b, "tuned": t, "decoding": decoding[0], "seed": seed}
                for p, b, t in zip(prompts, base, tuned)]
    rows = [{"prompt": p, "candidates": []} for p in prompts]
    for strategy in decoding:
        for s in range(samples if DECODING_PRESETS[strategy]["do_sample"] else 1):
            settings = DecodingSettings(strategy, max_new_tokens, batch_size, seed + s)
            for row, out in zip(rows, generate_batched(net, tokenizer, texts, settings, desc=f"generate {strategy}")):
                row["candidates"].append({"text": out, "source": f"{name} {strategy} seed={seed + s}"})
    return rows


def write_jsonl(rows: list[dict], path: str | Path, overwrite: bool = False) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another --output or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path
