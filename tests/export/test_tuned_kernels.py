from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from autotune.tuners import RandomTuner
from measure import LocalBuilder, LocalRunner
from records import RecordLog
from export import TunedKernels
from runtime import UntunedShapeWarning
from search_space import Task


def test_best_config_is_used_and_untuned_shapes_fall_back(tmp_path, host, fast_policy):
    task = Task.make("gemv", {"M": 3, "N": 96, "K": 200})
    log = RecordLog(tmp_path / "r.jsonl")
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy) as runner:
        summary = RandomTuner(task, host, seed=4).tune(8, builder, runner, batch_size=4, log=log)
    rng = np.random.default_rng(0)
    with TunedKernels.from_logs([log.path]) as kernels:
        kernel = kernels.get("gemv", task.dims)
        assert kernel.tuned and kernel.config == summary.best.config
        assert kernels.get("gemv", task.dims) is kernel  # compiled once
        x = rng.standard_normal((3, 200)).astype(np.float32)
        w = rng.standard_normal((96, 200)).astype(np.float32)
        np.testing.assert_allclose(kernel(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
        with pytest.warns(UntunedShapeWarning, match="never tuned"):
            other = kernels.get("gemm", {"M": 5, "N": 7, "K": 9})
        assert not other.tuned
        x, w = rng.standard_normal((5, 9)).astype(np.float32), rng.standard_normal((7, 9)).astype(np.float32)
        np.testing.assert_allclose(other(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
        with pytest.raises(ValueError, match="expected"):
            kernel(x, w)


def test_runtime_does_not_import_the_tuner_stack():
    code = ("import sys, runtime; "
            "bad = [m for m in ('xgboost', 'optuna', 'mlflow', 'cost_model', 'autotune') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_default_serves_other_values_of_its_dynamic_dims_without_compiling_again():
    """A decode step asks for attention at a new KV length every token: where the template's
    default config is the same, the kernel compiled for the first serves them all (it compiled
    one each); where the default differs (a dim it depends on), that default is compiled."""
    from search_space import Target, get_template

    dims = {"B": 1, "H": 4, "HKV": 2, "D": 32, "S": 64}
    template = get_template("attention_decode", "cpu")

    def default(**changed):
        task = Task.make("attention_decode", {**dims, "L": 10, **changed}, dynamic=("S", "L"))
        return template.default(task, Target.host()).as_dict()

    with TunedKernels.defaults() as kernels:
        first = kernels.get("attention_decode", {**dims, "L": 10}, dynamic=["S", "L"])
        assert first.config == default()
        for changed in ({"L": 11}, {"L": 63}, {"S": 128, "L": 90}):
            again = kernels.get("attention_decode", {**dims, **changed}, dynamic=["S", "L"])
            assert (again is first) == (default(**changed) == first.config), changed
            assert again.config == default(**changed)
        assert kernels.get("attention_decode", {**dims, "L": 11}, dynamic=["S", "L"]) is first
        other = kernels.get("attention_decode", {**dims, "H": 8, "L": 10}, dynamic=["S", "L"])  # static dims differ
        assert other is not first
        task = Task.make("attention_decode", {**dims, "S": 128, "L": 90}, dynamic=("S", "L"))
        inputs = get_template("attention_decode", "cpu").make_inputs(task, np.random.default_rng(0))
        want = get_template("attention_decode", "cpu").reference(task, inputs)["O"]
        np.testing.assert_allclose(first(**inputs, dims={"S": 128, "L": 90}), want, rtol=1e-4, atol=1e-5)


def test_a_closed_tuned_kernels_refuses_to_serve_as_a_closed_library_does(tmp_path):
    from records import load_records

    log = RecordLog(tmp_path / "r.jsonl")
    log.path.touch()
    assert load_records(str(log.path)) == []
    kernels = TunedKernels.from_logs(str(log.path))  # one path, not a list of its characters
    kernels.close()
    with pytest.raises(RuntimeError, match="closed"):
        kernels.get("gemm", {"M": 5, "N": 7, "K": 9})



@pytest.mark.tools("cc")
def test_a_longrope_record_is_found_again_by_tuned_kernels_and_an_exported_library(tmp_path, host, fast_policy):
    """A list-valued attribute, longrope's short factors: through the log's JSON (a list there), the
    records read back, TunedKernels and an exported library (its manifest and C header), the tuned
    kernel serves the call a model makes, whatever sequence type the factors come in."""
    import json

    import runtime
    from export import export_library
    from records import load_records
    from runtime.rope_frequencies import rope_attrs
    from search_space import get_template

    factors = [1.0 + i / 4 for i in range(16)]
    attrs = rope_attrs(10000.0, "longrope", short_factor=factors, attention_factor=1.19)
    task = Task.make("rope", {"T": 8, "H": 4, "D": 32}, attrs=attrs, dynamic=("T",))
    log = RecordLog(tmp_path / "r.jsonl")
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy) as runner:
        summary = RandomTuner(task, host, seed=2).tune(4, builder, runner, batch_size=4, log=log)
    line = json.loads(log.path.read_text().splitlines()[0])
    assert line["task"]["attrs"]["short_factor"] == factors  # a JSON list
    records = load_records([log.path])
    assert {r.task for r in records} == {task} and {r.task.key for r in records} == {task.key}
    template = get_template("rope", "cpu")
    inputs = template.make_inputs(Task.make("rope", {"T": 5, "H": 4, "D": 32}, attrs=attrs), np.random.default_rng(3))
    want = template.reference(task, inputs)["Y"]
    call = {**attrs, "short_factor": np.array(factors)}  # as a caller may hold them
    with TunedKernels.from_logs([log.path]) as kernels:
        kernel = kernels.get("rope", {"T": 5, "H": 4, "D": 32}, attrs=call, dynamic=("T",))
        assert kernel.tuned and kernel.config == summary.best.config
        np.testing.assert_allclose(kernel(**inputs, dims={"T": 5}), want, rtol=1e-5, atol=1e-5)
    export_library(records, tmp_path / "lib")
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    (entry,) = manifest["kernels"]
    assert entry["attrs"]["short_factor"] == factors and entry["task"] == task.key
    assert "short_factor=[1.0, 1.25, 1.5," in (tmp_path / "lib" / manifest["header"]).read_text()
    with runtime.load(tmp_path / "lib") as library:
        kernel = library.get("rope", {"T": 5, "H": 4, "D": 32}, attrs={**attrs, "short_factor": factors},
                             dynamic=("T",))
        assert kernel.tuned and kernel.entry == entry["entry"]
        np.testing.assert_allclose(kernel(**inputs, dims={"T": 5}), want, rtol=1e-5, atol=1e-5)
