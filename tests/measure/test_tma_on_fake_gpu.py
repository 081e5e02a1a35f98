"""The warp-specialised TMA gemm end to end on the fake GPU: the runner encodes a descriptor
per ``tensor_map`` argument from the device buffers it launches on and passes it by value;
an exported library's kernels do the same when they are bound (``runtime.tensor_map``).
The emulator reads the descriptors the fake driver encodes, so a descriptor of the wrong
array, box or stride gives a wrong answer here."""
from __future__ import annotations

import json

import numpy as np
import pytest
from fakes import FAKE_GPU_TARGET, FAKE_GPU_TIMING, register_library
from test_cuda_on_fake_gpu import build_and_register

import runtime
from export import export_library
from measure import CudaRunner, MeasureError, MeasureInput
from measure.verify import check_output
from records import Record, RecordLog
from runtime.abi import numpy_dtype
from runtime.library import LibraryFormatError
from search_space import Task, get_template

pytestmark = pytest.mark.tools("nvcc")

TMA = dict(instr="wgmma", bk=64, wn=16, swizzle="xor", vec=8, split_k=1, pipeline="tma")


def _input(shape, dtype, **config):
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", shape, dtype)
    space = template.space(task, FAKE_GPU_TARGET)
    values = dict(TMA, **config)
    assert space.accepts(values), space.violations(space.from_values(values))
    return MeasureInput(task, space.from_values(values), FAKE_GPU_TARGET)


def test_tma_gemm_is_measured_and_exported_and_runs_from_the_library(fake_gpu, tmp_path):
    inputs = [
        # persistent: the fake GPU has 2 SMs, so each block walks 3 of the 6 tiles
        _input({"M": 130, "N": 90, "K": 200}, "float16", bm=64, bn=32, wm=64, stages=3, group_m=8, persistent=1),
        # a cluster of the 2 blocks, walking pairs of row tiles that share W's tile
        _input({"M": 130, "N": 90, "K": 200}, "bfloat16", bm=64, bn=32, wm=64, stages=3, group_m=8, persistent=1,
               cluster=2),
        _input({"M": 70, "N": 40, "K": 72}, "bfloat16", bm=128, bn=64, wm=64, stages=2, group_m=1, persistent=0,
               epilogue="smem"),  # a descriptor of the output too: Y is written back by TMA stores
    ]
    builds = build_and_register(fake_gpu, inputs)
    assert [a.role for a in builds[0].source.args][:2] == ["tensor_map", "tensor_map"]
    assert builds[0].source.launch_dims["grid"] == (2, 1, 1)
    with CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        results = runner.run(inputs, builds)
    assert [r.error for r in results] == [MeasureError.NO_ERROR] * 3, [r.message for r in results]

    log = RecordLog(tmp_path / "tma.jsonl")
    log.append(Record.from_measure(i, r, tuner="test") for i, r in zip(inputs, results))
    export_library(log.records(), tmp_path / "lib", "cuda")
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert len(manifest["kernels"]) == 3
    maps = sorted([(a["of"], a["shape"][0]) for a in k["args"] if a["role"] == "tensor_map"] for k in manifest["kernels"])
    assert maps == [[("X", 64), ("W", 16)], [("X", 64), ("W", 32)], [("X", 128), ("W", 64), ("Y", 64)]]
    register_library(fake_gpu, tmp_path / "lib")

    library = runtime.load(tmp_path / "lib")
    template = get_template("gemm", "cuda")
    rng = np.random.default_rng(1)
    for inp in inputs:
        task = inp.task
        kernel = library.get("gemm", task.dims, task.dtype)
        data = template.make_inputs(task, rng)
        want = template.reference(task, data)["Y"]
        assert check_output("Y", kernel(**data), want, template.tolerance(task), task.dtype) is None

        # device buffers bound once: the descriptors are encoded from the bound addresses
        from runtime.arrays import CudaArrays

        arrays = CudaArrays()
        bound = {n: arrays.upload(a) for n, a in data.items()}
        bound["Y"] = arrays.empty(want.shape, numpy_dtype(task.dtype))
        kernel.bind(bound)()
        got = arrays.get(bound["Y"])
        assert check_output("Y", got, want, template.tolerance(task), task.dtype) is None


def test_a_tma_box_the_hardware_cannot_copy_is_refused_when_the_library_loads(fake_gpu, tmp_path):
    inp = _input({"M": 70, "N": 40, "K": 72}, "float16", bm=64, bn=32, wm=64, stages=2, group_m=1, persistent=0)
    (build,) = build_and_register(fake_gpu, [inp])
    with CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        (result,) = runner.run([inp], [build])
    log = RecordLog(tmp_path / "tma.jsonl")
    log.append([Record.from_measure(inp, result, tuner="test")])
    export_library(log.records(), tmp_path / "lib", "cuda")
    path = tmp_path / "lib" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["kernels"][0]["args"][0]["shape"] = [64, 128]  # 256-byte rows: wider than the 128-byte swizzle
    path.write_text(json.dumps(manifest))
    with pytest.raises(LibraryFormatError, match="is not one TMA can copy"):
        runtime.load(tmp_path / "lib")


