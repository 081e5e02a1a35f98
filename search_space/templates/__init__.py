"""Built-in schedule templates: importing this package registers every one of them."""
from __future__ import annotations

from . import add, cuda, gelu, gemm, gemv, layernorm, rmsnorm, rope, softmax, swiglu  # noqa: F401
