"""``kv_append``, ``rope_append`` and ``argmax`` on CUDA: the small kernels that keep a decode
step on the device (see ``search_space.ops.device_step``).

kv_append: one block per (sequence, KV head) row; it reads the sequence's position from P
and copies the K and V rows (D elements, as vectors of ``vec``) into the caches; a position
outside the cache writes nothing.

rope_append: one block per (head of q or k, sequence). A q head's block rotates its row of the
projection's output into Q; a k head's block reads the sequence's position, rotates the k row
into the cache row there and copies the matching v row into V's cache (a position outside the
cache writes nothing). Each thread takes ``vec`` pairs (i, i + D/2) at a time (i + R/2 for a
partial ``rotary_dim`` R, whose dims R .. D - 1 are copied as they are); angles as in
``rope`` (float64 frequencies and reduction, then the fast sincos). It runs only in the captured
decode step, so it takes a programmatic launch (``codegen.cuda_ptx.GRID_DEPENDENCY_HELPERS``):
it lets the next kernel launch and waits for the Q/K/V projection before it reads anything.

argmax: one block per row. Each thread scans its strided share in increasing index order
keeping the first largest value, then the block reduces (value, index) pairs, preferring
the smaller index on equal values, so the result is numpy's (the first maximum).
"""
from __future__ import annotations

from ...codegen.cuda import PREAMBLE, VECTOR_HELPERS, c_type, dim_scalars, kernel_params, static_dims
from ...codegen.cuda_ptx import GRID_DEPENDENCY_HELPERS, grid_dependency_code, programmatic_launch
from ...ops.common import ITEMSIZE
from ...ops.device_step import ArgmaxOp, KvAppendOp, RopeAppendOp
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .limits import occupancy
from .rope import half_constants, rope_code, rotary_pairs

REGISTERS = 40  # about what ptxas gives these small kernels (32-52): the estimate before a build


def _vectors(task: Task, length: int) -> tuple[int, ...]:
    """Vector widths of at most 16 bytes that keep every row aligned (they divide the row)."""
    return tuple(v for v in (1, 2, 4, 8) if v * ITEMSIZE[task.dtype] <= 16 and length % v == 0)


def _space(task: Task, target: Target, length: int, threads: tuple[int, ...]) -> ConfigSpace:
    max_threads = target.max_threads_per_block or 1024
    return ConfigSpace([Knob("vec", _vectors(task, length)),
                        Knob("threads", tuple(t for t in threads if t <= max_threads))], [])


def _default(space: ConfigSpace, length: int) -> Config:
    """The widest vectors, and the fewest threads that cover ``length`` elements in one pass."""
    vec = max(space.knob("vec").values)
    threads = min((t for t in space.knob("threads").values if t * vec >= length),
                  default=max(space.knob("threads").values))
    return space.from_values(dict(vec=vec, threads=threads))


def _features(task: Task, config: Config, target: Target, length: int, min_bytes: float) -> dict[str, float]:
    c = config.as_dict()
    return {"threads": c["threads"] / 32, "vector_lanes": c["vec"], "bytes_moved": min_bytes,
            "chunks_per_thread": length / (c["threads"] * c["vec"]),
            "occupancy": occupancy(c["threads"], 0, REGISTERS, target)}


def _source(task: Task, config: Config, args, constants: str, body: str, entry: str, grid,
            grid_y: int = 1, programmatic_on=None) -> KernelSource:
    """A launch of ``body`` (its parameters at @PARAMS@) on a (grid, grid_y) grid, E the element
    type, VEC and THREADS from the config, then ``constants``; ``programmatic_on``: the target of
    a ``body`` that calls the helpers of a programmatic launch (``codegen.cuda_ptx``)."""
    c = config.as_dict()
    code = (PREAMBLE + VECTOR_HELPERS + (GRID_DEPENDENCY_HELPERS if programmatic_on else "")
            + f"typedef {c_type(task.dtype)} E;\nconstexpr int VEC = {c['vec']};\n"
            f"constexpr int THREADS = {c['threads']};\n" + constants + body.replace("@PARAMS@", kernel_params(args)))
    launch = (("block", (c["threads"], 1, 1)), ("grid", (grid, grid_y, 1)), ("smem", 0))
    launch += programmatic_launch(programmatic_on) if programmatic_on else ()
    return KernelSource("cuda", code, entry, tuple(args), launch)


