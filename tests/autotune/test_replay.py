"""Replay: every tuner against a sweep measured on this machine, with no measuring again."""
from __future__ import annotations

import math

import numpy as np
import pytest

from autotune.compare import compare_tuners, format_table, plot_convergence, to_json
from autotune.replay import TRANSFER, ReplayBuilder, ReplayRunner, Trajectory, pretrain_for, replay_tuner
from autotune.tuners import TUNERS, make_tuner
from autotune.units import format_rate
from fakes import recorded_space
from measure import MeasureError, MeasureInput
from records import RecordLog

REPLAYABLE = sorted(t for t in TUNERS if t != "sweep")


@pytest.fixture(scope="module")
def space(sweep_logs):
    return recorded_space(sweep_logs["target"])


def test_recorded_space_holds_the_sweep(space, sweep_logs):
    records = RecordLog(sweep_logs["target"]).records()
    # 56 configs on an AVX2 host, 80 on AVX-512 (more register blocks fit): enough for 40 distinct trials
    assert len(space.results) == len(records) == len(space.space.valid_indices()) >= 50
    assert space.best_gflops == pytest.approx(max(r.gflops for r in records))
    assert 0 < space.share_within(0.95) <= 1
    # the replay runner answers with the recorded result, and refuses what was never measured
    index = space.space.valid_indices()[3]
    runner = ReplayRunner(space.results)
    config = space.space.get(index)
    (answer,) = runner.run([MeasureInput(space.task, config, space.target)], ReplayBuilder().build([None]))
    assert answer is space.results[index]
    full = space.template.space(space.task, space.target)
    outside = next(c for c in full if c.index not in space.results)  # a threads=2 config, not swept
    assert not space.space.is_valid(outside)
    (missing,) = runner.run([MeasureInput(space.task, outside, space.target)], [None])
    assert missing.error == MeasureError.INVALID_CONFIG


def test_min_statistic_answers_with_the_fastest_sample(sweep_logs):
    by_median = recorded_space(sweep_logs["target"])
    by_min = recorded_space(sweep_logs["target"], "min")
    for index, result in by_median.results.items():
        assert by_min.results[index].median == min(result.costs) <= result.median


@pytest.mark.parametrize("name", REPLAYABLE)
def test_every_tuner_replays(name, space, tmp_path):
    """The tuner contract on recorded data: distinct recorded configs only, resumable, deterministic."""
    log = RecordLog(tmp_path / "replay.jsonl")
    runner = ReplayRunner(space.results)
    tuner = make_tuner(name, space.task, space.target, seed=3, space=space.space)
    summary = tuner.tune(30, ReplayBuilder(), runner, batch_size=6, log=log)
    indices = [r.config_index for r in log.records()]
    assert summary.trials == len(indices) == 30 == runner.calls
    assert len(set(indices)) == 30 and set(indices) <= set(space.results)
    again = make_tuner(name, space.task, space.target, seed=4, space=space.space)
    more = again.tune(40, ReplayBuilder(), ReplayRunner(space.results), batch_size=6, log=log)
    indices = [r.config_index for r in log.records()]
    assert more.resumed == 30 and more.measured == 10 and len(set(indices)) == 40
    first = replay_tuner(space, name, seed=7, trials=25, batch=5)
    second = replay_tuner(space, name, seed=7, trials=25, batch=5)
    assert first.gflops == second.gflops and len(first.gflops) == 25


def test_replay_runs_to_the_end_of_a_small_space(space):
    run = replay_tuner(space, "random", seed=0, trials=500)
    assert len(run.gflops) == len(space.results)
    assert run.best_so_far()[-1] == pytest.approx(space.best_gflops)
    assert run.trials_to(space.best_gflops) <= len(space.results)


def test_xgb_records_its_live_ranking_quality(space, tmp_path):
    log = RecordLog(tmp_path / "xgb.jsonl")
    make_tuner("xgb", space.task, space.target, seed=0, space=space.space).tune(
        32, ReplayBuilder(), ReplayRunner(space.results), batch_size=8, log=log)
    records = log.records()
    assert not any(r.model for r in records[:8]), "the first batch is random: no model yet"
    ranked = records[8:]
    assert all("score" in r.model and r.model["batch"] in (8, 16, 24) for r in ranked)
    last_of_batch = [r for r in ranked if "pairwise_accuracy" in r.model]
    assert [r.model["batch"] for r in last_of_batch] == [8, 16, 24]
    for r in last_of_batch:
        assert 0.0 <= r.model["pairwise_accuracy"] <= 1.0 and 0.0 <= r.model["topk_recall"] <= 1.0
        assert r.model["k"] == 2


