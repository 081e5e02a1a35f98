"""``layernorm`` on the CPU: Y = (X - mean) / sqrt(var + eps) * G + BETA.

The ``stats`` knob chooses how mean and variance are found, both exact for rows whose
mean dwarfs their spread (and for outlier channels, common in LLM activations):

- ``two_pass``: the mean K, then the sums of d = x - K and d^2: var = E[d^2] - E[d]^2 and
  mean = K + E[d] (the corrected two-pass algorithm: E[d] removes the rounding of the
  first mean). One more pass over the row, hot in cache after the first.
- ``float64``: one pass summing x and x^2 in float64, where E[x^2] - E[x]^2 keeps 1e-8 of
  the variance even at |mean| = 1e4 std: half the vector width per add, one pass less.
  (A float32 one-pass shifted by a sample of the row would fail when that sample is an
  outlier.)

Every row is centred as (x - K) - (mean - K) with K a float32 near the mean, never as
x - mean with the mean rounded to float32, which would add half an ulp of the mean to
every deviation. The two-pass partial sums are float32, ``vec x unroll`` per row (see
rmsnorm). The ``reuse`` knob is rmsnorm's: the last pass reloads the row, or (short rows)
keeps it in registers.
"""
from __future__ import annotations

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.elementwise import LayerNormOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from . import rowwise as rw

STATS = ("two_pass", "float64")


