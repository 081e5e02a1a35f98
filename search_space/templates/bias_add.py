"""``bias_add`` on the CPU: Y = X + B, the bias B[N] of a linear layer added to every row.

A block of ``rows`` rows walks the row's vectors once: each vector of B is loaded once and
added to that vector of every row of the block (B stays in registers across the block).
"""
from __future__ import annotations

from ..ops.elementwise import BiasAddOp
from ..space import Config, ConfigSpace
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from . import rowwise as rw

BLOCK_ROWS = (1, 2, 4, 8)


@register_template
class BiasAddCpu(BiasAddOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        m, n = task.dims["M"], task.dims["N"]
        knobs = [rw.vec_knob(target, n), rw.unroll_knob(n), rw.rows_knob(m, BLOCK_ROWS), rw.threads_knob(target),
                 rw.stores_knob(task, target)]
        return ConfigSpace(knobs, rw.common_constraints(n, m))

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        return rw.pick_default(self.space(task, target), [dict(vec=lanes, unroll=u, rows=r, stores="cached")
                                                          for u in (2, 1) for r in (4, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        return rw.row_features(task, c, task.dims["N"], task.dims["M"], 2, 1.0, accumulators=0,
                               bytes_moved=self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        n, lanes, unroll = task.dims["N"], c["vec"], c["unroll"]
        args = rw.kernel_args(task, self.signature(task))
        streaming = c["stores"] == "streaming"

        def block(ctx: rw.RowContext, row0, nrows: int) -> None:
            kb, a = ctx.kb, ctx.arrays
            bases = rw.row_bases(kb, row0, nrows, n)

            def step(off, _u, count) -> None:
                bias = rw.load(kb, a["B"], off, lanes, count)
                for base in bases:
                    at = kb.b.add(base, off)
                    rw.store(kb, kb.fadd(rw.load(kb, a["X"], at, lanes, count), bias), a["Y"], at, count, streaming)

            rw.each_vector(kb, n, lanes, unroll, step)

        return rw.build_row_kernel(self.op, task, args, "M", c["rows"], c["threads"], block, streaming=streaming)
