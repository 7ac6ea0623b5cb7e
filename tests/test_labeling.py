"""`hf-tuner label`, `generate` and `report`: every endpoint, the files they write, the statistics, the
round trip into the reward model, and one end-to-end run in headless Chromium (skipped without it)."""

import json
import os
import shutil
import threading
import time

import pytest

from conftest import assert_loss_falls, free_port, logged_losses, write_jsonl
from hf_tuner.data import DataError
from hf_tuner.data.preferences import read_preference_file
from hf_tuner.evaluation.human import cohen_kappa, read_judgments, summarize, wilson_interval
from hf_tuner.labeling.app import create_app, host_name
from hf_tuner.labeling.items import read_ab_pairs, read_candidates, read_run, read_two_folders
from hf_tuner.labeling.session import JudgmentError, LabelSession, parse_order

from starlette import testclient as starlette_testclient  # needs httpx: a dev dependency, so a hard import

EVIL = '<script>document.title="pwned"</script><img src=x onerror=alert(1)><b>bold</b>'


def client(session):
    return starlette_testclient.TestClient(create_app(session), base_url="http://127.0.0.1:8765")


@pytest.fixture
def candidates(tmp_path):
    return write_jsonl(tmp_path / "cands.jsonl", [
        {"prompt": "Describe <the> film.",
         "candidates": [EVIL, "a quiet, lovely film", {"text": "dull", "source": "m2"}]},
        {"prompt": "Two only", "candidates": ["first answer", "second answer"]},
        {"prompt": "Four", "candidates": ["w", "x", "y", "z"]},
    ])


@pytest.fixture
def rank_session(candidates, tmp_path):
    items, _ = read_candidates([candidates])
    return LabelSession("rank", items, tmp_path / "prefs.jsonl", "ann1")


@pytest.fixture
def ab_session(tmp_path):
    rows = [{"prompt": f"prompt number {i}", "base": f"left-or-right answer {i}a",
             "tuned": f"left-or-right answer {i}b"} for i in range(5)]
    items = read_ab_pairs(write_jsonl(tmp_path / "ab.jsonl", rows))
    return LabelSession("ab", items, tmp_path / "judged.jsonl", "ann1")


def post(c, session, item_id=None, **fields):
    item_id = item_id if item_id is not None else session.current().id
    return c.post("/judge", data={"token": session.token, "item_id": item_id, **fields}, follow_redirects=False)


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


# ---- pages and static files

def test_page_shows_model_text_as_text_with_progress(rank_session):
    r = client(rank_session).get("/")
    assert r.status_code == 200
    assert "1 of 3" in r.text
    assert "&lt;script&gt;document.title=&#34;pwned&#34;&lt;/script&gt;" in r.text
    assert "&lt;img src=x onerror=alert(1)&gt;&lt;b&gt;bold&lt;/b&gt;" in r.text
    assert "<script>document" not in r.text and "<img" not in r.text and "<b>bold" not in r.text
    assert "Describe &lt;the&gt; film." in r.text  # the prompt too
    assert "script-src 'self'" in r.headers["content-security-policy"]  # no inline script could run anyway
    assert r.headers["cache-control"] == "no-store"


