"""The bundled offline datasets as `datasets.Dataset` splits, for the one loader (hf_tuner.data.sources).

Their raw files are no format `datasets` reads (WordNet's database files, the standard library's pydoc
topics, chatterbot's YAML), so our own readers build the rows and `Dataset.from_list` holds them.
`vader-sentiment` is not here: its human ratings become labels, pairs or prompts in the recipes that use it.
"""

from __future__ import annotations


def _wordnet() -> list[dict]:
    from hf_tuner import assets
    from hf_tuner.data.wordnet import definition_examples

    return definition_examples(assets.resolve("wordnet-definitions"))  # group: the word (the split unit)


def _pydoc() -> list[dict]:
    from hf_tuner.data.text import pydoc_topics

    return [{"text": d["text"], "name": d["name"]} for d in pydoc_topics()]


def _chatterbot() -> list[dict]:
    from hf_tuner import assets
    from hf_tuner.data.text import chatterbot_dialogues

    return [{"text": d["text"], "name": d["name"]} for d in chatterbot_dialogues(assets.resolve("chatterbot-corpus"))]


BUILTIN = {"wordnet-definitions": _wordnet, "pydoc-topics": _pydoc, "chatterbot-corpus": _chatterbot}


def builtin_splits(name: str) -> dict:
    from datasets import Dataset

    return {"train": Dataset.from_list(BUILTIN[name]())}
