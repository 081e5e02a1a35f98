"""Measure a GPU's ceilings in the same run as the kernels judged against them.

Two probe kernels, built with nvcc and run through pycuda in a GPU worker process:

- streaming bandwidth: ``c[i] = a[i] + b[i]`` over float4 vectors on arrays far larger
  than L2 (2 reads + 1 write counted), a grid-stride loop with a few loads in flight;
  an H200 measured 4.09 TB/s for such a kernel (2026-11-28);
- float32 peak: independent FFMA chains in every thread of a full grid.

The tensor-core peak needs a well-built matmul; where torch is importable it comes from
cuBLAS (``autotune.bench.cuda_baselines.tensor_core_peak``). When a probe cannot run, the
``DOCUMENTED`` H200 numbers stand in, and the result says so.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from search_space import ArgSpec, KernelSource, Target
from search_space.codegen.cuda import PREAMBLE

# Measured on an H200 on 2026-11-28 (used only when a probe cannot run, and said so).
DOCUMENTED = {"stream_gbs": 4090.0, "fp32_gflops": 51000.0, "bf16_gflops": 736000.0, "fp16_gflops": 700000.0}

# Probe sizes; the environment can shrink them (small GPUs, the tests' CPU-emulated GPU).
STREAM_BYTES = int(os.environ.get("AUTOTUNE_CUDA_PROBE_BYTES", 1 << 30))  # per array: far past any L2
FMA_ITERATIONS = int(os.environ.get("AUTOTUNE_CUDA_PROBE_ITERATIONS", 4096))
FMA_CHAINS = 8

_STREAM = PREAMBLE + r"""
extern "C" __global__ void __launch_bounds__(256) stream_add(const float4* __restrict__ a, const float4* __restrict__ b,
                                                           float4* __restrict__ c, long long n) {
  const long long stride = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    float4 x[4], y[4];
    #pragma unroll
    for (int u = 0; u < 4; ++u) { x[u] = __ldcs(a + i + u * stride); y[u] = __ldcs(b + i + u * stride); }
    #pragma unroll
    for (int u = 0; u < 4; ++u)
      __stcs(c + i + u * stride, make_float4(x[u].x + y[u].x, x[u].y + y[u].y, x[u].z + y[u].z, x[u].w + y[u].w));
  }
  for (; i < n; i += stride) {
    const float4 x = a[i], y = b[i];
    c[i] = make_float4(x.x + y.x, x.y + y.y, x.z + y.z, x.w + y.w);
  }
}
"""

_FMA = PREAMBLE + f"""
extern "C" __global__ void __launch_bounds__(256) fma_peak(const float* __restrict__ seed, float* __restrict__ out) {{
  float acc[{FMA_CHAINS}];
  const float x = seed[0], y = seed[1];
  #pragma unroll
  for (int c = 0; c < {FMA_CHAINS}; ++c) acc[c] = seed[2 + c] + threadIdx.x;
  for (int i = 0; i < {FMA_ITERATIONS}; ++i) {{
    #pragma unroll
    for (int c = 0; c < {FMA_CHAINS}; ++c) acc[c] = fmaf(acc[c], x, y);
  }}
  float s = 0.0f;
  #pragma unroll
  for (int c = 0; c < {FMA_CHAINS}; ++c) s += acc[c];
  if (s == 12345.678f) out[0] = s;  // never true: keeps the chains alive
}}
"""


def probe_sources() -> dict[str, KernelSource]:
    """The probe kernels as KernelSources (compiled by the same nvcc step as candidates)."""
    stream_args = (ArgSpec("a", "in", "float32", ("n",)), ArgSpec("b", "in", "float32", ("n",)),
                   ArgSpec("c", "out", "float32", ("n",)), ArgSpec("n", "scalar", "int64"))
    fma_args = (ArgSpec("seed", "in", "float32", (16,)), ArgSpec("out", "out", "float32", (1,)))
    return {"stream": KernelSource("cuda", _STREAM, "stream_add", stream_args),
            "fma": KernelSource("cuda", _FMA, "fma_peak", fma_args)}


def measure_cuda_roofline(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side (a GPU worker): streaming bandwidth (GB/s) and float32 FFMA peak (GFLOP/s)."""
    import numpy as np

    from .backends import get_backend
    from .builder import compile_through_cache, default_cache_dir

    target = Target.from_dict(payload["target"])
    cache = Path(payload.get("cache_dir") or default_cache_dir())
    sources = probe_sources()

    def cubin_of(name: str) -> bytes:  # through the kernel cache: the probes are the same every bench
        return Path(compile_through_cache(sources[name], target, cache)["artifact"]).read_bytes()

    gpu = get_backend("cuda").open_session()
    drv = gpu.drv
    out: dict[str, Any] = {"device": gpu.device_name}

    module = drv.module_from_buffer(cubin_of("stream"))
    func = module.get_function("stream_add")
    func.prepare([np.uintp, np.uintp, np.uintp, np.int64])
    n_vec = STREAM_BYTES // 16
    arrays = [drv.mem_alloc(STREAM_BYTES) for _ in range(3)]
    for i, a in enumerate(arrays):
        drv.memset_d32(a, 0x3F800000 + i, STREAM_BYTES // 4)  # 1.0-ish floats, never zeros
    blocks = (target.sm_count or 132) * 8

    def stream() -> None:
        func.prepared_async_call((blocks, 1, 1), (256, 1, 1), gpu.stream, *(int(a) for a in arrays), np.int64(n_vec))

    out["stream_gbs"] = 3 * STREAM_BYTES / _best_seconds(gpu, stream, 20) / 1e9
    for a in arrays:
        a.free()

    module = drv.module_from_buffer(cubin_of("fma"))
    func = module.get_function("fma_peak")
    func.prepare([np.uintp, np.uintp])
    seed = drv.mem_alloc(64)
    drv.memcpy_htod(seed, np.linspace(0.5, 1.5, 16).astype(np.float32))
    sink = drv.mem_alloc(4)
    fma_blocks = (target.sm_count or 132) * 16

    def fma() -> None:
        func.prepared_async_call((fma_blocks, 1, 1), (256, 1, 1), gpu.stream, int(seed), int(sink))

    flops = 2.0 * FMA_ITERATIONS * FMA_CHAINS * 256 * fma_blocks
    out["fp32_gflops"] = flops / _best_seconds(gpu, fma, 10) / 1e9
    out["sm_clock_mhz"] = gpu.clock.read()
    return out


def _best_seconds(gpu, launch, repeats: int) -> float:
    """The median of ``repeats`` event-timed launches after two warm-ups."""
    import numpy as np

    drv = gpu.drv
    for _ in range(2):
        launch()
    starts = [drv.Event() for _ in range(repeats)]
    ends = [drv.Event() for _ in range(repeats)]
    for s, e in zip(starts, ends):
        s.record(gpu.stream)
        launch()
        e.record(gpu.stream)
    ends[-1].synchronize()
    return float(np.median([e.time_since(s) * 1e-3 for s, e in zip(starts, ends)]))
