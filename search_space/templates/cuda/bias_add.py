"""``bias_add`` on CUDA: Y = X + B, the bias B[N] added to every row, element-wise over M x N
(see flat: B is read at each element's column, a cached stream every row reuses)."""
from __future__ import annotations

from ...ops.elementwise import BiasAddOp
from ...template import register_template
from .flat import ElementwiseCuda


@register_template
class BiasAddCuda(BiasAddOp, ElementwiseCuda):
    dtypes = ("float32", "float16", "bfloat16")
    expr = "a + b"
