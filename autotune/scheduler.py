"""Spread one trial budget over the tasks of a model (Ansor's gradient task scheduler).

The quantity minimised is the model's estimated latency, ``sum(weight_i * best_i)``: each
task's best measured time times how often the workload runs it. Every task first gets one
round, its template default among the configs, so each has a measured time (the first
rounds shrink so that the budget reaches every task); after that
each round (one batch of trials) goes to the task where a trial is expected to cut the
estimate most: ``weight_i * (alpha * backward_i + (1 - alpha) * forward_i)``, where
``backward_i`` is how fast the task's best fell over its last ``window`` rounds and
``forward_i = -best_i / rounds_i`` an optimistic guess that another round gains as much as
an average one did. A small share of rounds goes to a random task, so that none starves.

Resumable: every trial is in the log; a restarted job resumes each task's tuner from it,
counts those records toward the budget and never measures them again.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from measure import Builder, MeasureError, Runner
from records import Record, RecordLog
from search_space import Config, Target

from .model_tasks import ModelTask
from .tuners import TuneSummary, Tuner, make_tuner

MAX_FAILED_ROUNDS = 3  # rounds without one verified candidate before a task is given up

# on_round(scheduler, task_index, records): after each round, with the round's records
RoundCallback = Callable[["TaskScheduler", int, list[Record]], None]


@dataclass
class ModelTuneSummary:
    tasks: list[ModelTask]
    summaries: list[TuneSummary]
    trials: int = 0
    measured: int = 0
    resumed: int = 0
    rounds: int = 0
    wall_s: float = 0.0
    history: list[tuple[int, float]] = field(default_factory=list)  # (trials so far, estimated latency)
    given_up: list[str] = field(default_factory=list)

    @property
    def estimated_latency_s(self) -> float:
        return self.history[-1][1] if self.history else math.inf

    @property
    def compile_share(self) -> float:
        build = sum(s.build_s for s in self.summaries)
        busy = build + sum(s.run_s for s in self.summaries)
        return build / busy if busy > 0 else 0.0


class TaskScheduler:
    def __init__(self, tasks: Sequence[ModelTask], target: Target, tuner: str = "xgb", seed: int = 0,
                 batch: int = 8, restrict: dict | None = None, tuner_options: dict | None = None,
                 alpha: float = 0.2, window: int = 3, epsilon: float = 0.05):
        if not tasks:
            raise ValueError("no tasks to tune")
        self.tasks = list(tasks)
        self.target = target
        self.batch = batch
        self.alpha, self.window, self.epsilon = alpha, window, epsilon
        self.rng = np.random.default_rng(seed)
        self.tuners: list[Tuner] = [make_tuner(tuner, t.task, target, seed=seed + i, restrict=restrict,
                                               **(tuner_options or {})) for i, t in enumerate(self.tasks)]
        self.rounds = [0] * len(self.tasks)
        self.failed_rounds = [0] * len(self.tasks)
        self.history: list[list[float]] = [[] for _ in self.tasks]  # best after each round
        self.given_up: set[int] = set()

    # -- the estimate ------------------------------------------------------------------
    def best(self, i: int) -> float:
        return self.tuners[i].best_cost

    def estimated_latency(self) -> float:
        """sum(weight * best) over the tasks, inf while some task has no verified time."""
        return float(sum(t.weight * self.best(i) for i, t in enumerate(self.tasks)))

    def gradient(self, i: int) -> float:
        """Expected change of the estimate per round spent on task i (negative is good)."""
        best = self.best(i)
        history = self.history[i]
        if len(history) > self.window and math.isfinite(history[-1 - self.window]):
            backward = (history[-1] - history[-1 - self.window]) / self.window
        else:
            backward = 0.0
        forward = -best / max(self.rounds[i], 1)
        return self.tasks[i].weight * (self.alpha * backward + (1 - self.alpha) * forward)

    def _alive(self, i: int) -> bool:
        return i not in self.given_up and self.tuners[i].has_next()

    def choose(self) -> int | None:
        """The next task to spend a round on, or None when no task has configs left."""
        alive = [i for i in range(len(self.tasks)) if self._alive(i)]
        if not alive:
            return None
        fresh = [i for i in alive if self.rounds[i] == 0 or not math.isfinite(self.best(i))]
        if fresh:
            return fresh[0]
        if self.rng.random() < self.epsilon:
            return int(self.rng.choice(alive))
        return min(alive, key=self.gradient)

    # -- the loop ----------------------------------------------------------------------
    def _first_configs(self, i: int, n: int) -> list[Config]:
        """The template default (when this space holds it) and the tuner's first picks."""
        tuner = self.tuners[i]
        configs: list[Config] = []
        default = tuner.template.default(tuner.task, self.target)
        values = default.as_dict()
        try:
            index = tuner.space.index_of(values)
            if tuner.space.is_valid(values) and index not in tuner.visited:
                configs.append(tuner.space.get(index))
        except (KeyError, ValueError):
            pass
        if n > len(configs):
            configs += [c for c in tuner.next_batch(n - len(configs)) if c.index not in {x.index for x in configs}]
        return configs

    def tune(self, trials_total: int, builder: Builder, runner: Runner, log: RecordLog | None = None,
             on_round: Sequence[RoundCallback] = ()) -> ModelTuneSummary:
        # one job per log, as Tuner.tune: a second job would measure every config again
        with log.lock() if log is not None else nullcontext():
            return self._tune(trials_total, builder, runner, log, on_round)

    def _tune(self, trials_total: int, builder: Builder, runner: Runner, log: RecordLog | None,
              on_round: Sequence[RoundCallback]) -> ModelTuneSummary:
        if trials_total < 1:
            raise ValueError(f"trials_total must be >= 1, got {trials_total}")
        # round callbacks that follow candidates too (progress) get each one as it is measured
        per_candidate = [_PerCandidate(c) for c in on_round if hasattr(c, "measured")]
        start = time.perf_counter()
        summaries = [tuner.start(log) for tuner in self.tuners]
        for i, s in enumerate(summaries):
            if s.resumed:
                self.rounds[i] = math.ceil(s.resumed / self.batch)
                self.history[i].append(self.best(i))
        result = ModelTuneSummary(self.tasks, summaries, resumed=sum(s.resumed for s in summaries))
        trials = result.resumed
        result.history.append((trials, self.estimated_latency()))
        while trials < trials_total:
            i = self.choose()
            if i is None:
                break
            n = min(self.batch, trials_total - trials)
            if self.rounds[i] == 0:  # a first round for every task before any gets a second one
                unmeasured = sum(1 for j in range(len(self.tasks)) if self.rounds[j] == 0 and self._alive(j))
                n = max(1, min(n, (trials_total - trials) // max(unmeasured, 1)))
                configs = self._first_configs(i, n)
            else:
                configs = self.tuners[i].next_batch(n)
            before = len(summaries[i].records)
            measured = self.tuners[i].measure(configs, builder, runner, summaries[i], log, per_candidate)
            if not measured:  # the tuner has nothing new to offer
                self.given_up.add(i)
                continue
            records = summaries[i].records[before:]
            trials += measured
            result.measured += measured
            self.rounds[i] += 1
            self.history[i].append(self.best(i))
            if not any(r.ok for r in summaries[i].records):
                self.failed_rounds[i] += 1
                if self.failed_rounds[i] >= MAX_FAILED_ROUNDS:
                    self.given_up.add(i)
                    errors = sorted({MeasureError(r.result.error).name for r in summaries[i].records})
                    warnings.warn(f"{self.tasks[i].key}: no candidate verified in {self.failed_rounds[i]} rounds "
                                  f"({', '.join(errors)}); giving it up", stacklevel=2)
            result.history.append((trials, self.estimated_latency()))
            for callback in on_round:
                callback(self, i, records)
        result.trials = trials
        result.rounds = sum(self.rounds)
        result.summaries = [tuner.finish(s) for tuner, s in zip(self.tuners, summaries)]
        result.given_up = [self.tasks[i].key for i in sorted(self.given_up)]
        result.wall_s = time.perf_counter() - start
        return result


class _PerCandidate:
    """A round callback's per-candidate hooks (``building``, ``measured``) as a tuner callback."""

    def __init__(self, callback):
        self.building = getattr(callback, "building", None)
        self.measured = callback.measured

    def __call__(self, *args) -> None:  # batch ends are reported per round by the scheduler itself
        pass
