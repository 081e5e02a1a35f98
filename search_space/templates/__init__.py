"""Built-in schedule templates: importing this package registers every one of them."""
from __future__ import annotations

from . import attention_decode, attention_prefill, cuda, gemm, gemv  # noqa: F401