@register_template
class LayerNormCpu(LayerNormOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        n = task.dims["N"]
        reuse = ["reload"]
        if rw.vectors_per_row(n, target.vector_lanes_f32) <= rw.vector_registers(target) // 2:
            reuse.append("registers")
        knobs = rw.reduction_knobs(task, target) + [rw.stores_knob(task, target), Knob("stats", STATS),
                                                    Knob("reuse", tuple(reuse))]
        budget = rw.register_budget(target)
        constraints = rw.common_constraints(n, task.dims["M"]) + [
            ("accumulators fit in registers",
             lambda c: c["rows"] * c["unroll"] * (2 if c["stats"] == "two_pass" else c["vec"] // 4) <= budget),
            ("kept rows fit in registers",
             lambda c: c["reuse"] != "registers" or c["rows"] * rw.vectors_per_row(n, c["vec"]) <= budget),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        return rw.pick_default(self.space(task, target), [
            dict(vec=lanes, unroll=u, rows=1, stores="cached", stats="two_pass", reuse="reload")
            for u in (4, 2, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        m, n = task.dims["M"], task.dims["N"]
        passes = 3.0 if c["stats"] == "two_pass" else 2.0
        per_vector = 2 if c["stats"] == "two_pass" else 2 * c["vec"] // 8  # float64 sums: two per 8 lanes
        return rw.row_features(task, c, n, m, 2, passes, accumulators=c["rows"] * c["unroll"] * per_vector,
                               bytes_moved=self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        n, lanes, unroll = task.dims["N"], c["vec"], c["unroll"]
        eps = float(self.attrs(task)["eps"])
        in_registers = c["reuse"] == "registers"
        streaming = c["stores"] == "streaming"
        args = rw.kernel_args(task, self.signature(task))

        def block(ctx: rw.RowContext, row0, nrows: int) -> None:
            kb, b, a = ctx.kb, ctx.kb.b, ctx.arrays
            bases = rw.row_bases(kb, row0, nrows, n)
            at = lambda r, off: b.add(bases[r], off)  # noqa: E731
            kept: list = []

            def first(r, off, count):
                """The first read of a vector of row r (kept when rows stay in registers)."""
                x = rw.load(kb, a["X"], at(r, off), lanes, count)
                if in_registers:
                    kept.append(x)
                return x

            if c["stats"] == "two_pass":
                sums = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "sum")

                def total(off, u, count) -> None:
                    for r in range(nrows):
                        sums.set(r, u, kb.fadd(sums.get(r, u), first(r, off, count)))

                rw.each_vector(kb, n, lanes, unroll, total, unrolled=in_registers)
                shifts = [kb.splat(kb.fmul(sums.sum(r), cg.f32(1.0 / n)), lanes) for r in range(nrows)]
                deviations = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "dev")
                squares = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "sq")
                replay = iter(list(kept))

                def centred(off, u, count) -> None:
                    for r in range(nrows):
                        x = next(replay) if in_registers else first(r, off, count)
                        d = rw.keep_lanes(kb, kb.fsub(x, shifts[r]), count)
                        deviations.set(r, u, kb.fadd(deviations.get(r, u), d))
                        squares.set(r, u, kb.fma(d, d, squares.get(r, u)))

                rw.each_vector(kb, n, lanes, unroll, centred, unrolled=in_registers)
                residual_means, variances = [], []
                for r in range(nrows):
                    # mean and variance of d = x - shift; the residual mean of d corrects both
                    mean_d = kb.fmul(deviations.sum(r), cg.f32(1.0 / n))
                    spread = kb.fsub(kb.fmul(squares.sum(r), cg.f32(1.0 / n)), kb.fmul(mean_d, mean_d))
                    residual_means.append(kb.splat(mean_d, lanes))
                    variances.append(kb.fmax(spread, cg.f32(0.0)))
            else:
                sums = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "sum", cg.F64)
                squares = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "sq", cg.F64)

                def moments(off, u, count) -> None:
                    for r in range(nrows):
                        x = b.fpext(first(r, off, count), cg.vec(lanes, cg.F64))  # masked-off lanes are 0
                        sums.set(r, u, kb.fadd(sums.get(r, u), x))
                        squares.set(r, u, kb.fma(x, x, squares.get(r, u)))

                rw.each_vector(kb, n, lanes, unroll, moments, unrolled=in_registers)
                shifts, residual_means, variances = [], [], []
                for r in range(nrows):
                    # plain float64 arithmetic: E[x^2] - E[x]^2 cancels, so no reassociation here
                    mean = b.fmul(sums.sum(r), ir.Constant(cg.F64, 1.0 / n))
                    spread = b.fsub(b.fmul(squares.sum(r), ir.Constant(cg.F64, 1.0 / n)), b.fmul(mean, mean))
                    high = b.fptrunc(mean, cg.F32)
                    low = b.fptrunc(b.fsub(mean, b.fpext(high, cg.F64)), cg.F32)  # mean = high + low
                    shifts.append(kb.splat(high, lanes))
                    residual_means.append(kb.splat(low, lanes))
                    variances.append(kb.fmax(b.fptrunc(spread, cg.F32), cg.f32(0.0)))
            scale_v = [kb.splat(kb.fdiv(cg.f32(1.0), kb.call_math("sqrt", kb.fadd(v, cg.f32(eps)))), lanes)
                       for v in variances]
            replay = iter(kept)

            def normalise(off, u, count) -> None:
                g = rw.load(kb, a["G"], off, lanes, count)
                beta = rw.load(kb, a["BETA"], off, lanes, count)
                for r in range(nrows):
                    x = next(replay) if in_registers else rw.load(kb, a["X"], at(r, off), lanes, count)
                    # (x - shift) - mean_d, never x - (shift + mean_d): the rounded sum would
                    # carry an error of half an ulp of the mean into every element. Plain
                    # fsub: with fast-math flags LLVM may reassociate it into just that.
                    centred = b.fsub(b.fsub(x, shifts[r]), residual_means[r])
                    t = kb.fmul(centred, scale_v[r])
                    rw.store(kb, kb.fma(t, g, beta), a["Y"], at(r, off), count, streaming)

            rw.each_vector(kb, n, lanes, unroll, normalise, unrolled=in_registers)

        return rw.build_row_kernel("layernorm", task, args, "M", c["rows"], c["threads"], block, streaming=streaming)