def test_static_files_progress_and_methods(rank_session):
    c = client(rank_session)
    js = c.get("/static/label.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "keydown" in js.text
    assert c.get("/static/label.css").status_code == 200
    assert c.get("/static/../app.py").status_code == 404
    assert c.get("/static/secret.txt").status_code == 404
    assert c.get("/judge").status_code == 405
    assert c.get("/api/progress").json() == {"mode": "rank", "annotator": "ann1", "done": 0, "total": 3,
                                             "current": rank_session.items[0].id, "finished": False}


def test_a_foreign_host_header_is_refused(rank_session):
    c = starlette_testclient.TestClient(create_app(rank_session), base_url="http://evil.example:8765")
    assert c.get("/").status_code == 400
    r = c.post("/judge", data={"token": rank_session.token, "item_id": rank_session.items[0].id, "order": "1>2=3"})
    assert r.status_code == 400 and "Host" in r.text
    assert not rank_session.output.exists()
    assert host_name("[::1]:8765") == "::1" and host_name("localhost:1") == "localhost"
    assert host_name("127.0.0.1") == "127.0.0.1"


# ---- posting judgments

def test_ranking_is_recorded_as_every_pair_with_annotator_and_timestamp(rank_session):
    item = rank_session.current()
    shown = [item.responses[i] for i in rank_session.layout(item)]
    r = post(client(rank_session), rank_session, order="2>1=3")
    assert r.status_code == 303 and r.headers["location"] == "/" and r.headers["x-judgment"] == "recorded"
    rows = lines(rank_session.output)
    assert len(rows) == 3  # C(3, 2) pairs of one judgment
    prefs = {(x["chosen"], x["rejected"]) for x in rows if "chosen" in x}
    assert prefs == {(shown[1], shown[0]), (shown[1], shown[2])}
    tie = [x for x in rows if x.get("tie")]
    assert len(tie) == 1 and set(tie[0]["responses"]) == {shown[0], shown[2]}
    assert all(x["annotator"] == "ann1" and x["item_id"] == item.id and x["timestamp"].endswith("+00:00")
               and x["prompt"] == item.prompt for x in rows)
    assert len({x["judgment_id"] for x in rows}) == 1
    assert rank_session.progress() == (1, 3)
    assert "2 of 3" in client(rank_session).get("/").text


def test_every_judgment_is_fsynced_before_the_answer(rank_session, ab_session, monkeypatch):
    import hf_tuner.labeling.store as store

    synced = []
    monkeypatch.setattr(store.os, "fsync", lambda fd: synced.append(fd))
    post(client(rank_session), rank_session, order="1>2>3")
    assert len(synced) == 2  # the file, and its folder entry for a new file
    post(client(rank_session), rank_session, order="1=2")
    post(client(ab_session), ab_session, choice="tie")
    assert len(synced) == 5


def test_double_submit_is_idempotent_and_a_changed_mind_is_refused(rank_session):
    c = client(rank_session)
    item = rank_session.current()
    assert post(c, rank_session, order="1>2>3").headers["x-judgment"] == "recorded"
    before = rank_session.output.read_bytes()
    again = post(c, rank_session, item_id=item.id, order="1>2>3")
    assert again.status_code == 303 and again.headers["x-judgment"] == "duplicate"
    other = post(c, rank_session, item_id=item.id, order="3>2>1")
    assert other.status_code == 409 and "already judged" in other.text
    assert rank_session.output.read_bytes() == before


def test_ab_double_submit_is_idempotent(ab_session):
    c = client(ab_session)
    item = ab_session.current()
    assert post(c, ab_session, choice="left").headers["x-judgment"] == "recorded"
    assert post(c, ab_session, item_id=item.id, choice="left").headers["x-judgment"] == "duplicate"
    assert post(c, ab_session, item_id=item.id, choice="tie").status_code == 409
    assert len(lines(ab_session.output)) == 1


def test_unknown_item_id_is_refused(rank_session):
    r = post(client(rank_session), rank_session, item_id="000000000000", order="1>2")
    assert r.status_code == 404 and "no item" in r.text
    assert not rank_session.output.exists()


@pytest.mark.parametrize("fields, status, message", [
    ({"order": "2>1=3", "extra": "x"}, 400, "unexpected field(s): extra"),
    ({"order": "2>1=3", "choice": "left"}, 400, "unexpected field(s): choice"),
    ({}, 400, "missing field(s): order"),
    ({"order": "1>1>2"}, 400, "[1] given twice"),
    ({"order": "1>2"}, 400, "[3] not ranked"),
    ({"order": "1>2>5"}, 400, "no position [5]"),
    ({"order": "1,2,3"}, 400, "is not a ranking"),
    ({"order": ""}, 400, "is not a ranking"),
    ({"order": "<script>"}, 400, "is not a ranking"),
])
def test_malformed_rank_posts_are_refused_and_write_nothing(rank_session, fields, status, message):
    r = post(client(rank_session), rank_session, **fields)
    assert r.status_code == status
    assert message.replace("<", "&lt;").replace(">", "&gt;") in r.text
    assert "<script>" not in r.text.split("</head>")[1]
    assert not rank_session.output.exists()


def test_malformed_requests_are_refused(rank_session, ab_session):
    c = client(rank_session)
    item_id = rank_session.current().id
    ok = f"token={rank_session.token}&item_id={item_id}&order=1>2>3"
    assert c.post("/judge", json={"token": rank_session.token, "item_id": item_id, "order": "1>2>3"}).status_code == 415
    assert c.post("/judge", content=ok + "&order=3>2>1",
                  headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 400
    assert c.post("/judge", content=b"token=\xff\xfe", headers={"content-type": "application/x-www-form-urlencoded"}
                  ).status_code == 400
    assert c.post("/judge", content=ok + "&pad=" + "x" * 5000,
                  headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 413
    wrong_token = c.post("/judge", data={"token": "forged", "item_id": item_id, "order": "1>2>3"})
    assert wrong_token.status_code == 403 and "reload" in wrong_token.text
    assert not rank_session.output.exists()
    bad_choice = post(client(ab_session), ab_session, choice="base")
    assert bad_choice.status_code == 400 and "expected one of left, right, tie" in bad_choice.text
    assert not ab_session.output.exists()


# ---- resuming, the blind layout, the file itself

def test_a_new_server_resumes_where_the_person_stopped(rank_session, candidates):
    c = client(rank_session)
    post(c, rank_session, order="1=2=3")
    post(c, rank_session, order="2>1")
    items, _ = read_candidates([candidates])
    again = LabelSession("rank", items, rank_session.output, "ann1")
    assert again.progress() == (2, 3) and again.current().id == items[2].id
    assert again.layout(items[2]) == rank_session.layout(items[2])  # same screen after a restart
    assert "3 of 3" in client(again).get("/").text
    other = LabelSession("rank", items, rank_session.output, "ann2")  # another person starts at the top
    assert other.progress() == (0, 3)


def test_ab_sides_stay_hidden_until_the_round_ends(ab_session):
    c = client(ab_session)
    choices = ["left", "right", "tie", "left", "right"]
    for choice in choices:
        page = c.get("/").text
        assert "base" not in page and "tuned" not in page
        assert post(c, ab_session, choice=choice).status_code == 303
    rows = lines(ab_session.output)
    for row, choice in zip(rows, choices):
        item = ab_session.by_id[row["item_id"]]
        left = ["base", "tuned"][ab_session.layout(item)[0]]
        assert row["left"] == left and row["choice"] == choice
        assert row["winner"] == {"left": left, "right": "tuned" if left == "base" else "base", "tie": "tie"}[choice]
        assert (row["base"], row["tuned"]) == item.responses
    assert {r["left"] for r in rows} == {"base", "tuned"}  # both layouts occur in 5 items with this seed
    final = c.get("/").text
    assert "All 5 items judged" in final and "Which side was which" in final and "tuned" in final
    assert c.get("/api/progress").json()["finished"] is True


def test_a_torn_last_line_is_cut_off_and_the_round_goes_on(rank_session, candidates, capsys):
    post(client(rank_session), rank_session, order="1>2>3")
    good = rank_session.output.read_bytes()
    rank_session.output.write_bytes(good + b'{"prompt": "Two only", "cho')
    items, _ = read_candidates([candidates])
    again = LabelSession("rank", items, rank_session.output, "ann1")
    assert "incomplete" in capsys.readouterr().err
    assert rank_session.output.read_bytes() == good and again.progress() == (1, 3)
    rank_session.output.write_bytes(good + b'{"not": "a judgment"}\n')
    with pytest.raises(DataError, match=r"prefs.jsonl row 4: no item_id, annotator, order"):
        LabelSession("rank", items, rank_session.output, "ann1")


def test_parse_order_and_session_arguments():
    assert parse_order("2>1=3", 3) == [[2], [1, 3]]
    assert parse_order(" 1 = 2 ", 2) == [[1, 2]]
    with pytest.raises(JudgmentError, match="not a ranking"):
        parse_order("1>>2", 2)
    with pytest.raises(ValueError, match="annotator 'two words'"):
        LabelSession("rank", [], "x.jsonl", "two words")
    with pytest.raises(ValueError, match="mode 'score'"):
        LabelSession("score", [], "x.jsonl", "a")


# ---- reading what the page shows

def test_candidate_files_merge_by_prompt_and_are_checked(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "candidates": ["one", "two"]},
                                           {"prompt": "lonely", "candidates": ["same", "same", "  "]}])
    b = write_jsonl(tmp_path / "b.jsonl",
                    [{"prompt": "p", "candidates": [{"text": "three", "source": "tuned"}, "one"]}])
    items, skipped = read_candidates([a, b])
    assert [i.responses for i in items] == [("one", "two", "three")] and items[0].sources[2] == "tuned"
    assert skipped == 1
    big = write_jsonl(tmp_path / "big.jsonl", [{"prompt": "p", "candidates": list("abcde")}])
    with pytest.raises(DataError, match=r"big.jsonl row 1: prompt 'p' has 5 distinct candidates"):
        read_candidates([big])
    bad = write_jsonl(tmp_path / "bad.jsonl",
                      [{"prompt": "p", "candidates": ["a", "b"]}, {"prompt": "q", "answers": []}])
    with pytest.raises(DataError, match=r"bad.jsonl row 2: `candidates` must be a non-empty list"):
        read_candidates([bad])


def test_ab_sources_pairs_run_folder_and_two_folders(tmp_path):
    with pytest.raises(DataError, match=r"ab.jsonl row 1: missing column\(s\) `tuned`"):
        read_ab_pairs(write_jsonl(tmp_path / "ab.jsonl", [{"prompt": "p", "base": "b"}]))
    with pytest.raises(DataError, match="prompt 'p' appears again"):
        read_ab_pairs(write_jsonl(tmp_path / "dup.jsonl", [{"prompt": "p", "base": "b", "tuned": "t"}] * 2))
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DataError, match="no generations.jsonl"):
        read_run(run)
    write_jsonl(run / "generations.jsonl", [{"prompt": "p", "reference": "r", "base": "", "tuned": "t"},
                                            {"prompt": "p", "reference": "r2", "base": "", "tuned": "t"}])
    (item,) = read_run(run)  # a prompt held out twice (two references) is judged once
    assert item.responses == ("", "t") and item.sources == ("run:base", "run:tuned")  # an empty answer is judged too
    evals = tmp_path / "eval-base"
    evals.mkdir()
    (evals / "predictions.json").write_text(json.dumps(
        {"prompts": ["q", "p"], "references": ["r1", "r2"], "greedy/zero_shot": ["bq", "bp"]}))
    (item,) = read_two_folders(evals, run)
    assert item.prompt == "p" and item.responses == ("bp", "t")
    assert item.sources == ("eval-base:greedy/zero_shot", "run:tuned")


