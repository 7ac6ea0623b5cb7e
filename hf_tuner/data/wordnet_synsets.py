"""WordNet synsets as retrieval pairs: a word (query) against the gloss of its synset (passage).

Reads the `data.*` files of the `wordnet-definitions` asset directly (nltk's reader needs a download).
Each synset gives one pair, its lemma drawn with a fixed seed, so two pairs in one batch never share a
gloss (in-batch negatives would otherwise hold false negatives). The split unit is the synset.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from hf_tuner.data.wordnet import POS_FILES

_LEMMA = re.compile(r"^[a-z][a-z_'-]*$")


def read_synsets(folder: str | Path, min_words: int = 3, max_words: int = 30) -> list[dict]:
    """{"synset": "n:02084071", "lemmas": [...], "gloss": definition} for every synset, in file order."""
    folder = Path(folder)
    out = []
    for pos, name in POS_FILES.items():
        path = folder / f"data.{name}"
        if not path.is_file():
            raise FileNotFoundError(f"{folder} is not a WordNet database folder (missing data.{name})")
        with open(path, encoding="latin-1") as f:
            for line in f:
                if line.startswith(" ") or " | " not in line:  # licence header
                    continue
                head, gloss = line.split(" | ", 1)
                parts = head.split()
                count = int(parts[3], 16)  # w_cnt is two hex digits
                lemmas = [parts[4 + 2 * i].lower() for i in range(count)]
                lemmas = list(dict.fromkeys(re.sub(r"\(.*\)$", "", w) for w in lemmas if _LEMMA.match(
                    re.sub(r"\(.*\)$", "", w))))
                definition = re.split(r';\s*"', gloss.strip())[0].strip().rstrip(";").strip()
                if lemmas and min_words <= len(definition.split()) <= max_words:
                    out.append({"synset": f"{pos}:{parts[0]}", "lemmas": [w.replace("_", " ") for w in lemmas],
                                "gloss": definition})
    return out


def word_gloss_pairs(folder: str | Path, seed: int = 0) -> list[dict]:
    """One {"query": lemma, "passage": gloss, "group": synset} per synset; the lemma drawn with `seed`."""
    rng = random.Random(seed)
    return [{"query": rng.choice(s["lemmas"]), "passage": s["gloss"], "group": s["synset"]}
            for s in read_synsets(folder)]
