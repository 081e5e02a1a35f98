"""A candidate that hangs, crashes its worker, computes a wrong answer or writes to its inputs
costs one trial, and never the next candidate's; every backend gives the same fault the same error."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import ThreadPoolExecutor

import fakes  # noqa: F401  (registers the fault_probe template)
import pytest

from autotune.tuners import GridTuner
from measure import BuildResult, LocalBuilder, LocalRunner, MeasureError, MeasureInput
from records import RecordLog, best_records
from search_space import ArgSpec, Task, get_template

TASK = Task.make(fakes.FAULT_OP, {"N": 4096})


def inputs_for(host, *modes):
    space = get_template(fakes.FAULT_OP, "cpu").space(TASK, host)
    return [MeasureInput(TASK, space.from_values({"mode": m, "repeat": 1}), host) for m in modes]


# Every backend gives a fault the same error. The sequence puts a correct candidate after each
# fault: it must measure as if nothing had happened before it.
FAULTS = {
    "ok": MeasureError.NO_ERROR,
    "prepare_raise": MeasureError.RUNTIME_ERROR,  # making the task's inputs raises
    "prepare_crash": MeasureError.WORKER_CRASH,   # ... kills the worker
    "crash": MeasureError.WORKER_CRASH,           # a write far outside any array
    "hang": MeasureError.RUN_TIMEOUT,
    "wrong": MeasureError.WRONG_ANSWER,
    "scribble": MeasureError.WRONG_ANSWER,        # the right output, then its input zeroed
    "oob": MeasureError.WRONG_ANSWER,             # the right output, and one element past its end
    "oor": MeasureError.OUT_OF_RESOURCES,         # a workspace larger than any machine's memory
}
SEQUENCE = ["ok", "prepare_raise", "ok", "prepare_crash", "ok", "crash", "ok", "hang", "ok", "wrong", "ok",
            "scribble", "ok", "oob", "ok", "oor", "ok"]
HUGE_WORKSPACE = ArgSpec("W", "workspace", nbytes=1 << 50)  # 1 PiB: past any address space


def task_for(op, mode):
    """The probe's task; for the input faults, one whose inputs fail to be made."""
    inputs = mode.removeprefix("prepare_") if mode.startswith("prepare_") else "ok"
    return Task.make(op, TASK.dims, attrs={"inputs": inputs} if inputs != "ok" else None)


def with_huge_workspace(build):
    """A correct kernel that asks for HUGE_WORKSPACE."""
    source = dataclasses.replace(build.source, args=build.source.args + (HUGE_WORKSPACE,))
    return dataclasses.replace(build, source=source)


def cpu_fault_candidates(host):
    """The CPU fault probe's modes as they are."""
    space = get_template(fakes.FAULT_OP, "cpu").space(TASK, host)
    inputs = {mode: MeasureInput(task_for(fakes.FAULT_OP, mode),
                                 space.from_values({"mode": mode if mode in fakes.MODES else "ok", "repeat": 1}), host)
              for mode in FAULTS}
    with LocalBuilder(n_parallel=2) as builder:
        builds = dict(zip(inputs, builder.build(list(inputs.values()))))
    builds["oor"] = with_huge_workspace(builds["oor"])
    return inputs, builds


