"""Tuned kernels and models beside their baselines, measured in one run.

    cpu.py             a CPU kernel against numpy/OpenBLAS and the roofline probes
    cuda.py            a CUDA kernel against the vendor (through torch) and the GPU's ceilings
    cuda_baselines.py  the vendor baselines per operator: cuBLAS, tinygemm, SDPA, torch row ops
    model_run.py       a whole model on tuned kernels against the numpy reference decoder

``bench_kernel`` is the one entry for a kernel on any target.
"""
from __future__ import annotations

from measure import TimingPolicy
from search_space import Config, Target, Task

from .cpu import BenchResult


def _bench_cpu(task: Task, target: Target, config: Config, threads: int | None, seed: int, timing: dict) -> BenchResult:
    from .cpu import bench

    return bench(task, target, config, threads or int(config.get("threads", 1) or 1), seed=seed, **timing)


def _bench_cuda(task: Task, target: Target, config: Config, threads: int | None, seed: int, timing: dict) -> BenchResult:
    from .cuda import bench_cuda  # torch and pycuda are imported there

    return bench_cuda(task, target, config, seed=seed, **timing)


BENCHES = {"cpu": _bench_cpu, "cuda": _bench_cuda}  # each target kind's kernel-beside-baseline bench


def bench_kernel(task: Task, target: Target, config: Config, threads: int | None = None, seed: int = 0,
                 policy: TimingPolicy | None = None) -> BenchResult:
    """Time ``config`` of ``task`` on ``target`` and its baseline side by side. ``threads``
    (CPU): both sides' thread count, by default the config's."""
    timing = {"policy": policy} if policy is not None else {}  # else each side's own bench policy
    if target.kind not in BENCHES:
        raise ValueError(f"no baseline bench for target kind {target.kind!r}")
    return BENCHES[target.kind](task, target, config, threads, seed, timing)


__all__ = ["BenchResult", "bench_kernel"]
