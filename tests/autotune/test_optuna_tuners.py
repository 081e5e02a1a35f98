"""Optuna tuners: invalid proposals and failed candidates are told as failed trials, never as slow."""
from __future__ import annotations

import pytest
from optuna.trial import TrialState

import fakes
from autotune.replay import ReplayBuilder, ReplayRunner
from autotune.tuners import make_tuner
from fakes import recorded_space
from measure import LocalBuilder, LocalRunner
from records import RecordLog
from search_space import Task


@pytest.mark.parametrize("name", ["optuna-tpe", "optuna-cmaes"])
def test_failed_candidates_are_failed_trials(name, host, fast_policy, tmp_path):
    """Kernels that hang, crash, compute wrong answers or do not compile: FAIL, with no value."""
    task = Task.make(fakes.FAULT_OP, {"N": 256})
    tuner = make_tuner(name, task, host, seed=0, restrict={"repeat": [1, 2]})  # every mode twice: 16 configs
    log = RecordLog(tmp_path / "faults.jsonl")
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy, timeout_s=3) as runner:
        tuner.tune(len(tuner.space), builder, runner, batch_size=6, log=log)
    records = log.records()
    assert len(records) == 16  # the whole space, each config once
    failed = {r.config_index for r in records if not r.ok}
    assert {r.config["mode"] for r in records if not r.ok} == {"hang", "crash", "wrong", "scribble", "oob", "badir"}
    for trial in tuner.study.trials:
        config = tuner.space.from_values(tuner._decode(trial.params))
        if config.index in failed:
            assert trial.state == TrialState.FAIL and trial.value is None
        elif trial.state == TrialState.COMPLETE:
            record = next(r for r in records if r.config_index == config.index)
            assert trial.value == pytest.approx(record.gflops)
    told = {tuner.space.from_values(tuner._decode(t.params)).index for t in tuner.study.trials}
    assert told == {r.config_index for r in records}, "every measured config is known to the study"


@pytest.mark.parametrize("name", ["optuna-tpe", "optuna-cmaes"])
def test_invalid_proposals_are_failed_trials(name, sweep_logs):
    """gemv's constraints (registers, kblock steps) reject some proposals: they fail, unmeasured."""
    space = recorded_space(sweep_logs["target"])
    tuner = make_tuner(name, space.task, space.target, seed=1, space=space.space)
    runner = ReplayRunner(space.results)
    tuner.tune(40, ReplayBuilder(), runner, batch_size=8)
    assert runner.calls == 40
    full = space.template.space(space.task, space.target)
    invalid = [t for t in tuner.study.trials if not full.is_valid(tuner._decode(t.params))]
    assert len(invalid) == tuner.failed_proposals
    assert all(t.state == TrialState.FAIL for t in invalid)
    complete = [t for t in tuner.study.trials if t.state == TrialState.COMPLETE]
    assert complete and all(full.is_valid(tuner._decode(t.params)) for t in complete)


@pytest.mark.parametrize("name", ["optuna-tpe", "optuna-cmaes"])
def test_the_tuner_leaves_the_processs_optuna_settings_as_they_were(name, sweep_logs):
    """A notebook's own Optuna studies keep their logging and warnings: the tuner quiets Optuna
    only while it calls it, and its experimental notices do not reach the user."""
    import warnings

    import optuna

    space = recorded_space(sweep_logs["target"])
    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tuner = make_tuner(name, space.task, space.target, seed=1, space=space.space)
            tuner.tune(12, ReplayBuilder(), ReplayRunner(space.results), batch_size=4)
            assert not [w for w in caught if issubclass(w.category, optuna.exceptions.ExperimentalWarning)]
            assert optuna.logging.get_verbosity() == optuna.logging.DEBUG
            warnings.warn("mine", optuna.exceptions.ExperimentalWarning)  # the user's filters still apply
            assert [str(w.message) for w in caught] == ["mine"]
    finally:
        optuna.logging.set_verbosity(before)
