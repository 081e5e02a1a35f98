"""``gelu`` on the CPU: the tanh approximation 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).

The ``form`` knob: ``tanh`` evaluates it as written (the codegen's tanh: a polynomial near
zero, the exp form elsewhere, both computed and one selected); ``sigmoid`` uses the
identity 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u)), one exp and one division, with no
cancellation anywhere (large negative u gives exp -> huge and the quotient -> 0). Its
division follows the ``division`` knob (see swiglu).

``gelu_tanh`` and the knobs (``GeluKnobsCpu``) are shared with geglu, which multiplies this by U.
"""
from __future__ import annotations

import math

from ..codegen import llvm as cg
from ..ops.elementwise import GeluOp
from ..space import Knob
from ..template import register_template
from .pointwise import PointwiseCpu, divide, division_knob

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def gelu_tanh(kb: cg.KernelBuilder, c, x):
    """gelu(x) of a float32 vector of ``c["vec"]`` lanes, in the ``form`` and ``division`` of ``c``."""
    const = lambda v: kb.splat(cg.f32(v), c["vec"])  # noqa: E731

    def scaled_inner(scale: float):
        """scale * u = x (scale sqrt(2/pi) + scale 0.044715 sqrt(2/pi) x^2)."""
        factor = kb.fma(kb.fmul(x, x), const(scale * 0.044715 * SQRT_2_OVER_PI), const(scale * SQRT_2_OVER_PI))
        return kb.fmul(x, factor)

    if c["form"] == "tanh":
        half_x = kb.fmul(x, const(0.5))
        return kb.fma(half_x, kb.tanh(scaled_inner(1.0)), half_x)
    denominator = kb.fadd(const(1.0), kb.exp_fast(scaled_inner(-2.0)))  # -2 folded into the constants
    return divide(kb, c, x, denominator)


class GeluKnobsCpu(PointwiseCpu):
    """The knobs gelu and geglu share: the formula (``form``) and how it divides (``division``)."""

    dtypes = ("float32",)

    def extra_knobs(self, task, target):
        return [Knob("form", ("sigmoid", "tanh")), division_knob(target)]

    def extra_defaults(self, task, target):
        return {"form": "sigmoid", "division": "divide"}

    def extra_constraints(self, task, target):
        # the tanh form divides inside KernelBuilder.tanh: the knob would change nothing
        return [("division applies to the sigmoid form", lambda c: c["form"] == "sigmoid" or c["division"] == "divide")]


@register_template
class GeluCpu(GeluOp, GeluKnobsCpu):
    def emit_vector(self, kb, c, values):
        return {"Y": gelu_tanh(kb, c, values["X"])}
