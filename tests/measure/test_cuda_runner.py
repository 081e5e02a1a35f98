"""The CUDA runner: error mapping with fake workers here; real kernels and faults on a GPU.

Tests marked ``gpu`` skip where there is no NVIDIA GPU with pycuda, and run on the H200
machine (``benchmarks/gpu_check.sh``).
"""
from __future__ import annotations

import math

import fakes
import numpy as np
import pytest

from measure import BuildResult, CudaRunner, LocalBuilder, MeasureError, MeasureInput
from measure.backends.cuda import visible_device
from measure.cuda_errors import classify_cuda_error
from measure.resources import cuda_resource_problems
from measure.worker import WorkerCrash, WorkerError, WorkerTimeout
from search_space import ArgSpec, KernelSource, Target, Task, get_template

SM90 = Target.from_name("sm_90a")


# ----------------------------------------------------------------------------- no GPU needed


def failures_on_the_gpu(inputs: list[MeasureInput]) -> list[tuple]:
    """(task, config, error, message) of each input that did not build, run and verify."""
    with LocalBuilder(timeout_s=300) as builder, CudaRunner(timeout_s=60) as runner:
        results = runner.run(inputs, builder.build(inputs))
    return [(i.task.key, str(i.config), r.error.name, r.message) for i, r in zip(inputs, results) if not r.ok]


def seed_inputs(template, task: Task, target: Target) -> list[MeasureInput]:
    """The template's seed configs the task's space accepts, as inputs."""
    space = template.space(task, target)
    seeds = space.accepted(template.seed_configs(task, target), template.default(task, target).as_dict())
    return [MeasureInput(task, config, target) for config in seeds]


@pytest.mark.parametrize("message, during_launch, expected", [
    ("cuCtxSynchronize failed: an illegal memory access was encountered", False, (MeasureError.RUNTIME_ERROR, True)),
    ("cuEventSynchronize failed: misaligned address", False, (MeasureError.RUNTIME_ERROR, True)),
    ("cuEventSynchronize failed: unspecified launch failure", False, (MeasureError.RUNTIME_ERROR, True)),
    ("cuEventSynchronize failed: an illegal instruction was encountered", False, (MeasureError.RUNTIME_ERROR, True)),
    ("cuLaunchKernel failed: too many resources requested for launch", True, (MeasureError.OUT_OF_RESOURCES, False)),
    ("cuFuncSetAttribute failed: invalid argument", True, (MeasureError.OUT_OF_RESOURCES, False)),
    ("cuMemAlloc failed: out of memory", False, (MeasureError.OUT_OF_RESOURCES, False)),
    ("cuModuleLoadData failed: device kernel image is invalid", True, (MeasureError.RUNTIME_ERROR, False)),
])
def test_cuda_errors_are_classified(message, during_launch, expected):
    assert classify_cuda_error(message, during_launch) == expected


