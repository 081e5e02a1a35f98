"""The skeleton shared by the CPU templates of row-wise and element-wise operators.

Those operators walk rows of contiguous floats: M rows of N (T tokens of H x D for rope).
A kernel is a chunk body over blocks of ``rows`` consecutive rows, one block per parallel
chunk (``codegen.llvm.parallel_entry`` splits the chunks over threads), and inside a row a
vector loop of ``vec`` lanes unrolled ``unroll`` times with a masked tail. Templates say
what happens to one vector and to one block of rows; this module holds the common knobs,
the loops, masked memory access, vector accumulators and the kernel entry, so that every
template reads the row count the same way: compiled in when static, taken from the int64
scalar argument named after the dim when dynamic (its value is never compiled in).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..space import Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource
from .threads import default_thread_counts, threads_knob

VECTOR_WIDTHS = (4, 8, 16)
UNROLLS = (1, 2, 4)
BLOCK_ROWS = (1, 2, 4)  # rows processed together by row-reduction templates
CHUNK_ROWS = (1, 4, 16, 64, 256)  # rows per flat chunk of element-wise templates
F32_MAX = 3.4028234663852886e38


def vector_registers(target: Target) -> int:
    return 32 if target.vector_bits >= 512 else 16


# ----------------------------------------------------------------------------- knobs


def vec_knob(target: Target, n: int) -> Knob:
    """Vector widths the target has, without those more than twice as wide as the row
    (a row of n elements in a vector of 2n lanes or more is mostly masked-off lanes)."""
    widths = [v for v in VECTOR_WIDTHS if v <= target.vector_lanes_f32] or [VECTOR_WIDTHS[0]]
    return Knob("vec", tuple(v for v in widths if v == widths[0] or v // 2 < n))


def unroll_knob(n: int) -> Knob:
    """Unroll factors that leave at least one full unrolled step at the smallest width."""
    return Knob("unroll", tuple(u for u in UNROLLS if u == 1 or VECTOR_WIDTHS[0] * u <= n))


def rows_knob(count: int, choices: Sequence[int]) -> Knob:
    return Knob("rows", tuple(r for r in choices if r == choices[0] or r <= count))


def stores_knob(task: Task, target: Target) -> Knob:
    """How the final results are stored: ``cached``, or also ``streaming`` (non-temporal
    stores, which skip reading each output line into the cache before writing it: a third
    less memory traffic for a read-one-write-one stream) when the data far outgrows the
    caches, as the roofline counts it (over half the L3)."""
    big = target.l3_bytes and task.min_bytes > target.l3_bytes / 2
    return Knob("stores", ("cached", "streaming") if big else ("cached",))


def common_constraints(n: int, count: int) -> list[tuple[str, Callable]]:
    """The unrolled step fits the row, and every thread gets a chunk (at the tuned count)."""
    return [
        ("unroll fits the row", lambda c: c["unroll"] == 1 or c["vec"] * c["unroll"] <= n),
        ("one chunk per thread at least",
         lambda c: c["threads"] == 1 or math.ceil(count / c["rows"]) >= c["threads"]),
    ]


def reduction_knobs(task: Task, target: Target) -> list[Knob]:
    """vec, unroll, rows (rows of a block, processed together), threads: for row reductions."""
    m, n = task.dims["M"], task.dims["N"]
    return [vec_knob(target, n), unroll_knob(n), rows_knob(m, BLOCK_ROWS), threads_knob(target)]


def register_budget(target: Target) -> int:
    """Vectors a block may keep live (accumulators, kept rows): about half the registers."""
    return vector_registers(target) // 2 + 4


def vectors_per_row(n: int, lanes: int) -> int:
    return -(-n // lanes)


def pick_default(space, candidates: Sequence[dict], task: Task, target: Target):
    """The first candidate the space accepts, each tried on every core first where the task
    gains from it (``threads.default_thread_counts``); the last resort: its first valid config."""
    for threads in default_thread_counts(task, target):
        for values in candidates:
            values = dict(values, threads=threads)
            if space.accepts(values):
                return space.from_values(values)
    return next(iter(space))


def row_features(task: Task, c: dict, n: int, count: int, streams: int, passes: float,
                 accumulators: int, bytes_moved: float) -> dict[str, float]:
    """Analytic features of a row kernel: ``streams`` arrays of rows, ``passes`` over a row."""
    chunks = math.ceil(count / c["rows"])
    step = c["vec"] * c["unroll"]
    return {
        "threads": c["threads"],
        "vector_lanes": c["vec"],
        "unroll": c["unroll"],
        "accumulators": accumulators,
        "parallel_chunks": chunks,
        "chunks_per_thread": chunks / c["threads"],
        "tile_bytes_l1": 4.0 * streams * c["rows"] * n,
        "tile_bytes_l2": 4.0 * streams * c["rows"] * n * passes,
        "bytes_moved": bytes_moved,
        "arith_intensity": task.flops / max(bytes_moved, 1.0),
        "n_tail_fraction": (n % step) / n,
    }


# ----------------------------------------------------------------------------- loops and memory


def vector_loop(kb: cg.KernelBuilder, n: int | ir.Value, lanes: int, unroll: int,
                step: Callable[[ir.Value, int, ir.Value | None], None], name: str = "j") -> None:
    """Call ``step(offset, u, count)`` for every vector of a range of ``n`` elements.

    The main loop advances ``lanes * unroll`` at a time (``u`` numbers the vectors of one
    step, so unrolled reductions can keep ``unroll`` independent accumulators); then whole
    vectors; then one masked vector where ``count`` (an i64) says how many lanes are real.
    ``count`` is None for whole vectors. ``n`` is an int (the loops are laid out at
    render time) or an i64 value.
    """
    b = kb.b
    span = lanes * unroll
    if isinstance(n, int):
        main = n - n % span
        if main:
            with kb.loop(0, main, span, name=name) as j:
                for u in range(unroll):
                    step(b.add(j, cg.i64(u * lanes)), u, None)
        at, u = main, 0
        while n - at >= lanes:
            step(cg.i64(at), u, None)
            at, u = at + lanes, u + 1
        if n - at:
            step(cg.i64(at), u % unroll, cg.i64(n - at))
        return
    main = b.sub(n, b.srem(n, cg.i64(span)))
    with kb.loop(0, main, span, name=name) as j:
        for u in range(unroll):
            step(b.add(j, cg.i64(u * lanes)), u, None)
    whole = b.sub(n, b.srem(n, cg.i64(lanes)))
    if unroll > 1:
        with kb.loop(main, whole, lanes, name=f"{name}.v") as j:
            step(j, 0, None)
    rest = b.sub(n, whole)
    with kb.if_then(b.icmp_signed(">", rest, cg.i64(0))):
        step(whole, 0, rest)


def each_vector(kb: cg.KernelBuilder, n: int, lanes: int, unroll: int,
                step: Callable[[ir.Value, int, ir.Value | None], None], unrolled: bool = False) -> None:
    """``vector_loop`` over a row of ``n`` elements, or with ``unrolled``, every vector of the
    row laid out at render time in the same order (so values can be kept between passes)."""
    if not unrolled:
        vector_loop(kb, n, lanes, unroll, step)
        return
    for index, at in enumerate(range(0, n, lanes)):
        step(cg.i64(at), index % unroll, cg.i64(n - at) if n - at < lanes else None)


def row_bases(kb: cg.KernelBuilder, row0, nrows: int, n: int) -> list:
    """Element offsets of the rows of a block: (row0 + r) * n."""
    return [kb.b.mul(kb.b.add(row0, cg.i64(r)), cg.i64(n)) for r in range(nrows)]

def load(kb: cg.KernelBuilder, base, at, lanes: int, count=None, fill: float = 0.0):
    """``lanes`` floats at ``base[at]``; with ``count``, only that many, the rest ``fill``."""
    if count is None:
        return kb.load_vec(base, at, lanes)
    value = kb.masked_load_vec(base, at, lanes, count)
    if fill:
        value = kb.b.select(kb.lane_mask(lanes, count), value, kb.splat(cg.f32(fill), lanes))
    return value


def store(kb: cg.KernelBuilder, value, base, at, count=None, streaming: bool = False) -> None:
    """Store a vector (its first ``count`` lanes with ``count``); ``streaming``: a non-temporal
    store (whole vectors only). Its alignment stays that of a float, so LLVM never emits an
    aligned-only instruction: unaligned rows get narrower non-temporal stores instead."""
    if count is not None:
        kb.masked_store_vec(value, base, at, count)
    elif streaming:
        addr = kb.b.bitcast(kb.gep(base, at), value.type.as_pointer())
        instruction = kb.b.store(value, addr, align=4)
        instruction.set_metadata("nontemporal", kb.module.add_metadata([ir.Constant(cg.I32, 1)]))
    else:
        kb.store_vec(value, base, at)


def keep_lanes(kb: cg.KernelBuilder, value, count, fill: float = 0.0):
    """``value`` with the lanes past ``count`` replaced by ``fill`` (None count: unchanged)."""
    if count is None:
        return value
    lanes = value.type.count
    return kb.b.select(kb.lane_mask(lanes, count), value, kb.splat(cg.f32(fill), lanes))


def vmax(kb: cg.KernelBuilder, a, b):
    """max(a, b) as one max instruction: a > b ? a : b (``KernelBuilder.fmax`` is llvm.maxnum,
    whose NaN rule costs a compare and a blend per use on x86, in the loop-carried chain)."""
    return kb.b.select(kb.b.fcmp_ordered(">", a, b), a, b)


class Accumulators:
    """Vector accumulators in stack slots, one per (row of a block, unrolled vector).

    Slots keep the IR simple across loops; SROA turns them into registers.
    """

    def __init__(self, kb: cg.KernelBuilder, rows: int, unroll: int, lanes: int, init: float, name: str = "acc",
                 element: ir.Type = cg.F32):
        self.kb, self.unroll = kb, unroll
        self.slots = [[kb.local(cg.vec(lanes, element), name=f"{name}{r}_{u}") for u in range(unroll)]
                      for r in range(rows)]
        start = kb.splat(ir.Constant(element, init), lanes)
        for row in self.slots:
            for slot in row:
                kb.b.store(start, slot)

    def get(self, r: int, u: int):
        return self.kb.b.load(self.slots[r][u])

    def set(self, r: int, u: int, value) -> None:
        self.kb.b.store(value, self.slots[r][u])

    def vector(self, r: int, combine: Callable) -> ir.Value:
        """Row ``r``'s unrolled accumulators folded into one vector with ``combine``."""
        total = self.get(r, 0)
        for u in range(1, self.unroll):
            total = combine(total, self.get(r, u))
        return total

    def sum(self, r: int) -> ir.Value:
        return self.kb.reduce_add(self.vector(r, self.kb.fadd))

    def max(self, r: int) -> ir.Value:
        return self.kb.reduce_max(self.vector(r, lambda a, b: vmax(self.kb, a, b)))