# ---- from rankings to a reward model

def test_rankings_train_the_reward_model(tmp_path):
    """Rank 3 candidates for 20 prompts through the endpoint, then train recipes/reward_model.py on the file."""
    from conftest import NEGATIVE, NOUNS, POSITIVE
    from recipes.reward_model import train

    rows = [{"prompt": f"Review {i}: the {NOUNS[i % 10]}", "candidates": [
        f"was {POSITIVE[i % 8]} and {POSITIVE[(i + 3) % 8]}", f"was {NOUNS[(i + 1) % 10]} shaped",
        f"was {NEGATIVE[i % 8]} and {NEGATIVE[(i + 3) % 8]}"]} for i in range(20)]
    items, _ = read_candidates([write_jsonl(tmp_path / "cands.jsonl", rows)])
    session = LabelSession("rank", items, tmp_path / "prefs.jsonl", "ann1", seed=3)
    c = client(session)
    for item in items:  # rank as a person would, from the screen: praise > neutral > panning
        shown = session.layout(item)  # shown[p] = index of the response at position p+1
        order = ">".join(str(shown.index(i) + 1) for i in (0, 1, 2))
        assert post(c, session, order=order).headers["x-judgment"] == "recorded"
    pairs = read_preference_file(session.output)
    assert len(pairs) == 60 and all(p["chosen"] != p["rejected"] for p in pairs)
    assert all(POSITIVE[0] not in p["rejected"] for p in pairs)
    cfg = {"model_name_or_path": "tiny-bert", "dataset_name": str(session.output), "output_dir": str(tmp_path / "rm"),
           "eval_samples": 4, "peft_method": "full", "max_length": 32, "per_device_train_batch_size": 8,
           "max_steps": 30, "learning_rate": 1e-3, "lr_scheduler_type": "constant", "logging_steps": 1,
           "gradient_checkpointing": False, "save_strategy": "no", "report_to": [], "bf16": False, "seed": 0,
           "num_threads": 1}
    result = train(cfg)
    assert result.metrics["train"]["train_pairs"] == 48 and result.metrics["train"]["eval_pairs"] == 12
    assert_loss_falls(logged_losses(result.output_dir), window=5)
    assert (result.output_dir / "model" / "config.json").exists()


