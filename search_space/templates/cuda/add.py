"""``add`` on CUDA: the residual add Y = A + B, element-wise over M x N (see flat)."""
from __future__ import annotations

from ...ops.elementwise import AddOp
from ...template import register_template
from .flat import ElementwiseCuda


@register_template
class AddCuda(AddOp, ElementwiseCuda):
    dtypes = ("float32", "float16", "bfloat16")
    expr = "a + b"
