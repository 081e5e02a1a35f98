"""Built-in schedule templates: importing this package registers every one of them."""
from __future__ import annotations

from . import (  # noqa: F401
    add,
    attention_decode,
    attention_prefill,
    cuda,
    gelu,
    gemm,
    gemv,
    layernorm,
    rmsnorm,
    rope,
    softmax,
    swiglu,
)