def test_tie_rows_are_records_not_training_pairs(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "p", "tie": True, "responses": ["a", "b"], "annotator": "x"},
        {"prompt": "p", "chosen": "a", "rejected": "c", "annotator": "x"}])
    assert [(r["chosen"], r["rejected"]) for r in read_preference_file(path)] == [("a", "c")]


# ---- statistics and the report

def test_wilson_interval_against_hand_computed_values():
    # 7 of 10: p = 0.7, z = 1.96: centre (0.7 + 0.19207) / 1.38415 = 0.64449,
    # half-width 1.96 / 1.38415 * sqrt(0.021 + 0.00960) = 0.24772 -> (0.3968, 0.8922)
    lo, hi = wilson_interval(7, 10)
    assert lo == pytest.approx(0.3968, abs=1e-4) and hi == pytest.approx(0.8922, abs=1e-4)
    lo, hi = wilson_interval(0, 5)  # the interval stays inside [0, 1] and is not empty at p = 0
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.4345, abs=1e-4)
    assert wilson_interval(0, 0) is None


def test_cohen_kappa_against_hand_computed_values():
    # 50 items, both "tuned" 20, A tuned/B base 5, A base/B tuned 10, both "base" 15:
    # p_o = 35/50 = 0.7; p_e = 0.5*0.6 + 0.5*0.4 = 0.5; kappa = (0.7 - 0.5) / 0.5 = 0.4
    a = ["tuned"] * 25 + ["base"] * 25
    b = ["tuned"] * 20 + ["base"] * 5 + ["tuned"] * 10 + ["base"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(["tie", "tuned"], ["tie", "tuned"]) == pytest.approx(1.0)
    assert cohen_kappa(["tie"] * 3, ["tie"] * 3) is None
    with pytest.raises(ValueError):
        cohen_kappa(["a"], [])


def _judgments(tmp_path):
    """Annotator A: 7 tuned wins, 3 base wins, 2 ties on items 0-11; annotator B on items 0-3 (agrees on 3 of 4)."""
    a = ["tuned"] * 7 + ["base"] * 3 + ["tie"] * 2
    b = ["tuned", "tuned", "tie", "tuned"]  # A says tuned, tuned, tuned, tuned
    rows_a = [{"item_id": f"i{k}", "annotator": "A", "winner": w} for k, w in enumerate(a)]
    rows_b = [{"item_id": f"i{k}", "annotator": "B", "winner": w} for k, w in enumerate(b)]
    return write_jsonl(tmp_path / "a.jsonl", rows_a), write_jsonl(tmp_path / "b.jsonl", rows_b)


def test_summary_counts_win_rate_ties_and_kappa(tmp_path):
    fa, fb = _judgments(tmp_path)
    rows, duplicates = read_judgments([fa, fb, fa])
    assert duplicates == 12
    s = summarize(rows)
    # 16 judgments: tuned 10, base 3, ties 3; win rate 10/13; tie rate 3/16
    assert (s["judgments"], s["tuned_wins"], s["base_wins"], s["ties"]) == (16, 10, 3, 3)
    assert s["win_rate"] == pytest.approx(10 / 13) and s["tie_rate"] == pytest.approx(3 / 16)
    assert s["win_rate_ci95"] == pytest.approx(list(wilson_interval(10, 13)))
    # kappa on the 4 shared items: A = t,t,t,t; B = t,t,tie,t: p_o = 0.75, p_e = 1*0.75 = 0.75 -> 0
    (pair,) = s["agreement"]
    assert pair["annotators"] == ["A", "B"] and pair["items"] == 4
    assert pair["kappa"] == pytest.approx(0.0) and pair["raw_agreement"] == pytest.approx(0.75)
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"item_id": "x", "annotator": "A", "winner": "left"}])
    with pytest.raises(DataError, match=r"bad.jsonl row 1: winner 'left'"):
        read_judgments([bad])


