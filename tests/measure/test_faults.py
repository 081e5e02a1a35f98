"""A candidate that hangs, crashes its worker, computes a wrong answer or writes to its inputs
costs one trial, and never the next candidate's."""
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
    inputs = inputs_for(host, "ok", "hang", "ok", "crash", "ok", "wrong", "ok", "scribble", "ok", "oob", "ok")
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(timeout_s=3, policy=fast_policy) as runner:
        builds = builder.build(inputs)
        assert all(b.error == MeasureError.NO_ERROR for b in builds)
        results = runner.run(inputs, builds)
    errors = [r.error for r in results]
    assert errors == [MeasureError.NO_ERROR, MeasureError.RUN_TIMEOUT, MeasureError.NO_ERROR,
                      MeasureError.WORKER_CRASH, MeasureError.NO_ERROR, MeasureError.WRONG_ANSWER,
                      MeasureError.NO_ERROR, MeasureError.WRONG_ANSWER, MeasureError.NO_ERROR,
                      MeasureError.WRONG_ANSWER, MeasureError.NO_ERROR], \
        [(e.name, r.message) for e, r in zip(errors, results)]
    assert "SIGSEGV" in results[3].message
    assert "relative error" in results[5].message or "element" in results[5].message
    assert "modified its input X" in results[7].message
    assert "wrote past the end of its output Y" in results[9].message
    for r in results:
        assert r.ok == (r.error == MeasureError.NO_ERROR)
        assert (r.median > 0) if r.ok else (r.median == float("inf"))


def test_a_tuning_job_survives_faults_and_never_picks_a_faulty_best(host, fast_policy, tmp_path):
    # "slow" is correct, so it is the only legal competition for "ok"; faulty modes are never best.
    # The grid measures the modes in the order of fakes.MODES, so "slow" runs right after the
    # scribblers and is the check that their damage did not reach the next candidate.
    log = RecordLog(tmp_path / "faults.jsonl")
    tuner = GridTuner(TASK, host, restrict={"repeat": [1, 2]})  # every mode twice
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(timeout_s=3, policy=fast_policy) as runner:
        summary = tuner.tune(len(tuner.space), builder, runner, batch_size=5, log=log)
    records = log.records()
    assert summary.trials == len(records) == len(tuner.space) == 2 * len(fakes.MODES) == 16
    by_mode: dict[str, set] = {}
    for r in records:
        by_mode.setdefault(r.config["mode"], set()).add(r.result.error)
    assert set(by_mode) == set(fakes.MODES)
    expected = {"ok": MeasureError.NO_ERROR, "slow": MeasureError.NO_ERROR, "hang": MeasureError.RUN_TIMEOUT,
                "crash": MeasureError.WORKER_CRASH, "wrong": MeasureError.WRONG_ANSWER,
                "scribble": MeasureError.WRONG_ANSWER, "oob": MeasureError.WRONG_ANSWER,
                "badir": MeasureError.COMPILE_ERROR}
    assert by_mode == {mode: {error} for mode, error in expected.items()}, \
        [(r.config["mode"], r.result.error.name, r.result.message) for r in records]
    for r in records:
        if r.config["mode"] == "scribble":
            assert "modified its input X" in r.result.message
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


def test_a_candidate_that_writes_to_its_inputs_is_wrong_and_the_next_is_not(host, fast_policy):
    """It writes the right Y, then zeroes X: it is the wrong one, not the correct kernel after it."""
    inputs = inputs_for(host, "scribble", "ok", "scribble", "scribble", "slow")
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(timeout_s=10, policy=fast_policy) as runner:
        results = runner.run(inputs, builder.build(inputs))
        generation = runner._worker.generation
    assert [r.error for r in results] == [MeasureError.WRONG_ANSWER, MeasureError.NO_ERROR,
                                          MeasureError.WRONG_ANSWER, MeasureError.WRONG_ANSWER,
                                          MeasureError.NO_ERROR], [r.message for r in results]
    for r in results[0], results[2], results[3]:
        assert r.message == "modified its input X during the verification run"
    assert generation == 1  # no worker was lost: the inputs were made again in the same one


def test_inputs_written_only_while_timed_are_caught_too(host, fast_policy, monkeypatch):
    """A kernel whose verification run leaves X alone but whose timed calls write to it
    (modelled in this process: the timed calls of a correct kernel, then a write to X)."""
    from dataclasses import asdict

    import numpy as np

    from measure import runner as runner_module
    from measure.cpu_kernel import LoadedKernel
    from search_space import template_module

    (inp,) = inputs_for(host, "ok")
    with LocalBuilder(n_parallel=1) as builder:
        (build,) = builder.build([inp])
    timed_calls = LoadedKernel.rotate

    def timed_calls_then_scribble(self, sets, dims, n):
        timed_calls(self, sets, dims, n)
        sets[0]["X"][0] = np.float32(7.0)

    monkeypatch.setattr(LoadedKernel, "rotate", timed_calls_then_scribble)
    payload = {"task": TASK.to_dict(), "target": host.to_dict(), "source": build.source.to_dict(),
               "artifact": build.artifact, "module": template_module(fakes.FAULT_OP, "cpu"),
               "policy": asdict(fast_policy), "check": True, "seed": 0}
    out = runner_module.run_cpu_candidate(payload)
    assert out["error"] == "WRONG_ANSWER" and out["message"] == "modified its input X while timed"
    assert out["inputs_dropped"] and not runner_module._PREPARED  # the next candidate gets fresh inputs


@pytest.mark.parametrize("mode", ["hang", "crash"])
def test_worker_is_replaced_after_a_fault(host, fast_policy, mode):
    inputs = inputs_for(host, mode, "ok")
    with LocalBuilder(n_parallel=1) as builder, LocalRunner(timeout_s=3, policy=fast_policy) as runner:
        builds = builder.build(inputs)
        first, second = runner.run(inputs, builds)
        assert not first.ok and second.ok
        assert runner._worker.generation == 2


def test_a_whole_autotune_tune_job_over_a_mix_of_faults(tmp_path):
    """Through the command line, as a user meets it: a template of one's own (AUTOTUNE_PLUGINS),
    one candidate of each fault mode, each carrying its own error, every correct one NO_ERROR."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(fakes.__file__).parent
    # the project before tests/: its folders (tests/search_space, ...) would shadow the packages
    path = [str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, AUTOTUNE_PLUGINS="fakes", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=os.pathsep.join(filter(None, path)))
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "tune", "--op", fakes.FAULT_OP, "--shape", "N=4096",
                           "--tuner", "grid", "--trials", str(len(fakes.MODES)), "--restrict", "repeat=1",
                           "--run-timeout", "3", "--no-mlflow", "--quiet", "--log", "faults.jsonl"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    records = RecordLog(tmp_path / "faults.jsonl").records()
    errors = {r.config["mode"]: r.result.error for r in records}
    assert errors == {"ok": MeasureError.NO_ERROR, "slow": MeasureError.NO_ERROR, "hang": MeasureError.RUN_TIMEOUT,
                      "crash": MeasureError.WORKER_CRASH, "wrong": MeasureError.WRONG_ANSWER,
                      "scribble": MeasureError.WRONG_ANSWER, "oob": MeasureError.WRONG_ANSWER,
                      "badir": MeasureError.COMPILE_ERROR}, [(r.config, r.result.message) for r in records]
    assert "best:" in proc.stdout and ('"mode": "ok"' in proc.stdout or '"mode": "slow"' in proc.stdout)
