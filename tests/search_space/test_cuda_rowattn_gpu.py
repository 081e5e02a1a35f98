"""The CUDA row-wise and attention templates on a GPU: awkward shapes, every dtype, runtime
sizes other than the tuned ones, against the float64 references.

Kernels are built by the LocalBuilder (nvcc) and run through pycuda directly: cubin
loaded with module_from_buffer, launched with resolve_launch, outputs poisoned with NaN
before every launch, workspaces zero-filled once at allocation (the convention the
split-KV decode relies on) and reused across calls, kernels with more than 48 KiB of
dynamic shared memory opted in first.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.verify import check_output
from runtime import tensor_map
from search_space import Target, Task, get_template
from search_space.codegen.cuda import resolve_launch
from search_space.ops.common import numpy_dtype

pytestmark = pytest.mark.gpu

DTYPES = ("float32", "float16", "bfloat16")
SMEM_DEFAULT_LIMIT = 48 << 10


@pytest.fixture(scope="module")
def drv():
    import pycuda.driver as driver

    driver.init()
    context = driver.Device(0).make_context()
    yield driver
    context.pop()
    context.detach()


@pytest.fixture(scope="module")
def target(drv):
    return Target.cuda(0)


@pytest.fixture(scope="module")
def builder():
    with LocalBuilder(n_parallel=min(16, os.cpu_count() or 2), timeout_s=300) as b:
        yield b


def poison(shape, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return np.full(shape, 0xFFFF, dtype=np.uint16)   # a bfloat16 NaN
    return np.full(shape, np.nan, dtype=numpy_dtype(dtype))


def run_and_check(drv, build, tuned: Task, runs: list[dict], repeat: int = 1, seed: int = 0) -> list[str]:
    """Launch the built kernel at each runtime size in ``runs`` (dynamic dims only differ
    from ``tuned``), ``repeat`` times each on fresh poison, and compare with the reference."""
    template = get_template(tuned.op, "cuda")
    source = build.source
    module = drv.module_from_buffer(Path(build.artifact).read_bytes())
    kernel = module.get_function(source.entry)
    problems = []
    workspaces = {a.name: drv.mem_alloc(max(a.nbytes, 1)) for a in source.args if a.role == "workspace"}
    for name, arg in ((a.name, a) for a in source.args if a.role == "workspace"):
        drv.memset_d8(workspaces[name], 0, max(arg.nbytes, 1))
    for i, overrides in enumerate(runs):
        task = tuned.with_dims(**overrides)
        dims = task.dims
        rng = np.random.default_rng(seed + i)
        inputs = template.make_inputs(task, rng)
        reference = template.reference(task, inputs)
        grid, block, smem = resolve_launch(source.launch_dims, dims)
        if smem > SMEM_DEFAULT_LIMIT:
            kernel.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        params, outputs, pointers = [], {}, {}
        for arg in source.args:
            if arg.role == "in":
                params.append(drv.to_device(np.ascontiguousarray(inputs[arg.name])))
                pointers[arg.name] = int(params[-1])
            elif arg.role == "out":
                shape = arg.resolve_shape(dims)
                device = drv.mem_alloc(max(int(np.prod(shape)) * numpy_dtype(arg.dtype).itemsize, 1))
                outputs[arg.name] = (device, shape, arg.dtype)
                params.append(device)
                pointers[arg.name] = int(device)
            elif arg.role == "workspace":
                params.append(workspaces[arg.name])
            elif arg.role == "scalar":
                params.append(np.int64(dims[arg.name]))
        maps = [a for a in source.args if a.role == "tensor_map"]  # first in the call, by value
        if maps:
            arrays = {a.name: a for a in source.args}
            params = [np.frombuffer(tensor_map.encode(drv, m, arrays[m.of], pointers[m.of], dims), dtype="V128")[0]
                      for m in maps] + params
        for attempt in range(repeat):
            for device, shape, dtype in outputs.values():
                drv.memcpy_htod(device, poison(shape, dtype))
            kernel(*params, block=block, grid=grid, shared=smem)
            drv.Context.synchronize()
            for name, (device, shape, dtype) in outputs.items():
                got = np.empty(shape, dtype=numpy_dtype(dtype))
                drv.memcpy_dtoh(got, device)
                problem = check_output(name, got, reference[name], template.tolerance(task), dtype)
                if problem:
                    problems.append(f"{task.key} [{build.source.entry}] call {attempt}: {problem}")
    return problems


def configs_for(template, task: Task, target: Target, wanted: list[dict], n_sampled: int) -> list:
    space = template.space(task, target)
    default = template.default(task, target)
    configs = [default]
    for overrides in wanted:
        values = dict(default.as_dict(), **overrides)
        if space.accepts(values):
            configs.append(space.from_values(values))
    configs += space.sample(np.random.default_rng(7), n_sampled)
    unique = {c.index: c for c in configs}
    return list(unique.values())


def check_cases(drv, builder, target, cases, n_sampled: int = 2, repeat: int = 1) -> None:
    """``cases``: (op, tuned shape, attrs, dynamic dims, runtime overrides, wanted config overrides)."""
    jobs = []
    for op, shape, attrs, dynamic, runs, wanted in cases:
        template = get_template(op, "cuda")
        for dtype in DTYPES:
            task = Task.make(op, shape, dtype, attrs=attrs, dynamic=dynamic)
            for config in configs_for(template, task, target, wanted, n_sampled):
                jobs.append((task, config, runs))
    builds = builder.build([MeasureInput(task, config, target) for task, config, _ in jobs])
    problems = []
    for (task, config, runs), build in zip(jobs, builds):
        if build.error != MeasureError.NO_ERROR:
            problems.append(f"{task.key} {config}: build failed: {build.message}")
            continue
        problems += [f"{p} with {config}" for p in run_and_check(drv, build, task, runs, repeat)]
    assert not problems, "\n".join(problems[:20])


ROW_WANTED = [dict(mapping="warp", cache="regs"), dict(mapping="warp", cache="smem"),
              dict(mapping="block", cache="reread", unroll=2), dict(mapping="block", cache="smem", stream=1),
              dict(mapping="warp", cache="reread", vec=1)]


def test_row_ops_on_gpu(drv, builder, target):
    runs = [{"M": 1}, {"M": 3}, {"M": 64}, {"M": 200}]
    cases = []
    for n in (1, 24, 1000, 4100):
        for op, attrs in (("softmax", {}), ("rmsnorm", {}), ("rmsnorm", {"residual": True}), ("layernorm", {})):
            cases.append((op, {"M": 64, "N": n}, attrs, ("M",), runs, ROW_WANTED))
    cases.append(("softmax", {"M": 9, "N": 11008}, {}, (), [{}], ROW_WANTED))   # static M
    check_cases(drv, builder, target, cases, n_sampled=1)


def test_qk_norm_on_gpu(drv, builder, target):
    """Qwen3's per-head q/k norm: Qwen3-8B's heads (32 + 2 x 8 of 128), an odd small group and
    256 dims, T a runtime argument below and above the tuned size; Qwen3-14B's heads with T
    compiled in."""
    runs = [{"T": 1}, {"T": 3}, {"T": 64}, {"T": 200}]
    cases = [("qk_norm", {"T": 64, "H": h, "HKV": hkv, "D": d}, {}, ("T",), runs, ROW_WANTED)
             for h, hkv, d in ((32, 8, 128), (5, 1, 64), (16, 2, 256))]
    cases.append(("qk_norm", {"T": 9, "H": 40, "HKV": 8, "D": 128}, {"eps": 1e-5}, (), [{}], ROW_WANTED))
    check_cases(drv, builder, target, cases, n_sampled=1)


def test_qk_norm_by_projection_on_gpu(drv, builder, target):
    """OLMo 2's q/k norm over the whole q and k projections: OLMo 2 7B's heads (32 + 2 x 32 of
    128), a GQA group with D = 38 (vectors of 2 at most) and 256 dims, T a runtime argument below
    and above the tuned size; 40 + 2 x 8 heads with T compiled in."""
    runs = [{"T": 1}, {"T": 3}, {"T": 64}, {"T": 200}]
    wanted = [dict(threads=128), dict(threads=512), dict(vec=1)]
    cases = [("qk_norm", {"T": 64, "H": h, "HKV": hkv, "D": d}, {"span": "projection"}, ("T",), runs, wanted)
             for h, hkv, d in ((32, 32, 128), (5, 1, 38), (16, 2, 256))]
    cases.append(("qk_norm", {"T": 9, "H": 40, "HKV": 8, "D": 128}, {"span": "projection", "eps": 1e-5}, (), [{}],
                  wanted))
    check_cases(drv, builder, target, cases, n_sampled=1)


def test_elementwise_ops_on_gpu(drv, builder, target):
    runs = [{"M": 1}, {"M": 5}, {"M": 64}, {"M": 333}]
    wanted = [dict(grid="persistent"), dict(vec=1, unroll=4), dict(stream=1, unroll=1)]
    cases = [(op, {"M": 64, "N": n}, {}, ("M",), runs, wanted)
             for op in ("add", "swiglu", "geglu", "gelu") for n in (1, 7, 1001, 4096)]
    check_cases(drv, builder, target, cases, n_sampled=1)


def test_rope_on_gpu(drv, builder, target):
    runs = [{"T": 1}, {"T": 7}, {"T": 16}, {"T": 50}]
    wanted = [dict(trig="registers"), dict(tokens=4), dict(vec=1)]
    cases = [("rope", {"T": 16, "H": h, "D": d}, attrs, ("T",), runs, wanted)
             for h, d, attrs in ((1, 2, {}), (3, 80, {"theta": 500000.0}), (32, 128, {}),
                                 (8, 128, {"theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 8192}),
                                 (4, 64, {"theta": 10000.0, "rope_type": "linear", "factor": 4.0}))]
    check_cases(drv, builder, target, cases, n_sampled=1)


def test_rope_append_on_gpu(drv, builder, target):
    """The resident decode step's rope and cache write in one kernel, at batch 1 and 3 (one
    position past the cache), Llama 2 and Llama 3 heads."""
    cases = [("rope_append", {"B": b, "H": h, "HKV": hkv, "D": 128, "S": 64}, attrs, ("S",), [{}, {"S": 40}],
              [dict(vec=1), dict(threads=32)])
             for b, h, hkv, attrs in ((1, 32, 32, {}), (3, 32, 8, {"theta": 500000.0, "rope_type": "llama3",
                                                                   "factor": 8.0, "low_freq_factor": 1.0,
                                                                   "high_freq_factor": 4.0,
                                                                   "original_max_position_embeddings": 8192}))]
    check_cases(drv, builder, target, cases, n_sampled=1)


def test_rope_append_attention_on_gpu(drv, builder, target):
    """The captured step's attention with rope and the cache write: ragged positions (one past
    the cache), split and unsplit, Llama 2 and Llama 3 heads, every config called twice on the
    same workspace."""
    llama3 = {"theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    wanted = [dict(splits=1), dict(splits=8), dict(lanes=32, vec=1)]
    cases = [("rope_append_attention", {"B": b, "H": h, "HKV": hkv, "D": 128, "S": 512, "L": 512}, attrs, ("S", "L"),
              [{"L": 1}, {"L": 300}, {"S": 700, "L": 699}], wanted)
             for b, h, hkv, attrs in ((1, 32, 32, {}), (3, 32, 8, llama3))]
    # a sliding window: the rows from P - 99 on (all of them at L = 1)
    cases.append(("rope_append_attention", {"B": 3, "H": 32, "HKV": 8, "D": 128, "S": 512, "L": 512}, {"window": 100},
                  ("S", "L"), [{"L": 1}, {"L": 300}], wanted))
    # soft-capped (Gemma 2's): the new row's score too; with a window
    cases.append(("rope_append_attention", {"B": 3, "H": 32, "HKV": 8, "D": 128, "S": 512, "L": 512},
                  {"window": 100, "softcap": 2.0}, ("S", "L"), [{"L": 1}, {"L": 300}], wanted))
    check_cases(drv, builder, target, cases, n_sampled=1, repeat=2)


def test_attention_decode_on_gpu(drv, builder, target):
    """Split counts from 1 up, L from 1 to S (S itself a runtime argument), every config
    called twice on the same workspace: the second call proves the counters were reset."""
    wanted = [dict(splits=1), dict(splits=4), dict(splits=16, unroll=1), dict(lanes=32, vec=1), dict(warps=1)]
    cases = [
        ("attention_decode", {"B": 1, "H": 4, "HKV": 4, "D": 64, "S": 512, "L": 512}, {}, ("S", "L"),
         [{"L": 1}, {"L": 37}, {"L": 512}, {"S": 700, "L": 699}], wanted),
        ("attention_decode", {"B": 2, "H": 8, "HKV": 2, "D": 128, "S": 512, "L": 512}, {}, ("S", "L"),
         [{"L": 257}, {"S": 300, "L": 300}], wanted),
        ("attention_decode", {"B": 3, "H": 6, "HKV": 1, "D": 80, "S": 64, "L": 33}, {"scale": 0.3}, (), [{}], wanted),
        # sliding window over ragged lengths: the splits cut each sequence's last 100 rows
        ("attention_decode", {"B": 3, "H": 8, "HKV": 2, "D": 128, "S": 512, "L": 512},
         {"window": 100, "lengths": "per_sequence"}, ("S", "L"), [{"L": 1}, {"L": 77}, {"L": 512}], wanted),
        # soft-capping: a small cap over ragged lengths, Gemma 2's cap of 50 on scores scaled up to reach it
        ("attention_decode", {"B": 3, "H": 8, "HKV": 2, "D": 128, "S": 512, "L": 512},
         {"softcap": 2.0, "lengths": "per_sequence"}, ("S", "L"), [{"L": 1}, {"L": 512}], wanted),
        ("attention_decode", {"B": 2, "H": 8, "HKV": 4, "D": 256, "S": 300, "L": 300}, {"scale": 1.0, "softcap": 50.0},
         ("S", "L"), [{"L": 300}], wanted),
    ]
    check_cases(drv, builder, target, cases, n_sampled=1, repeat=2)


def test_attention_prefill_on_gpu(drv, builder, target):
    wanted = [dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0, block_k=64, stages=2, consumers=1),
              dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0, block_k=128, stages=2, consumers=2),
              dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0, block_k=64, stages=3, consumers=2, overlap=1),
              dict(impl="mma", block_k=32, stages=3, q_regs=0), dict(impl="mma", warps=8, block_k=128),
              dict(impl="mma", warp_rows=32, block_k=32, q_regs=0),
              dict(impl="simt", warp_rows=1, block_k=64, stages=1, q_regs=0),
              dict(impl="simt", warp_rows=4, block_k=32, stages=1, q_regs=0)]
    runs = [{"T": 1}, {"T": 77}, {"T": 128}, {"T": 300}]
    cases = [
        ("attention_prefill", {"B": 2, "T": 128, "H": 4, "HKV": 2, "D": 64}, {}, ("T",), runs, wanted),
        ("attention_prefill", {"B": 1, "T": 128, "H": 8, "HKV": 2, "D": 128}, {"causal": False}, ("T",), runs, wanted),
        ("attention_prefill", {"B": 1, "T": 40, "H": 3, "HKV": 1, "D": 80}, {}, (), [{}], wanted),
        ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 1, "D": 72}, {"scale": 0.2}, (), [{}], wanted),
        # sliding windows: key tiles skipped and masked below each row's window; one key a row
        ("attention_prefill", {"B": 2, "T": 128, "H": 4, "HKV": 2, "D": 64}, {"window": 33}, ("T",), runs, wanted),
        ("attention_prefill", {"B": 1, "T": 200, "H": 2, "HKV": 1, "D": 128}, {"window": 1}, (), [{}], wanted),
        # soft-capping before the mask: causal, with a window, not causal; Gemma 2's cap of 50 on
        # scores scaled up to reach it (D = 256: mma and simt)
        ("attention_prefill", {"B": 2, "T": 128, "H": 4, "HKV": 2, "D": 64}, {"softcap": 2.0}, ("T",), runs, wanted),
        ("attention_prefill", {"B": 1, "T": 200, "H": 2, "HKV": 1, "D": 128}, {"window": 33, "softcap": 1.5}, (), [{}],
         wanted),
        ("attention_prefill", {"B": 1, "T": 128, "H": 8, "HKV": 2, "D": 128}, {"causal": False, "softcap": 2.0}, ("T",),
         runs, wanted),
        ("attention_prefill", {"B": 1, "T": 150, "H": 4, "HKV": 2, "D": 256}, {"scale": 1.0, "softcap": 50.0}, (), [{}],
         wanted),
    ]
    check_cases(drv, builder, target, cases, n_sampled=1)
