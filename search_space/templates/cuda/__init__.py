"""CUDA schedule templates: importing this package registers every one of them.

Rendering is pure text (CUDA C following the conventions in ``search_space.codegen.cuda``);
building needs nvcc, running needs a GPU and pycuda.
"""
from __future__ import annotations

from . import add, attention_decode, attention_prefill, bias_add, gelu, gemm, gemm_q4, gemv, gemv_q4  # noqa: F401
from . import device_step, layernorm, rmsnorm, rope, softmax, swiglu  # noqa: F401
