"""A CUDA kernel library: cubins built by nvcc (no GPU needed), loaded by the runtime through
pycuda. Here pycuda is ``tests/fake_pycuda`` (host memory as device memory, kernels run on the
CPU emulator), so this checks the plumbing (manifest, cubins, launch geometry for dynamic
dims, device buffers); the ``gpu`` machine runs the same on an H200."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from fakes import FAKE_GPU_TARGET, FAKE_GPU_TIMING, FAKE_PYCUDA, register_library

import runtime
from measure import CudaRunner, LocalBuilder
from measure.verify import check_output
from export import export_library
from records import RecordLog
from search_space import Task, get_template

FAKE, FAKE_TARGET = FAKE_PYCUDA, FAKE_GPU_TARGET

pytestmark = pytest.mark.tools("nvcc")


def test_cuda_records_export_to_cubins_that_the_runtime_launches(fake_gpu, tmp_path, monkeypatch):
    from autotune.tuners import RandomTuner

    log = RecordLog(tmp_path / "cuda.jsonl")
    tasks = [Task.make("rmsnorm", {"M": 8, "N": 64}, "float16", dynamic=("M",)),
             Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16")]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder, CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        for task in tasks:
            summary = RandomTuner(task, FAKE_TARGET, seed=0).tune(2, builder, runner, batch_size=2, log=log)
            assert summary.best is not None, task.key
    # the kernel cache holds every cubin the job built: an nvcc that always fails comes first
    # on the PATH of the export's workers, and is never run
    refusing = tmp_path / "refusing-bin"
    refusing.mkdir()
    (refusing / "nvcc").write_text("#!/bin/sh\necho 'error: export recompiled a cubin the tuning job built' >&2\n"
                                   "exit 1\n")
    (refusing / "nvcc").chmod(0o755)
    with monkeypatch.context() as patch:
        patch.setenv("PATH", f"{refusing}{os.pathsep}{os.environ['PATH']}")
        summary = export_library(log.records(), tmp_path / "lib", "cuda")
    assert summary.library is None and summary.verified == 0 and "checked when they run on a GPU" in summary.notes[0]
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert manifest["target"]["kind"] == "cuda" and manifest["library"] is None and manifest["header"] is None
    for entry in manifest["kernels"]:
        cubin = (tmp_path / "lib" / entry["cubin"]).read_bytes()
        assert cubin[:4] == b"\x7fELF"  # a cubin is an ELF image
        assert entry["cubin_sha256"] == hashlib.sha256(cubin).hexdigest()  # checked by runtime.load
        assert set(entry["launch"]) >= {"grid", "block"} and entry["source"].endswith(".cu")
    register_library(fake_gpu, tmp_path / "lib")

    library = runtime.load(tmp_path / "lib")
    rng = np.random.default_rng(0)
    for task in (tasks[0].with_dims(M=5), tasks[0].with_dims(M=13), tasks[1]):  # M off its bucket of 8
        kernel = library.get(task.op, task.dims, task.dtype, dynamic=task.dynamic)
        assert kernel.tuned and kernel.spec.dims == {**task.dims, **{d: 8 for d in task.dynamic}}
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
    call = kernel.bind(device, dims={"M": 8})
    with pytest.raises(ValueError, match="dim M = 9 exceeds 8, what the bound arrays hold"):
        call(M=9)  # raw allocations hold what bind was told: no launch past it
    call(M=4)
    y = np.empty((6, 64), np.float16)
    drv.memcpy_dtoh(y, device["Y"])
    want = get_template("rmsnorm", "cuda").reference(task, inputs)["Y"]
    assert check_output("Y", y[:4], want[:4], 5e-3, "float16") is None
    assert np.isnan(y[4:]).all(), "rows past M were written"

    with pytest.raises(ValueError, match="a numpy array is host memory"):
        kernel.bind({**inputs, "Y": np.empty((6, 64), np.float16)}, dims={"M": 6})
    from runtime.arrays import CudaArrays

    arrays = CudaArrays()
    upload = {n: arrays.upload(a) for n, a in inputs.items()}
    with pytest.raises(ValueError, match=r"output Y: expected \(6, 64\) float16, got \(64, 6\)"):
        kernel.bind({**upload, "Y": arrays.empty((64, 6), np.float16)})
    kernel.bind({**upload, "Y": arrays.empty((6, 64), np.float16)})()

    with pytest.raises(LookupError, match="has no kernel for gemv/float16/M=2,N=64,K=64"):
        library.get("gemv", {"M": 2, "N": 64, "K": 64}, "float16")
    library.close()

    changed = tmp_path / "changed"  # a cubin changed after export never reaches the GPU
    shutil.copytree(tmp_path / "lib", changed)
    cubin = changed / manifest["kernels"][0]["cubin"]
    cubin.write_bytes(cubin.read_bytes() + b"\0")
    from runtime.library import LibraryFormatError

    with pytest.raises(LibraryFormatError, match="cubin of .* does not match the manifest's"):
        runtime.load(changed)

    edited = tmp_path / "edited"  # a launch edited by hand is not what export sealed with the cubin
    shutil.copytree(tmp_path / "lib", edited)
    block = manifest["kernels"][0]["launch"]["block"]
    block[0] = block[0] * 2 if block[0] <= 512 else block[0] // 2
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LibraryFormatError, match="was edited after export"):
        runtime.load(edited)
