"""``softmax`` on the CPU: each row normalised, Y = exp(X - max) / sum, max-subtracted so no
exp overflows whatever the magnitude of X; -inf entries give exactly 0.

The ``passes`` knob chooses the pass structure over a row:

- ``online``: one pass keeps a running max m and a sum s per lane; each element costs one
  exp: with d = x - m, e = exp(-|d|), s = s e + 1 when x is the new max, else s + e.
  Lanes are combined at the end (s_lane exp(m_lane - max)); a second pass writes
  exp(x - max) / sum. Two reads of X, two exps per element.
- ``store_exp``: max; then exp(x - max) stored to Y and summed; then Y scaled in place.
  One exp per element, three passes (the last two over Y, hot in cache). Never with
  streaming stores: Y's lines are already in the cache, written by the second pass, and a
  non-temporal store to them costs a second write-back (measured 3x slower at 16384 x 512).
- ``recompute``: max; the sum of exp(x - max); then exp(x - max) / sum. Three reads of X,
  two exps, nothing written before the last pass.

Running maxima start at -FLT_MAX, not -inf, so that x - m is never -inf - (-inf) = NaN.
"""
from __future__ import annotations

from ..codegen import llvm as cg
from ..ops.elementwise import SoftmaxOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from . import rowwise as rw

PASSES = ("online", "store_exp", "recompute")
ACCUMULATORS = {"online": 2, "store_exp": 1, "recompute": 1}
READS = {"online": 2.0, "store_exp": 3.0, "recompute": 3.0}


@register_template
class SoftmaxCpu(SoftmaxOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        knobs = rw.reduction_knobs(task, target) + [rw.stores_knob(task, target), Knob("passes", PASSES)]
        constraints = rw.common_constraints(task.dims["N"], task.dims["M"]) + [
            ("accumulators fit in registers",
             lambda c: c["rows"] * c["unroll"] * ACCUMULATORS[c["passes"]] <= rw.register_budget(target)),
            ("store_exp has Y in the cache already", lambda c: c["passes"] != "store_exp" or c["stores"] == "cached"),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        return rw.pick_default(self.space(task, target), [
            dict(vec=lanes, unroll=u, rows=1, stores="cached", passes="store_exp") for u in (2, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        m, n = task.dims["M"], task.dims["N"]
        return rw.row_features(task, c, n, m, 2, READS[c["passes"]],
                               accumulators=c["rows"] * c["unroll"] * ACCUMULATORS[c["passes"]],
                               bytes_moved=self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        n, lanes, unroll, passes = task.dims["N"], c["vec"], c["unroll"], c["passes"]
        streaming = c["stores"] == "streaming"
        args = rw.kernel_args(task, self.signature(task))

        def block(ctx: rw.RowContext, row0, nrows: int) -> None:
            kb, b, a = ctx.kb, ctx.kb.b, ctx.arrays
            bases = rw.row_bases(kb, row0, nrows, n)
            splat = lambda v: kb.splat(cg.f32(v), lanes)  # noqa: E731
            at = lambda r, off: b.add(bases[r], off)  # noqa: E731
            x_of = lambda r, off, count: rw.load(kb, a["X"], at(r, off), lanes, count, fill=-float("inf"))  # noqa: E731

            if passes == "online":
                maxima = rw.Accumulators(kb, nrows, unroll, lanes, -rw.F32_MAX, "max")
                sums = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "sum")

                def online(off, u, count) -> None:
                    for r in range(nrows):
                        x, m, s = x_of(r, off, count), maxima.get(r, u), sums.get(r, u)
                        d = kb.fsub(x, m)
                        e = kb.exp_fast(b.fneg(kb.call_math("fabs", d)), nonpositive=True)
                        bigger = b.fcmp_ordered(">", d, splat(0.0))
                        sums.set(r, u, b.select(bigger, kb.fma(s, e, splat(1.0)), kb.fadd(s, e)))
                        maxima.set(r, u, rw.vmax(kb, x, m))

                rw.vector_loop(kb, n, lanes, unroll, online)
                row_max, inverse = [], []
                for r in range(nrows):
                    top = maxima.max(r)
                    top_v = kb.splat(top, lanes)
                    scale = lambda u: kb.exp_fast(kb.fsub(maxima.get(r, u), top_v), nonpositive=True)  # noqa: E731
                    total = kb.fmul(sums.get(r, 0), scale(0))
                    for u in range(1, unroll):
                        total = kb.fma(sums.get(r, u), scale(u), total)
                    row_max.append(top_v)
                    inverse.append(kb.splat(kb.fdiv(cg.f32(1.0), kb.reduce_add(total)), lanes))
            else:
                maxima = rw.Accumulators(kb, nrows, unroll, lanes, -float("inf"), "max")

                def find_max(off, u, count) -> None:
                    for r in range(nrows):
                        maxima.set(r, u, rw.vmax(kb, x_of(r, off, count), maxima.get(r, u)))

                rw.vector_loop(kb, n, lanes, unroll, find_max)
                row_max = [kb.splat(maxima.max(r), lanes) for r in range(nrows)]
                sums = rw.Accumulators(kb, nrows, unroll, lanes, 0.0, "sum")

                def exp_sum(off, u, count) -> None:
                    for r in range(nrows):
                        e = kb.exp_fast(kb.fsub(x_of(r, off, count), row_max[r]), nonpositive=True)  # -inf fill: 0
                        if passes == "store_exp":
                            rw.store(kb, e, a["Y"], at(r, off), count)
                        sums.set(r, u, kb.fadd(sums.get(r, u), e))

                rw.vector_loop(kb, n, lanes, unroll, exp_sum)
                inverse = [kb.splat(kb.fdiv(cg.f32(1.0), sums.sum(r)), lanes) for r in range(nrows)]

            def normalise(off, u, count) -> None:
                for r in range(nrows):
                    if passes == "store_exp":
                        e = rw.load(kb, a["Y"], at(r, off), lanes, count)
                    else:
                        e = kb.exp_fast(kb.fsub(x_of(r, off, count), row_max[r]), nonpositive=True)
                    rw.store(kb, kb.fmul(e, inverse[r]), a["Y"], at(r, off), count, streaming)

            rw.vector_loop(kb, n, lanes, unroll, normalise)

        return rw.build_row_kernel("softmax", task, args, "M", c["rows"], c["threads"], block, streaming=streaming)
