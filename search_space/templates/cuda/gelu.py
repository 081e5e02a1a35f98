"""``gelu`` on CUDA, tanh approximation, element-wise (see flat).

0.5 x (1 + tanh(u)) equals x * sigmoid(2u) = x / (1 + exp(-2u)) exactly, which needs one
fast exponential and no cancellation near u = 0 (u = sqrt(2/pi) (x + 0.044715 x^3)).
"""
from __future__ import annotations

from ...ops.elementwise import GeluOp
from ...template import register_template
from .flat import ElementwiseCuda


@register_template
class GeluCuda(GeluOp, ElementwiseCuda):
    dtypes = ("float32", "float16", "bfloat16")
    # -2 * sqrt(2 / pi) = -1.5957691216057308
    expr = "a / (1.0f + __expf(-1.5957691216057308f * fmaf(0.044715f * a, a * a, a)))"
