"""The tuning loop. Tuners only choose configs (``next_batch``) and learn (``update``)."""
from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from cost_model import batch_quality
from cost_model.transfer import throughput_of
from measure import Builder, MeasureInput, MeasureResult, Runner
from records import CodeCheck, Record, RecordLog, select_best
from search_space import Config, ConfigSpace, Target, Task, Template, get_template


# callback(tuner, inputs, results, records, first_trial): after each batch is logged, and
# once at the start with the records resumed from the log (first_trial = 0). A callback may
# also have ``building(n)`` (a batch of n starts compiling) and ``measured(record, trial)``
# (one candidate is measured and logged): progress displays advance per candidate with them.
Callback = Callable[["Tuner", list[MeasureInput], list[MeasureResult], list[Record], int], None]


def _tell(callbacks: Sequence[Callback], event: str, *args) -> None:
    for callback in callbacks:
        hook = getattr(callback, event, None)
        if hook is not None:
            hook(*args)


@dataclass
class TuneSummary:
    task: Task
    target: Target
    trials: int = 0            # all trials counted toward the budget, resumed ones included
    measured: int = 0          # trials measured by this call
    resumed: int = 0           # trials found in the log
    failed: int = 0            # trials measured by this call that failed
    resumed_failed: int = 0    # resumed trials that failed
    stopped: str = ""          # why the loop ended short of the budget ("" when it did not)
    best_at: int = 0           # ``trials`` when the fastest so far was found (resumed: the start)
    best: Record | None = None
    wall_s: float = 0.0
    build_s: float = 0.0
    run_s: float = 0.0
    records: list[Record] = field(default_factory=list)
    started: float = 0.0       # perf_counter at start
    tuner: str = ""            # the name of the tuner that filled it in

    def __repr__(self) -> str:
        # short: every record repeats the task and the target (a 16-trial summary was 32 KB)
        best = "None" if self.best is None else f"{self.best.seconds:.3g} s with {self.best.config}"
        return (f"{type(self).__name__}(task={self.task.key!r}, target={self.target.key!r}, tuner={self.tuner!r}, "
                f"trials={self.trials}, measured={self.measured}, resumed={self.resumed}, failed={self.failed}, "
                f"best={best})")

    @property
    def compile_share(self) -> float:
        busy = self.build_s + self.run_s
        return self.build_s / busy if busy > 0 else 0.0


SPACE_SPENT = "every valid config of the space is measured"


