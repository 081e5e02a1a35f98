"""``swiglu`` on the CPU: Y = silu(G) * U = G * U / (1 + exp(-G)), one division per element
(the ``division`` knob: a division instruction or, with AVX-512, a reciprocal estimate
refined by a Newton step; see ``pointwise.division_knob``).

exp is the codegen's inline ``exp_fast`` (no libm call per lane). For G below -88,
exp(-G) is clamped to exp(88) = 1.7e38, so the quotient goes to the correct limit 0.
"""
from __future__ import annotations

from ..codegen import llvm as cg
from ..ops.elementwise import SwiGLUOp
from ..template import register_template
from .pointwise import PointwiseCpu, divide, division_knob


@register_template
class SwiGLUCpu(SwiGLUOp, PointwiseCpu):
    dtypes = ("float32",)

    def extra_knobs(self, task, target):
        return [division_knob(target)]

    def extra_defaults(self, task, target):
        return {"division": "divide"}

    def emit_vector(self, kb, c, values):
        g, u = values["G"], values["U"]
        one = kb.splat(cg.f32(1.0), c["vec"])
        return {"Y": divide(kb, c, kb.fmul(g, u), kb.fadd(one, kb.exp_fast(kb.b.fneg(g))))}
