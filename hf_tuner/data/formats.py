"""Row shapes: TRL's dataset types in standard and conversational form, the community shapes (Alpaca,
ShareGPT), a column mapping for anything else, and the row checks that name dataset, split and row.

TRL's types (https://huggingface.co/docs/trl/dataset_formats), told apart by their columns:
    language_modeling     text | messages
    prompt_only           prompt
    prompt_completion     prompt, completion
    preference            prompt, chosen, rejected   (explicit prompt)
                          chosen, rejected           (implicit prompt: the shared start of both)
    unpaired_preference   prompt, completion, label
Each value is text (standard) or a list of {role, content} messages (conversational).

Rows are standardized (column mapping, Alpaca, ShareGPT) and checked inside `datasets.map(batched=True)`,
so a file-backed dataset is checked once and its result served from the datasets cache after; a streaming
dataset is checked as it is read.
"""

from __future__ import annotations

import json

from hf_tuner.data.files import ROLES, DataError, _text

TYPES = ("language_modeling", "prompt_only", "prompt_completion", "preference", "unpaired_preference")
# ShareGPT speaker names -> chat roles. TRL's maybe_convert_to_chatml renames the keys but keeps
# "human"/"gpt", which no chat template knows, so the roles are mapped here.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant", "system": "system"}


def present(raw: dict) -> dict:
    """The row without the None that Arrow puts in columns a row lacks (JSON rows of different shapes)."""
    return {k: v for k, v in raw.items() if v is not None}


def check_columns(columns: list[str], mapping: dict | None, label: str) -> None:
    """dataset_columns names columns the dataset must have; checked once, before any row is read."""
    for ours, theirs in (mapping or {}).items():
        if theirs not in columns:
            raise DataError(f"dataset_columns: {label} has no column {theirs!r} (for {ours!r}); "
                            f"its columns: {', '.join(columns)}")


def standardize(raw: dict, mapping: dict | None, where: str) -> dict:
    """One row in TRL's column names: the config's mapping first, then Alpaca and ShareGPT recognised."""
    row = present(raw)
    for ours, theirs in (mapping or {}).items():
        if theirs in row:
            row[ours] = row.pop(theirs)
    if "conversations" in row and "messages" not in row:  # ShareGPT
        turns = row.pop("conversations")
        if not isinstance(turns, list):
            raise DataError(f"{where}: `conversations` must be a list of {{from, value}} turns")
        messages = []
        for j, t in enumerate(turns):
            if not isinstance(t, dict) or not ({"from", "value"} <= set(present(t)) or {"role", "content"} <= set(present(t))):
                raise DataError(f"{where}: `conversations[{j}]` needs `from` and `value` (ShareGPT)")
            who = str(t.get("from", t.get("role"))).lower()
            if who not in SHAREGPT_ROLES:
                raise DataError(f"{where}: `conversations[{j}].from` is {who!r}; expected one of "
                                f"{sorted(SHAREGPT_ROLES)}")
            messages.append({"role": SHAREGPT_ROLES[who], "content": t.get("value", t.get("content"))})
        row["messages"] = messages
    if "instruction" in row and "output" in row and not {"prompt", "completion", "messages"} & set(row):  # Alpaca
        instruction = _text(row.pop("instruction"), where, "instruction")
        extra = row.pop("input", "") or ""
        row["prompt"] = instruction + (f"\n\n{extra}" if str(extra).strip() else "")
        row["completion"] = row.pop("output")
        system = row.pop("system", None)
        if isinstance(system, str) and system.strip():
            row["prompt"] = [{"role": "system", "content": system}, {"role": "user", "content": row["prompt"]}]
            row["completion"] = [{"role": "assistant", "content": _text(row["completion"], where, "output")}]
    return row


def row_type(row: dict) -> str | None:
    """TRL's type of one standardized row, from its columns (None: no TRL type)."""
    keys = set(row)
    if {"chosen", "rejected"} <= keys:
        return "preference"
    if {"prompt", "completion", "label"} <= keys:
        return "unpaired_preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "messages" in keys or "text" in keys:
        return "language_modeling"
    if "prompt" in keys:
        return "prompt_only"
    return None


