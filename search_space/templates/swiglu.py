"""``swiglu`` on the CPU: Y = silu(G) * U = G * U / (1 + exp(-G)), one division per element.

exp is the codegen's inline vector exp (no libm call per lane). For G below about -88,
exp(-G) is clamped to about 2.4e38, so the quotient goes to the correct limit 0.
"""
from __future__ import annotations

from ..codegen import llvm as cg
from ..ops.elementwise import SwiGLUOp
from ..template import register_template
from .pointwise import PointwiseCpu


@register_template
class SwiGLUCpu(SwiGLUOp, PointwiseCpu):
    dtypes = ("float32",)

    def emit_vector(self, kb, c, values):
        g, u = values["G"], values["U"]
        one = kb.splat(cg.f32(1.0), c["vec"])
        return {"Y": kb.fdiv(kb.fmul(g, u), kb.fadd(one, kb.exp(kb.b.fneg(g))))}
