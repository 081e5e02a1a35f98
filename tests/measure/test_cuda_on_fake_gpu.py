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

import numpy as np
import pytest
from fakes import FAKE_GPU_TARGET, FAKE_PYCUDA

from measure import BuildResult, LocalBuilder, MeasureError, MeasureInput
from measure.cuda_runner import CudaRunner
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


def test_runner_verifies_and_times_real_templates_on_the_fake_gpu(fake_gpu):
    inputs = (_inputs("gemv", {"M": 2, "N": 40, "K": 96}, "float16", 1)
              + _inputs("gemm", {"M": 20, "N": 24, "K": 40}, "bfloat16", 1)
              + _inputs("gemm_q4", {"M": 5, "N": 20, "K": 128}, "float16", 1, {"group_size": 32}))
    builds = build_and_register(fake_gpu, inputs)
    with CudaRunner(timeout_s=300) as runner:
        results = runner.run(inputs, builds)
    assert [r.error for r in results] == [MeasureError.NO_ERROR] * len(inputs), [r.message for r in results]
    for r in results:
        assert len(r.costs) >= 10 and r.median > 0
        assert r.stats["p20"] <= r.median <= r.stats["p80"] and r.stats["min"] <= r.stats["p20"]
        assert r.stats["device"] == "Fake GPU (CPU emulator)" and r.stats["registers"] > 0
        assert r.stats["l2_flush_bytes"] >= 64 << 20


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


def test_cli_tunes_and_benches_on_the_fake_gpu(fake_gpu, tmp_path):
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
    assert "4 measured now, 0 failed" in tuned.stdout, tuned.stdout
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


def test_cuda_target_with_no_gpu_is_one_line_exit_2(tmp_path):
    env = _fake_env(tmp_path)
    env["FAKE_PYCUDA_NO_DEVICE"] = "1"
    proc = _cli(["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--target", "cuda"], env, tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA-capable device" in lines[0], proc.stderr
