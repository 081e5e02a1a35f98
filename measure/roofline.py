"""Measure the CPU's ceilings, the roofline that tuned kernels are judged against.

Generated kernels, run with the same thread count as the kernel under test: an FMA loop
with enough independent accumulators to keep every FMA unit busy (peak FLOP/s), and a
vectorised sum over buffers sized for L2, for L3 and far beyond the caches (read
bandwidth of each level). A kernel's memory roof is the bandwidth of the level its data
fits in: a small GEMV served from L2 is not held to DRAM speed.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from search_space import ArgSpec, KernelSource, Target
from search_space.codegen import llvm as cg

from .timing import MAX_LAST_LEVEL_CACHE

FMA_CHAINS = 16
FMA_ITERATIONS = 1 << 19
READ_BYTES = 512 << 20
CHUNK = 1 << 12  # floats per parallel chunk of the read probe


def _fma_kernel(lanes: int, threads: int) -> KernelSource:
    module = cg.new_module("peak")
    body, kb = cg.chunk_body(module, "peak_chunk", n_pointers=2, n_scalars=0)
    src, out, begin, end, thread = body.args
    b = kb.b
    x = kb.load_vec(src, 0, lanes)
    y = kb.load_vec(src, lanes, lanes)
    slots = [kb.local(cg.vec(lanes)) for _ in range(FMA_CHAINS)]
    for i, slot in enumerate(slots):
        b.store(kb.load_vec(src, 2 * lanes + i * lanes, lanes), slot)
    with kb.loop(begin, end, 1, name="c"):
        with kb.loop(0, FMA_ITERATIONS, 1, name="i"):
            for slot in slots:
                b.store(kb.fma(b.load(slot), x, y), slot)
    total = b.load(slots[0])
    for slot in slots[1:]:
        total = kb.fadd(total, b.load(slot))
    kb.store_vec(total, out, b.mul(thread, cg.i64(lanes)))
    kb.ret()
    cg.parallel_entry(module, "peak", body, 2, 0, threads, threads)
    args = (ArgSpec("src", "in", "float32", ((FMA_CHAINS + 2) * lanes,)),
            ArgSpec("out", "out", "float32", (threads * lanes,)))
    return KernelSource("llvm", str(module), "peak", args)


def _read_kernel(lanes: int, threads: int, n: int, passes: int) -> KernelSource:
    module = cg.new_module("stream")
    chunk = CHUNK
    body, kb = cg.chunk_body(module, "read_chunk", n_pointers=2, n_scalars=0)
    src, out, begin, end, thread = body.args
    b = kb.b
    slots = [kb.local(cg.vec(lanes)) for _ in range(8)]
    for slot in slots:
        b.store(kb.zeros(lanes), slot)
    with kb.loop(0, passes, 1, name="pass"):  # passes inside one call: no thread start-up per pass
        with kb.loop(begin, end, 1, name="c") as c:
            base = b.mul(c, cg.i64(chunk))
            with kb.loop(0, chunk, lanes * 8, name="i") as i:
                for u, slot in enumerate(slots):
                    at = b.add(base, b.add(i, cg.i64(u * lanes)))
                    b.store(kb.fadd(b.load(slot), kb.load_vec(src, at, lanes)), slot)
    total = b.load(slots[0])
    for slot in slots[1:]:
        total = kb.fadd(total, b.load(slot))
    kb.store_vec(total, out, b.mul(thread, cg.i64(lanes)))
    kb.ret()
    cg.parallel_entry(module, "stream", body, 2, 0, threads, n // chunk)
    args = (ArgSpec("src", "in", "float32", (n,)), ArgSpec("out", "out", "float32", (threads * lanes,)))
    return KernelSource("llvm", str(module), "stream", args)


def _best_of(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _read_gbs(target: Target, threads: int, nbytes: int) -> float:
    from .cpu_kernel import allocate_args, compile_and_load

    n = max(nbytes // 4 // (CHUNK * threads), 1) * CHUNK * threads
    passes = max(1, (256 << 20) // (4 * n))  # at least 256 MB of reads per sample
    stream = _read_kernel(target.vector_lanes_f32, threads, n, passes)
    kernel = compile_and_load(stream, target)
    buffers = allocate_args(stream, {}, {"src": np.ones(n, dtype=np.float32)})
    kernel(buffers, {})
    seconds = _best_of(lambda: kernel(buffers, {}))
    return 4.0 * n * passes / seconds / 1e9


def working_set_bandwidth(roof: dict[str, float], nbytes: float, target: Target, threads: int) -> tuple[str, float]:
    """(level, read GB/s) of the smallest memory level whose capacity holds a working set of
    ``nbytes``: L2 (per core, times the threads that share the work), L3 (as reported, at most
    ``MAX_LAST_LEVEL_CACHE``: see ``measure.timing``), else DRAM. A bench times with the same
    buffers every call, so a working set that fits a level is served from it."""
    if target.l2_bytes and nbytes <= target.l2_bytes * threads:
        return "L2", roof["l2_gbs"]
    if target.l3_bytes and nbytes <= min(target.l3_bytes, MAX_LAST_LEVEL_CACHE):
        return "L3", roof["l3_gbs"]
    return "DRAM", roof["read_gbs"]


def measure_read_rate(payload: dict[str, Any]) -> float:
    """Worker side: DRAM read bytes/s with ``threads`` threads (the read probe alone)."""
    target = Target.from_dict(payload["target"])
    return 1e9 * _read_gbs(target, int(payload.get("threads", 1)), READ_BYTES)


def measure_roofline(payload: dict[str, Any]) -> dict[str, float]:
    """Worker side: compile and run the probes. Returns GFLOP/s and GB/s per memory level."""
    from .cpu_kernel import allocate_args, compile_and_load

    target = Target.from_dict(payload["target"])
    threads = int(payload.get("threads", 1))
    lanes = target.vector_lanes_f32
    peak = _fma_kernel(lanes, threads)
    kernel = compile_and_load(peak, target)
    src = np.full((FMA_CHAINS + 2) * lanes, 0.5, dtype=np.float32)
    buffers = allocate_args(peak, {}, {"src": src})
    kernel(buffers, {})
    seconds = _best_of(lambda: kernel(buffers, {}), repeats=9)
    gflops = 2.0 * lanes * FMA_CHAINS * FMA_ITERATIONS * threads / seconds / 1e9

    l2 = (target.l2_bytes or 1 << 20) * threads // 2
    l3 = min((target.l3_bytes or 8 << 20) // 2, 8 << 20)
    return {"peak_gflops": gflops, "threads": threads,
            "l2_gbs": _read_gbs(target, threads, l2),
            "l3_gbs": _read_gbs(target, threads, l3),
            "read_gbs": _read_gbs(target, threads, READ_BYTES)}
