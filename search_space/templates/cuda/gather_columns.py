"""``gather_columns`` on CUDA: Y[m, j] = X[m, P[j]], each row's columns in the order P gives
(the input of an act-order int4 linear layer).

A block takes ``rows`` consecutive rows (grid x, M may be a runtime argument) and one of
``split`` chunks of a row's columns (grid y). Its threads walk the chunk in vectors of
``vec`` columns, thread t taking vectors t, t + threads, ...: each loads its ``vec``
indices of P at once (coalesced, read-only path), then for each of the block's rows reads
the ``vec`` elements X[row, P[j]] (scattered within the row, which L1 soon holds: a block
touches its rows all over) and stores them as one vector of Y (coalesced). A thread loads
the indices of ``unroll`` vectors, then per row issues all their gathers before the first
store (``unroll`` x ``vec`` loads in flight: their latency is the kernel's cost); the
indices serve the block's ``rows`` rows. ``split`` > 1 gives a few rows (decode: M = 1)
enough blocks, at the price of every chunk's block pulling the whole row through its own
L1; one chunk per row (``split`` = 1) reads each row into one SM once (prefill).

P holds a permutation of 0 .. N - 1 (the operator's contract): it is not checked. The
kernel is a plain launch, as the other row kernels of the decode step (rmsnorm, swiglu,
bias_add): the kernel after it waits for it to end, and it waits for the one before.
"""
from __future__ import annotations

from ...codegen.cuda import PREAMBLE, VECTOR_HELPERS, c_type, dim_scalars, kernel_params, registers_ok, static_dims
from ...ops.common import ITEMSIZE
from ...ops.elementwise import GatherColumnsOp
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .limits import occupancy

