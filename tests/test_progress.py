"""The run clock: each phase's line, and an ETA for the whole run from the phases measured so far."""

from types import SimpleNamespace

from hf_tuner.progress import RunClock


def test_the_eta_counts_what_is_left_from_the_measured_phase_each_stands_for(capsys):
    clock = RunClock(["base", "few_shot_3", "train", "tuned"], like={"tuned": "base"})
    clock.evaluation("base", {"seconds": 30.0, "generation": {"prompts": 200, "new_tokens": 3000,
                                                              "tokens_per_s": 100.0}})
    line = capsys.readouterr().out
    assert "base: 30s (200 prompts, 3000 new tokens, 100 tok/s)" in line
    # the tuned evaluation stands in for the base one; few-shot and training are not known yet, and say so
    assert line.rstrip().endswith("whole run ETA 30s + few_shot_3, train")
    clock.done("few_shot_3", 50.0)
    assert capsys.readouterr().out.rstrip().endswith("whole run ETA 30s + train")


def test_training_progress_gives_the_whole_run_s_eta(capsys):
    clock = RunClock(["base", "train", "tuned"], like={"tuned": "base"})
    clock.done("base", 40.0)
    callback = clock.callback(every=0.5)
    state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
    callback.on_train_begin(None, state, None)
    callback.begin -= 20.0  # 20 s into training ...
    state.global_step = 5  # ... and half way: 20 s left, then the tuned evaluation's 40 s
    capsys.readouterr()
    callback.on_step_end(None, state, None)
    line = capsys.readouterr().out
    assert "training 50%: 20s left; whole run ETA 1m00s" in line
    assert 39 < clock.train_estimate < 42