def test_report_command_adds_the_section_once(tmp_path, capsys):
    from hf_tuner.cli import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("# sft_instruction\n\n## Held-out results\n\ntable\n")
    (run / "metrics.json").write_text(json.dumps({"tuned": {"rougeL": 0.2}}))
    fa, fb = _judgments(tmp_path)
    assert main(["report", str(run), "--judgments", str(fa)]) == 0
    assert main(["report", str(run), "--judgments", str(fa), str(fb)]) == 0
    text = (run / "report.md").read_text()
    assert text.count("## Human evaluation (blind A/B)") == 1 and text.startswith("# sft_instruction")
    assert "| 10 | 3 | 3 | 76.9% | 49.7% to 91.8% | 18.8% |" in text
    assert "Cohen's kappa 0.000" in text and "Wilson" in text
    assert json.loads((run / "metrics.json").read_text())["human_eval"]["judgments"] == 16
    assert main(["report", str(tmp_path / "nowhere"), "--judgments", str(fa)]) == 2
    assert "no report.md" in capsys.readouterr().err


# ---- hf-tuner generate

def test_generate_writes_candidates_the_page_loads(tmp_path, tiny_llama, capsys):
    from hf_tuner.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Define the word 'apple'.\nDefine the word 'river'.\n\nDefine the word 'apple'.\n")
    out = tmp_path / "cands.jsonl"
    assert main(["generate", "--model", tiny_llama, "--prompts", str(prompts), "--decoding", "greedy,top_p",
                 "--samples", "2", "--max_new_tokens", "6", "--output", str(out)]) == 0
    rows = lines(out)
    assert [r["prompt"] for r in rows] == ["Define the word 'apple'.", "Define the word 'river'."]
    assert [len(r["candidates"]) for r in rows] == [3, 3]  # greedy once, top_p with seeds 0 and 1
    assert rows[0]["candidates"][2]["source"].endswith("top_p seed=1")
    assert main(["generate", "--model", tiny_llama, "--prompts", str(prompts), "--output", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["generate", "--model", tiny_llama, "--prompts", str(prompts), "--decoding", "nucleus",
                 "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "unknown decoding preset(s) ['nucleus']" in capsys.readouterr().err
    assert main(["generate", "--model", tiny_llama, "--prompts", str(prompts), "--compare_base",
                 "--output", str(tmp_path / "y.jsonl")]) == 2
    assert "--compare_base needs --adapter" in capsys.readouterr().err


def test_generate_compare_base_answers_with_the_adapter_off_and_on(tmp_path, tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from hf_tuner.cli import main
    from hf_tuner.generation import DecodingSettings, generate_batched
    from hf_tuner.labeling.candidates import _templated
    from hf_tuner.models import load_model

    import torch

    torch.manual_seed(0)
    adapter = tmp_path / "run" / "adapter"
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)  # not a no-op
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), lora).save_pretrained(adapter)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Define the word 'apple'."},
                                                       {"prompt": "Define the word 'stone'."}])
    out = tmp_path / "ab.jsonl"
    assert main(["generate", "--model", tiny_llama, "--adapter", str(adapter), "--compare_base", "--decoding",
                 "top_p", "--seed", "3", "--max_new_tokens", "8", "--prompts", str(prompts), "--output", str(out)]) == 0
    rows = lines(out)
    model, tokenizer = load_model(tiny_llama)
    texts = _templated(tokenizer, model, [r["prompt"] for r in rows], None)
    plain = generate_batched(model, tokenizer, texts, DecodingSettings("top_p", 8, seed=3))
    assert [r["base"] for r in rows] == plain and all(plain)  # the base column: the model without the adapter
    assert [r["base"] for r in rows] != [r["tuned"] for r in rows]  # same seed, the adapter changes the answers
    assert [i.prompt for i in read_ab_pairs(out)] == ["Define the word 'apple'.", "Define the word 'stone'."]


