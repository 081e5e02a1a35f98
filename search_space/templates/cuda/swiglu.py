"""``swiglu`` on CUDA: Y = silu(G) * U = G / (1 + exp(-G)) * U, element-wise (see flat).

exp is the fast hardware exponential (__expf); for very negative G it overflows to inf and
G / inf gives the correct -0, for large G it underflows to 0 and silu(G) = G.
"""
from __future__ import annotations

from ...ops.elementwise import SwiGLUOp
from ...template import register_template
from .flat import ElementwiseCuda


@register_template
class SwiGLUCuda(SwiGLUOp, ElementwiseCuda):
    dtypes = ("float32", "float16", "bfloat16")
    expr = "a / (1.0f + __expf(-a)) * b"
