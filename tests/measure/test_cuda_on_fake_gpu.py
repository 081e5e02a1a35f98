"""The GPU code paths, run here on a fake GPU: ``tests/fake_pycuda`` stands in for pycuda
(host memory as device memory) and launches kernels on the CPU emulator.

What this checks is the plumbing a first run on a real GPU depends on: the worker's use of
the driver API (context, allocation, NaN poisoning, dynamic shared memory, prepared
launches, events), verification, timing statistics, error mapping and worker replacement,
and the CLI's ``tune``/``bench --target cuda`` end to end. Real timings, real faults and
the hardware's semantics are for the ``gpu`` tests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import fakes
import numpy as np
import pytest
from fakes import FAKE_GPU_TARGET, FAKE_GPU_TIMING, FAKE_PYCUDA

from measure import BuildResult, CudaRunner, LocalBuilder, MeasureError, MeasureInput
from search_space import Task, get_template

FAKE, FAKE_TARGET = FAKE_PYCUDA, FAKE_GPU_TARGET


def register(registry: Path, cubin: bytes, source) -> None:
    (registry / (hashlib.sha256(cubin).hexdigest() + ".json")).write_text(json.dumps(source.to_dict()))


def build_and_register(registry, inputs):
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    for build in builds:
        assert build.error == MeasureError.NO_ERROR, build.message
        register(registry, Path(build.artifact).read_bytes(), build.source)
    return builds


def _inputs(op, shape, dtype, n, attrs=None, seed=0):
    template = get_template(op, "cuda")
    task = Task.make(op, shape, dtype, attrs)
    space = template.space(task, FAKE_TARGET)
    configs = [template.default(task, FAKE_TARGET)] + space.sample(np.random.default_rng(seed), n)
    return [MeasureInput(task, c, FAKE_TARGET) for c in configs]


@pytest.mark.tools("nvcc")
def test_runner_verifies_and_times_real_templates_on_the_fake_gpu(fake_gpu):
    # the defaults: a kernel without dynamic shared memory (gemv) and two with it, each timed with
    # the CUDA default policy (sampled configs would only repeat that plumbing)
    inputs = (_inputs("gemv", {"M": 2, "N": 40, "K": 96}, "float16", 0)
              + _inputs("gemm", {"M": 20, "N": 24, "K": 40}, "bfloat16", 0)
              + _inputs("gemm_q4", {"M": 5, "N": 20, "K": 128}, "float16", 0, {"group_size": 32}))
    builds = build_and_register(fake_gpu, inputs)
    assert [b.source.launch_dims["smem"] > 0 for b in builds] == [False, True, True]
    with CudaRunner(timeout_s=300) as runner:
        results = runner.run(inputs, builds)
    assert [r.error for r in results] == [MeasureError.NO_ERROR] * len(inputs), [r.message for r in results]
    for r in results:
        assert len(r.costs) >= 10 and r.median > 0
        assert r.stats["p20"] <= r.median <= r.stats["p80"] and r.stats["min"] <= r.stats["p20"]
        assert r.stats["device"] == "Fake GPU (CPU emulator)" and r.stats["registers"] > 0
        assert r.stats["l2_flush_bytes"] >= 64 << 20


@pytest.mark.tools("nvcc")
def test_wrong_answers_refused_launches_and_kernel_faults_on_the_fake_gpu(fake_gpu):
    (good,) = _inputs("gemv", {"M": 1, "N": 33, "K": 64}, "float16", 0)
    (build,) = build_and_register(fake_gpu, [good])

    def variant(old, new, launch=None):
        """The same cubin bytes under another name, registered with a changed source."""
        source = dataclasses.replace(build.source, code=build.source.code.replace(old, new))
        if launch is not None:
            source = dataclasses.replace(source, launch=launch)
        cubin = Path(build.artifact).read_bytes() + old.encode()  # distinct bytes, distinct registry key
        path = Path(build.artifact).with_name(hashlib.sha256(cubin).hexdigest() + ".cubin")
        path.write_bytes(cubin)
        register(fake_gpu, cubin, source)
        return dataclasses.replace(build, artifact=str(path), source=source)

    assert "acc[m][r] = warp_sum(acc[m][r]);" in build.source.code
    wrong = variant("acc[m][r] = warp_sum(acc[m][r]);", "acc[m][r] = 1.01f * warp_sum(acc[m][r]);")
    too_big = variant("const int lane", "const int lane",
                      launch=tuple((k, 300 << 10) if k == "smem" else (k, v) for k, v in build.source.launch))
    deadlock = variant("  const int lane_k", "  if (threadIdx.x < 16) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);\n"
                                             "  __syncthreads();\n  const int lane_k")
    inputs = [good] * 5
    with CudaRunner(timeout_s=300) as runner:
        results = runner.run(inputs, [build, wrong, too_big, deadlock, build])
        generation = runner._workers[0].generation
    assert [r.error for r in results] == [MeasureError.NO_ERROR, MeasureError.WRONG_ANSWER,
                                          MeasureError.OUT_OF_RESOURCES, MeasureError.RUNTIME_ERROR,
                                          MeasureError.NO_ERROR], [r.message for r in results]
    assert "relative error" in results[1].message
    assert "launch refused" in results[2].message
    assert "deadlock" in results[3].message and "worker replaced" in results[3].message
    assert generation == 2  # the 'sticky' fault cost the worker once


@pytest.mark.tools("nvcc")
def test_refused_launches_on_the_fake_gpu_cost_only_their_own_trial(fake_gpu, tmp_path):
    """The faults only a GPU has (those every backend shares: tests/measure/test_faults.py):
    too much shared memory, which the builder turns away and the driver refuses, and more
    registers than the register file holds. A refused launch writes nothing and costs no
    worker; the correct kernel after it is NO_ERROR."""
    from measure.compile_cuda import compile_to_cubin

    template = get_template(fakes.CUDA_FAULT_OP, "cuda")
    task = Task.make(fakes.CUDA_FAULT_OP, {"N": 4096})
    space = template.space(task, FAKE_TARGET)
    modes = ["ok", "fat", "ok", "greedy", "ok"]
    inputs = [MeasureInput(task, space.from_values({"mode": "ok" if m == "greedy" else m, "block": 128}),
                           FAKE_TARGET) for m in modes]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        built = dict(zip(modes, builder.build(inputs)))
    assert built["fat"].error == MeasureError.OUT_OF_RESOURCES  # the builder's check turns it away
    assert 0 < built["ok"].stats["occupancy"] <= 1  # from ptxas's registers, for the cost model
    # ... and had it not, the driver refuses it: compile it anyway and let the runner try
    cubin, stats = compile_to_cubin(built["fat"].source, FAKE_TARGET)
    fat_path = tmp_path / "fat.cubin"
    fat_path.write_bytes(cubin)
    built["fat"] = BuildResult(str(fat_path), built["fat"].source, "fat", stats=stats)
    # "greedy": the correct kernel as if it needed 128 registers a thread, in blocks of 1024
    # threads: more than the register file holds, so its launch is refused
    greedy_cubin = Path(built["ok"].artifact).read_bytes() + b"greedy"  # distinct bytes, distinct registry key
    greedy_path = tmp_path / "greedy.cubin"
    greedy_path.write_bytes(greedy_cubin)
    greedy_source = dataclasses.replace(built["ok"].source, launch=tuple(
        (k, (1024, 1, 1) if k == "block" else (4, 1, 1) if k == "grid" else v) for k, v in built["ok"].source.launch))
    (fake_gpu / (hashlib.sha256(greedy_cubin).hexdigest() + ".json")).write_text(
        json.dumps(dict(greedy_source.to_dict(), registers=128)))
    built["greedy"] = dataclasses.replace(built["ok"], artifact=str(greedy_path), source=greedy_source)
    for mode, build in built.items():
        if mode not in ("fat", "greedy"):
            assert build.error == MeasureError.NO_ERROR, build.message
            register(fake_gpu, Path(build.artifact).read_bytes(), build.source)
    register(fake_gpu, cubin, built["fat"].source)
    with CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        results = runner.run(inputs, [built[m] for m in modes])
        generation = runner._workers[0].generation
    errors = [r.error.name for r in results]
    assert errors == ["NO_ERROR", "OUT_OF_RESOURCES", "NO_ERROR", "OUT_OF_RESOURCES", "NO_ERROR"], \
        list(zip(modes, errors, [r.message for r in results]))
    assert "launch refused" in results[1].message
    assert "too many resources requested for launch" in results[3].message
    assert generation == 1  # refused launches cost no worker


def test_the_fake_refuses_launches_over_the_register_file_as_the_driver_does(fake_gpu):
    """CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES: raised by the launch call, before anything runs (the
    outputs keep their poison), and not sticky (the next launch in the same context works)."""
    import pycuda.driver as drv

    from measure.cuda_errors import classify_cuda_error

    task = Task.make(fakes.CUDA_FAULT_OP, {"N": 4096})
    template = get_template(fakes.CUDA_FAULT_OP, "cuda")
    source = template.render(task, template.default(task, FAKE_TARGET), FAKE_TARGET)
    cubin = b"a kernel that needs 128 registers a thread"
    (fake_gpu / (hashlib.sha256(cubin).hexdigest() + ".json")).write_text(
        json.dumps(dict(source.to_dict(), registers=128)))
    drv.init()
    func = drv.module_from_buffer(cubin).get_function("fault")
    assert func.get_attribute(drv.function_attribute.MAX_THREADS_PER_BLOCK) == 512
    func.prepare([np.uintp, np.uintp])
    x_host = np.random.default_rng(0).uniform(-1, 1, 4096).astype(np.float32)
    x, y = drv.mem_alloc(x_host.nbytes), drv.mem_alloc(x_host.nbytes)
    drv.memcpy_htod(x, x_host)
    drv.memset_d32(y, 0x7FC00000, 4096)
    with pytest.raises(drv.LaunchError, match="too many resources requested for launch") as refused:
        func.prepared_async_call((4, 1, 1), (1024, 1, 1), None, int(x), int(y))
    assert classify_cuda_error(str(refused.value), during_launch=True) == (MeasureError.OUT_OF_RESOURCES, False)
    y_host = np.empty_like(x_host)
    drv.memcpy_dtoh(y_host, y)
    assert np.isnan(y_host).all()  # nothing ran
    func.prepared_async_call((8, 1, 1), (512, 1, 1), None, int(x), int(y))
    drv.memcpy_dtoh(y_host, y)
    np.testing.assert_array_equal(y_host, 2 * x_host)


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=1200)


def _fake_env(registry):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(FAKE), str(FAKE.parent)] + [p for p in sys.path if p])
    env["FAKE_PYCUDA_REGISTRY"] = str(registry)
    env["AUTOTUNE_CUDA_PROBE_BYTES"] = str(1 << 20)
    env["AUTOTUNE_CUDA_PROBE_ITERATIONS"] = "64"
    return env


@pytest.mark.tools("nvcc")
def test_cli_tunes_and_benches_on_the_fake_gpu(fake_gpu, tmp_path, kernel_cache):
    from autotune.tuners import GridTuner
    from measure.cuda_roofline import probe_sources

    task = Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16")
    tuner = GridTuner(task, FAKE_TARGET)
    configs = tuner.next_batch(4)
    inputs = [MeasureInput(task, c, FAKE_TARGET) for c in configs]
    inputs.append(MeasureInput(task, get_template("gemv", "cuda").default(task, FAKE_TARGET), FAKE_TARGET))
    build_and_register(fake_gpu, inputs)
    env = _fake_env(fake_gpu)
    # the probes are compiled inside the worker: register what that compile will produce
    from measure.compile_cuda import compile_to_cubin

    probe_env = {"AUTOTUNE_CUDA_PROBE_BYTES", "AUTOTUNE_CUDA_PROBE_ITERATIONS"}
    code = ("import json, sys; from measure.cuda_roofline import probe_sources; "
            "print(json.dumps({k: v.to_dict() for k, v in probe_sources().items()}))")
    probes = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                       env={**os.environ, **{k: env[k] for k in probe_env}}).stdout)
    from search_space import KernelSource

    for source in probes.values():
        cubin, _ = compile_to_cubin(KernelSource.from_dict(source), FAKE_TARGET)
        register(fake_gpu, cubin, KernelSource.from_dict(source))
    del probe_sources

    tuned = _cli(["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--dtype", "float16", "--target", "cuda",
                  "--tuner", "grid", "--trials", "4", "--batch", "2", "--log", "t.jsonl", "--no-mlflow", "--quiet"],
                 env, tmp_path)
    assert tuned.returncode == 0, tuned.stderr
    assert "4 measured now; 0 failed" in tuned.stdout, tuned.stdout
    from records import RecordLog

    records = RecordLog(tmp_path / "t.jsonl").records()
    assert len(records) == 4 and all(r.ok for r in records)
    assert {r.target.device_name for r in records} == {"Fake GPU (CPU emulator)"}

    bench = _cli(["bench", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--dtype", "float16", "--target", "cuda",
                  "--json"], env, tmp_path)
    assert bench.returncode == 0, bench.stderr
    out = json.loads(bench.stdout)
    assert out["tuned_s"] > 0 and out["error"] == ""
    # which floor binds depends on the emulator's probe timings; it must follow from them
    flops, nbytes = 2 * 64 * 64, 2 * (64 + 64 * 64 + 64)
    compute_s, memory_s = flops / (out["peak_gflops"] * 1e9), nbytes / (out["memory_gbs"] * 1e9)
    assert out["bound"] == ("compute" if compute_s >= memory_s else "memory")
    assert out["ceilings"]["stream_gbs"] > 0 and "measured now" in out["ceilings"]["source"]
    if out["baseline_s"] is None:
        assert "torch" in out["baseline"]
    # the probes went through the kernel cache: the next bench loads them instead of running nvcc
    cached = {json.loads(p.read_text())["entry"] for p in kernel_cache.glob("*.source.json")}
    assert {"stream_add", "fma_peak"} <= cached


def test_cuda_target_with_no_gpu_is_one_line_exit_2(tmp_path):
    env = _fake_env(tmp_path)
    env["FAKE_PYCUDA_NO_DEVICE"] = "1"
    proc = _cli(["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--target", "cuda"], env, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA-capable device" in lines[0], proc.stderr
