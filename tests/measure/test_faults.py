"""A candidate that hangs, crashes its worker or computes a wrong answer costs one trial."""
from __future__ import annotations

import fakes  # noqa: F401  (registers the fault_probe template)
import pytest

from autotune.tuners import GridTuner
from measure import LocalBuilder, LocalRunner, MeasureError, MeasureInput
from records import RecordLog, best_records
from search_space import Task, get_template

TASK = Task.make(fakes.FAULT_OP, {"N": 4096})


def inputs_for(host, *modes):
    space = get_template(fakes.FAULT_OP, "cpu").space(TASK, host)
    return [MeasureInput(TASK, space.from_values({"mode": m, "repeat": 1}), host) for m in modes]


def test_each_fault_is_recorded_with_its_error_and_measuring_goes_on(host, fast_policy):
    inputs = inputs_for(host, "ok", "hang", "ok", "crash", "ok", "wrong", "ok")
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(timeout_s=3, policy=fast_policy) as runner:
        builds = builder.build(inputs)
        assert all(b.error == MeasureError.NO_ERROR for b in builds)
        results = runner.run(inputs, builds)
    errors = [r.error for r in results]
    assert errors == [MeasureError.NO_ERROR, MeasureError.RUN_TIMEOUT, MeasureError.NO_ERROR,
                      MeasureError.WORKER_CRASH, MeasureError.NO_ERROR, MeasureError.WRONG_ANSWER,
                      MeasureError.NO_ERROR]
    assert "SIGSEGV" in results[3].message
    assert "relative error" in results[5].message or "element" in results[5].message
    for r in results:
        assert r.ok == (r.error == MeasureError.NO_ERROR)
        assert (r.median > 0) if r.ok else (r.median == float("inf"))


def test_a_tuning_job_survives_faults_and_never_picks_a_faulty_best(host, fast_policy, tmp_path):
    # "slow" is correct, so it is the only legal competition for "ok"; faulty modes are never best
    log = RecordLog(tmp_path / "faults.jsonl")
    tuner = GridTuner(TASK, host, restrict={"repeat": [1, 2]})  # every mode twice
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(timeout_s=3, policy=fast_policy) as runner:
        summary = tuner.tune(len(tuner.space), builder, runner, batch_size=5, log=log)
    records = log.records()
    assert summary.trials == len(records) == len(tuner.space) == 12
    by_mode: dict[str, set] = {}
    for r in records:
        by_mode.setdefault(r.config["mode"], set()).add(r.result.error)
    assert by_mode["hang"] == {MeasureError.RUN_TIMEOUT}
    assert by_mode["crash"] == {MeasureError.WORKER_CRASH}
    assert by_mode["wrong"] == {MeasureError.WRONG_ANSWER}
    assert by_mode["badir"] == {MeasureError.COMPILE_ERROR}
    assert by_mode["ok"] == by_mode["slow"] == {MeasureError.NO_ERROR}
    best = best_records(records)[(TASK.key, host.key)]
    assert best.config["mode"] in ("ok", "slow") and best.ok
    assert summary.best.config["mode"] in ("ok", "slow")


def test_invalid_config_is_an_error_value_not_an_exception(host):
    from measure import BuildResult

    template = get_template("gemm", "cpu")
    task = Task.make("gemm", {"M": 8, "N": 8, "K": 8})
    space = template.space(task, host)
    bad = next(space.get(i) for i in range(len(space)) if not space.is_valid(space.get(i)))
    with LocalBuilder(n_parallel=1) as builder:
        (build,) = builder.build([MeasureInput(task, bad, host)])
    assert isinstance(build, BuildResult) and build.error == MeasureError.INVALID_CONFIG
    assert "violates" in build.message


def test_invalid_ir_is_a_compile_error(host):
    (inp,) = inputs_for(host, "badir")
    with LocalBuilder(n_parallel=1) as builder:
        (build,) = builder.build([inp])
    assert build.error == MeasureError.COMPILE_ERROR and build.artifact is None
    assert "ret" in build.message or "type" in build.message


@pytest.mark.parametrize("mode", ["hang", "crash"])
def test_worker_is_replaced_after_a_fault(host, fast_policy, mode):
    inputs = inputs_for(host, mode, "ok")
    with LocalBuilder(n_parallel=1) as builder, LocalRunner(timeout_s=3, policy=fast_policy) as runner:
        builds = builder.build(inputs)
        first, second = runner.run(inputs, builds)
        assert not first.ok and second.ok
        assert runner._worker.generation == 2