def is_conversational(value) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


def messages(value, where: str, column: str) -> list[dict]:
    """A list of {role, content} messages; CSV cells may hold it as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: `{column}` is not a JSON list of messages ({e.msg})") from e
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: `{column}` must be a non-empty list of {{role, content}} messages")
    out = []
    for j, m in enumerate(value):
        m = present(m) if isinstance(m, dict) else m
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: `{column}[{j}]` needs `role` and `content`")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: `{column}[{j}].role` is {m['role']!r}; expected one of {sorted(ROLES)}")
        out.append({"role": m["role"], "content": _text(m["content"], where, f"{column}[{j}].content")})
    return out


def text_or_messages(value, where: str, column: str, role: str) -> list[dict]:
    """A standard value becomes one message with `role`; a conversational one is checked as it is."""
    if isinstance(value, list) or (isinstance(value, str) and value.lstrip().startswith("[{")):
        return messages(value, where, column)
    return [{"role": role, "content": _text(value, where, column)}]


def accepts(recipe: str, kinds: dict, found: str | None, row: dict, label: str) -> None:
    """Refuse a dataset whose type the recipe cannot use, naming the types it takes (and who takes this one)."""
    if found in kinds:
        return
    takers = {"language_modeling": "continued_pretraining (text), sft_instruction (messages)",
              "prompt_only": "ppo_rlhf", "prompt_completion": "sft_instruction, seq2seq",
              "preference": "reward_model, dpo", "unpaired_preference": "none yet (KTO is not a recipe)"}
    what = f"a {found} dataset" if found else "no TRL dataset type"
    hint = f"; {found} data is taken by: {takers[found]}" if found in takers else ""
    raise DataError(f"{label}: {recipe} takes {', '.join(kinds)} rows, but found {what} (columns: "
                    f"{', '.join(row) or 'none'}){hint}. Rename columns with dataset_columns, e.g. "
                    "{prompt: question, completion: answer}")


# ------------------------------------------------------------------ recipe rows
def sft_row(raw: dict, where: str) -> dict:
    """-> {"prompt": [messages], "completion": [the last assistant message], "turns", "group", "where"}.

    A multi-turn `messages` row keeps every earlier turn, assistant answers included, in `prompt`; `turns`
    counts the assistant messages, all of which carry loss in training (hf_tuner.data.chat_masks)."""
    if "messages" in raw:
        msgs = messages(raw["messages"], where, "messages")
        if msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer, got {msgs[-1]['role']!r}")
        if len(msgs) < 2:
            raise DataError(f"{where}: `messages` needs at least one message before the assistant's answer")
        prompt, completion = msgs[:-1], msgs[-1:]
    elif "prompt" in raw or "completion" in raw:
        for col in ("prompt", "completion"):
            if col not in raw:
                raise DataError(f"{where}: missing column `{col}` (columns: {', '.join(map(str, raw))})")
        prompt = text_or_messages(raw["prompt"], where, "prompt", "user")
        completion = text_or_messages(raw["completion"], where, "completion", "assistant")
        if len(completion) != 1 or completion[0]["role"] != "assistant":
            raise DataError(f"{where}: `completion` must be one assistant message")
    else:
        raise DataError(f"{where}: missing columns: need `prompt` and `completion`, or `messages` "
                        f"(columns: {', '.join(map(str, raw)) or 'none'})")
    turns = 1 + sum(m["role"] == "assistant" for m in prompt)
    # identical prompts stay on one side of a split; a `group` column (e.g. the word defined) decides instead
    group = str(raw["group"]) if "group" in raw else json.dumps(prompt, sort_keys=True)
    return {"prompt": prompt, "completion": completion, "turns": turns, "group": group, "where": where}


def flatten(value) -> str:
    """A conversational value as plain text for models with no chat template (an encoder reward model)."""
    if isinstance(value, list):
        return "\n".join(m["content"] for m in value)
    return value


def preference_row(raw: dict, where: str) -> list[dict]:
    """Preference pairs, standard or conversational, explicit or implicit prompt (TRL's extract_prompt
    finds the shared start); a `ranking` expands into every ordered pair; a judged `tie` gives no pair."""
    from itertools import combinations

    from trl.data_utils import extract_prompt

    if raw.get("tie") is True:  # a person found the responses equally good: a record, not a training pair
        return []
    prompt = raw.get("prompt", "")
    if "ranking" in raw:
        ranking = raw["ranking"]
        if not isinstance(ranking, list) or len(ranking) < 2:
            raise DataError(f"{where}: `ranking` must be a list of at least two responses, best first")
        texts = [_text(t, where, f"ranking[{i}]") for i, t in enumerate(ranking)]
        return [{"prompt": _text(prompt, where, "prompt") if prompt else "", "chosen": a, "rejected": b,
                 "group": prompt or where, "where": where} for a, b in combinations(texts, 2)]
    missing = [c for c in ("chosen", "rejected") if c not in raw]
    if missing:
        raise DataError(f"{where}: missing column(s) {', '.join(f'`{c}`' for c in missing)}: need `chosen` and "
                        f"`rejected` (optionally `prompt`), or `prompt` and `ranking` (columns: {', '.join(raw)})")
    chosen, rejected = raw["chosen"], raw["rejected"]
    if is_conversational(chosen) or is_conversational(rejected):
        chosen, rejected = messages(chosen, where, "chosen"), messages(rejected, where, "rejected")
        if prompt:
            prompt = text_or_messages(prompt, where, "prompt", "user")
        else:  # implicit prompt: the turns both sides share
            parts = extract_prompt({"chosen": chosen, "rejected": rejected})
            prompt, chosen, rejected = parts["prompt"], parts["chosen"], parts["rejected"]
            if not chosen or not rejected:
                raise DataError(f"{where}: `chosen` and `rejected` are the same conversation")
    else:
        chosen, rejected = _text(chosen, where, "chosen"), _text(rejected, where, "rejected")
        prompt = _text(prompt, where, "prompt") if prompt else ""
    if chosen == rejected:
        raise DataError(f"{where}: `chosen` and `rejected` are the same text")
    group = json.dumps(prompt) if prompt else json.dumps(chosen)
    return [{"prompt": prompt, "chosen": chosen, "rejected": rejected, "group": group, "where": where}]


def prompt_row(raw: dict, where: str) -> dict:
    """A prompt for RL: text, or messages ending with the user's turn."""
    if "prompt" not in raw:
        raise DataError(f"{where}: missing column `prompt` (columns: {', '.join(raw) or 'none'})")
    value = raw["prompt"]
    if is_conversational(value):
        value = messages(value, where, "prompt")
    else:
        value = _text(value, where, "prompt")
    return {"prompt": value, "group": json.dumps(value), "where": where}


def text_row(raw: dict, where: str) -> dict:
    """A language-modelling document: `text`, or `messages` (kept as JSON text, rendered with the chat template
    once the tokenizer is loaded)."""
    name = str(raw.get("name") or where)
    if "text" in raw:
        return {"text": _text(raw["text"], where, "text"), "messages": "", "name": name, "where": where}
    if "messages" in raw:
        return {"text": "", "messages": json.dumps(messages(raw["messages"], where, "messages")), "name": name,
                "where": where}
    raise DataError(f"{where}: missing column `text` or `messages` (columns: {', '.join(raw) or 'none'})")


def labelled_row(raw: dict, where: str, labels: list[str]) -> dict:
    """A classification row {text, label}; a label outside `labels` is refused."""
    for col in ("text", "label"):
        if col not in raw:
            raise DataError(f"{where}: missing column `{col}` (columns: {', '.join(map(str, raw)) or 'none'})")
    text, label = _text(raw["text"], where, "text"), str(raw["label"]).strip()
    if label not in labels:
        raise DataError(f"{where}: `label` {raw['label']!r} is not in the label set {labels} (set `labels`)")
    return {"text": text, "label": label, "group": " ".join(text.lower().split()), "where": where}