class Tuner:
    """Base of every search strategy.

    Subclasses implement ``next_batch(n)`` (never returning a visited config) and may
    extend ``update``. ``tune`` owns the loop: resume from the log, build, run, log each
    record as soon as it is measured, update, call back. A tuner with a cost model also
    implements ``predict_batch``: the loop then records the model's score of each
    candidate before it is measured, and on the batch's last record how well the model's
    ranking of the batch matched the measured one (live model quality).
    """

    name = "base"

    def __init__(self, task: Task, target: Target, template: Template | None = None, seed: int = 0,
                 restrict: dict[str, Sequence] | None = None, space: ConfigSpace | None = None):
        self.task = task
        self.target = target
        self.template = template or get_template(task.op, target.kind)
        # ``space``: search a given space (e.g. the configs a sweep recorded) instead of the template's
        self.space = space if space is not None else self.template.space(task, target)
        if restrict:  # e.g. {"threads": [1]}: search only part of the space
            self.space = self.space.restrict(**restrict)
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.visited: set[int] = set()
        self.best_cost = math.inf
        # which records this version still builds: rendered once per config, at resume and when
        # the job's best is chosen (a log of thousands of stale records takes seconds to render)
        self.code_check = CodeCheck()

    # -- strategy interface ----------------------------------------------------------
    def next_batch(self, n: int) -> list[Config]:
        raise NotImplementedError

    def update(self, inputs: Sequence[MeasureInput], results: Sequence[MeasureResult]) -> None:
        for inp, res in zip(inputs, results):
            self.visited.add(inp.config.index)
            if res.ok and 0 < res.median < self.best_cost:  # a zero or negative time is no kernel's
                self.best_cost = res.median

    def has_next(self) -> bool:
        return len(self.visited) < len(self.space)

    def predict_batch(self, configs: Sequence[Config]) -> np.ndarray | None:
        """The cost model's scores of ``configs`` (higher = faster), or None without a model."""
        return None

    # -- the loop ----------------------------------------------------------------------
    def resume(self, log: RecordLog) -> list[Record]:
        """Feed this task's records from ``log`` to the tuner; returns them."""
        prior: list[Record] = []
        outside = 0
        for record in log.records():
            if record.task.key != self.task.key or record.target.key != self.target.key:
                continue
            try:
                record.to_config(self.space)
            except (KeyError, ValueError):
                outside += 1
                continue
            prior.append(record)
        if outside:
            warnings.warn(f"{outside} record(s) of {self.task.key} in {log.path} lie outside the space searched "
                          "now (other knob values or another template version); they are not counted", stacklevel=2)
        if prior:
            self.update([r.to_measure_input(self.space) for r in prior], [r.result for r in prior])
            # the best to beat is one this version builds: a faster record of code the template no
            # longer renders (stale) says nothing of what a config runs at today
            choices = select_best(prior, check=self.code_check)
            self.best_cost = choices[0].record.seconds if choices and choices[0].record else math.inf
        return prior

    def tune(self, n_trials: int, builder: Builder, runner: Runner, batch_size: int = 8,
             log: RecordLog | None = None, callbacks: Sequence[Callback] = (),
             time_limit_s: float | None = None, early_stopping: int | None = None) -> TuneSummary:
        """Search until ``n_trials`` configs (the ``log``'s records of this task included) are
        measured or the space is spent: ``batch_size`` at a time, built by ``builder`` and
        timed by ``runner``, each record appended to ``log`` as it is measured, ``callbacks``
        told after each batch. Returns the TuneSummary (``best`` is None when nothing verified).
        Raises ValueError for a budget or batch < 1, LogLockedError when another job holds the
        log."""
        if n_trials < 1:
            raise ValueError(f"n_trials must be >= 1, got {n_trials}")
        if batch_size < 1:  # a batch of none would end the job at once, as if the space were spent
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        # the whole job holds the log: a second job on it would measure every config again and
        # count it toward its own budget (LogLockedError, at once, for that job)
        with log.lock() if log is not None else nullcontext():
            summary = self.start(log, callbacks)
            while summary.trials < n_trials:
                summary.stopped = self.stop_reason(summary, time_limit_s, early_stopping)
                if summary.stopped:
                    break
                configs = self.next_batch(min(batch_size, n_trials - summary.trials))
                if not self.measure(configs, builder, runner, summary, log, callbacks):
                    summary.stopped = SPACE_SPENT  # no untried config left to propose
                    break
            return self.finish(summary)

    def stop_reason(self, summary: TuneSummary, time_limit_s: float | None = None,
                    early_stopping: int | None = None) -> str:
        """Why the loop stops before its budget, or "": the space is spent, the time limit
        (Kernel Tuner's ``time_limit``) is reached, or no faster config was found in the last
        ``early_stopping`` trials (AutoTVM's ``early_stopping``)."""
        if not self.has_next():
            return SPACE_SPENT
        if time_limit_s is not None and time.perf_counter() - summary.started >= time_limit_s:
            return f"the time limit of {time_limit_s:g} s is reached"
        if early_stopping is not None and summary.trials - summary.best_at >= early_stopping:
            return f"no faster config in the last {summary.trials - summary.best_at} trials (early stopping)"
        return ""

    # The steps of ``tune``, for drivers that interleave many tasks (the model scheduler).
    def start(self, log: RecordLog | None = None, callbacks: Sequence[Callback] = ()) -> TuneSummary:
        """Resume from ``log``; returns the summary that ``measure`` and ``finish`` fill in."""
        summary = TuneSummary(self.task, self.target, tuner=self.name)
        summary.started = time.perf_counter()
        prior = self.resume(log) if log is not None else []
        # a config counts once toward the budget, however often it is in the log (two jobs that
        # once ran on one log measured each config twice)
        summary.resumed = summary.trials = summary.best_at = len({r.to_config(self.space).index for r in prior})
        verified = {r.to_config(self.space).index for r in prior if r.ok}
        summary.resumed_failed = len({r.to_config(self.space).index for r in prior if not r.ok} - verified)
        summary.records.extend(prior)
        if prior:
            resumed_inputs = [r.to_measure_input(self.space) for r in prior]
            for callback in callbacks:
                callback(self, resumed_inputs, [r.result for r in prior], prior, 0)
        return summary

    def measure(self, configs: Sequence[Config], builder: Builder, runner: Runner, summary: TuneSummary,
                log: RecordLog | None = None, callbacks: Sequence[Callback] = ()) -> int:
        """Build, run, log and learn from one batch of configs (visited ones are dropped);
        returns how many were measured."""
        configs = [c for c in configs if c.index not in self.visited]
        if not configs:
            return 0
        inputs = [MeasureInput(self.task, c, self.target) for c in configs]
        scores = self.predict_batch(configs)  # ranked before anything is measured
        _tell(callbacks, "building", len(inputs))
        builds = builder.build(inputs)
        results: list[MeasureResult] = []
        batch_records: list[Record] = []
        for i, (inp, build) in enumerate(zip(inputs, builds)):
            # one at a time, logged at once: a kill loses at most the trial in flight
            result = runner.run([inp], [build])[0]
            results.append(result)
            model = None
            if scores is not None:
                model = {"score": float(scores[i]), "batch": summary.trials}
                if i == len(inputs) - 1:  # the whole batch is measured: how good was the ranking?
                    measured = [throughput_of(self.task, r) for r in results]
                    model.update(batch_quality(scores, measured))
            record = Record.from_measure(inp, result, self.name, model)
            if log is not None:
                log.append([record])
            batch_records.append(record)
            _tell(callbacks, "measured", record, summary.trials + i + 1)
            summary.build_s += result.build_s
            summary.run_s += result.run_s
        best_before = self.best_cost
        self.update(inputs, results)
        first = summary.trials
        summary.trials += len(inputs)
        if self.best_cost < best_before:
            summary.best_at = summary.trials
        summary.measured += len(inputs)
        summary.failed += sum(1 for r in results if not r.ok)
        summary.records.extend(batch_records)
        for callback in callbacks:
            callback(self, inputs, results, batch_records, first)
        return len(inputs)

    def finish(self, summary: TuneSummary) -> TuneSummary:
        summary.wall_s = time.perf_counter() - summary.started
        ok = [r for r in summary.records if r.ok]
        summary.best = min(ok, key=lambda r: r.seconds) if ok else None
        return summary
