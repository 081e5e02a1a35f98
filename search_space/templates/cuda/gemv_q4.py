"""``gemv_q4`` on CUDA: decode matmul with int4 weights, M = 1..16 (schedules in ``matmul_q4``).

One block covers every X row (``mtile`` = ceil(M / 8) tiles of 8 for the tensor-core
schedule), so each weight is read from memory exactly once.
"""
from __future__ import annotations

import math

from ...ops.matmul import GemvQ4Op
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from . import matmul_q4 as q4


@register_template
class GemvQ4Cuda(GemvQ4Op, Template):
    target_kind = "cuda"
    dtypes = ("float16", "bfloat16", "float32")
    fusable = True

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return q4.q4_space(task, target, (math.ceil(task.dims["M"] / 8),))

    def default(self, task: Task, target: Target) -> Config:
        return q4.q4_default(self.space(task, target), task, target)

    def seed_configs(self, task: Task, target: Target) -> list[dict]:
        """int4 GEMV schedules on mma: a pipelined one (``prefetch`` 2, K split over 8 warps: every
        warp streams its share from the start; no spill at llama-2-7b's shapes), the H200's best two
        so far, the other pipelined ones, then the rest of the hand-picked ones. A resumed model
        tuning measures the log's best of the same dims before these (``autotune.tuning``)."""
        return [dict(core="mma", warps=w, rows=r, ksplit=k, unroll=u, prefetch=p)  # mtile: all of M
                for w, r, k, u, p in ((8, 1, 8, 2, 2), (4, 1, 4, 2, 1), (4, 1, 2, 2, 1), (8, 1, 8, 4, 2), (4, 1, 4, 4, 2),
                                      (8, 2, 8, 2, 2), (8, 1, 4, 2, 1), (8, 1, 2, 1, 0), (4, 2, 2, 2, 1),
                                      (4, 1, 1, 2, 0), (8, 2, 4, 1, 1), (2, 1, 2, 2, 0))]

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return q4.q4_features(self, task, config, target)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return q4.q4_render(self, task, config, target)