@register_template
class KvAppendCuda(KvAppendOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return _space(task, target, task.dims["D"], (32, 64, 128))

    def default(self, task: Task, target: Target) -> Config:
        return _default(self.space(task, target), task.dims["D"])

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return _features(task, config, target, task.dims["D"], self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        d = task.dims
        constants = f"constexpr long long HKV = {d['HKV']};\nconstexpr long long D = {d['D']};\n"
        return _source(task, config, self.signature(task) + dim_scalars(task),
                       constants + static_dims(task, ("S",)), _KV_APPEND, "kv_append_rows", d["B"] * d["HKV"])


_KV_APPEND = r"""
extern "C" __global__ void __launch_bounds__(THREADS) kv_append_rows(@PARAMS@) {
  const long long row = blockIdx.x;              // sequence b, KV head row % HKV
  const long long position = P[row / HKV];
  if (position < 0 || position >= S) return;     // outside the cache: nothing to write
  const long long src = row * D, dst = (row * S + position) * D;
  for (long long e = (long long)threadIdx.x * VEC; e < D; e += (long long)THREADS * VEC) {
    store_pack<VEC>(KC + dst + e, load_pack<VEC>(K + src + e));
    store_pack<VEC>(VC + dst + e, load_pack<VEC>(V + src + e));
  }
}
"""


@register_template
class RopeAppendCuda(RopeAppendOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return _space(task, target, rotary_pairs(task), (32, 64, 128))

    def default(self, task: Task, target: Target) -> Config:
        return _default(self.space(task, target), rotary_pairs(task))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return _features(task, config, target, rotary_pairs(task), self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        d = task.dims
        constants = (f"constexpr int H = {d['H']};\nconstexpr int HKV = {d['HKV']};\nconstexpr int D = {d['D']};\n"
                     + half_constants(task) + static_dims(task, ("S",))
                     + rope_code(task, self.attrs(task)))
        # a step of the captured decode graph: the next kernel may launch at once, this one waits for the rows
        _, trigger, wait = grid_dependency_code(True)
        body = _ROPE_APPEND.replace("(@PARAMS@) {\n", "(@PARAMS@) {" + trigger + wait)
        if 2 * rotary_pairs(task) < d["D"]:  # partial rotary: the dims past ROTARY as they are
            body = body.replace("\n  }\n}\n", "\n  }\n" + _PASS_THROUGH + "}\n")
        return _source(task, config, self.signature(task) + dim_scalars(task), constants, body,
                       "rope_append_rows", d["H"] + d["HKV"], d["B"], programmatic_on=target)


_ROPE_APPEND = r"""
extern "C" __global__ void __launch_bounds__(THREADS) rope_append_rows(@PARAMS@) {
  const int head = blockIdx.x;                   // q heads 0 .. H - 1, then k heads
  const long long b = blockIdx.y;
  const int position = P[b];
  const E* row = QKV + b * (H + 2 * HKV) * (long long)D;
  E* out;
  if (head < H) {
    out = Q + (b * H + head) * (long long)D;
  } else {
    if (position < 0 || position >= S) return;   // outside the cache: no row to write
    const long long cache_row = ((b * HKV + head - H) * S + position) * D;
    out = KC + cache_row;
    for (int e = threadIdx.x * VEC; e < D; e += THREADS * VEC)   // v of this KV head, as it is
      store_pack<VEC>(VC + cache_row + e, load_pack<VEC>(row + (long long)(head + HKV) * D + e));
  }
  const E* x = row + (long long)head * D;
  for (int f = threadIdx.x * VEC; f < HALF; f += THREADS * VEC) {
    const Pack<E, VEC> lo = load_pack<VEC>(x + f);
    const Pack<E, VEC> hi = load_pack<VEC>(x + f + HALF);
    Pack<E, VEC> ylo, yhi;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      float cs, sn;
      rope_angle(position, INV_FREQ[f + e], cs, sn);
      const float a = to_f32(lo.e[e]), c = to_f32(hi.e[e]);
      ylo.e[e] = from_f32<E>(a * cs - c * sn);
      yhi.e[e] = from_f32<E>(c * cs + a * sn);
    }
    store_pack<VEC>(out + f, ylo);
    store_pack<VEC>(out + f + HALF, yhi);
  }
}
"""
_PASS_THROUGH = """  for (int e = ROTARY + threadIdx.x; e < D; e += THREADS) out[e] = x[e];
"""


@register_template
class ArgmaxCuda(ArgmaxOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return _space(task, target, task.dims["N"], (128, 256, 512, 1024))

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        return space.from_values(dict(vec=max(space.knob("vec").values),
                                      threads=min(1024, max(space.knob("threads").values))))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return _features(task, config, target, task.dims["N"], self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        d = task.dims
        return _source(task, config, self.signature(task) + dim_scalars(task),
                       f"constexpr long long N = {d['N']};\n" + static_dims(task, ("M",)), _ARGMAX, "argmax_rows",
                       "M" if "M" in task.dynamic else d["M"])


_ARGMAX = r"""
// the better of two (value, index) pairs: the larger value, the smaller index on a tie
__device__ __forceinline__ void keep_better(float& value, long long& index, float v, long long i) {
  if (v > value || (v == value && i < index)) { value = v; index = i; }
}

extern "C" __global__ void __launch_bounds__(THREADS) argmax_rows(@PARAMS@) {
  __shared__ float sm_value[THREADS / 32];
  __shared__ long long sm_index[THREADS / 32];
  const E* x = X + (long long)blockIdx.x * N;
  float value = -INFINITY;
  long long index = N;                            // past the end: nothing seen yet
  for (long long e = (long long)threadIdx.x * VEC; e < N; e += (long long)THREADS * VEC) {
    const Pack<E, VEC> p = load_pack<VEC, 1>(x + e);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      const float v = to_f32(p.e[k]);
      if (v > value) { value = v; index = e + k; }  // increasing indices: the first maximum stays
    }
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1)
    keep_better(value, index, __shfl_xor_sync(0xffffffffu, value, offset),
                __shfl_xor_sync(0xffffffffu, index, offset));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) { sm_value[warp] = value; sm_index[warp] = index; }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < THREADS / 32; ++w) keep_better(value, index, sm_value[w], sm_index[w]);
    Y[blockIdx.x] = (int)(index < N ? index : 0);   // no value above -inf: index 0, as numpy
  }
}
"""
