"""How many threads a CPU kernel runs on: the ``threads`` knob, and what a default takes.

The knob offers one thread or every core. Parallel kernels hand their shares to a pool
that is created once per process and woken per call (``codegen/llvm_pool.py``), which
costs a few microseconds, up to about 12 when the workers sleep. A template default
(the first config a tuner measures, and what the runtime runs for a kernel it has no
record of) takes every core when one core would need much longer than that: a prefill
GEMM or a decode GEMV single-threaded is half the machine's speed on two cores, a norm
of one token row is over before the workers wake.
"""
from __future__ import annotations

from ..space import Knob
from ..target import Target
from ..task import Task

# a rough single-core pace, only to tell microsecond kernels from the rest
ONE_CORE_BYTES_PER_S = 16e9
ONE_CORE_FLOPS = 50e9
PARALLEL_FROM_S = 20e-6  # a few times the hand-over to the pool


def threads_knob(target: Target) -> Knob:
    """One thread, and every core."""
    return Knob("threads", tuple(sorted({1, max(target.cores, 1)})))


def rough_one_core_seconds(task: Task) -> float:
    """A guess, before anything is measured, of how long ``task`` takes on one core."""
    return task.min_bytes / ONE_CORE_BYTES_PER_S + task.flops / ONE_CORE_FLOPS


def default_thread_counts(task: Task, target: Target) -> tuple[int, ...]:
    """The thread counts a default tries, in order: every core first when the task is
    long enough on one core to gain from the rest (the template falls back to one thread
    where its constraints leave a thread without work), else one."""
    cores = max(target.cores, 1)
    return (cores, 1) if cores > 1 and rough_one_core_seconds(task) >= PARALLEL_FROM_S else (1,)
