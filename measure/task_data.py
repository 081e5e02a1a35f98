"""A worker's random inputs and float64 reference for one task, kept between its candidates.

Making them can take long (a large float64 reference), so a worker makes them once per task
and seed and measures every candidate of the task on them. One task at a time: inputs can be
hundreds of MB. ``digests`` record what each input held when it was made, so that a
candidate that wrote to its inputs is caught (see ``measure.runner``).
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import dataclass

import numpy as np

from search_space import Task, get_template


@dataclass
class TaskData:
    key: str  # the task's key and the seed
    inputs: dict[str, np.ndarray]
    reference: dict[str, np.ndarray]
    digests: dict[str, bytes]


_KEPT: dict[str, TaskData] = {}


def task_data(task: Task, kind: str, seed: int) -> TaskData:
    """The kept inputs and reference of ``task`` (made now if they are not kept)."""
    key = f"{task.key}#{seed}"
    if key not in _KEPT:
        drop_task_data()
        template = get_template(task.op, kind)
        made = template.make_inputs(task, np.random.default_rng(seed))
        inputs = {name: np.ascontiguousarray(array) for name, array in made.items()}
        with _one_blas_thread(kind == "cpu"):
            reference = template.reference(task, inputs)
        _KEPT[key] = TaskData(key, inputs, reference, {name: input_digest(array) for name, array in inputs.items()})
    return _KEPT[key]


def _one_blas_thread(limit: bool):
    """For a CPU task, the reference's matmuls on one BLAS thread: OpenBLAS's threads spin for
    about 0.1 s after a call, and on a small machine they would hold the cores that the
    candidates timed next run their threads on (a two-thread candidate timed right after the
    reference ran at one thread's speed)."""
    if not limit:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


def drop_task_data() -> None:
    """Forget the kept inputs (the next candidate makes them again)."""
    _KEPT.clear()


def input_digest(array: np.ndarray) -> bytes:
    """A digest of the array's bytes (NaN-safe, unlike comparing values); ~1.5 GB/s."""
    return hashlib.sha1(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).digest()
