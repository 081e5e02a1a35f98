"""Spread one trial budget over the tasks of a model (Ansor's gradient task scheduler).

The quantity minimised is the model's estimated latency, ``sum(weight_i * best_i)``: each
task's best measured time times how often the workload runs it. Every task first gets a
short round (``FIRST_ROUND`` configs, its template default first), so each has a measured
time (a task resumed from a log gets today's default in its first round of the job, where the
log has no record of it); the budget then goes where the time is: a model's norms of one
token row take the same first round as its largest GEMM and no more unless they turn out to
matter. The first rounds go in the order of a guess at each task's share (its runs times its
bytes and flops at a nominal rate), and a budget too small for full first rounds keeps one
trial for every task still unmeasured, so the tasks likely to matter get the second config. After that
each round (one batch of trials) goes to the task where a trial is expected to cut the
estimate most: ``weight_i * (alpha * backward_i + (1 - alpha) * forward_i)``, where
``backward_i`` is how fast the task's best fell over its last ``window`` rounds and
``forward_i = -headroom_i / rounds_i`` an optimistic guess that another round gains as much
as an average one did. A small share of rounds goes to a random task, so that none starves.

The headroom is what a task's best could still lose. Ansor takes all of it (``best_i``). A
kernel that streams a model's weights (or KV cache) cannot beat the memory, though, and a
decode GEMV at that floor would otherwise take most rounds for nothing while the prefill
GEMMs wait. With ``weights_from_memory`` (a job timed cold, every kernel's weights coming from
memory), a task that streams weights (or a KV cache) with few flops per byte (under
``MEMORY_BOUND_INTENSITY``: GEMVs, int4 GEMVs, decode attention) has a floor: its bytes at
the memory's read rate, as a probe measured it (``read_rate``) or as the fastest such task of
the job has reached so far, whichever is higher. Its headroom is what is left above that
floor, at least ``MIN_HEADROOM`` of its best (a kernel may beat the probe). Timed
warm, a task's bytes come from whichever cache level they fit, at rates that differ by size,
so no task's rate says where another's floor is: the headroom is then its best, as Ansor has it.

Resumable: every trial is in the log; a restarted job resumes each task's tuner from it,
counts those records toward the budget and never measures them again.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Collection, Sequence

import numpy as np

from measure import Builder, MeasureError, Runner
from records import Record, RecordLog
from search_space import Config, Target, op_definition
from search_space.templates.threads import rough_one_core_seconds

from .model_tasks import ModelTask
from .tuners import TuneSummary, Tuner, make_tuner
from .tuning import ClusterRound, fresh_best, with_priors

MAX_FAILED_ROUNDS = 3  # rounds without one verified candidate before a task is given up
FIRST_ROUND = 2  # configs in a task's first round: its default and its tuner's first pick
# of its best: what a task at the memory floor may still gain (one job's rates differ by a few percent)
MIN_HEADROOM = 0.03
# flops per byte read below which a kernel is bound by memory on every target: under the ridge
# point of a 2-core AVX-512 CPU (about 8) and of an H200 (about 14 in float32, more on tensor cores)
MEMORY_BOUND_INTENSITY = 6.0

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
    started: float = field(default_factory=time.perf_counter)
    # task key -> how many faster stale records (resumed, of code this version no longer
    # builds) its best passed over
    stale_passed_over: dict[str, int] = field(default_factory=dict)

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
                 alpha: float = 0.2, window: int = 3, epsilon: float = 0.05, priors: Sequence[Record] = (),
                 weights_from_memory: bool = False, read_rate: float = 0.0):
        """``priors``: records (the resumed log's) whose best configs of each task's other
        shapes and variants an xgb tuner measures first, before its template's seed configs.
        ``weights_from_memory``: the weight-streaming tasks' headroom stops at the memory's rate (for a
        job whose candidates find their weights in memory, as a cold one does); ``read_rate``:
        the memory's read bytes/s with the job's threads, where a probe measured it."""
        if not tasks:
            raise ValueError("no tasks to tune")
        self.tasks = list(tasks)
        self.target = target
        self.batch = batch
        self.alpha, self.window, self.epsilon = alpha, window, epsilon
        self.rng = np.random.default_rng(seed)
        self.tuners: list[Tuner] = [make_tuner(tuner, t.task, target, seed=seed + i, restrict=restrict,
                                               **with_priors(tuner, t.task, target, priors, tuner_options))
                                    for i, t in enumerate(self.tasks)]
        # the bytes each task reads, and which of them stream weights at memory speed
        self.min_bytes = [t.task.min_bytes for t in self.tasks]
        self.read_rate = read_rate
        # before a task is measured: its runs times a rough time, to order the first rounds
        self.guessed_share = [t.weight * rough_one_core_seconds(t.task) for t in self.tasks]
        self.streams = [weights_from_memory and bool(op_definition(t.task.op).resident_inputs(t.task))
                        and t.task.flops < MEMORY_BOUND_INTENSITY * nbytes
                        for t, nbytes in zip(self.tasks, self.min_bytes)]
        self.rounds = [0] * len(self.tasks)
        # tasks whose template default this job has offered (a resumed task's log may lack it:
        # the template's default changed since, or the log was tuned under a restriction)
        self.default_offered: set[int] = set()
        self.failed_rounds = [0] * len(self.tasks)
        self.history: list[list[float]] = [[] for _ in self.tasks]  # best after each round
        self.given_up: set[int] = set()

    # -- the estimate ------------------------------------------------------------------
    def best(self, i: int) -> float:
        return self.tuners[i].best_cost

    def estimated_latency(self) -> float:
        """sum(weight * best) over the tasks, inf while some task has no verified time."""
        return float(sum(t.weight * self.best(i) for i, t in enumerate(self.tasks)))

    def memory_floor(self, i: int) -> float:
        """Task i's bytes at the memory's read rate (the probe's, or the fastest a memory-bound
        weight-streaming task of this job has reached so far, if higher); 0 for any other task,
        or before a rate is known."""
        if not self.streams[i]:
            return 0.0
        rate = max([self.read_rate] + [self.min_bytes[j] / self.best(j) for j in range(len(self.tasks))
                                       if self.streams[j] and 0 < self.best(j) < math.inf])
        return self.min_bytes[i] / rate if rate > 0 else 0.0

    def gradient(self, i: int) -> float:
        """Expected change of the estimate per round spent on task i (negative is good)."""
        best = self.best(i)
        headroom = max(best - self.memory_floor(i), MIN_HEADROOM * best) if math.isfinite(best) else best
        history = self.history[i]
        if len(history) > self.window and math.isfinite(history[-1 - self.window]):
            backward = (history[-1] - history[-1 - self.window]) / self.window
        else:
            backward = 0.0
        forward = -headroom / max(self.rounds[i], 1)
        return self.tasks[i].weight * (self.alpha * backward + (1 - self.alpha) * forward)

    def _alive(self, i: int) -> bool:
        return i not in self.given_up and self.tuners[i].has_next()

    def choose(self, busy: Collection[int] = ()) -> int | None:
        """The next task to spend a round on, or None when no task has configs left; ``busy``
        tasks (a round in flight on a cluster) are not chosen."""
        alive = [i for i in range(len(self.tasks)) if self._alive(i) and i not in busy]
        if not alive:
            return None
        fresh = [i for i in alive if self.rounds[i] == 0 or not math.isfinite(self.best(i))]
        if fresh:
            return max(fresh, key=lambda j: self.guessed_share[j])
        if self.rng.random() < self.epsilon:
            return int(self.rng.choice(alive))
        return min(alive, key=self.gradient)

    # -- the loop ----------------------------------------------------------------------
    def _default_config(self, i: int) -> Config | None:
        """Task i's template default, within a restriction such as ``--threads 1`` (None where
        this space does not hold it)."""
        tuner = self.tuners[i]
        default = tuner.template.default(tuner.task, self.target)
        values = {name: value if value in tuner.space.knob(name).values else tuner.space.knob(name).values[0]
                  for name, value in default.as_dict().items()}
        try:
            index = tuner.space.index_of(values)
        except (KeyError, ValueError):
            return None
        return tuner.space.get(index) if tuner.space.is_valid(values) else None

    def unmeasured_defaults(self) -> list[str]:
        """Keys of the tasks with records (in the log or from this job) but none of their
        template default: a log tuned before the template's default changed, whose resumed
        job had no budget left for them."""
        out = []
        for i, tuner in enumerate(self.tuners):
            default = self._default_config(i)
            if tuner.visited and default is not None and default.index not in tuner.visited:
                out.append(self.tasks[i].key)
        return out

    def _first_configs(self, i: int, n: int) -> list[Config]:
        """The template default (within a restriction, see ``_default_config``), unless measured
        already, and the tuner's first picks."""
        tuner = self.tuners[i]
        self.default_offered.add(i)
        default = self._default_config(i)
        configs: list[Config] = [default] if default is not None and default.index not in tuner.visited else []
        if n > len(configs):
            # the default counts as seen while the tuner picks, so that its picks are other configs
            # (it is measured with them: no longer seen once they are chosen)
            default_index = {c.index for c in configs} - tuner.visited
            tuner.visited |= default_index
            try:
                picks = tuner.next_batch(n - len(configs))
            finally:
                tuner.visited -= default_index
            configs += [c for c in picks if c.index not in {x.index for x in configs}]
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
        result = self._begin(log)
        trials = result.resumed
        while trials < trials_total:
            i = self.choose()
            if i is None:
                break
            configs = self._round_configs(i, trials_total - trials)
            before = len(result.summaries[i].records)
            measured = self.tuners[i].measure(configs, builder, runner, result.summaries[i], log, per_candidate)
            if not measured:  # the tuner has nothing new to offer
                self.given_up.add(i)
                continue
            trials += measured
            self._after_round(i, result, result.summaries[i].records[before:], on_round)
        return self._end(result)

    # -- the steps of a round, shared by the loop above and ``ClusterRounds`` -----------
    def _begin(self, log: RecordLog | None) -> ModelTuneSummary:
        """Resume every task from ``log``; the summary the rounds fill in."""
        summaries = [tuner.start(log) for tuner in self.tuners]
        for i, s in enumerate(summaries):
            if s.resumed:
                self.rounds[i] = math.ceil(s.resumed / self.batch)
                self.history[i].append(self.best(i))
        result = ModelTuneSummary(self.tasks, summaries, resumed=sum(s.resumed for s in summaries))
        result.trials = result.resumed
        result.history.append((result.trials, self.estimated_latency()))
        return result

    def _round_configs(self, i: int, remaining: int, busy: Collection[int] = ()) -> list[Config]:
        """The configs of task i's next round, at most ``remaining``."""
        n = min(self.batch, remaining)
        if self.rounds[i] == 0:  # a short first round for every task before any gets a second one
            n = min(n, FIRST_ROUND)
            unmeasured = sum(1 for j in range(len(self.tasks))
                             if self.rounds[j] == 0 and self._alive(j) and (j == i or j not in busy))
            n = max(1, min(n, remaining - (unmeasured - 1)))  # one trial left for each of the others
            return self._first_configs(i, n)
        if i not in self.default_offered:  # a resumed task: today's default, if the log lacks it
            return self._first_configs(i, n)
        return self.tuners[i].next_batch(n)

    def _after_round(self, i: int, result: ModelTuneSummary, records: list[Record],
                     on_round: Sequence[RoundCallback]) -> None:
        """Task i's round is measured: count it, give the task up after rounds without a
        verified candidate, and report the round."""
        summary = result.summaries[i]
        result.trials += len(records)
        result.measured += len(records)
        self.rounds[i] += 1
        self.history[i].append(self.best(i))
        if not any(r.ok for r in summary.records):
            self.failed_rounds[i] += 1
            if self.failed_rounds[i] >= MAX_FAILED_ROUNDS:
                self.given_up.add(i)
                errors = sorted({MeasureError(r.result.error).name for r in summary.records})
                warnings.warn(f"{self.tasks[i].key}: no candidate verified in {self.failed_rounds[i]} rounds "
                              f"({', '.join(errors)}); giving it up", stacklevel=2)
        result.history.append((result.trials, self.estimated_latency()))
        for callback in on_round:
            callback(self, i, records)

    def _end(self, result: ModelTuneSummary) -> ModelTuneSummary:
        result.rounds = sum(self.rounds)
        result.summaries = [tuner.finish(s) for tuner, s in zip(self.tuners, result.summaries)]
        # each task's best as `best`, export and run choose it
        for tuner, summary in zip(self.tuners, result.summaries):
            choice = fresh_best(summary, tuner.code_check)
            if choice is not None and choice.stale:
                result.stale_passed_over[summary.task.key] = choice.stale
        result.given_up = [self.tasks[i].key for i in sorted(self.given_up)]
        result.wall_s = time.perf_counter() - result.started
        return result


