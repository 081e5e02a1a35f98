"""``rmsnorm`` on the CPU: Y = X / sqrt(mean(X^2) + eps) * G, optionally fused with the
residual add (S = X + R is written and normalised).

Two passes over each row: the sum of squares (``vec x unroll`` float32 partial sums per
row, so each lane adds N / (vec x unroll) terms: for N = 11008 about 340 at the default,
far below where float32 summation error matters at the 2e-4 tolerance), then the scaled
product. A block of ``rows`` rows runs through both passes together: independent sums to
overlap and one load of G per vector for all of them. The ``reuse`` knob says where the
second pass gets the row: ``reload`` reads it again (X, or S when fused: one stream, hot
in cache), ``recompute`` (fused only) reads X and R again and adds, ``registers`` keeps
every vector of the row in registers (only offered when the block fits: short rows).
"""
from __future__ import annotations


from ..codegen import llvm as cg
from ..ops.elementwise import RMSNormOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from . import rowwise as rw


@register_template
class RMSNormCpu(RMSNormOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        n = task.dims["N"]
        reuse = ["reload"] + (["recompute"] if self._residual(task) else [])
        if rw.vectors_per_row(n, target.vector_lanes_f32) <= rw.vector_registers(target) // 2:
            reuse.append("registers")
        knobs = rw.reduction_knobs(task, target) + [rw.stores_knob(task, target), Knob("reuse", tuple(reuse))]
        budget = rw.register_budget(target)
        constraints = rw.common_constraints(n, task.dims["M"]) + [
            ("accumulators fit in registers", lambda c: c["rows"] * c["unroll"] <= budget),
            ("kept rows fit in registers",
             lambda c: c["reuse"] != "registers" or c["rows"] * rw.vectors_per_row(n, c["vec"]) <= budget),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        return rw.pick_default(self.space(task, target), [
            dict(vec=lanes, unroll=u, rows=1, stores="cached", reuse="reload") for u in (4, 2, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        m, n = task.dims["M"], task.dims["N"]
        streams = 4 if self._residual(task) else 2
        return rw.row_features(task, c, n, m, streams, 2.0, accumulators=c["rows"] * c["unroll"],
                               bytes_moved=self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        n, lanes, unroll = task.dims["N"], c["vec"], c["unroll"]
        residual, reuse = self._residual(task), c["reuse"]
        eps = float(self.attrs(task)["eps"])
        args = rw.kernel_args(task, self.signature(task))
        in_registers = reuse == "registers"
        streaming = c["stores"] == "streaming"

        def block(ctx: rw.RowContext, row0, nrows: int) -> None:
            kb, b, a = ctx.kb, ctx.kb.b, ctx.arrays
            bases = rw.row_bases(kb, row0, nrows, n)
            acc = rw.Accumulators(kb, nrows, unroll, lanes, 0.0)
            kept: list = []

            def row_vector(r: int, off, count):
                at = b.add(bases[r], off)
                x = rw.load(kb, a["X"], at, lanes, count)
                if residual:
                    x = kb.fadd(x, rw.load(kb, a["R"], at, lanes, count))
                return x

            def squares(off, u, count) -> None:
                for r in range(nrows):
                    x = row_vector(r, off, count)
                    if residual:
                        # S is read back by the second pass when reloaded: keep it cached then
                        rw.store(kb, x, a["S"], b.add(bases[r], off), count, streaming and reuse != "reload")
                    if in_registers:
                        kept.append(x)
                    acc.set(r, u, kb.fma(x, x, acc.get(r, u)))

            rw.each_vector(kb, n, lanes, unroll, squares, unrolled=in_registers)
            scales = []
            for r in range(nrows):
                mean = kb.fmul(acc.sum(r), cg.f32(1.0 / n))
                root = kb.call_math("sqrt", kb.fadd(mean, cg.f32(eps)))
                scales.append(kb.splat(kb.fdiv(cg.f32(1.0), root), lanes))
            position = iter(kept)

            def scale(off, u, count) -> None:
                g = rw.load(kb, a["G"], off, lanes, count)
                for r in range(nrows):
                    at = b.add(bases[r], off)
                    if in_registers:
                        x = next(position)
                    elif reuse == "recompute" or not residual:
                        x = row_vector(r, off, count)
                    else:
                        x = rw.load(kb, a["S"], at, lanes, count)
                    rw.store(kb, kb.fmul(kb.fmul(x, scales[r]), g), a["Y"], at, count, streaming)

            rw.each_vector(kb, n, lanes, unroll, scale, unrolled=in_registers)

        return rw.build_row_kernel("rmsnorm", task, args, "M", c["rows"], c["threads"], block, streaming=streaming)