def test_the_hopper_seeds_compile_for_sm90a_without_spills():
    """The TMA schedules the tuner tries first at a large shape (two consumer warpgroups with
    128 accumulators each, registers moved by setmaxnreg), through nvcc and ptxas."""
    from measure import LocalBuilder
    from search_space import Target
    from search_space.templates.cuda.gemm import TENSOR_CORE_SEEDS

    template = get_template("gemm", "cuda")
    sm90 = Target.from_name("sm_90a")
    task = Task.make("gemm", {"M": 4096, "N": 4096, "K": 4096}, "bfloat16")
    space = template.space(task, sm90)
    seeds = [s for s in TENSOR_CORE_SEEDS if s.get("pipeline") == "tma"]
    inputs = [MeasureInput(task, space.from_values(s), sm90) for s in seeds if space.accepts(s)]
    assert len(inputs) == len(seeds) >= 4 and any(s.get("epilogue") == "smem" for s in seeds)
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    for inp, build in zip(inputs, builds):
        assert build.error == MeasureError.NO_ERROR, build.message
        assert build.stats["spill_stores"] == 0 and build.stats["registers"] <= 168, (str(inp.config), build.stats)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_tma_gemm_on_the_gpu(dtype):
    """The hardware's word on what only the emulator checks elsewhere: TMA's swizzle and edge
    fill, the mbarrier phases, setmaxnreg, the persistent walk, the TMA-store epilogue and
    clusters with multicast."""
    from measure import LocalBuilder
    from search_space import Target

    target = Target.cuda(0)
    template = get_template("gemm", "cuda")
    variants = [dict(bm=128, bn=256, wm=64, stages=4, persistent=1, epilogue="direct"),
                dict(bm=128, bn=128, wm=64, stages=3, persistent=1, epilogue="smem"),
                dict(bm=256, bn=128, wm=128, stages=3, persistent=0, epilogue="direct"),
                dict(bm=64, bn=64, wm=64, stages=2, persistent=0, epilogue="smem"),
                dict(bm=128, bn=256, wm=64, stages=4, persistent=1, epilogue="direct", cluster=2),
                dict(bm=64, bn=128, wm=64, stages=3, persistent=0, epilogue="smem", cluster=2)]
    inputs = []
    for shape in ({"M": 4096, "N": 2048, "K": 512}, {"M": 300, "N": 200, "K": 136}):
        task = Task.make("gemm", shape, dtype)
        space = template.space(task, target)
        for values in variants:
            for group_m in (8, 1):
                if space.accepts(dict(TMA, group_m=group_m, **values)):
                    inputs.append(MeasureInput(task, space.from_values(dict(TMA, group_m=group_m, **values)), target))
                    break
    assert len(inputs) >= 9
    with LocalBuilder(timeout_s=300) as builder, CudaRunner(timeout_s=60, policy=FAKE_GPU_TIMING) as runner:
        results = runner.run(inputs, builder.build(inputs))
    failures = [(i.task.key, str(i.config), r.error.name, r.message) for i, r in zip(inputs, results) if not r.ok]
    assert not failures, failures


def test_tma_attention_from_a_library_at_a_shorter_prompt(fake_gpu, tmp_path):
    """The Hopper prefill through an exported library: bound once at the length it was tuned
    for, then called at a shorter T. Its descriptors are encoded again at that T, so TMA reads
    zeros past it: rows of K and V past T that hold infinities (a cache's stale rows) would
    otherwise meet P = 0 on the tensor cores and make NaN."""
    template = get_template("attention_prefill", "cuda")
    task = Task.make("attention_prefill", {"B": 1, "T": 96, "H": 4, "HKV": 2, "D": 64}, "float16", dynamic=("T",))
    space = template.space(task, FAKE_GPU_TARGET)
    config = space.from_values(dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0, block_k=64, stages=2,
                                    consumers=1, overlap=1))
    inp = MeasureInput(task, config, FAKE_GPU_TARGET)
    (build,) = build_and_register(fake_gpu, [inp])
    with CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        (result,) = runner.run([inp], [build])
    assert result.error == MeasureError.NO_ERROR, result.message
    log = RecordLog(tmp_path / "attn.jsonl")
    log.append([Record.from_measure(inp, result, tuner="test")])
    export_library(log.records(), tmp_path / "lib", "cuda")
    register_library(fake_gpu, tmp_path / "lib")
    kernel = runtime.load(tmp_path / "lib").get("attention_prefill", task.dims, task.dtype, dynamic=["T"])

    from runtime.arrays import CudaArrays

    arrays = CudaArrays()
    rng = np.random.default_rng(3)
    full = template.make_inputs(task, rng)
    poisoned = {n: a.copy() for n, a in full.items()}
    for name in ("K", "V"):
        poisoned[name][:, 37:] = np.inf
    bound = {n: arrays.upload(a) for n, a in poisoned.items()}
    bound["O"] = arrays.empty((1, 96, 4, 64), np.float16)
    call = kernel.bind(bound)
    short = task.with_dims(T=37)
    data = {n: np.ascontiguousarray(a[:, :37]) for n, a in full.items()}  # one batch: the first 37 rows
    call(T=37)
    got = arrays.get(bound["O"])[:, :37]
    assert check_output("O", got, template.reference(short, data)["O"], template.tolerance(short), "float16") is None
