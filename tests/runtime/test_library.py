"""An exported library loaded by the runtime: in this process, and in a fresh one with numpy only."""
from __future__ import annotations

import json
import shutil
import textwrap
import warnings

import numpy as np
import pytest
from fakes import run_numpy_only

import runtime
from measure.verify import check_output
from runtime.library import LibraryFormatError, missing_cpu_features
from search_space import Task, get_template

# Dynamic dims at values other than the bucket each kernel was tuned at.
OFF_BUCKET = {"rmsnorm": [{"M": 5}, {"M": 40}, {"M": 200}], "attention_decode": [{"S": 100, "L": 77}, {"S": 9, "L": 1}],
              "rope": [{"T": 13}, {"T": 1}]}


def _calls(library):
    """(task the call asks for, the entry it must get) for every kernel, off its bucket where it has one."""
    for entry in library.entries:
        task = Task.make(entry["op"], entry["dims"], entry["dtype"], entry["attrs"], entry["dynamic"])
        for dims in OFF_BUCKET.get(task.op, [{}]) if task.dynamic else [{}]:
            yield task.with_dims(**dims), entry


def _nearest_rmsnorm(m: int) -> int:
    return min((8, 64), key=lambda bucket: abs(np.log(bucket / m)))


def test_every_kernel_of_the_library_matches_numpy_off_its_bucket(exported_library):
    library = runtime.load(exported_library)
    assert len(library.entries) == 7 and len(library.specs()) == 7
    rng = np.random.default_rng(7)
    checked = 0
    for task, entry in _calls(library):
        kernel = library.get(task.op, task.dims, task.dtype, task.attr, task.dynamic)
        if task.op == "rmsnorm":  # two buckets: the nearest on a ratio scale serves the call
            m = _nearest_rmsnorm(task.dims["M"])
            entry = next(e for e in library.entries if e["op"] == "rmsnorm" and e["dims"]["M"] == m)
        assert kernel.entry == entry["entry"]
        assert kernel.tuned and kernel.config == entry["config"] and kernel.seconds == entry["seconds"]
        template = get_template(task.op, "cpu")
        inputs = template.make_inputs(task, rng)
        want = template.reference(task, inputs)
        got = kernel(**inputs, dims={d: task.dims[d] for d in task.dynamic})
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(kernel.output_names) == len(want)
        for name, value in zip(kernel.output_names, got):
            dtype = next(a.dtype for a in kernel.args if a.name == name)
            problem = check_output(name, value, want[name], template.tolerance(task), dtype)
            assert problem is None, f"{task.key} via {kernel.entry}: {problem}"
            checked += 1
    assert checked == 3 + 2 * 3 * 2 + 2 + 2  # gemv x3; rmsnorm: 2 buckets x 3 calls x 2 outputs; attention; rope


def test_a_bound_call_takes_new_dynamic_dims(exported_library):
    library = runtime.load(exported_library)
    kernel = library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True}, dynamic=["M"])
    rng = np.random.default_rng(1)
    x, r = (rng.standard_normal((16, 64)).astype(np.float32) for _ in range(2))
    g = rng.standard_normal(64).astype(np.float32)
    y, s = np.full_like(x, np.nan), np.full_like(x, np.nan)
    call = kernel.bind({"X": x, "R": r, "G": g, "Y": y, "S": s}, dims={"M": 16})
    call(M=3)  # only the first three rows
    total = x[:3].astype(np.float64) + r[:3]
    expect = total / np.sqrt((total ** 2).mean(axis=1, keepdims=True) + 1e-5) * g
    np.testing.assert_allclose(y[:3], expect, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s[:3], total, rtol=1e-6)
    assert np.isnan(y[3:]).all(), "rows past M were written"


def test_an_untuned_shape_runs_the_fallback_with_a_warning(exported_library):
    from export import TunedKernels

    with runtime.load(exported_library) as bare, pytest.raises(LookupError, match="without a fallback"):
        bare.get("gemv", {"M": 3, "N": 64, "K": 128})
    library = runtime.load(exported_library, fallback=TunedKernels.defaults())
    with pytest.warns(runtime.UntunedShapeWarning, match="not in the kernel library"):
        kernel = library.get("gemv", {"M": 3, "N": 64, "K": 128})
    assert not kernel.tuned
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((3, 128)).astype(np.float32), rng.standard_normal((64, 128)).astype(np.float32)
    np.testing.assert_allclose(kernel(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
    # once per kernel, not per value of a dynamic dim (a decode step asks at every KV length)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", runtime.UntunedShapeWarning)
        for rows in (5, 7, 300):
            library.get("rmsnorm", {"M": rows, "N": 96}, dynamic=["M"])
    assert len(caught) == 1, [str(w.message) for w in caught]
    quiet = runtime.load(exported_library, warn_untuned=False, fallback=TunedKernels.defaults())
    with warnings.catch_warnings():
        warnings.simplefilter("error", runtime.UntunedShapeWarning)
        assert not quiet.get("gemv", {"M": 3, "N": 64, "K": 128}).tuned
    library.close()
    quiet.close()
    with pytest.raises(RuntimeError, match="is closed: load it again"):  # not "loaded without a fallback"
        library.get("gemv", {"M": 3, "N": 64, "K": 128})


def test_a_directory_that_is_no_library_is_refused(tmp_path, exported_library):
    with pytest.raises(FileNotFoundError, match="has no manifest.json"):
        runtime.load(tmp_path)
    copy = tmp_path / "lib"
    shutil.copytree(exported_library, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "schema": 99}))
    with pytest.raises(LibraryFormatError, match="schema 99"):
        runtime.load(copy)
    (copy / "manifest.json").write_text(json.dumps({**manifest, "format": "something-else"}))
    with pytest.raises(LibraryFormatError, match="not an llm-autotune-kernels manifest"):
        runtime.load(copy)