# ---- `hf-tuner label` as a user starts it: a server process, real HTTP, Ctrl-C

class _LabelCommand:
    """`python -m hf_tuner.cli label ...` on a free port, until SIGINT (what Ctrl-C sends)."""

    def __init__(self, *args, host="127.0.0.1"):
        import subprocess
        import sys

        from conftest import subprocess_env

        self.host, self.port = host, free_port()
        cmd = [sys.executable, "-m", "hf_tuner.cli", "label", *map(str, args), "--host", host, "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, env=subprocess_env(PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)

    def request(self, method, path, body=None, host_header=None):
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)  # no proxy: straight to the server
        headers = {"Host": host_header or f"{self.host}:{self.port}"}
        if body is not None:
            from urllib.parse import urlencode

            body, headers["Content-Type"] = urlencode(body), "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        r = conn.getresponse()
        return r.status, r.read().decode()

    def __enter__(self):
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hf-tuner label exited: {self.proc.communicate()[1][-2000:]}")
            try:
                if self.request("GET", "/api/progress")[0] == 200:
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("hf-tuner label did not start")
            time.sleep(0.1)

    def stop(self):
        import signal

        self.proc.send_signal(signal.SIGINT)
        self.out, self.err = self.proc.communicate(timeout=30)
        return self.proc.returncode

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def _token(html):
    import re

    return re.search(r'name="token" value="([^"]+)"', html).group(1)


