"""The schedule shared by the CUDA row kernels (softmax, rmsnorm, layernorm).

A row of N elements is handled by one warp (``mapping = warp``: a block holds
threads / 32 rows) or by a whole block (``mapping = block``). The row is split into
vectors of ``vec`` elements (16 bytes at most, N a multiple of ``vec`` so every row stays
aligned); thread ``tid`` of the row takes vectors ``i * TPR + tid`` (TPR threads per row),
so each load instruction of a warp covers contiguous memory. N is compiled in, so the
vectors per thread (VPT) and the tail guard are compile-time constants.

Norms and softmax need the row more than once. ``cache`` says where it stays between
passes: ``regs`` (VPT packed vectors per thread, loops fully unrolled), ``smem`` (the row
in dynamic shared memory; each thread reads back only the vectors it wrote, so no
barrier is needed) or ``reread`` (later passes load it again from global memory, where
L1/L2 usually still hold it). ``unroll`` unrolls the loops of the smem/reread modes so
that several independent loads are in flight. ``stream`` marks data touched once with
evict-first cache hints. Reductions use warp shuffles, and shared memory across warps
when a block owns the row. All arithmetic is float32.

``RowKernelCuda`` is the template of the family: an op is its operator plus the body of
its kernel once the row is chosen.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ...codegen.cuda import (PREAMBLE, VECTOR_HELPERS, bytes_per_block_ok, c_type, dim_scalars, kernel_params,
                             registers_ok, static_dims)
from ...ops.common import ITEMSIZE
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template
from .limits import occupancy

THREADS = (64, 128, 256, 512, 1024)
CACHES = ("regs", "smem", "reread")
REGS_FOR_CACHE = 64     # at most this many registers per thread hold a cached row
BASE_REGISTERS = 32     # addresses, loop counters, reduction temporaries


@dataclass(frozen=True)
class RowPlan:
    """Derived sizes of one row-kernel config: everything the renderer and features need."""

    n: int
    dtype: str
    mapping: str
    threads: int
    vec: int
    cache: str
    unroll: int
    stream: int

    @classmethod
    def of(cls, task: Task, config: Config | dict) -> "RowPlan":
        c = config.as_dict() if isinstance(config, Config) else config
        return cls(task.dims["N"], task.dtype, c["mapping"], c["threads"], c["vec"], c["cache"], c["unroll"],
                   c["stream"])

    @property
    def itemsize(self) -> int:
        return ITEMSIZE[self.dtype]

    @property
    def ctype(self) -> str:
        return c_type(self.dtype)

    @property
    def tpr(self) -> int:
        """Threads per row."""
        return 32 if self.mapping == "warp" else self.threads

    @property
    def rows(self) -> int:
        """Rows per block."""
        return self.threads // self.tpr

    @property
    def nv(self) -> int:
        return self.n // self.vec

    @property
    def vpt(self) -> int:
        return -(-self.nv // self.tpr)

    def cached_registers(self, arrays: int = 1) -> int:
        return arrays * self.vpt * self.vec * self.itemsize // 4 if self.cache == "regs" else 0

    def register_estimate(self, arrays: int = 1, streams: int = 1) -> int:
        """Cached row + loads in flight (``streams`` input rows per pass) + the rest."""
        in_flight = streams * self.unroll * max(self.vec * self.itemsize // 4, 1)
        return BASE_REGISTERS + self.cached_registers(arrays) + in_flight

    def smem_bytes(self, arrays: int = 1) -> int:
        return arrays * self.rows * self.n * self.itemsize if self.cache == "smem" else 0

    def grid(self, task: Task) -> str | int:
        if "M" in task.dynamic:
            return f"(M + {self.rows - 1}) // {self.rows}" if self.rows > 1 else "M"
        return -(-task.dims["M"] // self.rows)

    # ------------------------------------------------------------------ code pieces

    def constants(self, log2e: bool = False) -> str:
        return (f"typedef {self.ctype} T;\n"
                f"constexpr int N = {self.n};\nconstexpr int VEC = {self.vec};\nconstexpr int NV = N / VEC;\n"
                f"constexpr int THREADS = {self.threads};\nconstexpr int TPR = {self.tpr};\n"
                f"constexpr int ROWS = THREADS / TPR;\nconstexpr int VPT = (NV + TPR - 1) / TPR;\n"
                + ("constexpr float LOG2E = 1.4426950408889634f;\n" if log2e else ""))

    def reducers(self) -> str:
        """row_sum / row_max over the threads of one row (every one of them gets the result)."""
        if self.mapping == "warp":
            return ("__device__ __forceinline__ float row_sum(float v, float*) { return warp_sum(v); }\n"
                    "__device__ __forceinline__ float row_max(float v, float*) { return warp_max(v); }\n")
        return ("__device__ __forceinline__ float row_sum(float v, float* s) { return block_sum<THREADS>(v, s); }\n"
                "__device__ __forceinline__ float row_max(float v, float* s) { return block_max<THREADS>(v, s); }\n")

    def row_start(self) -> str:
        """Declares tid (thread within the row), slot (row within the block) and row; threads
        of a row past M leave together (a whole warp or a whole block, so no barrier or
        shuffle is left waiting)."""
        tid = "threadIdx.x & 31" if self.mapping == "warp" else "threadIdx.x"
        slot = "threadIdx.x >> 5" if self.mapping == "warp" else "0"
        return (f"  __shared__ float scratch[32];\n  const int tid = {tid};\n  const int slot = {slot};\n"
                f"  const long long row = (long long)blockIdx.x * ROWS + slot;\n  if (row >= M) return;\n"
                "  (void)scratch; (void)slot;\n")

    def loop(self, first: bool) -> str:
        """The loop over this thread's vectors; ``v`` is the vector index within the row."""
        pragma = "#pragma unroll" if self.cache == "regs" else f"#pragma unroll {self.unroll}"
        return (f"{pragma}\n  for (int i = 0; i < VPT; ++i) {{\n    const int v = i * TPR + tid;\n"
                "    if (NV % TPR != 0 && v >= NV) break;\n")

    def declare_cache(self, name: str, slot_index: int = 0, arrays: int = 1) -> str:
        if self.cache == "regs":
            return f"  Pack<T, VEC> {name}_c[VPT];\n"
        if self.cache == "smem":
            return (f"  T* {name}_s = reinterpret_cast<T*>(smem_rows) + ((long long)slot * {arrays} + {slot_index}) * N;\n")
        return ""

    def smem_decl(self) -> str:
        return "  extern __shared__ __align__(16) unsigned char smem_rows[];\n" if self.cache == "smem" else ""

    def keep(self, name: str, var: str) -> str:
        if self.cache == "regs":
            return f"    {name}_c[i] = {var};\n"
        if self.cache == "smem":
            return f"    store_pack<VEC>({name}_s + v * VEC, {var});\n"
        return ""

    def get(self, name: str, source: str) -> str:
        """The cached vector v of ``name``; re-read from ``source`` (a row pointer) otherwise.
        Re-reads use plain loads: ``source`` may be an output this thread wrote."""
        if self.cache == "regs":
            return f"{name}_c[i]"
        if self.cache == "smem":
            return f"load_pack<VEC>({name}_s + v * VEC)"
        return f"load_pack<VEC>({source} + (long long)v * VEC)"

    def first_load(self, ptr: str) -> str:
        """Vector v of the row at ``ptr``, loaded by the first pass."""
        return f"load_pack<VEC, {self.load_hint}>({ptr} + (long long)v * VEC)"

    @staticmethod
    def column(var: str, array: str) -> str:
        """Declares ``var``: vector v of the per-column parameter ``array`` [N], which no
        thread writes (read-only path)."""
        return f"    const Pack<T, VEC> {var} = load_pack<VEC, 2>({array} + (long long)v * VEC);\n"

    def first_pass(self, statements: str) -> str:
        """The loop of the first pass: ``a`` = vector v of the row x, loaded and kept in the
        cache, then ``statements``."""
        return (self.loop(True) + f"    const Pack<T, VEC> a = {self.first_load('x')};\n" + self.keep("x", "a")
                + statements + "  }\n")

    def next_pass(self, statements: str, source: str = "x") -> str:
        """The loop of a later pass: ``a`` = vector v of the cached row (re-read from the row
        pointer ``source`` otherwise), then ``statements``."""
        return self.loop(False) + f"    const Pack<T, VEC> a = {self.get('x', source)};\n" + statements + "  }\n"

    def write_pass(self, source: str, expr: str, columns: str = "") -> str:
        """The last pass of every row kernel: after ``a`` (see ``next_pass``) and the
        ``columns`` declared, element e of y = ``expr``."""
        return self.next_pass(
            columns + "    Pack<T, VEC> o;\n"
            f"#pragma unroll\n    for (int e = 0; e < VEC; ++e) o.e[e] = from_f32<T>({expr});\n"
            f"    store_pack<VEC, {self.store_hint}>(y + (long long)v * VEC, o);\n", source)

    @property
    def load_hint(self) -> int:
        """First-pass loads: evict-first when streaming and the row is not read again."""
        return 1 if self.stream and self.cache != "reread" else 0

    @property
    def store_hint(self) -> int:
        return 1 if self.stream else 0


