"""Run-level progress: after each phase, its throughput and an ETA for the whole run, not only per-batch bars.

A recipe names its phases up front (evaluations, training, benchmarks). Each phase still to come is
estimated from one already measured: the tuned evaluation from the base one (same prompts, same
decoding), the tuned benchmarks from the base ones, training from its own first steps (a callback
prints the run's ETA as training goes). A phase with nothing to go on yet is named, not guessed.
"""

from __future__ import annotations

import time

from transformers import TrainerCallback


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunClock:
    """Phases in order; `like` maps a phase to an earlier one whose measured time stands in for it."""

    def __init__(self, phases: list[str], like: dict[str, str] | None = None, enabled: bool = True):
        self.phases, self.like, self.enabled = list(phases), dict(like or {}), enabled
        self.seconds: dict[str, float] = {}
        self.train_estimate: float | None = None
        self.start = time.perf_counter()

    def estimate(self, phase: str) -> float | None:
        if phase in self.seconds:
            return self.seconds[phase]
        if phase == "train":
            return self.train_estimate
        model = self.like.get(phase)
        return self.seconds.get(model) if model else None

    def eta(self, current: str | None = None, current_left: float = 0.0) -> str:
        """'ETA 4m10s' over the phases not yet done (plus what is left of `current`), naming the unknown ones."""
        todo = [p for p in self.phases if p not in self.seconds and p != current]
        known = current_left + sum(e for p in todo if (e := self.estimate(p)) is not None)
        unknown = [p for p in todo if self.estimate(p) is None]
        return f"ETA {_clock(known)}" + (f" + {', '.join(unknown)}" if unknown else "")

    def done(self, phase: str, seconds: float, detail: str = "") -> None:
        self.seconds[phase] = seconds
        if self.enabled:
            print(f"[{_clock(time.perf_counter() - self.start)} run] {phase}: {_clock(seconds)}"
                  f"{' (' + detail + ')' if detail else ''}; whole run {self.eta()}", flush=True)

    def evaluation(self, phase: str, result: dict) -> dict:
        """Record an `evaluate_model` result (its seconds, and tokens/s where it generated); returns it."""
        gen = result.get("generation")
        detail = (f"{gen['prompts']} prompts, {gen['new_tokens']} new tokens, {gen['tokens_per_s']:.0f} tok/s"
                  if gen else f"{result.get('seconds_per_example', 0):.2f} s per example")
        self.done(phase, result["seconds"], detail)
        return result

    def callback(self, every: float = 0.25) -> TrainerCallback:
        """A Trainer callback: the run's ETA at each quarter of training, from the steps so far."""
        return _TrainingEta(self, every)


class _TrainingEta(TrainerCallback):
    def __init__(self, clock: RunClock, every: float):
        self.clock, self.every, self.next, self.begin = clock, every, every, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.begin, self.first = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        total = state.max_steps or 0
        if not total or self.begin is None:
            return
        done = (state.global_step - self.first) / max(total - self.first, 1)
        if done >= self.next and done < 1:
            self.next += self.every
            elapsed = time.perf_counter() - self.begin
            left = elapsed * (1 - done) / done
            self.clock.train_estimate = elapsed + left
            if self.clock.enabled and state.is_world_process_zero:
                print(f"\n[{_clock(time.perf_counter() - self.clock.start)} run] training {done:.0%}: "
                      f"{_clock(left)} left; whole run {self.clock.eta('train', left)}", flush=True)