def test_transfer_ranks_the_first_batch(space, sweep_logs):
    """Pre-trained on another shape, xgb's very first batch is chosen by the model."""
    other = RecordLog(sweep_logs["other"]).records()
    base = pretrain_for(space, other)
    assert base.fitted and base.n_trees > 0
    tuner = make_tuner("xgb", space.task, space.target, seed=0, space=space.space, base_model=base)
    assert tuner.features.names == base.feature_names
    first = tuner.next_batch(8)
    scores = tuner.predict_batch(first)
    assert scores is not None and len(set(c.index for c in first)) == 8
    assert tuner.ranker() is base
    # once the task has measurements of its own, a model of those alone ranks
    tuner.update([MeasureInput(space.task, c, space.target) for c in first], [space.results[c.index] for c in first])
    assert tuner.ranker() is tuner.model and tuner.model.fitted and tuner.model.base is None
    run = replay_tuner(space, TRANSFER, seed=0, trials=24, base_model=base)
    assert len(run.gflops) == 24
    # the task's own records are never used to pre-train its model
    with pytest.raises(ValueError, match="nothing to pre-train"):
        pretrain_for(space, RecordLog(sweep_logs["target"]).records())


def test_trials_to_counts_from_one():
    run = Trajectory("x", 0, [1.0, 0.0, 3.0, 2.0, 5.0], 0.0)
    assert list(run.best_so_far()) == [1.0, 1.0, 3.0, 3.0, 5.0]
    assert run.trials_to(3.0) == 3 and run.trials_to(0.5) == 1 and run.trials_to(6.0) is None


def test_compare_report_table_json_and_plot(space, sweep_logs, tmp_path):
    other = RecordLog(sweep_logs["other"]).records()
    lines = []
    report = compare_tuners([space], ["xgb", "random"], seeds=3, trials=30, batch=6, transfer=other,
                            progress=lines.append)
    (entry,) = report["spaces"]
    assert [t["tuner"] for t in entry["tuners"]] == ["xgb", TRANSFER, "random"]
    assert len(lines) == 3
    for t in entry["tuners"]:
        assert t["seeds"] == 3
        t95 = t["trials_to_95"]
        assert 0 <= t95["reached"] <= 3 and 1 <= t95["median"] <= 31
        assert t95["p25"] <= t95["median"] <= t95["p75"]
        assert 0 < t["best_after_trials"]["median"] <= 1.0
        assert len(entry["curves"][t["tuner"]]) == 3
        assert all(len(c) == 30 for c in entry["curves"][t["tuner"]])
    accuracy = entry["tuners"][0]["heldout_pairwise_accuracy"]["median"]
    assert math.isnan(accuracy) or 0 <= accuracy <= 1
    table = format_table(report)
    assert space.task.key in table and TRANSFER in table and "within 95%" in table
    assert '"trials": 30' in to_json(report) and "NaN" not in to_json(report)
    png = tmp_path / "curves.png"
    plot_convergence(report, str(png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_curves_are_monotone_shares_of_the_best(space):
    report = compare_tuners([space], ["random"], seeds=2, trials=20)
    for curve in report["spaces"][0]["curves"]["random"]:
        assert np.all(np.diff(curve) >= 0) and 0 < curve[-1] <= 1.0


def test_a_space_of_failed_records_only_is_not_replayed(sweep_logs):
    """Its best is 0 GFLOP/s: every tuner 'reached 95%' of it at once, and the curves divided by it."""
    import dataclasses

    from autotune.replay import RecordedSpace
    from measure import MeasureResult

    records = RecordLog(sweep_logs["target"]).records()
    failed = [dataclasses.replace(r, result=MeasureResult((), MeasureError.RUNTIME_ERROR, "failed")) for r in records]
    assert RecordedSpace.from_records(failed) == []
    assert len(RecordedSpace.from_records(failed + records[:3])) == 1  # one verified config is a best to reach


def test_replay_arguments_are_checked_and_the_report_names_the_machine(space):
    for bad in ({"seeds": 0}, {"trials": 0}, {"batch": 0}, {"seeds": 2.5}):
        with pytest.raises(ValueError, match="must be an int >= 1"):
            compare_tuners([space], ["random"], **{"seeds": 1, "trials": 4, "batch": 2, **bad})
    report = compare_tuners([space], ["random"], seeds=1, trials=4, batch=2)
    assert report["spaces"][0]["space"]["target"] == space.target.key
    assert f"{space.task.key} on {space.target.key}:" in format_table(report)
    # a gemv is memory-bound: its best is in GB/s, as tune and best print it
    best = min(r.median for r in space.results.values() if r.ok)
    assert f"best {format_rate(space.task, best)};" in format_table(report) and "GB/s" in format_rate(space.task, best)
    tuner = make_tuner("random", space.task, space.target, space=space.space)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        tuner.tune(4, ReplayBuilder(), ReplayRunner(space.results), batch_size=0)


def test_an_empty_log_gives_a_frame_with_the_usual_columns():
    from records.log import to_dataframe

    frame = to_dataframe([])
    assert len(frame) == 0 and {"task", "target", "gflops", "ok", "best_so_far_gflops"} <= set(frame.columns)
    assert frame.groupby("task")["gflops"].max().empty  # what a notebook does first
