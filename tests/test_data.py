import json
from pathlib import Path

import pytest

from conftest import write_jsonl
from hf_tuner.data import DataError, load_examples, split_by_group
from hf_tuner.data.wordnet import definition_examples, read_definitions

HEADER = "  1 This software and database is being provided to you by Princeton University\n"


def make_wordnet(folder: Path, senses: dict, counts: dict | None = None) -> Path:
    """A WordNet-format database: senses = {pos: [(word, gloss), ...]} in sense order per word."""
    folder.mkdir()
    names = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
    for pos, name in names.items():
        data, index = HEADER, {}
        for word, gloss in reversed(senses.get(pos, [])):  # reversed: file order must not decide sense order
            offset = len(data.encode())
            data += f"{offset:08d} 05 {pos} 01 {word} 0 000 | {gloss}  \n"
            index.setdefault(word, []).insert(0, offset)
        (folder / f"data.{name}").write_text(data)
        lines = [f"{w} {pos} {len(offs)} 1 @ {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  \n"
                 for w, offs in sorted(index.items())]
        (folder / f"index.{name}").write_text(HEADER + "".join(lines))
    (folder / "cntlist.rev").write_text("".join(f"{k} 1 {v}\n" for k, v in (counts or {}).items()))
    return folder


@pytest.fixture
def wordnet(tmp_path) -> Path:
    return make_wordnet(tmp_path / "wn", {
        "n": [("run", "a score in baseball made by a runner touching all four bases"),
              ("run", "the act of testing something quickly"),
              ("lamp", 'an artificial source of visible illumination; "the lamp was bright"'),
              ("new_york", "the largest city in the United States of America"),
              ("ox", "cattle")],
        "v": [("run", "move fast by using one's feet, with one foot off the ground")],
        "a": [("happy", "enjoying or showing or marked by joy or pleasure")],
    }, counts={"run%2:38:00::": 40, "run%1:04:00::": 3})


def test_wordnet_first_sense_pos_by_usage_and_filters(wordnet):
    rows = {r["word"]: r for r in read_definitions(wordnet)}
    assert rows["run"]["pos"] == "v"  # more tagged uses as a verb
    assert rows["run"]["definition"].startswith("move fast")
    assert rows["lamp"]["definition"] == "an artificial source of visible illumination"  # example dropped
    assert "new_york" not in rows  # letters-only lemmas
    assert "ox" not in rows  # definitions of 3-25 words
    assert rows["happy"]["pos"] == "a"


def test_wordnet_first_sense_comes_from_the_index(tmp_path):
    folder = make_wordnet(tmp_path / "wn2", {"n": [("bank", "sloping land beside a body of water"),
                                                   ("bank", "a financial institution that accepts deposits")]})
    assert read_definitions(folder)[0]["definition"] == "sloping land beside a body of water"


def test_wordnet_examples_are_chat_rows(wordnet):
    row = next(r for r in definition_examples(wordnet) if r["group"] == "lamp")
    assert row["prompt"] == [{"role": "user", "content": "Define the word 'lamp'."}]
    assert row["completion"][0]["role"] == "assistant"


def test_wordnet_missing_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a WordNet database folder"):
        read_definitions(tmp_path)


def test_split_never_puts_a_group_on_both_sides():
    rows = [{"group": f"w{i % 30}", "prompt": [], "completion": []} for i in range(90)]
    train, held = split_by_group(rows, eval_size=10, seed=3)
    assert {r["group"] for r in train}.isdisjoint({r["group"] for r in held})
    assert len({r["group"] for r in held}) == 10 and len(train) + len(held) == 90
    again, _ = split_by_group(rows, eval_size=10, seed=3)
    assert again == train  # fixed seed, same split
    with pytest.raises(DataError, match="leaves nothing to train"):
        split_by_group(rows, eval_size=30, seed=0)


def test_load_examples_reads_every_form_of_one_file(tmp_path):
    pc = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "Q?", "completion": "A."}])
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q?"},
            {"role": "assistant", "content": "A."}]
    js = tmp_path / "b.json"
    js.write_text(json.dumps([{"messages": msgs}]))
    a, b = load_examples(str(pc))[0], load_examples(str(js))[0]
    assert a["prompt"] == [{"role": "user", "content": "Q?"}] and a["completion"][0]["content"] == "A."
    assert b["prompt"] == msgs[:2] and b["completion"] == msgs[2:]


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "Q?", "completion": "A."}', '{"prompt": "Q?"}'], r"b\.jsonl row 2: missing column `completion`"),
    (['{"prompt": "Q?", "completion": "A."}', '{"prompt": "Q?", "completion": "  "}'], r"row 2: `completion` is empty"),
    (['{"prompt": "Q?", "completion": "A."}', "", '{"prompt": "Q?", completion: 1}'], r"row 3: not valid JSON"),
    (['{"text": "just text"}'], r"row 1: missing columns: need `prompt` and `completion`, or `messages`"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], r"row 1: the last message must be the assistant"),
    (['{"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]}'],
     r"row 1: `messages\[0\].role` is 'robot'"),
])
def test_bad_rows_are_refused_with_file_and_row(tmp_path, lines, message):
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        load_examples(str(path))
