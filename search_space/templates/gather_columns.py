"""``gather_columns`` on the CPU: Y[m, j] = X[m, P[j]], each row's columns in the order P gives
(the input of an act-order int4 linear layer, whose weight rows are stored sorted by group).

A block of ``rows`` rows walks the output columns in vectors of ``vec`` lanes: each vector of
the int32 indices P is loaded once and serves every row of the block (P stays in registers
across the block). For each row the lanes are gathered from that row of X, ``gather``:
``loads`` (one scalar load per lane, put into a vector) or ``intrinsic`` (one
``llvm.masked.gather``: a hardware gather where the target has a fast one), then stored as one
contiguous vector of Y, the tail masked. Reads of a row of X go in random order, so a block
(rows x N floats) should stay in L1/L2; Y is written in order, hence the ``stores`` knob.
Blocks are split over ``threads`` (one thread for a single decode row).
"""
from __future__ import annotations

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.elementwise import GatherColumnsOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from . import rowwise as rw

BLOCK_ROWS = (1, 2, 4, 8)
GATHERS = ("loads", "intrinsic")


@register_template
class GatherColumnsCpu(GatherColumnsOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        m, n = task.dims["M"], task.dims["N"]
        knobs = [rw.vec_knob(target, n), rw.unroll_knob(n), rw.rows_knob(m, BLOCK_ROWS), rw.threads_knob(target),
                 Knob("gather", GATHERS), rw.stores_knob(task, target)]
        return ConfigSpace(knobs, rw.common_constraints(n, m))

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        # scalar loads, one row a block: hardware gathers are slow on many x86 cores, and rows of
        # N = 11008 outgrow L1 in blocks (on a Zen 5 host, one thread: the intrinsic 10-20%
        # slower; rows 2 and 4 1.2x and 1.5x slower at N = 11008, rows 1 within 6% at N = 4096)
        return rw.pick_default(self.space(task, target), [dict(vec=lanes, unroll=u, rows=1, gather="loads",
                                                               stores="cached") for u in (2, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        n = task.dims["N"]
        features = rw.row_features(task, c, n, task.dims["M"], 2, 1.0, accumulators=0,
                                   bytes_moved=self.min_bytes(task))
        for level in ("tile_bytes_l1", "tile_bytes_l2"):
            features[level] += 4.0 * n  # P, read by every block
        return features

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        n, lanes, unroll = task.dims["N"], c["vec"], c["unroll"]
        args = rw.kernel_args(task, self.signature(task))
        streaming = c["stores"] == "streaming"
        intrinsic = c["gather"] == "intrinsic"

        def gather(kb: cg.KernelBuilder, row, order):
            """X's row ``row`` (a float*) at the ``lanes`` int32 indices ``order``."""
            b = kb.b
            if intrinsic:
                # a GEP with a vector of indices is a vector of pointers (llvmlite types it as
                # one pointer, hence the type set by hand); i32 indices allow the 32-bit gather
                pointers = b.gep(row, [order], inbounds=True, source_etype=cg.F32)
                pointers.type = cg.vec(lanes, cg.F32.as_pointer())
                t = cg.vec(lanes)
                fn = cg.declare_intrinsic(kb.module, f"llvm.masked.gather.v{lanes}f32.v{lanes}p0", t,
                                          [pointers.type, cg.I32, cg.vec(lanes, cg.I1), t])
                every = ir.Constant(cg.vec(lanes, cg.I1), [1] * lanes)
                return b.call(fn, [pointers, ir.Constant(cg.I32, 4), every, ir.Constant(t, ir.Undefined)])
            value = ir.Constant(cg.vec(lanes), ir.Undefined)
            for lane in range(lanes):
                at = ir.Constant(cg.I32, lane)
                value = b.insert_element(value, kb.load(row, b.extract_element(order, at)), at)
            return value

        def block(ctx: rw.RowContext, row0, nrows: int) -> None:
            kb, a = ctx.kb, ctx.arrays
            bases = rw.row_bases(kb, row0, nrows, n)
            rows_x = [kb.gep(a["X"], base) for base in bases]

            def step(off, _u, count) -> None:
                # the tail's missing lanes read index 0: in the row, and their values never stored
                order = (kb.load_vec(a["P"], off, lanes, cg.I32) if count is None
                         else kb.masked_load_vec(a["P"], off, lanes, count, cg.I32))
                for base, row in zip(bases, rows_x):
                    rw.store(kb, gather(kb, row, order), a["Y"], kb.b.add(base, off), count, streaming)

            rw.each_vector(kb, n, lanes, unroll, step)

        return rw.build_row_kernel(self.op, task, args, "M", c["rows"], c["threads"], block, streaming=streaming)
