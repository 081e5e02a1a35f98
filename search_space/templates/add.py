"""``add`` on the CPU: the residual add Y = A + B, a pure stream (see ``pointwise``)."""
from __future__ import annotations

from ..ops.elementwise import AddOp
from ..template import register_template
from .pointwise import PointwiseCpu


@register_template
class AddCpu(AddOp, PointwiseCpu):
    dtypes = ("float32",)

    def emit_vector(self, kb, c, values):
        return {"Y": kb.fadd(values["A"], values["B"])}
