"""CUDA schedule templates: importing this package registers every one of them.

Rendering is pure text (CUDA C following the conventions in ``search_space.codegen.cuda``);
building needs nvcc, running needs a GPU and pycuda.
"""
from __future__ import annotations

from . import (  # noqa: F401
    add,
    attention_decode,
    attention_prefill,
    gelu,
    gemm,
    gemm_q4,
    gemv,
    gemv_q4,
    layernorm,
    rmsnorm,
    rope,
    softmax,
    swiglu,
)