def test_label_command_serves_records_a_judgment_and_stops_on_ctrl_c(tmp_path):
    rows = [{"prompt": f"prompt number {i}", "base": f"answer {i}a", "tuned": f"answer {i}b"} for i in range(3)]
    pairs = write_jsonl(tmp_path / "ab.jsonl", rows)
    out = tmp_path / "judged.jsonl"
    with _LabelCommand("ab", "--pairs", pairs, "--output", out, "--annotator", "ann7") as server:
        status, page = server.request("GET", "/")
        assert status == 200 and "1 of 3" in page
        item = server.request("GET", "/api/progress")[1]
        status, _ = server.request("POST", "/judge", {"token": _token(page), "item_id": json.loads(item)["current"],
                                                      "choice": "left"})
        assert status == 303
        assert server.request("GET", "/", host_header="evil.example:80")[0] == 400  # loopback: Host checked
        assert server.stop() == 0, server.err[-2000:]
    assert [(r["annotator"], r["choice"]) for r in lines(out)] == [("ann7", "left")]
    assert f"hf-tuner label ab: 3 items, 0 already judged by ann7; judgments go to {out}" in server.out
    assert f"open http://127.0.0.1:{server.port}/" in server.out
    assert "warning: binding" not in server.out


def test_label_command_on_another_address_warns_and_drops_the_host_check(tmp_path, candidates):
    """--host other than loopback: the printed warning, and what it says (the Host check is off) is so.
    127.0.0.2 is another address of this machine's loopback, so nothing is exposed to the network."""
    with _LabelCommand("rank", "--candidates", candidates, "--output", tmp_path / "prefs.jsonl",
                       host="127.0.0.2") as server:
        assert server.request("GET", "/", host_header="evil.example:80")[0] == 200
        assert server.stop() == 0, server.err[-2000:]
    assert ("warning: binding 127.0.0.2: anyone who can reach this machine can read the outputs and post "
            "judgments; the Host check is off") in server.out
    assert f"open http://127.0.0.2:{server.port}/" in server.out


