"""Helpers for CUDA C kernels: the shared preamble, C types, launch geometry.

Conventions every CUDA template follows (the CUDA builder and runner rely on them):
- The kernel is ``extern "C" __global__`` and named by ``KernelSource.entry``.
- Its parameters follow ``KernelSource.args``: array pointers (inputs, outputs,
  workspaces) in order, then ``long long`` scalars for the dynamic dims.
- ``KernelSource.launch`` holds ``block`` (3 ints), ``grid`` (3 entries: ints, or
  expressions over dim names such as ``"(L + 255) // 256"`` for dynamic dims, evaluated
  by ``resolve_launch``) and ``smem`` (dynamic shared memory bytes, int or expression).
Rendering is pure text: nothing here needs a GPU or nvcc.
"""
from __future__ import annotations

import ast
import operator
from typing import Any, Mapping

C_TYPES = {"float32": "float", "float16": "__half", "bfloat16": "__nv_bfloat16", "uint8": "uint8_t",
           "int32": "int32_t", "int64": "long long"}

PREAMBLE = r"""
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  #pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}
"""


def c_type(dtype: str) -> str:
    return C_TYPES[dtype]


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


def evaluate(expr: int | str, dims: Mapping[str, int]) -> int:
    """An int, or integer arithmetic (+ - * // % and parentheses) over dim names."""
    if isinstance(expr, int):
        return expr

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported launch expression {expr!r}")

    return int(walk(ast.parse(str(expr), mode="eval")))


def resolve_launch(launch: Mapping[str, Any], dims: Mapping[str, int]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """(grid, block, dynamic shared memory bytes) for the given dims."""
    grid = tuple(evaluate(g, dims) for g in launch["grid"])
    block = tuple(int(b) for b in launch["block"])
    return grid, block, evaluate(launch.get("smem", 0), dims)


def kernel_params(args) -> str:
    """The C parameter list for ``args`` (ArgSpecs) following the convention above."""
    params = []
    for arg in args:
        if arg.role == "scalar":
            params.append(f"long long {arg.name}")
        elif arg.role == "in":
            params.append(f"const {c_type(arg.dtype)}* __restrict__ {arg.name}")
        elif arg.role == "workspace":
            params.append(f"float* __restrict__ {arg.name}")
        else:
            params.append(f"{c_type(arg.dtype)}* __restrict__ {arg.name}")
    return ", ".join(params)
