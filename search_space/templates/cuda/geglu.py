"""``geglu`` on CUDA: Y = gelu(G) * U, gelu in the tanh approximation (Gemma's gated MLP),
element-wise (see flat).

gelu is written as gelu's: 0.5 g (1 + tanh(u)) = g / (1 + exp(-2u)), u = sqrt(2/pi) (g +
0.044715 g^3), one fast exponential (__expf) and no cancellation. For very negative G, -2u
is large (or +inf once g^3 overflows) and __expf overflows to inf: G / inf gives the correct
-0; for large G it underflows to 0 and gelu(G) = G. Only G = -inf gives NaN, as in torch.
"""
from __future__ import annotations

from ...ops.elementwise import GegluOp
from ...template import register_template
from .flat import ElementwiseCuda


@register_template
class GegluCuda(GegluOp, ElementwiseCuda):
    dtypes = ("float32", "float16", "bfloat16")
    # -2 * sqrt(2 / pi) = -1.5957691216057308
    expr = "a / (1.0f + __expf(-1.5957691216057308f * fmaf(0.044715f * a, a * a, a))) * b"