def test_label_command_names_the_missing_source(tmp_path, capsys):
    from hf_tuner.cli import main

    out = str(tmp_path / "j.jsonl")
    assert main(["label", "ab", "--output", out]) == 2
    assert "label ab: give one of --run RUN_DIR, --pairs FILE, or --base DIR --tuned DIR" in capsys.readouterr().err
    assert main(["label", "ab", "--output", out, "--base", str(tmp_path)]) == 2  # --base without --tuned
    assert "label ab: give one of" in capsys.readouterr().err
    assert main(["label", "rank", "--output", out]) == 2
    assert "label rank: give --candidates FILE [FILE ...], or --model and --prompts" in capsys.readouterr().err
    assert main(["label", "rank", "--output", out, "--model", "tiny-llama"]) == 2
    assert "label rank --model needs --prompts FILE" in capsys.readouterr().err
    assert not (tmp_path / "j.jsonl").exists()


# ---- the real thing: a browser, the keyboard, a reload

def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium not found (needs Debian's chromium and chromium-driver): "
                    "`make test-browser` installs them with apt-get and runs this test")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let Selenium Manager look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1100,800"):
        options.add_argument(arg)
    return webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver), options=options)


class _Server:
    """uvicorn in a thread on a free loopback port, stopped by the test."""

    def __init__(self, session):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(create_app(session), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the label server did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}/"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.browser
def test_browser_three_keyboard_judgments_survive_a_reload(tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    # the first item's prompt and one answer carry a script that would retitle the page if it ran
    rows = [{"prompt": EVIL if i == 0 else f"prompt number {i}", "base": EVIL if i == 0 else f"answer {i}a",
             "tuned": f"left-or-right answer {i}b"} for i in range(5)]
    ab_session = LabelSession("ab", read_ab_pairs(write_jsonl(tmp_path / "ab.jsonl", rows)),
                              tmp_path / "judged.jsonl", "ann1")
    browser = _browser_or_skip()
    try:
        with _Server(ab_session) as url:
            browser.get(url)
            wait = _page_wait(browser)
            progress = lambda: browser.find_element(By.ID, "progress").text.strip()  # noqa: E731
            assert progress() == "1 of 5"
            assert "document.title" in browser.find_element(By.TAG_NAME, "body").text  # shown as text
            assert browser.title.startswith("hf-tuner label") and "pwned" not in browser.title
            for n, key in enumerate(["1", Keys.ARROW_RIGHT, "t"], start=2):
                browser.find_element(By.TAG_NAME, "body").send_keys(key)
                wait.until(lambda _: progress() == f"{n} of 5")
            browser.refresh()
            wait.until(lambda _: progress() == "4 of 5")
            rows = lines(ab_session.output)
            assert [r["choice"] for r in rows] == ["left", "right", "tie"]
            assert "pwned" not in browser.title
    finally:
        browser.quit()


def _page_wait(browser):
    """Wait for the page after a judgment replaces it. Besides the usual stale-element errors, chromedriver may
    report a node of the replaced page as "unknown error: ... Node with given id does not belong to the
    document" (a plain WebDriverException, seen in CI): that too means "not yet", so poll again."""
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, 15, ignored_exceptions=(WebDriverException,))


@pytest.mark.browser
def test_browser_ranks_three_responses_with_a_tie(rank_session):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser = _browser_or_skip()
    try:
        with _Server(rank_session) as url:
            browser.get(url)
            body = browser.find_element(By.TAG_NAME, "body")
            for key in ["3", "=", "1", "2"]:
                body.send_keys(key)
            assert browser.find_element(By.ID, "order").get_attribute("value") == "3=1>2"
            body.send_keys(Keys.BACKSPACE, "2")
            body.send_keys(Keys.ENTER)
            wait = _page_wait(browser)
            wait.until(lambda b: b.find_element(By.ID, "progress").text.strip() == "2 of 3")
            assert browser.title.startswith("hf-tuner label")  # the <script> in a response did not run
            rows = lines(rank_session.output)
            assert len(rows) == 3 and sum(bool(r.get("tie")) for r in rows) == 1
    finally:
        browser.quit()
