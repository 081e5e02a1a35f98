"""How times and rates are printed, the same way by every command for the same task.

A kernel's rate is given in the unit that matters for its operator: GB/s (the bytes it must
move) for memory-bound operators, GFLOP/s for compute-bound ones, decided by the task's
arithmetic intensity alone, so ``tune``, ``best``, ``bench`` and ``export`` agree whatever
the machine.
"""
from __future__ import annotations

import math

# FLOPs per byte moved below which an operator is limited by memory on any machine we target
# (CPUs and GPUs alike balance at 10-300 FLOP/byte): GEMV ~0.5, row-wise ops < 2, GEMM >> 10
MEMORY_BOUND_INTENSITY = 4.0


def memory_bound(task) -> bool:
    return task.min_bytes > 0 and task.flops / task.min_bytes < MEMORY_BOUND_INTENSITY


def rate(task, seconds: float) -> tuple[float, str]:
    """(value, unit) of the rate that matters for ``task`` when a call takes ``seconds``."""
    if not seconds or not math.isfinite(seconds) or seconds <= 0:
        return 0.0, "GB/s" if memory_bound(task) else "GFLOP/s"
    if memory_bound(task):
        return task.min_bytes / seconds / 1e9, "GB/s"
    return task.flops / seconds / 1e9, "GFLOP/s"


def format_rate(task, seconds: float) -> str:
    """The rate that matters, in GB/s or GFLOP/s (TB/s or TFLOP/s from 10,000 up, as on a GPU)."""
    value, unit = rate(task, seconds)
    if value >= 1e4:
        return f"{value / 1e3:.1f} {unit.replace('G', 'T', 1)}"
    return f"{value:.1f} {unit}"


def format_time(seconds: float | None) -> str:
    """A time with a unit that shows its figure: 3.20 us, 1.234 ms, 2.50 s."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.2f} s"


def format_bytes(nbytes: int) -> str:
    """A size in the unit that reads best: KiB below a MiB, MiB below a GiB, else GiB."""
    if nbytes < 1 << 20:
        return f"{nbytes / 1024:.1f} KiB"
    if nbytes < 1 << 30:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes / (1 << 30):.1f} GiB"