class ClusterRounds:
    """A ``TaskScheduler`` driven on a cluster: rounds of different tasks are in flight at once
    (at most one per task, as a tuner learns from each round before its next), so that every
    runner of the target has work while the builds of later rounds go on. ``next_rounds``
    offers new rounds while fewer than ``capacity`` candidates of this target are in flight;
    the budget counts the rounds in flight, so it is never overrun. Give ``next_rounds`` to
    ``autotune.tuning.measure_on_cluster``; ``summary()`` when it returns. The tasks resume
    from ``log``; records go to ``writer`` (a ``tuning.LogWriter``), else to ``log``."""

    def __init__(self, scheduler: TaskScheduler, trials_total: int, cluster, log: RecordLog | None,
                 on_round: Sequence[RoundCallback] = (), capacity: int | None = None, writer=None):
        if trials_total < 1:
            raise ValueError(f"trials_total must be >= 1, got {trials_total}")
        self.scheduler, self.trials_total, self.cluster = scheduler, trials_total, cluster
        self.writer = writer if writer is not None else log
        self.on_round = list(on_round)
        self.per_candidate = [_PerCandidate(c) for c in on_round if hasattr(c, "measured")]
        key = scheduler.target.key
        self.key = key
        self.capacity = capacity or cluster.capacity(key)
        self.result = scheduler._begin(log)
        self.reserved = self.result.trials  # measured, resumed, or in flight
        self.busy: set[int] = set()
        self.step = self.result.trials

    def next_rounds(self) -> list[ClusterRound]:
        s, rounds = self.scheduler, []
        in_flight = self.cluster.in_flight_for(self.key)
        while in_flight < self.capacity and self.reserved < self.trials_total:
            i = s.choose(self.busy)
            if i is None:
                break
            configs = s._round_configs(i, self.trials_total - self.reserved, self.busy)
            round_ = ClusterRound(s.tuners[i], self.result.summaries[i], configs, self.writer, self.per_candidate,
                                  self._done)
            if not round_.inputs:  # the tuner has nothing new to offer
                s.given_up.add(i)
                continue
            round_.tag = i
            self.busy.add(i)
            self.reserved += len(round_.inputs)
            in_flight += len(round_.inputs)
            rounds.append(round_)
        return rounds

    def _done(self, round_) -> None:
        self.busy.discard(round_.tag)
        round_.finish(self.step)
        self.step += len(round_.records)
        self.scheduler._after_round(round_.tag, self.result, round_.records, self.on_round)

    def summary(self) -> ModelTuneSummary:
        return self.scheduler._end(self.result)


class _PerCandidate:
    """A round callback's per-candidate hooks (``building``, ``measured``) as a tuner callback."""

    def __init__(self, callback):
        self.building = getattr(callback, "building", None)
        self.measured = callback.measured

    def __call__(self, *args) -> None:  # batch ends are reported per round by the scheduler itself
        pass
