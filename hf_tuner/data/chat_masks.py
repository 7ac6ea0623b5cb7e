"""Loss on every assistant turn of a multi-turn conversation, for any chat template.

Why by hand: TRL's `assistant_only_loss` needs `{% generation %}` markers in the chat template, and
SmolLM2's (like most) has none; without it SFTTrainer trains `messages` rows on the whole sequence, user
turns included. We render the conversation once, find each assistant turn's characters by rendering the
turns before it (with the generation prompt) and up to it, and mark the tokens whose characters fall
inside. The result is TRL's pre-tokenized form with labels (`input_ids` + `labels`, -100 outside the
assistant turns), which SFTTrainer uses as it is.
"""

from __future__ import annotations

from hf_tuner.data.files import DataError


def assistant_spans(tokenizer, messages: list[dict], where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(the rendered conversation, [(start, end) characters of each assistant turn, end-of-turn included])."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant" or k == 0:
            continue
        before = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:k + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (turn {k} "
                            "changes what comes before it), so the assistant turns cannot be found; use single-turn "
                            "prompt/completion rows with this model")
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize_conversation(tokenizer, messages: list[dict], max_length: int | None, where: str = "") -> dict:
    """{"input_ids", "labels"}: labels are the ids on the tokens of every assistant turn, -100 elsewhere."""
    text, spans = assistant_spans(tokenizer, messages, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(s <= start < e for s, e in spans)) for start, _ in enc["offset_mapping"]]
    ids = enc["input_ids"]
    if max_length:
        ids, mask = ids[:max_length], mask[:max_length]
    return {"input_ids": ids, "labels": [t if m else -100 for t, m in zip(ids, mask)]}


def tokenized_conversations(dataset, tokenizer, max_length: int | None, system_prompt: str | None = None):
    """A dataset of SFT rows ({"prompt", "completion", "where"}) as pre-tokenized conversations, every
    assistant turn labelled; batched `map`, so a file-backed dataset is tokenized once and cached."""
    from datasets import Dataset

    system = [{"role": "system", "content": system_prompt}] if system_prompt else []

    def batch(rows: dict) -> dict:
        out = {"input_ids": [], "labels": []}
        for prompt, completion, where in zip(rows["prompt"], rows["completion"], rows["where"]):
            enc = tokenize_conversation(tokenizer, system + prompt + completion, max_length, where)
            out["input_ids"].append(enc["input_ids"])
            out["labels"].append(enc["labels"])
        return out

    kwargs = {"desc": "tokenizing conversations"} if isinstance(dataset, Dataset) else {}
    names = dataset.column_names or list(next(iter(dataset)).keys())
    return dataset.map(batch, batched=True, remove_columns=names, **kwargs)