def row_space(task: Task, target: Target, cached_arrays: int = 1, streams: int = 1) -> ConfigSpace:
    """Knobs and named constraints of a row kernel.

    ``cached_arrays``: rows kept between passes (1 for every op here); ``streams``: input
    rows loaded per element in the heaviest pass (register estimate of loads in flight).
    """
    n, itemsize = task.dims["N"], ITEMSIZE[task.dtype]
    max_threads = target.max_threads_per_block or 1024
    knobs = [
        Knob("mapping", ("warp", "block")),
        Knob("threads", tuple(t for t in THREADS if t <= max_threads)),
        Knob("vec", tuple(v for v in (1, 2, 4, 8) if v * itemsize <= 16 and n % v == 0)),
        Knob("cache", CACHES),
        Knob("unroll", (1, 2, 4)),
        Knob("stream", (0, 1)),
    ]

    def plan(c) -> RowPlan:
        return RowPlan(n, task.dtype, c["mapping"], c["threads"], c["vec"], c["cache"], c["unroll"], c["stream"])

    constraints = [
        ("unroll applies to smem or re-read rows only",
         lambda c: c["unroll"] == 1 or c["cache"] != "regs"),
        ("unroll at most the vectors per thread",
         lambda c: c["unroll"] <= plan(c).vpt),
        ("block rows give every warp a vector",
         lambda c: c["mapping"] == "warp" or c["threads"] <= max(32, 32 * -(-plan(c).nv // 32))),
        ("cached row fits in registers",
         lambda c: plan(c).cached_registers(cached_arrays) <= REGS_FOR_CACHE),
        ("registers fit the block",
         lambda c: registers_ok(plan(c).register_estimate(cached_arrays, streams), c["threads"], target)),
        ("cached rows fit in shared memory",
         lambda c: bytes_per_block_ok(plan(c).smem_bytes(cached_arrays) + 128, target)),
    ]
    return ConfigSpace(knobs, constraints)


def row_default(space: ConfigSpace, task: Task) -> Config:
    """Widest vectors; one warp per row for short rows (8 rows per block), else a block per
    row with just enough threads to keep the row in registers, else re-read rows."""
    vec = max(space.knob("vec").values)
    nv = task.dims["N"] // vec
    preferences = []
    if nv <= 32 * 4:
        preferences.append(dict(mapping="warp", threads=256, vec=vec, cache="regs", unroll=1, stream=0))
    for threads in (256, 512, 1024):
        preferences.append(dict(mapping="block", threads=threads, vec=vec, cache="regs", unroll=1, stream=0))
    for threads in (256, 512, 1024, 128, 64):
        for unroll in (4, 2, 1):
            preferences.append(dict(mapping="block", threads=threads, vec=vec, cache="reread", unroll=unroll,
                                    stream=0))
    preferences.append(dict(mapping="warp", threads=256, vec=vec, cache="regs", unroll=1, stream=0))
    for values in preferences:
        if space.accepts(values):
            return space.from_values(values)
    return next(iter(space))


def row_features(task: Task, config: Config, target: Target, min_bytes: float, flops: float,
                 passes: int, cached_arrays: int = 1) -> dict[str, float]:
    """Analytic features shared by the row kernels; ``passes`` counts reads of the row."""
    p = RowPlan.of(task, config)
    m = task.dims["M"]
    blocks = -(-m // p.rows)
    per_sm = max(1, min(2048 // p.threads, 32))
    smem = p.smem_bytes(cached_arrays)
    if smem:
        per_sm = max(1, min(per_sm, (target.max_shared_memory_per_block or 48 << 10) // smem))
    rereads = passes - 1 if p.cache == "reread" else 0
    row_bytes = p.itemsize * m * p.n
    moved = min_bytes + rereads * row_bytes
    covered = p.vpt * p.tpr
    return {
        "threads": p.threads / 32,
        "vector_lanes": p.vec,
        "unroll": p.unroll,
        "accumulators": p.vpt,
        "parallel_chunks": blocks,
        "chunks_per_thread": blocks / max(target.sm_count, 1),
        "waves": blocks / (max(target.sm_count, 1) * per_sm),
        "tile_bytes_l1": p.rows * p.n * p.itemsize,
        "bytes_moved": moved,
        "arith_intensity": flops / moved,
        "n_tail_fraction": (covered - p.nv) / covered,
        "m_tail_fraction": (blocks * p.rows - m) / (blocks * p.rows),
        "shared_bytes": smem,
        "registers": p.register_estimate(cached_arrays),
        "occupancy": occupancy(p.threads, smem, p.register_estimate(cached_arrays), target),
        "reduction_share": math.log2(p.tpr) / max(p.vpt * p.vec, 1),
    }


def c_float(value: float) -> str:
    """A float32 literal for C (``1e-05f``)."""
    text = repr(float(value))
    return text + "f" if any(ch in text for ch in ".e") else text + ".0f"


def row_kernel_source(task: Task, plan: RowPlan, entry: str, args, body: str, log2e: bool = False) -> KernelSource:
    """Assemble a row kernel: preamble, helpers, constants, reducers and ``body`` (the
    statements after the row is chosen); one block of ``plan.threads`` per ``plan.rows`` rows."""
    code = (PREAMBLE + VECTOR_HELPERS + plan.constants(log2e) + static_dims(task, ("M",)) + plan.reducers()
            + f'\nextern "C" __global__ void __launch_bounds__({plan.threads}) {entry}({kernel_params(args)}) {{\n'
            + plan.smem_decl() + plan.row_start() + body + "}\n")
    launch = (("block", (plan.threads, 1, 1)), ("grid", (plan.grid(task), 1, 1)), ("smem", plan.smem_bytes()))
    return KernelSource("cuda", code, entry, tuple(args), launch)


class RowKernelCuda(Template):
    """A row kernel over M x N (one warp or block per row); subclasses also inherit the
    operator (RowOp) and write ``body``. The kernel is named ``<op>_rows``."""

    target_kind = "cuda"
    log2e: ClassVar[bool] = False  # the body uses the constant LOG2E

    def streams(self, task: Task) -> int:
        """Input rows loaded per element in the heaviest pass (see ``row_space``)."""
        return 1

    def body(self, task: Task, plan: RowPlan) -> str:
        """The kernel's statements once the row is chosen (see ``row_kernel_source``)."""
        raise NotImplementedError

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return row_space(task, target, streams=self.streams(task))

    def default(self, task: Task, target: Target) -> Config:
        return row_default(self.space(task, target), task)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return row_features(task, config, target, self.min_bytes(task), self.flops(task), passes=2)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        plan = RowPlan.of(task, config)
        args = self.signature(task) + dim_scalars(task)
        return row_kernel_source(task, plan, f"{self.op}_rows", args, self.body(task, plan), log2e=self.log2e)
