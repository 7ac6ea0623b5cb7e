"""WordNet definitions as instruction data: "Define the word 'X'." -> the gloss of X's first sense.

Reads the WordNet 3.0 database files directly (the `wordnet-definitions` asset); nltk's reader would
need a download. Sense order comes from the `index.*` files (the `data.*` files do not rank senses);
the part of speech is the one with the most tagged uses in `cntlist.rev`, ties going to noun first.
"""

from __future__ import annotations

import re
from pathlib import Path

POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}  # 5 = adjective satellite
POS_ORDER = ["n", "v", "a", "r"]
PROMPT = "Define the word '{word}'."
_LETTERS = re.compile(r"^[a-z]+$")


def _first_sense_offsets(folder: Path, pos: str) -> dict[str, int]:
    out = {}
    with open(folder / f"index.{POS_FILES[pos]}", encoding="latin-1") as f:
        for line in f:
            if line.startswith(" "):  # licence header
                continue
            parts = line.split()
            # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt synset_offset...
            p_cnt = int(parts[3])
            offsets = parts[4 + p_cnt + 2:]
            out[parts[0]] = int(offsets[0])
    return out


def _gloss(folder: Path, pos: str, offset: int, handle_cache: dict) -> str:
    f = handle_cache.setdefault(pos, open(folder / f"data.{POS_FILES[pos]}", "rb"))
    f.seek(offset)  # synset offsets are byte offsets into data.<pos>
    line = f.readline().decode("latin-1")
    gloss = line.split(" | ", 1)[1].strip()
    # Definition first, then examples in double quotes: keep the definition.
    return re.split(r';\s*"', gloss)[0].strip().rstrip(";").strip()


def _usage_counts(folder: Path) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    path = folder / "cntlist.rev"
    if not path.exists():
        return counts
    for line in path.read_text(encoding="latin-1").splitlines():
        key, _, count = line.split()
        lemma, rest = key.split("%", 1)
        pos = SENSE_KEY_POS.get(rest[0])
        if pos:
            counts[(lemma, pos)] = counts.get((lemma, pos), 0) + int(count)
    return counts


def read_definitions(folder: str | Path, min_words: int = 3, max_words: int = 25) -> list[dict]:
    """One row per letters-only lemma: {"word", "pos", "definition"}, sorted by word."""
    folder = Path(folder)
    missing = [f"index.{n}" for n in POS_FILES.values() if not (folder / f"index.{n}").exists()]
    if missing:
        raise FileNotFoundError(f"{folder} is not a WordNet database folder (missing {', '.join(missing)})")
    firsts = {pos: _first_sense_offsets(folder, pos) for pos in POS_ORDER}
    counts = _usage_counts(folder)
    words = sorted({w for table in firsts.values() for w in table if _LETTERS.match(w)})
    handles: dict = {}
    rows = []
    try:
        for word in words:
            candidates = [p for p in POS_ORDER if word in firsts[p]]
            pos = max(candidates, key=lambda p: (counts.get((word, p), 0), -POS_ORDER.index(p)))
            definition = _gloss(folder, pos, firsts[pos][word], handles)
            if min_words <= len(definition.split()) <= max_words:
                rows.append({"word": word, "pos": pos, "definition": definition})
    finally:
        for h in handles.values():
            h.close()
    return rows


def definition_examples(folder: str | Path) -> list[dict]:
    """Conversational prompt/completion rows, with `group` = the word (the split unit)."""
    return [
        {"prompt": [{"role": "user", "content": PROMPT.format(word=r["word"])}],
         "completion": [{"role": "assistant", "content": r["definition"]}],
         "group": r["word"]}
        for r in read_definitions(folder)
    ]