def test_a_library_for_a_cpu_with_more_extensions_is_refused_before_it_runs(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse2 pni sse4_2 avx avx2 fma avx512f avx512_bf16 abm\n")
    # /proc/cpuinfo spells some of LLVM's names its own way (sse3: pni, lzcnt: abm, bmi: bmi1);
    # extensions no kernel is compiled to use (amx, avx10) are not asked of the CPU
    target = {"features": "+avx2,+avx512f,+avx512bf16,+avx512vnni,+avx512bw,+sse4.2,+sse3,+lzcnt,+bmi,+gfni,"
                          "+amx-tile,+avx10.1,+64bit,-avx512fp16"}
    assert missing_cpu_features(target, str(cpuinfo)) == ["avx512vnni", "avx512bw", "bmi", "gfni"]
    assert missing_cpu_features(target, str(tmp_path / "absent")) == []
    with pytest.raises(LibraryFormatError, match="not LLVM's feature string"):  # a list would check nothing
        missing_cpu_features({"features": ["+avx512f"]}, str(cpuinfo))


# ----------------------------------------------------------------------------- numpy only

FRESH = r"""
import json, sys, warnings
import numpy as np
import runtime

library = runtime.load(sys.argv[1])
rng = np.random.default_rng(3)
out = {"entries": len(library.entries)}

kernel = library.get("rmsnorm", {"M": 5, "N": 64}, attrs={"residual": True}, dynamic=["M"])
x, r = rng.standard_normal((5, 64)).astype(np.float32), rng.standard_normal((5, 64)).astype(np.float32)
g = rng.standard_normal(64).astype(np.float32)
y, s = kernel(x, r, g)
total = x.astype(np.float64) + r
expect = total / np.sqrt((total ** 2).mean(axis=1, keepdims=True) + 1e-5) * g
out["rmsnorm_error"] = float(np.abs(y - expect).max())

kernel = library.get("gemv", {"M": 1, "N": 64, "K": 128})
x, w = rng.standard_normal((1, 128)).astype(np.float32), rng.standard_normal((64, 128)).astype(np.float32)
out["gemv_error"] = float(np.abs(kernel(x, w) - x.astype(np.float64) @ w.T).max())
out["gemv_threads"] = kernel.config["threads"]

try:
    library.get("gemv", {"M": 3, "N": 64, "K": 128})
    out["untuned"] = "no error"
except LookupError as exc:
    out["untuned"] = str(exc)

heavy = ("search_space", "measure", "records", "autotune", "cost_model", "llvmlite", "xgboost", "optuna", "mlflow")
out["imported"] = sorted(m for m in sys.modules if m.split(".")[0] in heavy)
out["project"] = sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy + ("runtime",)})
print(json.dumps(out))
"""


def test_a_fresh_process_with_only_numpy_loads_the_library_and_runs_kernels(tmp_path, exported_library):
    """What a deployment has: numpy and a copy of the runtime package, nothing else importable."""
    library = tmp_path / "deployed"
    shutil.copytree(exported_library, library)  # a library moves with its directory
    proc = run_numpy_only(tmp_path, textwrap.dedent(FRESH), str(library), timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["entries"] == 7
    assert out["rmsnorm_error"] < 1e-4 and out["gemv_error"] < 1e-3 and out["gemv_threads"] == 2
    assert out["untuned"].startswith("the kernel library") and "gemv/float32/M=3,N=64,K=128" in out["untuned"]
    assert out["imported"] == [] and out["project"] == ["runtime"]


def test_a_cuda_kernel_entry_says_whether_it_takes_a_programmatic_launch_with_a_bool():
    from runtime.library import _check_launch

    entry = {"dims": {"M": 1}, "launch": {"block": [128, 1, 1], "grid": [4, 1, 1], "smem": 0, "programmatic": True}}
    _check_launch(entry, "gemv")
    entry["launch"]["programmatic"] = "yes"  # a truthy string would join a kernel that never waits
    with pytest.raises(LibraryFormatError, match="gemv: programmatic 'yes' is not true or false"):
        _check_launch(entry, "gemv")


def test_an_entry_of_an_older_library_that_spells_out_defaults_serves_calls_that_leave_them_out():
    """Libraries exported before keys left defaults out have entries like the model's old
    calls (eps=1e-5, residual=false): they serve today's calls, which leave them out."""
    from runtime.abi import KernelSpec
    from runtime.kernel import select
    from runtime.library import spec_of_entry

    old = {"op": "rmsnorm", "dims": {"M": 8, "N": 64}, "dtype": "float32", "attrs": {"eps": 1e-5, "residual": False},
           "dynamic": ["M"]}
    want = KernelSpec.make("rmsnorm", {"M": 5, "N": 64}, dynamic=["M"])
    assert spec_of_entry(old).attrs == () and select([old], spec_of_entry, want) is old
    other = {**old, "attrs": {"eps": 1e-6}}
    assert select([other], spec_of_entry, want) is None