def cuda_fault_candidates(registry, tmp_path):
    """The CUDA fault probe's correct kernel, changed for each fault, on the fake GPU: the
    fake runs the source registered for a cubin's bytes on the CPU emulator (no nvcc needed).
    The emulator's libraries are built here, so that no worker spends its timeout on g++."""
    import cudaemu
    from fakes import FAKE_GPU_TARGET

    template = get_template(fakes.CUDA_FAULT_OP, "cuda")
    task = task_for(fakes.CUDA_FAULT_OP, "ok")
    space = template.space(task, FAKE_GPU_TARGET)
    ok_config = space.from_values({"mode": "ok", "block": 128})
    ok = template.render(task, ok_config, FAKE_GPU_TARGET)
    store = "if (i < 4096) Y[i] = 2.0f * v;"
    assert store in ok.code
    added = {"crash": "if (i == 0) *(volatile float*)(1ULL << 40) = 1.0f;",
             "hang": "if (i == 0) { volatile int spin = 1; while (spin) { } }",
             "oob": "if (i == 0) Y[4096] = 1.0f;"}
    sources = {mode: dataclasses.replace(ok, code=ok.code.replace(store, f"{store}\n  {line}"))
               for mode, line in added.items()}
    for mode in ("wrong", "scribble"):
        sources[mode] = template.render(task, space.from_values({"mode": mode, "block": 128}), FAKE_GPU_TARGET)
    inputs, builds = {}, {}
    for mode in FAULTS:
        source = sources.get(mode, ok)
        cubin = tmp_path / f"{mode}.cubin"
        cubin.write_bytes(f"a cubin of {mode}".encode())
        (registry / (hashlib.sha256(cubin.read_bytes()).hexdigest() + ".json")).write_text(json.dumps(source.to_dict()))
        inputs[mode] = MeasureInput(task_for(fakes.CUDA_FAULT_OP, mode), ok_config, FAKE_GPU_TARGET)
        builds[mode] = BuildResult(str(cubin), source, mode)
    builds["oor"] = with_huge_workspace(builds["oor"])
    with ThreadPoolExecutor(2) as pool:  # one build per distinct code
        list(pool.map(cudaemu.build, {s.code: s for s in sources.values()}.values()))
    return inputs, builds


@pytest.mark.parametrize("kind", ["cpu", "cuda"])
def test_every_backend_gives_each_fault_the_same_error_and_measuring_goes_on(kind, host, fast_policy, tmp_path,
                                                                             request):
    """The CPU and CUDA (on the fake GPU) backends through the one runner: the same fault, the
    same error; a correct candidate after each fault is NO_ERROR; a worker is lost only to
    faults that kill or hang it."""
    make = {"cpu": lambda: cpu_fault_candidates(host),
            "cuda": lambda: cuda_fault_candidates(request.getfixturevalue("fake_gpu"), tmp_path)}
    candidates = make[kind]()  # a new backend adds its fault probes here
    inputs, builds = ([c[mode] for mode in SEQUENCE] for c in candidates)
    with LocalRunner(timeout_s=3, policy=fast_policy, kind=kind) as runner:
        results = runner.run(inputs, builds)
        generation = runner._workers[0].generation
    assert [r.error for r in results] == [FAULTS[m] for m in SEQUENCE], \
        [(m, r.error.name, r.message) for m, r in zip(SEQUENCE, results)]
    message = dict(zip(SEQUENCE, (r.message for r in results)))
    assert message["prepare_raise"].startswith("preparing inputs: ") and "failed on purpose" in message["prepare_raise"]
    assert message["prepare_crash"] == "preparing inputs: worker killed by SIGABRT"
    assert message["crash"] == "worker killed by SIGSEGV"
    assert message["hang"] == "no result within 3 s (the worker was killed)"
    assert "relative error" in message["wrong"]
    assert message["scribble"] == "modified its input X during the verification run"
    assert message["oob"] == "wrote past the end of its output Y"
    assert message["oor"].startswith("out of memory")
    for r in results:
        assert r.ok == (r.error == MeasureError.NO_ERROR)
        assert (r.median > 0) if r.ok else (r.median == float("inf"))
    assert generation == 4  # a worker lost to each of prepare_crash, crash and hang


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
        generation = runner._workers[0].generation
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

    from measure import task_data
    from measure.cpu_kernel import LoadedKernel
    from measure.runner import measure_candidate
    from search_space import template_module

    (inp,) = inputs_for(host, "ok")
    with LocalBuilder(n_parallel=1) as builder:
        (build,) = builder.build([inp])
    timed_calls = LoadedKernel.rotation

    def timed_calls_then_scribble(self, sets, dims):
        run = timed_calls(self, sets, dims)

        def run_then_scribble(n):
            run(n)
            sets[0]["X"][0] = np.float32(7.0)
        return run_then_scribble

    monkeypatch.setattr(LoadedKernel, "rotation", timed_calls_then_scribble)
    payload = {"task": TASK.to_dict(), "target": host.to_dict(), "kind": "cpu", "source": build.source.to_dict(),
               "artifact": build.artifact, "module": template_module(fakes.FAULT_OP, "cpu"),
               "policy": asdict(fast_policy), "check": True, "seed": 0}
    out = measure_candidate(payload)
    assert out["error"] == "WRONG_ANSWER" and out["message"] == "modified its input X while timed"
    assert out["inputs_dropped"] and not task_data._KEPT  # the next candidate gets fresh inputs


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
