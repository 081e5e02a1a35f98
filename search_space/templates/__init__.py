"""Built-in schedule templates: importing this package registers every one of them."""
from __future__ import annotations

from . import cuda, gemm, gemm_q4, gemv, gemv_q4  # noqa: F401
