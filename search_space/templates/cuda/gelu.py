"""``gelu`` on CUDA, tanh approximation, element-wise (see flat).

0.5 x (1 + tanh(u)) equals x * sigmoid(2u) = x / (1 + exp(-2u)) exactly, which needs one
fast exponential and no cancellation near u = 0 (u = sqrt(2/pi) (x + 0.044715 x^3)).
"""
from __future__ import annotations

from ...ops.elementwise import GeluOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .flat import flat_default, flat_features, flat_source, flat_space


@register_template
class GeluCuda(GeluOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return flat_space(task, target, inputs=1)

    def default(self, task: Task, target: Target) -> Config:
        return flat_default(self.space(task, target))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return flat_features(task, config, target, self.min_bytes(task), self.flops(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        # -2 * sqrt(2 / pi) = -1.5957691216057308
        return flat_source(task, config, target, "gelu_flat", self.signature(task), ("X",),
                           "a / (1.0f + __expf(-1.5957691216057308f * fmaf(0.044715f * a, a * a, a)))")
