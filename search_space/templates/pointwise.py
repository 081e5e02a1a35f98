"""The CPU template base of point-wise operators (add, swiglu, gelu): Y = f(inputs), element by element.

Rows of a point-wise operator are contiguous in memory, so a chunk of ``rows`` rows is
one flat range of rows x N elements: one vector loop (unrolled, with a single masked
tail per chunk rather than one per row), split over threads by chunks. The subclass says
what ``f`` is on one vector (``emit_vector``) and may add knobs of its own (``extra_knobs``).
"""
from __future__ import annotations

from typing import Any

from ..codegen import llvm as cg
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template
from . import rowwise as rw


def division_knob(target: Target) -> Knob:
    """``divide`` (a division instruction) or, where the target has AVX-512 (with VL, so that
    every vector width has the instruction), ``reciprocal``: an estimate and a Newton step.
    The second frees the divider but adds two multiply-adds: on Zen 4, where the FMA pipes
    bound these kernels, dividing measured faster; the tuner decides per machine."""
    fast = target.has_feature("avx512f") and target.has_feature("avx512vl")
    return Knob("division", ("divide", "reciprocal") if fast else ("divide",))


def divide(kb: cg.KernelBuilder, c: dict[str, Any], numerator, denominator):
    """numerator / denominator as the ``division`` knob says (denominator finite, nonzero)."""
    if c["division"] == "reciprocal":
        return kb.fmul(numerator, kb.reciprocal_avx512(denominator))
    return kb.fdiv(numerator, denominator)


class PointwiseCpu(Template):
    """Point-wise operator over M x N floats; subclasses also inherit the operator (RowOp)."""

    target_kind = "cpu"

    def extra_knobs(self, task: Task, target: Target) -> list[Knob]:
        return []

    def extra_defaults(self, task: Task, target: Target) -> dict[str, Any]:
        return {}

    def extra_constraints(self, task: Task, target: Target) -> list:
        return []

    def emit_vector(self, kb: cg.KernelBuilder, c: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
        """Output vectors by name from input vectors by name (float32, ``c["vec"]`` lanes)."""
        raise NotImplementedError

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        m, n = task.dims["M"], task.dims["N"]
        knobs = [rw.vec_knob(target, n), rw.unroll_knob(n), rw.rows_knob(m, rw.CHUNK_ROWS),
                 rw.threads_knob(target), rw.stores_knob(task, target)] + self.extra_knobs(task, target)
        return ConfigSpace(knobs, rw.common_constraints(n, m) + self.extra_constraints(task, target))

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        lanes = target.vector_lanes_f32
        extra = self.extra_defaults(task, target)
        return rw.pick_default(space, [dict(vec=lanes, unroll=u, rows=r, stores="cached", **extra)
                                       for u in (2, 1) for r in (16, 4, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        streams = len(self.row_inputs) + len(self.outputs)
        return rw.row_features(task, c, task.dims["N"], task.dims["M"], streams, 1.0,
                               accumulators=0, bytes_moved=self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        n, lanes, unroll, rows = task.dims["N"], c["vec"], c["unroll"], c["rows"]
        args = rw.kernel_args(task, self.signature(task))
        streaming = c["stores"] == "streaming"

        def flat(ctx: rw.RowContext, row0, length) -> None:
            kb = ctx.kb
            start = kb.b.mul(row0, cg.i64(n))

            def step(offset, _u, count) -> None:
                at = kb.b.add(start, offset)
                values = {name: rw.load(kb, ctx.arrays[name], at, lanes, count) for name in self.row_inputs}
                for name, value in self.emit_vector(kb, c, values).items():
                    rw.store(kb, value, ctx.arrays[name], at, count, streaming)

            rw.vector_loop(kb, length, lanes, unroll, step)

        def block(ctx: rw.RowContext, row0, nrows: int) -> None:
            flat(ctx, row0, nrows * n)

        def rest(ctx: rw.RowContext, row0, nrows) -> None:
            flat(ctx, row0, ctx.kb.b.mul(nrows, cg.i64(n)))

        return rw.build_row_kernel(self.op, task, args, "M", rows, c["threads"], block, rest, streaming=streaming)
