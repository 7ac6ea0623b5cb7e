"""Evaluation split across ranks (issue 19, item 10): under a multi-process launch each rank evaluates its share
of the rows and every rank ends with the result one process gets. One torchrun launch of 2 CPU processes over
gloo runs tests/workers/eval_shard.py (tiny-llama and tiny-bert; generation, label words, classifier, regression,
preference pairs, causal and masked LM perplexity, sampled generation, then the classifier sharded by FSDP2); the
same evaluations run here in one process, without torch.distributed, for the reference."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import free_port, launcher_env
from hf_tuner.distributed import SINGLE, EvalShard

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "workers" / "eval_shard.py"
SHARED = ("generation", "label_words", "classifier", "regression", "preference", "clm", "mlm", "logits")


def _worker():
    spec = importlib.util.spec_from_file_location("eval_shard_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_bert(tiny_llama):
    from hf_tuner import assets

    return assets.resolve("tiny-bert")


@pytest.fixture(scope="module")
def launched(tmp_path_factory, tiny_llama, tiny_bert) -> list[dict]:
    out = tmp_path_factory.mktemp("eval_shard")
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), tiny_llama, tiny_bert, str(out)]
    # its own process group: ranks that wait on each other (a gather one of them skipped) are all killed
    proc = subprocess.Popen(cmd, env=launcher_env(OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, start_new_session=True)
    try:
        _, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"the 2-process evaluation hung: {err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in ranks] == [(0, 2), (1, 2)]
    return ranks


@pytest.fixture(scope="module")
def single(tiny_llama, tiny_bert) -> tuple[dict, dict]:
    """One process, torch.distributed not initialised: the harness as before, nothing gathered."""
    import torch.distributed as dist

    assert not dist.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("one process gathered")

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: another thread count blocks the matmuls, and rounds, differently
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(dist, "all_gather_object", refuse)
            return _worker().evaluations(tiny_llama, tiny_bert)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("task", [*SHARED, "sampled"])
def test_every_rank_gets_exactly_the_single_process_result(launched, single, task):
    expected = single[0][task]
    for record in launched:
        assert record["results"][task] == expected, (record["rank"], task)
    if task == "generation":  # greedy texts, generation stats, ROUGE/BLEU and perplexity
        assert len(set(expected["predictions"])) > 1 and expected["metrics"]["perplexity"] > 1
        assert expected["generation"]["prompts"] == 7
        assert len(expected["per_example"]["perplexity"]["values"]) == 7  # each row's log-loss, gathered in order


@pytest.mark.parametrize("task", SHARED)
def test_each_rank_evaluates_only_its_share(launched, single, task):
    everything = single[1][task]
    seen = [record["seen"][task] for record in launched]
    if everything["prompts"]:  # generation: every other prompt, in order
        assert [s["prompts"] for s in seen] == [everything["prompts"][0::2], everything["prompts"][1::2]]
        assert all(s["rows"] == 0 for s in seen)
    elif everything["rows"]:  # the classifier: whole batches, shared out
        assert sum(s["rows"] for s in seen) == everything["rows"]
        assert all(0 < s["rows"] < everything["rows"] for s in seen), seen
    else:  # perplexity of the LMs: whole batches of blocks, shared out
        assert all(not s["prompts"] and not s["rows"] for s in seen)
        assert sum(s["lm_rows"] for s in seen) == everything["lm_rows"]
        assert all(0 < s["lm_rows"] < everything["lm_rows"] for s in seen), seen


def test_sampled_generation_runs_every_prompt_on_every_rank(launched, single):
    """A share would draw its samples from another point of the seeded stream: every rank samples it all."""
    for record in launched:
        assert record["seen"]["sampled"]["prompts"] == single[1]["sampled"]["prompts"]


def test_a_model_sharded_by_fsdp2_is_evaluated_whole_on_every_rank(launched, single):
    """Each forward of a fully_shard model is a collective, so every rank forwards every row (no share), with
    the same result."""
    for record in launched:
        seen = record["seen"]["fsdp2_classifier"]
        assert seen["world"] == 1 and seen["rows"] == single[1]["classifier"]["rows"] == 5
        assert record["results"]["fsdp2_classifier"] == single[0]["classifier"]


def test_shares_cover_every_item_once_and_one_process_keeps_its_values():
    shares = [EvalShard(r, 3).rows(8) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4, 7], [2, 5]]
    assert SINGLE.rows(3) == [0, 1, 2] and SINGLE.gather_rows(2, [0, 1], ["a", "b"]) == ["a", "b"]
    assert SINGLE.all_gather({"x": 1}) == [{"x": 1}]
