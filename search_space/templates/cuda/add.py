"""``add`` on CUDA: the residual add Y = A + B, element-wise over M x N (see flat)."""
from __future__ import annotations

from ...ops.elementwise import AddOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .flat import flat_default, flat_features, flat_source, flat_space


@register_template
class AddCuda(AddOp, Template):
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
        return flat_source(task, config, target, "add_flat", self.signature(task), ("A", "B"), "a + b")