THREADS = (64, 128, 256, 512, 1024)
ROWS = (1, 2, 4)
SPLITS = (1, 2, 4, 8, 16, 32, 64)
UNROLLS = (1, 2, 4)
BASE_REGISTERS = 24   # addresses, loop counters


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _chunk(n: int, vec: int, split: int) -> int:
    """Vectors of a row per block."""
    return _cdiv(n // vec, split)


def _registers(vec: int, unroll: int) -> int:
    """The indices and the gathered elements of the vectors in flight, plus the rest (ptxas at
    sm_90: 12 to 62 registers, the most for float32 vectors of 4, unroll 4 and 4 rows)."""
    return BASE_REGISTERS + 2 * unroll * vec


def _space(task: Task, target: Target) -> ConfigSpace:
    n = task.dims["N"]
    max_threads = target.max_threads_per_block or 1024
    threads = tuple(t for t in THREADS if t <= max_threads)
    knobs = [
        Knob("threads", threads),
        # P's indices are int32: a vector of 4 is 16 bytes
        Knob("vec", tuple(v for v in (1, 2, 4) if v * ITEMSIZE[task.dtype] <= 16 and n % v == 0)),
        Knob("rows", ROWS),
        Knob("split", SPLITS),
        Knob("unroll", UNROLLS),
    ]
    constraints = [
        ("every chunk holds a vector",
         lambda c: (c["split"] - 1) * _chunk(n, c["vec"], c["split"]) < n // c["vec"]),
        ("every warp has a vector of the chunk",
         lambda c: c["threads"] == threads[0] or c["threads"] <= 32 * _cdiv(_chunk(n, c["vec"], c["split"]), 32)),
        ("unroll at most the vectors per thread",
         lambda c: c["unroll"] <= _cdiv(_chunk(n, c["vec"], c["split"]), c["threads"])),
        ("registers fit the block", lambda c: registers_ok(_registers(c["vec"], c["unroll"]), c["threads"], target)),
    ]
    return ConfigSpace(knobs, constraints)


def _default(space: ConfigSpace, task: Task, target: Target) -> Config:
    """The widest vectors, 128 threads, a row a block; as many chunks per row (at least one
    vector per thread) as take the blocks to two per SM (decode), one chunk for many rows; the
    most vectors in flight a thread has."""
    vec = max(space.knob("vec").values)
    nv = task.dims["N"] // vec
    want = 2 * max(target.sm_count, 1)
    for threads in (128, 64, 256):
        splits = [s for s in space.knob("split").values if s == 1 or s * threads <= nv]
        split = next((s for s in splits if task.dims["M"] * s >= want), splits[-1])
        for unroll in (4, 2, 1):
            values = dict(threads=threads, vec=vec, rows=1, split=split, unroll=unroll)
            if space.accepts(values):
                return space.from_values(values)
    return next(iter(space))


@register_template
class GatherColumnsCuda(GatherColumnsOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return _space(task, target)

    def default(self, task: Task, target: Target) -> Config:
        return _default(self.space(task, target), task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        m, n, itemsize = task.dims["M"], task.dims["N"], ITEMSIZE[task.dtype]
        nv, chunk = n // c["vec"], _chunk(n, c["vec"], c["split"])
        vpt = _cdiv(chunk, c["threads"])
        groups = _cdiv(m, c["rows"])
        blocks = groups * c["split"]
        registers = _registers(c["vec"], c["unroll"])
        per_sm = max(1, min(2048 // c["threads"], 32))
        covered = c["split"] * vpt * c["threads"]
        moved = self.min_bytes(task) + 4 * n * (groups - 1)   # P again for each block of rows (from L2)
        return {
            "threads": c["threads"] / 32,
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "parallel_chunks": blocks,
            "chunks_per_thread": vpt,
            "waves": blocks / (max(target.sm_count, 1) * per_sm),
            "tile_bytes_l1": c["rows"] * n * itemsize,
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "n_tail_fraction": (covered - nv) / covered,
            "m_tail_fraction": (groups * c["rows"] - m) / (groups * c["rows"]),
            "registers": registers,
            "occupancy": occupancy(c["threads"], 0, registers, target),
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        args = self.signature(task) + dim_scalars(task)
        code = (PREAMBLE + VECTOR_HELPERS
                + f"typedef {c_type(task.dtype)} T;\nconstexpr int N = {task.dims['N']};\n"
                f"constexpr int VEC = {c['vec']};\nconstexpr int THREADS = {c['threads']};\n"
                f"constexpr int ROWS = {c['rows']};\nconstexpr int SPLIT = {c['split']};\n"
                f"constexpr int UNROLL = {c['unroll']};\n" + static_dims(task, ("M",))
                + _KERNEL.replace("@PARAMS@", kernel_params(args)))
        rows = c["rows"]
        if "M" in task.dynamic:
            grid = f"(M + {rows - 1}) // {rows}" if rows > 1 else "M"
        else:
            grid = _cdiv(task.dims["M"], rows)
        launch = (("block", (c["threads"], 1, 1)), ("grid", (grid, c["split"], 1)), ("smem", 0))
        return KernelSource("cuda", code, "gather_columns_rows", tuple(args), launch)


_KERNEL = r"""constexpr int NV = N / VEC;                          // vectors of a row
constexpr int CHUNK = (NV + SPLIT - 1) / SPLIT;      // of a block (grid y: the chunk)
constexpr int VPT = (CHUNK + THREADS - 1) / THREADS; // of a thread

extern "C" __global__ void __launch_bounds__(THREADS) gather_columns_rows(@PARAMS@) {
  const long long row0 = (long long)blockIdx.x * ROWS;
  const int first = blockIdx.y * CHUNK;
  const int end = min(first + CHUNK, NV);
  for (int i0 = 0; i0 < VPT; i0 += UNROLL) {
    // the indices of UNROLL vectors (column 0 for a vector past the chunk: read, never stored)
    Pack<int32_t, VEC> p[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int v = first + (i0 + u) * THREADS + threadIdx.x;
      if (v < end) p[u] = load_pack<VEC, 2>(P + (long long)v * VEC);
      else p[u] = Pack<int32_t, VEC>{};
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const long long row = row0 + r;
      if (ROWS > 1 && row >= M) break;               // the same for the whole block
      const T* x = X + row * N;
      Pack<T, VEC> o[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u)               // every gather in flight before a store
#pragma unroll
        for (int e = 0; e < VEC; ++e) o[u].e[e] = x[p[u].e[e]];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int v = first + (i0 + u) * THREADS + threadIdx.x;
        if (v < end) store_pack<VEC>(Y + row * N + (long long)v * VEC, o[u]);
      }
    }
  }
}
"""
