"""Built-in schedule templates: importing this package registers every one of them."""
from __future__ import annotations

from . import add, attention_decode, attention_prefill, bias_add, cuda, gelu, gemm, gemm_q4, gemv, gemv_q4  # noqa: F401
from . import layernorm, rmsnorm, rope, softmax, swiglu  # noqa: F401