def test_visible_device_maps_through_cuda_visible_devices(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert visible_device(1) == "1"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert visible_device(1) == "5"
    with pytest.raises(ValueError):
        visible_device(2)


class FakeWorker:
    """Stands in for a GPU worker process: answers run calls from a script."""

    def __init__(self, script):
        self.script = list(script)
        self.generation = 1
        self.alive = True
        self.calls: list[str] = []
        self.killed = 0
        self.closed = False

    def call(self, path, payload, timeout):
        self.calls.append(path.split(":")[1])
        if path.endswith("prepare_task"):
            return {"device": "fake GPU"}
        action = self.script.pop(0)
        if isinstance(action, Exception):
            if isinstance(action, (WorkerTimeout, WorkerCrash)):
                self.kill()  # what WorkerProcess.call does before raising these
            raise action
        return action

    def kill(self):
        self.killed += 1
        self.generation += 1  # the next call starts a new process, which must prepare again

    def request_exit(self):
        pass

    def close(self):
        self.closed = True


def _item(n_builds: int = 1):
    template = get_template("gemv", "cuda")
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16")
    config = template.default(task, SM90)
    source = template.render(task, config, SM90)
    inp = MeasureInput(task, config, SM90)
    build = BuildResult("/nonexistent.cubin", source, "digest", 0.5, stats={"registers": 32})
    return [inp] * n_builds, [build] * n_builds


OK = {"error": "NO_ERROR", "costs": [1e-5, 1.1e-5, 0.9e-5], "stats": {"median": 1e-5, "sm_clock_mhz": 1980}}


def test_runner_maps_every_outcome_and_replaces_poisoned_workers():
    script = [
        OK,
        {"error": "RUNTIME_ERROR", "message": "kernel failed: illegal memory access", "sticky": True},
        OK,
        WorkerTimeout("no answer within 1.0 s"),
        WorkerCrash("worker killed by SIGSEGV"),
        {"error": "WRONG_ANSWER", "message": "Y: relative error 1 > 0.005"},
        {"error": "OUT_OF_RESOURCES", "message": "launch refused: too many resources requested", "sticky": False},
        WorkerError("LaunchError: cuCtxSynchronize failed: unspecified launch failure"),
        OK,
    ]
    worker = FakeWorker(script)
    inputs, builds = _item(len(script))
    with CudaRunner(worker_factory=lambda d: worker, timeout_s=1.0) as runner:
        results = runner.run(inputs, builds)
    assert [r.error for r in results] == [
        MeasureError.NO_ERROR, MeasureError.RUNTIME_ERROR, MeasureError.NO_ERROR, MeasureError.RUN_TIMEOUT,
        MeasureError.WORKER_CRASH, MeasureError.WRONG_ANSWER, MeasureError.OUT_OF_RESOURCES,
        MeasureError.RUNTIME_ERROR, MeasureError.NO_ERROR]
    assert results[0].ok and results[0].median == pytest.approx(1e-5)
    assert results[0].stats["sm_clock_mhz"] == 1980 and results[0].stats["registers"] == 32
    assert "worker replaced" in results[1].message
    # sticky error, timeout, crash and the sticky WorkerError each cost the worker; OOR does not
    assert worker.killed == 4
    # a fresh worker means preparing the task's inputs again (a wrong answer keeps them)
    assert worker.calls.count("prepare_task") == 5
    assert worker.closed
    for r in results:
        if r.error != MeasureError.NO_ERROR:
            assert not r.ok and r.median == math.inf and r.build_s == 0.5


def test_failed_builds_pass_through_without_running():
    worker = FakeWorker([])
    inputs, builds = _item()
    failed = BuildResult(None, builds[0].source, error=MeasureError.OUT_OF_RESOURCES, message="too much smem",
                         stats={"registers": 255})
    with CudaRunner(worker_factory=lambda d: worker) as runner:
        (result,) = runner.run(inputs, [failed])
    assert result.error == MeasureError.OUT_OF_RESOURCES and result.stats["registers"] == 255
    assert worker.calls == []


def test_batches_spread_over_gpus_in_order():
    workers = {0: FakeWorker([OK] * 3), 1: FakeWorker([dict(OK, costs=[2e-5])] * 2)}
    inputs, builds = _item(5)
    with CudaRunner(devices=(0, 1), worker_factory=lambda d: workers[d]) as runner:
        results = runner.run(inputs, builds)
    assert [r.median for r in results] == [1e-5, 2e-5, 1e-5, 2e-5, 1e-5]
    assert not workers[0].script and not workers[1].script


def _source(block, grid, smem):
    args = (ArgSpec("X", "in", "float32", ("N",)), ArgSpec("Y", "out", "float32", ("N",)))
    return KernelSource("cuda", "", "k", args, (("block", block), ("grid", grid), ("smem", smem)))


def test_resource_problems_from_the_ptxas_report():
    fits = _source((256, 1, 1), (100, 1, 1), 64 << 10)
    assert cuda_resource_problems(fits, {"registers": 128, "smem_bytes": 1024}, SM90, {"N": 1}) == []
    too_many_regs = cuda_resource_problems(fits, {"registers": 255, "smem_bytes": 0}, SM90, {"N": 1})
    assert too_many_regs == []  # 255 x 256 = 65280 <= 65536
    big_block = _source((1024, 1, 1), (1, 1, 1), 0)
    (problem,) = cuda_resource_problems(big_block, {"registers": 72}, SM90, {"N": 1})
    assert "72 registers x 1024 threads" in problem
    smem = cuda_resource_problems(_source((128, 1, 1), (1, 1, 1), 200 << 10), {"registers": 32, "smem_bytes": 40 << 10},
                                  SM90, {"N": 1})
    assert len(smem) == 1 and "shared memory" in smem[0]
    grid = cuda_resource_problems(_source((128, 1, 1), (1, 70000, 1), 0), {"registers": 32}, SM90, {"N": 1})
    assert len(grid) == 1 and "grid" in grid[0]
    threads = cuda_resource_problems(_source((2048, 1, 1), (1, 1, 1), 0), {"registers": 16}, SM90, {"N": 1})
    assert any("2048 threads" in p for p in threads)


@pytest.mark.tools("nvcc")
def test_builder_reports_out_of_resources_after_compiling():
    """nvcc builds the kernel, the check on its report and launch turns it away."""
    template = get_template(fakes.CUDA_FAULT_OP, "cuda")
    task = Task.make(fakes.CUDA_FAULT_OP, {"N": 1000})
    space = template.space(task, SM90)
    inputs = [MeasureInput(task, space.from_values({"mode": m, "block": 128}), SM90) for m in ("ok", "fat")]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        ok, fat = builder.build(inputs)
    assert ok.error == MeasureError.NO_ERROR and ok.stats["registers"] > 0
    assert fat.error == MeasureError.OUT_OF_RESOURCES and fat.artifact is None
    assert "shared memory" in fat.message and fat.stats["registers"] > 0


# ----------------------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu_target():
    return Target.cuda(0)


@pytest.mark.gpu
def test_real_kernels_verify_and_time(gpu_target):
    cases = [("gemv", {"M": 1, "N": 4096, "K": 4096}, "float16"), ("gemm", {"M": 256, "N": 256, "K": 256}, "bfloat16"),
             ("gemm", {"M": 100, "N": 70, "K": 130}, "float32"),
             ("gemv_q4", {"M": 1, "N": 4096, "K": 4096}, "float16"), ("gemm_q4", {"M": 40, "N": 512, "K": 1024}, "bfloat16")]
    inputs = []
    for op, shape, dtype in cases:
        template = get_template(op, "cuda")
        task = Task.make(op, shape, dtype)
        space = template.space(task, gpu_target)
        for config in [template.default(task, gpu_target)] + space.sample(np.random.default_rng(0), 2):
            inputs.append(MeasureInput(task, config, gpu_target))
    failures = failures_on_the_gpu(inputs)
    assert not failures, failures
    for r in results:
        assert len(r.costs) >= 10 and 1e-7 < r.median < 1.0
        assert r.stats["p20"] <= r.median <= r.stats["p80"]
        assert r.stats["device"]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_warpgroup_mma_gemm_on_the_gpu(gpu_target, dtype):
    """Hopper wgmma: its descriptors and layouts are checked only by the emulator elsewhere."""
    template = get_template("gemm", "cuda")
    configs = [dict(bm=128, bn=256, wm=64, stages=4, vec=8, split_k=1, group_m=8),
               dict(bm=256, bn=128, wm=128, stages=3, vec=8, split_k=1, group_m=8),
               dict(bm=64, bn=64, wm=64, stages=2, vec=4, split_k=2, group_m=1)]
    inputs = []
    for shape in ({"M": 512, "N": 512, "K": 512}, {"M": 300, "N": 200, "K": 136}):
        task = Task.make("gemm", shape, dtype)
        space = template.space(task, gpu_target)
        for values in configs:
            values = dict(values, instr="wgmma", bk=64, wn=16, swizzle="xor")
            if space.is_valid(values):
                inputs.append(MeasureInput(task, space.from_values(values), gpu_target))
    assert len(inputs) >= 4
    failures = failures_on_the_gpu(inputs)
    assert not failures, failures


@pytest.mark.gpu
def test_int4_gemv_seeds_on_the_gpu(gpu_target):
    """The int4 GEMV's seeds, the pipelined ones (weights loaded through registers ahead of use)
    among them, verified on the hardware at decode shapes: fp16, bf16 with zero points, M = 16."""
    template = get_template("gemv_q4", "cuda")
    inputs = []
    for shape, dtype, attrs in (({"M": 1, "N": 4096, "K": 4096}, "float16", {"group_size": 128}),
                                ({"M": 1, "N": 11008, "K": 4096}, "bfloat16", {"group_size": 64, "zero_point": True}),
                                ({"M": 16, "N": 4096, "K": 11008}, "float16", {"group_size": 128})):
        task = Task.make("gemv_q4", shape, dtype, attrs)
        inputs += seed_inputs(template, task, gpu_target)
    assert any(i.config["prefetch"] == 2 for i in inputs)
    failures = failures_on_the_gpu(inputs)
    assert not failures, failures


@pytest.mark.gpu
def test_fused_decode_gemvs_on_the_gpu(gpu_target):
    """The GEMVs of the resident decode step (RMSNorm before, SwiGLU or the residual add after)
    at llama-2-7b's shapes, their seeds verified on the hardware, float16 and int4."""
    norm = {"norm": "rmsnorm", "eps": 1e-5}
    inputs = []
    for op, shape, dtype, attrs in (
            ("gemv", {"M": 1, "N": 22016, "K": 4096}, "float16", {**norm, "act": "swiglu"}),
            ("gemv", {"M": 1, "N": 4096, "K": 11008}, "bfloat16", {"residual": True}),
            ("gemv_q4", {"M": 1, "N": 12288, "K": 4096}, "float16", {**norm, "group_size": 128}),
            ("gemv_q4", {"M": 1, "N": 22016, "K": 4096}, "bfloat16", {**norm, "act": "swiglu", "group_size": 128}),
            ("gemv_q4", {"M": 16, "N": 4096, "K": 11008}, "float16", {"residual": True, "group_size": 128})):
        template = get_template(op, "cuda")
        task = Task.make(op, shape, dtype, attrs)
        inputs += seed_inputs(template, task, gpu_target)[:4]
    failures = failures_on_the_gpu(inputs)
    assert not failures, failures


@pytest.mark.gpu
def test_cuda_faults_each_cost_one_trial_and_the_job_goes_on(gpu_target):
    template = get_template(fakes.CUDA_FAULT_OP, "cuda")
    task = Task.make(fakes.CUDA_FAULT_OP, {"N": 1 << 20})
    space = template.space(task, gpu_target)
    modes = ["ok", "oob", "ok", "hang", "ok", "wrong", "ok", "trap", "ok", "fat", "slow", "scribble", "ok"]
    inputs = [MeasureInput(task, space.from_values({"mode": m, "block": 128}), gpu_target) for m in modes]
    with LocalBuilder(n_parallel=4, timeout_s=300) as builder, CudaRunner(timeout_s=10) as runner:
        results = runner.run(inputs, builder.build(inputs))
        worker = runner._workers[0]
        assert worker.generation >= 4  # replaced after oob, hang and trap
    errors = [r.error for r in results]
    assert errors == [MeasureError.NO_ERROR, MeasureError.RUNTIME_ERROR, MeasureError.NO_ERROR,
                      MeasureError.RUN_TIMEOUT, MeasureError.NO_ERROR, MeasureError.WRONG_ANSWER,
                      MeasureError.NO_ERROR, MeasureError.RUNTIME_ERROR, MeasureError.NO_ERROR,
                      MeasureError.OUT_OF_RESOURCES, MeasureError.NO_ERROR, MeasureError.WRONG_ANSWER,
                      MeasureError.NO_ERROR], [(e.name, r.message) for e, r in zip(errors, results)]
    assert "illegal" in results[1].message
    assert "modified its input X" in results[11].message
    assert results[10].median > results[0].median  # the slow kernel is slower


@pytest.mark.gpu
def test_a_gpu_tuning_job_never_picks_a_faulty_best(gpu_target, tmp_path):
    from autotune.tuners import GridTuner
    from records import RecordLog

    task = Task.make(fakes.CUDA_FAULT_OP, {"N": 1 << 16})
    tuner = GridTuner(task, gpu_target)
    log = RecordLog(tmp_path / "faults.jsonl")
    with LocalBuilder(n_parallel=4, timeout_s=300) as builder, CudaRunner(timeout_s=10) as runner:
        summary = tuner.tune(len(tuner.space), builder, runner, batch_size=7, log=log)
    records = log.records()
    assert summary.trials == len(records) == len(tuner.space)
    assert summary.best is not None and summary.best.config["mode"] in ("ok", "slow")


@pytest.mark.gpu
def test_every_cuda_template_default_runs_at_its_example_shape(gpu_target):
    from search_space import list_templates

    inputs = []
    for template in list_templates("cuda"):
        if not type(template).__module__.startswith("search_space.templates"):
            continue
        for dtype in template.dtypes:
            task = Task.make(template.op, dict(template.example_shape), dtype, dynamic=template.dynamic_dims)
            inputs.append(MeasureInput(task, template.default(task, gpu_target), gpu_target))
    failures = failures_on_the_gpu(inputs)
    assert not failures, failures
