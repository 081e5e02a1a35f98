"""``swiglu`` on CUDA: Y = silu(G) * U = G / (1 + exp(-G)) * U, element-wise (see flat).

exp is the fast hardware exponential (__expf); for very negative G it overflows to inf and
G / inf gives the correct -0, for large G it underflows to 0 and silu(G) = G.
"""
from __future__ import annotations

from ...ops.elementwise import SwiGLUOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .flat import flat_default, flat_features, flat_source, flat_space


@register_template
class SwiGLUCuda(SwiGLUOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return flat_space(task, target, inputs=2)

    def default(self, task: Task, target: Target) -> Config:
        return flat_default(self.space(task, target))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return flat_features(task, config, target, self.min_bytes(task), self.flops(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return flat_source(task, config, target, "swiglu_flat", self.signature(task), ("G", "U"),
                           "a / (1.0f + __expf(-a)) * b")