# ----------------------------------------------------------------------------- kernel entry


@dataclass(frozen=True)
class RowContext:
    """What a template's emitters see inside the chunk body."""

    kb: cg.KernelBuilder
    arrays: dict[str, ir.Value]  # pointer arguments (arrays and workspaces) by name
    thread: ir.Value  # 0 .. threads-1: selects a thread's share of a workspace
    count: ir.Value  # number of rows: a constant, or the scalar argument when dynamic


BlockEmitter = Callable[[RowContext, ir.Value, int], None]
RestEmitter = Callable[[RowContext, ir.Value, ir.Value], None]


def kernel_args(task: Task, signature: Sequence[ArgSpec], workspace: Sequence[ArgSpec] = ()) -> tuple[ArgSpec, ...]:
    """The operator's arrays, the template's workspaces, then one int64 per dynamic dim."""
    return tuple(signature) + tuple(workspace) + tuple(ArgSpec(d, "scalar", "int64") for d in task.dynamic)


def build_row_kernel(name: str, task: Task, args: Sequence[ArgSpec], count_dim: str, rows: int, threads: int,
                     emit_block: BlockEmitter, emit_rest: RestEmitter | None = None,
                     prepare: Callable[[ir.Module], None] | None = None, streaming: bool = False) -> KernelSource:
    """Render a kernel that runs ``emit_block(ctx, row0, rows)`` on every block of rows.

    There are ceil(count / rows) chunks of ``rows`` rows, split over ``threads``. A last,
    partial block goes to ``emit_rest(ctx, row0, remaining)`` (an i64 row count), or when
    there is none, to ``emit_block`` one row at a time. ``prepare(module)`` may add globals
    (constant tables) before the body is emitted. ``streaming``: the emitters use
    non-temporal stores, so the body ends with a fence that makes them visible.
    """
    module = cg.new_module(name)
    if prepare is not None:
        prepare(module)
    pointers = [a for a in args if a.role != "scalar"]
    scalars = [a for a in args if a.role == "scalar"]
    body, kb = cg.chunk_body(module, f"{name}_chunk", len(pointers), len(scalars))
    b = kb.b
    values = list(body.args)
    arrays = {a.name: v for a, v in zip(pointers, values)}
    scalar_values = {a.name: v for a, v in zip(scalars, values[len(pointers):])}
    begin, end, thread = values[-3:]
    dynamic = count_dim in task.dynamic
    count = scalar_values[count_dim] if dynamic else cg.i64(task.dims[count_dim])
    ctx = RowContext(kb, arrays, thread, count)

    with kb.loop(begin, end, 1, name="chunk") as chunk:
        row0 = b.mul(chunk, cg.i64(rows))
        if rows == 1 or (not dynamic and task.dims[count_dim] % rows == 0):
            emit_block(ctx, row0, rows)
        else:
            whole = b.icmp_signed("<=", b.add(row0, cg.i64(rows)), count)
            with b.if_else(whole) as (then, otherwise):
                with then:
                    emit_block(ctx, row0, rows)
                with otherwise:
                    if emit_rest is not None:
                        emit_rest(ctx, row0, b.sub(count, row0))
                    else:
                        with kb.loop(row0, count, 1, name="rest") as row:
                            emit_block(ctx, row, 1)
    if streaming:
        b.fence("seq_cst")  # non-temporal stores are weakly ordered: drain them before returning
    kb.ret()

    if dynamic:
        index = len(pointers) + [a.name for a in scalars].index(count_dim)

        def n_chunks(entry_kb: cg.KernelBuilder, entry_args: list) -> ir.Value:
            return entry_kb.b.sdiv(entry_kb.b.add(entry_args[index], cg.i64(rows - 1)), cg.i64(rows))
    else:
        n_chunks = math.ceil(task.dims[count_dim] / rows)
    cg.parallel_entry(module, name, body, len(pointers), len(scalars), threads=threads, n_chunks=n_chunks)
    return KernelSource("llvm", str(module), name, tuple(args), (("threads", threads),))

