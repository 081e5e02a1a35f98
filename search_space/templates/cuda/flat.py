"""The schedule shared by the element-wise CUDA kernels (add, swiglu, gelu).

Element-wise ops ignore rows: M x N is one flat array of M * N elements (M may be a
runtime argument). A block takes a chunk of ``threads * unroll * vec`` elements; thread t
moves vectors ``u * threads + t`` (u < unroll) of the chunk, so each warp instruction
covers contiguous memory, and all ``unroll`` loads of a thread are issued before the
first result is computed. Vectors are ``vec`` elements (16 bytes at most), aligned
because the chunk starts at a multiple of ``vec``; the last, partial vector is done by
scalar code. ``grid = exact`` launches one block per chunk; ``persistent`` launches a
full wave of blocks that stride over the chunks. ``stream`` marks loads and stores
evict-first (data touched once). Arithmetic is float32.

An input of N elements (a bias: ``vector_inputs`` of the operator) is read at each element's
column, ``e % N``; its vectors must then stay in one row (``vec`` divides N), and its loads
are never marked evict-first: every row reads it again.

``ElementwiseCuda`` is the template of the family: an op is its operator plus the C
expression of one output element.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...codegen.cuda import (PREAMBLE, VECTOR_HELPERS, c_type, dim_scalars, kernel_params, registers_ok,
                             static_dims)
from ...ops.common import ITEMSIZE
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template
from .limits import occupancy

THREADS = (128, 256, 512, 1024)


@dataclass(frozen=True)
class FlatPlan:
    dtype: str
    vec: int
    threads: int
    unroll: int
    grid_mode: str
    stream: int

    @classmethod
    def of(cls, task: Task, config: Config | dict) -> "FlatPlan":
        c = config.as_dict() if isinstance(config, Config) else config
        return cls(task.dtype, c["vec"], c["threads"], c["unroll"], c["grid"], c["stream"])

    @property
    def chunk(self) -> int:
        return self.threads * self.unroll * self.vec

    def resident_blocks(self, target: Target) -> int:
        """Blocks of one full wave: every SM filled to 2048 threads."""
        return max(target.sm_count, 1) * max(1, 2048 // self.threads)

    def grid(self, task: Task, target: Target) -> str | int:
        if self.grid_mode == "persistent":
            return self.resident_blocks(target)
        n = task.dims["N"]
        if "M" in task.dynamic:
            return f"(M * {n} + {self.chunk - 1}) // {self.chunk}"
        return -(-task.dims["M"] * n // self.chunk)

    def register_estimate(self, inputs: int) -> int:
        return 24 + (inputs + 1) * self.unroll * max(self.vec * ITEMSIZE[self.dtype] // 4, 1)


def flat_space(task: Task, target: Target, inputs: int, by_column: bool = False) -> ConfigSpace:
    itemsize = ITEMSIZE[task.dtype]
    max_threads = target.max_threads_per_block or 1024
    knobs = [
        Knob("vec", tuple(v for v in (1, 2, 4, 8) if v * itemsize <= 16)),
        Knob("threads", tuple(t for t in THREADS if t <= max_threads)),
        Knob("unroll", (1, 2, 4)),
        Knob("grid", ("exact", "persistent")),
        Knob("stream", (0, 1)),
    ]
    constraints = [
        ("registers fit the block",
         lambda c: registers_ok(FlatPlan(task.dtype, c["vec"], c["threads"], c["unroll"], c["grid"],
                                         c["stream"]).register_estimate(inputs), c["threads"], target)),
    ]
    if by_column:
        constraints.append(("a vector stays in one row", lambda c: task.dims["N"] % c["vec"] == 0))
    return ConfigSpace(knobs, constraints)


def flat_default(space: ConfigSpace) -> Config:
    for vec in sorted(space.knob("vec").values, reverse=True):
        for values in (dict(vec=vec, threads=256, unroll=2, grid="exact", stream=0),
                       dict(vec=vec, threads=256, unroll=1, grid="exact", stream=0)):
            if space.accepts(values):
                return space.from_values(values)
    return next(iter(space))


def flat_features(task: Task, config: Config, target: Target, min_bytes: float, flops: float) -> dict[str, float]:
    p = FlatPlan.of(task, config)
    total = task.dims["M"] * task.dims["N"]
    chunks = -(-total // p.chunk)
    blocks = min(chunks, p.resident_blocks(target)) if p.grid_mode == "persistent" else chunks
    per_sm = max(1, 2048 // p.threads)
    return {
        "threads": p.threads / 32,
        "vector_lanes": p.vec,
        "unroll": p.unroll,
        "parallel_chunks": chunks,
        "chunks_per_thread": chunks / max(blocks, 1),
        "waves": blocks / (max(target.sm_count, 1) * per_sm),
        "tile_bytes_l1": p.chunk * ITEMSIZE[task.dtype],
        "bytes_moved": min_bytes,
        "arith_intensity": flops / min_bytes,
        "n_tail_fraction": (chunks * p.chunk - total) / (chunks * p.chunk),
        "registers": p.register_estimate(1),
        "occupancy": occupancy(p.threads, 0, p.register_estimate(1), target),
    }


def flat_source(task: Task, config: Config, target: Target, entry: str, signature, inputs: tuple[str, ...],
                expr: str, helpers: str = "", columns: tuple[str, ...] = ()) -> KernelSource:
    """``Y = expr`` element by element; ``expr`` is C over floats named a, b, ... (one per
    input, in order); ``helpers`` holds device functions it calls. ``columns``: the inputs
    of N elements, read at the element's column."""
    p = FlatPlan.of(task, config)
    names = "abcdefgh"[:len(inputs)]
    hint = 1 if p.stream else 0

    def at(src: str, index: str) -> str:
        return f"{src} + {index} % N" if src in columns else f"{src} + {index}"

    loads = "".join(f"        {n}[u] = load_pack<VEC, {0 if src in columns else hint}>({at(src, 'e')});\n"
                    for n, src in zip(names, inputs))
    # zero-initialised: a pack left unloaded (past the end) otherwise makes ptxas spill
    decls = "".join(f"    Pack<T, VEC> {n}[UNROLL] = {{}};\n" for n in names)
    vec_args = ", ".join(f"to_f32({n}[u].e[k])" for n in names)
    scalar_args = ", ".join(f"to_f32(*({at(src, 'k')}))" for src in inputs)
    params = ", ".join(f"float {n}" for n in names)
    if p.grid_mode == "persistent":
        loop = "  for (long long c = blockIdx.x; c < chunks; c += gridDim.x) {\n"
    else:  # the grid has exactly one block per chunk
        loop = "  {\n    const long long c = blockIdx.x;\n"
    code = (
        PREAMBLE + VECTOR_HELPERS
        + f"typedef {c_type(task.dtype)} T;\nconstexpr int VEC = {p.vec};\nconstexpr int THREADS = {p.threads};\n"
        f"constexpr int UNROLL = {p.unroll};\nconstexpr long long CHUNK = (long long)THREADS * UNROLL * VEC;\n"
        f"constexpr long long N = {task.dims['N']};\n" + static_dims(task, ("M",)) + helpers
        + f"__device__ __forceinline__ float op({params}) {{ return {expr}; }}\n\n"
        f'extern "C" __global__ void __launch_bounds__(THREADS) {entry}({kernel_params(signature + dim_scalars(task))}) {{\n'
        "  const long long total = M * N;\n"
        "  const long long chunks = (total + CHUNK - 1) / CHUNK;\n  (void)chunks;\n"
        + loop
        + "    const long long base = c * CHUNK;\n" + decls
        + "#pragma unroll\n    for (int u = 0; u < UNROLL; ++u) {\n"
        "      const long long e = base + ((long long)u * THREADS + threadIdx.x) * VEC;\n"
        "      if (e + VEC <= total) {\n" + loads + "      }\n    }\n"
        "#pragma unroll\n    for (int u = 0; u < UNROLL; ++u) {\n"
        "      const long long e = base + ((long long)u * THREADS + threadIdx.x) * VEC;\n"
        "      if (e + VEC <= total) {\n        Pack<T, VEC> o;\n"
        f"#pragma unroll\n        for (int k = 0; k < VEC; ++k) o.e[k] = from_f32<T>(op({vec_args}));\n"
        f"        store_pack<VEC, {hint}>(Y + e, o);\n"
        "      } else {\n"
        "        // the partial vector at the very end: at most VEC - 1 elements, one thread\n"
        f"        for (long long k = e; k < total; ++k) Y[k] = from_f32<T>(op({scalar_args}));\n"
        "      }\n    }\n  }\n}\n")
    launch = (("block", (p.threads, 1, 1)), ("grid", (p.grid(task, target), 1, 1)), ("smem", 0))
    return KernelSource("cuda", code, entry, tuple(signature + dim_scalars(task)), launch)


class ElementwiseCuda(Template):
    """Y = ``expr`` element by element over M x N; subclasses also inherit the operator (RowOp),
    whose ``row_inputs`` then ``vector_inputs`` are the kernel's inputs in order: a, b, ... in
    ``expr``, C over floats (see ``flat_source``). The kernel is named ``<op>_flat``."""

    target_kind = "cuda"
    expr: ClassVar[str] = ""

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return flat_space(task, target, len(self.row_inputs) + len(self.vector_inputs), bool(self.vector_inputs))

    def default(self, task: Task, target: Target) -> Config:
        return flat_default(self.space(task, target))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return flat_features(task, config, target, self.min_bytes(task), self.flops(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return flat_source(task, config, target, f"{self.op}_flat", self.signature(task),
                           self.row_inputs + self.vector_inputs, self.expr, columns=self.vector_inputs)
