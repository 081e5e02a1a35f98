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

from typing import Any, Mapping

from runtime.launch import evaluate  # the launch-expression format is the runtime's contract too

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


# --------------------------------------------------------------------------- row and attention helpers
# Appended for the row-wise and attention templates; self-contained (nothing above changes).

VECTOR_HELPERS = r"""
// N consecutive elements of T moved as one access of N * sizeof(T) bytes (<= 16); the
// alignment lets nvcc emit a single ld/st.global.v4 / v2 / b32 / b16.
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T e[N]; };
template <int BYTES> struct RawBits;
template <> struct RawBits<16> { typedef uint4 type; };
template <> struct RawBits<8> { typedef uint2 type; };
template <> struct RawBits<4> { typedef unsigned int type; };
template <> struct RawBits<2> { typedef unsigned short type; };

// HINT 0: default caching; 1: streaming (ld.global.cs / st.global.cs, data touched once);
// 2: read-only path (ld.global.nc) for data no thread of the kernel writes.
template <int N, int HINT = 0, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p) {
  typedef typename RawBits<sizeof(T) * N>::type R;
  R raw;
  if constexpr (HINT == 1) raw = __ldcs(reinterpret_cast<const R*>(p));
  else if constexpr (HINT == 2) raw = __ldg(reinterpret_cast<const R*>(p));
  else raw = *reinterpret_cast<const R*>(p);
  Pack<T, N> out;
  *reinterpret_cast<R*>(&out) = raw;
  return out;
}

template <int N, int HINT = 0, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, N>& v) {
  typedef typename RawBits<sizeof(T) * N>::type R;
  const R raw = *reinterpret_cast<const R*>(&v);
  if constexpr (HINT == 1) __stcs(reinterpret_cast<R*>(p), raw);
  else *reinterpret_cast<R*>(p) = raw;
}

// Block-wide reductions for blocks of THREADS threads (a multiple of 32). `scratch` is 32
// floats of shared memory; every thread gets the result. The leading barrier lets the
// same scratch serve consecutive reductions.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = warp_sum(v);
  if constexpr (THREADS > 32) {
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < THREADS / 32 ? scratch[threadIdx.x & 31] : 0.0f;
    v = warp_sum(v);
  }
  return v;
}

template <int THREADS>
__device__ __forceinline__ float block_max(float v, float* scratch) {
  v = warp_max(v);
  if constexpr (THREADS > 32) {
    __syncthreads();
    if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = v;
    __syncthreads();
    v = (threadIdx.x & 31) < THREADS / 32 ? scratch[threadIdx.x & 31] : -INFINITY;
    v = warp_max(v);
  }
  return v;
}
"""


def dim_scalars(task) -> tuple:
    """One int64 ``scalar`` ArgSpec per dynamic dim of ``task``, in the operator's dim order."""
    from ..template import ArgSpec  # noqa: PLC0415 - the template module imports this one

    return tuple(ArgSpec(name, "scalar", "int64") for name in task.dynamic)


def static_dims(task, names) -> str:
    """C constants for the dims among ``names`` that are compiled in; dynamic ones are the
    kernel's ``long long`` parameters of the same name, so code uses either the same way."""
    dims = task.dims
    return "".join(f"constexpr long long {n} = {dims[n]};\n" for n in names if n not in task.dynamic)


def bytes_per_block_ok(nbytes: int, target) -> bool:
    """Shared memory of one block fits the target (opt-in maximum, e.g. 227 KiB on sm_90).
    More than 48 KiB of dynamic shared memory needs the runner to raise the kernel's
    MAX_DYNAMIC_SHARED_SIZE_BYTES attribute before launching."""
    return nbytes <= (target.max_shared_memory_per_block or 48 << 10)


def registers_ok(per_thread: int, threads: int, target) -> bool:
    """A register estimate fits one thread (255) and the block's register file."""
    return per_thread <= 255 and per_thread * threads <= (target.max_registers_per_block or 65536)
