"""Contract tests over every tuner, on a real (small) gemm task."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from autotune.tuners import TUNERS, XGBTuner, make_tuner
from autotune.tuners.base import SPACE_SPENT
from fakes import SyntheticRunner
from measure import LocalBuilder, LocalRunner
from records import RecordLog
from search_space import Task

TASK = Task.make("gemm", {"M": 48, "N": 40, "K": 64})
DATA = Path(__file__).resolve().parents[2] / "benchmarks" / "data"  # recorded sweeps


@pytest.fixture(scope="module")
def machinery(fast_policy):
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy, timeout_s=30) as runner:
        yield builder, runner


@pytest.mark.parametrize("name", sorted(TUNERS))
def test_tuner_contract(name, host, machinery, tmp_path):
    builder, runner = machinery
    tuner = make_tuner(name, TASK, host, seed=1)
    log = RecordLog(tmp_path / "log.jsonl")
    seen: list[int] = []

    def watch(tuner_, inputs, results, records, first):
        assert first == len(seen)
        seen.extend(i.config.index for i in inputs)

    summary = tuner.tune(20, builder, runner, batch_size=6, log=log, callbacks=[watch])
    records = log.records()
    assert summary.trials == summary.measured == len(records) == 20
    indices = [r.config_index for r in records]
    assert indices == seen and len(set(indices)) == 20, "a config was measured twice"
    assert all(tuner.space.is_valid(r.config) for r in records)
    assert all(r.ok and r.seconds > 0 for r in records)
    assert summary.best is not None and summary.best.seconds == min(r.seconds for r in records)

    # resuming counts the old records and never re-measures them
    again = make_tuner(name, TASK, host, seed=2)
    more = again.tune(26, builder, runner, batch_size=6, log=log)
    records = log.records()
    assert more.resumed == 20 and more.measured == 6 and len(records) == 26
    assert len({r.config_index for r in records}) == 26


def test_unknown_tuner():
    with pytest.raises(ValueError, match="unknown tuner"):
        make_tuner("magic", TASK, None)


def test_xgb_ranks_better_than_chance_after_training():
    """After training on 48 trials the model must order the configs it has not seen better than
    a coin. The labels come from a recorded sweep (ReplayRunner), not from timings taken now, so
    the result is the same on every run and every machine (seed 0: 0.77; seeds 0-9: 0.69-0.79)."""
    from autotune.replay import ReplayBuilder, ReplayRunner
    from cost_model import pairwise_accuracy
    from cost_model.transfer import throughput_of
    from fakes import recorded_space

    sweep = recorded_space(DATA / "gemm_M128_N768_K512.jsonl.gz")  # 400 configs, all measured
    tuner = XGBTuner(sweep.task, sweep.target, seed=0, template=sweep.template, space=sweep.space)
    tuner.tune(48, ReplayBuilder(), ReplayRunner(sweep.results), batch_size=12)
    held_out = [sweep.space.get(i) for i in sorted(sweep.results) if i not in tuner.visited]
    assert len(held_out) == 400 - 48
    predicted = tuner.predict(held_out)
    measured = np.array([throughput_of(sweep.task, sweep.results[c.index]) for c in held_out])
    # pairs more than 25% apart: closer ones are within the sweep's timing noise
    assert pairwise_accuracy(predicted, measured, margin=0.25) > 0.7  # a model that learned nothing: 0.5


def test_xgb_proposals_are_unvisited_and_valid(host, machinery):
    builder, runner = machinery
    tuner = XGBTuner(TASK, host, seed=3)
    tuner.tune(16, builder, runner, batch_size=8)
    for _ in range(3):
        batch = tuner.next_batch(8)
        assert len(batch) == 8
        assert not {c.index for c in batch} & tuner.visited
        assert all(tuner.space.is_valid(c) for c in batch)


def test_xgb_batch_picks_differ_in_at_least_two_knobs(host):
    """The diversity rule: near-copies of a pick (one knob apart) wait for a later batch."""
    tuner = XGBTuner(TASK, host, seed=0)
    space = tuner.space
    first = space.sample(np.random.default_rng(1), 1)[0]
    close = [c for c in space.neighbors(first) if c.index != first.index]
    far = [c for c in space.sample(np.random.default_rng(2), 40)
           if sum(a != b for a, b in zip(space.digits(c), space.digits(first))) >= 2]
    assert len(close) >= 3 and len(far) >= 3
    ranked = [first] + close + far
    picks = tuner._diverse(ranked, 3)
    assert picks[0] is first and not {c.index for c in picks} & {c.index for c in close}
    digits = [np.asarray(space.digits(c)) for c in picks]
    assert all(np.count_nonzero(a != b) >= 2 for i, a in enumerate(digits) for b in digits[i + 1:])
    # too few diverse candidates: filled up in ranked order; diversity 0 is the plain top of the ranking
    assert [c.index for c in tuner._diverse([first] + close, 3)] == [first.index] + [c.index for c in close[:2]]
    tuner.diversity = 0
    assert [c.index for c in tuner._diverse(ranked, 3)] == [c.index for c in ranked[:3]]
    tuner.visited.add(first.index)  # a measured config is never proposed again
    assert first.index not in {c.index for c in tuner._diverse(ranked, 3)}


def test_a_summary_reads_in_one_short_line(host):
    """Every record repeats the task and the target: a summary of 16 trials was a 32 KB repr."""
    from autotune.tuners import TuneSummary
    from measure import MeasureResult
    from records import Record

    records = [Record(TASK, host, {"mr": i}, i, MeasureResult((1e-5 * (i + 1),)), tuner="random") for i in range(16)]
    summary = TuneSummary(TASK, host, trials=16, measured=16, failed=0, best=records[0], records=records,
                          tuner="random")
    text = repr(summary)
    assert len(text) < 400, text
    assert TASK.key in text and "tuner='random'" in text and "trials=16" in text and "1e-05 s with {'mr': 0}" in text


class _SlowRunner(SyntheticRunner):
    def run(self, inputs, builds):
        time.sleep(0.05 * len(inputs))
        return super().run(inputs, builds)


def test_the_loop_stops_early_by_time_by_no_improvement_and_on_a_spent_space(host, tmp_path):
    """AutoTVM's early_stopping and Kernel Tuner's time_limit; a restricted space smaller than
    the budget says it is spent rather than ending as if the budget were met."""
    runner = SyntheticRunner({"gemm": 1e-5})
    summary = make_tuner("random", TASK, host, seed=1).tune(400, runner, runner, batch_size=1, early_stopping=5)
    assert "early stopping" in summary.stopped and summary.trials < 400
    assert summary.trials - summary.best_at == 5
    times = [r.seconds for r in summary.records]
    assert min(times[:summary.best_at]) == summary.best.seconds == min(times)
    assert all(t > summary.best.seconds for t in times[:summary.best_at - 1])  # found at trial best_at

    slow = _SlowRunner({"gemm": 1e-5})
    summary = make_tuner("random", TASK, host, seed=1).tune(400, slow, slow, batch_size=1, time_limit_s=0.3)
    assert "time limit" in summary.stopped and 2 <= summary.trials < 40

    small = make_tuner("random", TASK, host, seed=1)
    knobs = {k.name: [k.values[0]] for k in small.space.knobs[1:]}
    for name in ("random", "grid", "xgb"):
        tuner = make_tuner(name, TASK, host, seed=1, restrict=knobs)
        summary = tuner.tune(10_000, runner, runner, batch_size=4, log=RecordLog(tmp_path / f"{name}.jsonl"))
        assert summary.stopped == SPACE_SPENT and 1 <= summary.trials < 10_000, name
    full = make_tuner("random", TASK, host, seed=1).tune(6, runner, runner, batch_size=4)
    assert full.trials == 6 and full.stopped == ""
