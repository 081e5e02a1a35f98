"""A CUDA kernel library: cubins built by nvcc (no GPU needed), loaded by the runtime through
pycuda. Here pycuda is ``tests/fake_pycuda`` (host memory as device memory, kernels run on the
CPU emulator), so this checks the plumbing (manifest, cubins, launch geometry for dynamic
dims, device buffers); the ``gpu`` machine runs the same on an H200."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import runtime
from measure import CudaRunner, LocalBuilder
from measure.verify import check_output
from records import RecordLog, export_library
from search_space import Target, Task, get_template

FAKE = Path(__file__).resolve().parent.parent / "fake_pycuda"
FAKE_TARGET = Target(kind="cuda", arch="sm_90a", device_name="Fake GPU (CPU emulator)", sm_count=2,
                     max_threads_per_block=1024, max_shared_memory_per_block=227 << 10,
                     max_registers_per_block=65536, l2_bytes=1 << 20, clock_mhz=1980)

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="building cubins needs nvcc")


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("FAKE_PYCUDA_REGISTRY", str(registry))
    monkeypatch.syspath_prepend(str(FAKE))
    yield registry
    for name in [m for m in sys.modules if m == "pycuda" or m.startswith("pycuda.")]:
        del sys.modules[name]


def _register_library(registry: Path, folder: Path) -> None:
    """Tell the fake which source each of the library's cubins was built from."""
    for entry in json.loads((folder / "manifest.json").read_text())["kernels"]:
        cubin = (folder / entry["cubin"]).read_bytes()
        source = {"lang": "cuda", "code": (folder / entry["source"]).read_text(), "entry": entry["symbol"],
                  "args": entry["args"], "launch": entry["launch"]}
        (registry / (hashlib.sha256(cubin).hexdigest() + ".json")).write_text(json.dumps(source))


def test_cuda_records_export_to_cubins_that_the_runtime_launches(fake_gpu, tmp_path):
    from autotune.tuners import RandomTuner

    log = RecordLog(tmp_path / "cuda.jsonl")
    tasks = [Task.make("rmsnorm", {"M": 8, "N": 64}, "float16", dynamic=("M",)),
             Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16")]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder, CudaRunner(timeout_s=300) as runner:
        for task in tasks:
            summary = RandomTuner(task, FAKE_TARGET, seed=0).tune(2, builder, runner, batch_size=2, log=log)
            assert summary.best is not None, task.key
    summary = export_library(log.records(), tmp_path / "lib", "cuda")
    assert summary.library is None and summary.verified == 0 and "checked when they run on a GPU" in summary.notes[0]
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "cuda" and manifest["library"] is None and manifest["header"] is None
    for entry in manifest["kernels"]:
        assert (tmp_path / "lib" / entry["cubin"]).read_bytes()[:4] == b"\x7fELF"  # a cubin is an ELF image
        assert set(entry["launch"]) >= {"grid", "block"} and entry["source"].endswith(".cu")
    _register_library(fake_gpu, tmp_path / "lib")

    library = runtime.load(tmp_path / "lib")
    rng = np.random.default_rng(0)
    for task in (tasks[0].with_dims(M=5), tasks[0].with_dims(M=13), tasks[1]):  # M off its bucket of 8
        kernel = library.get(task.op, task.dims, task.dtype, dynamic=task.dynamic)
        assert kernel.tuned and kernel.spec.shape == {**task.dims, **{d: 8 for d in task.dynamic}}
        template = get_template(task.op, "cuda")
        inputs = template.make_inputs(task, rng)
        (name,) = kernel.output_names
        problem = check_output(name, kernel(**inputs), template.reference(task, inputs)[name],
                               template.tolerance(task), task.dtype)
        assert problem is None, f"{task.key}: {problem}"

    # device-resident buffers: bound once, launched with a new M each call
    import pycuda.driver as drv

    kernel = library.get("rmsnorm", {"M": 8, "N": 64}, "float16", dynamic=["M"])
    task = tasks[0].with_dims(M=6)
    inputs = get_template("rmsnorm", "cuda").make_inputs(task, rng)
    device = {n: drv.mem_alloc(a.nbytes) for n, a in inputs.items()}
    for n, a in inputs.items():
        drv.memcpy_htod(device[n], a)
    device["Y"] = drv.mem_alloc(6 * 64 * 2)
    drv.memset_d16(device["Y"], 0x7E00, 6 * 64)  # NaN
    kernel.bind(device, dims={"M": 8})(M=4)
    y = np.empty((6, 64), np.float16)
    drv.memcpy_dtoh(y, device["Y"])
    want = get_template("rmsnorm", "cuda").reference(task, inputs)["Y"]
    assert check_output("Y", y[:4], want[:4], 5e-3, "float16") is None
    assert np.isnan(y[4:]).all(), "rows past M were written"

    with pytest.raises(LookupError, match="has no kernel for gemv/float16/M=2,N=64,K=64"):
        library.get("gemv", {"M": 2, "N": 64, "K": 64}, "float16")
    library.close()
