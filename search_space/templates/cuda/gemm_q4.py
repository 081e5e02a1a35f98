"""``gemm_q4`` on CUDA: matmul with int4 weights for any M (schedules in ``matmul_q4``).

Blocks tile M by ``mtile`` x 8 rows of X (tensor-core schedule); every M tile streams the
block's weights again, from L2 after the first.
"""
from __future__ import annotations

from ...ops.matmul import GemmQ4Op
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from . import matmul_q4 as q4


@register_template
class GemmQ4Cuda(GemmQ4Op, Template):
    target_kind = "cuda"
    dynamic_dims = ()  # M is compiled in (the CPU template takes it at run time)
    dtypes = ("float16", "bfloat16", "float32")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        M = task.dims["M"]
        mtiles = tuple(v for v in (1, 2, 4, 8, 16) if v == 1 or 8 * (v // 2) < M)
        return q4.q4_space(task, target, mtiles)

    def default(self, task: Task, target: Target) -> Config:
        return q4.q4_default(self.space(task, target), task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return q4.q4_features(self, task, config, target)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return q4.q4_render(self, task, config, target)
