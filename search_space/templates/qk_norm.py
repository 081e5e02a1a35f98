"""``qk_norm`` on the CPU: the RMSNorm of X[T, H + 2 HKV, D]'s query part scaled by GQ and of
its key part scaled by GK; the value heads are copied.

One token is one parallel chunk (T may be dynamic). The query and key parts are runs of
elements normalised as one row: each head of D (``span`` head, Qwen3: D = 64 or 128) or the
whole projection, H D and HKV D (``span`` projection, OLMo 2), the gain indexed by the offset
within the run. Two passes over a run: the sum of squares (``vec x unroll`` partial sums) then
the scaled product. The ``reuse`` knob says where the second pass gets the run: ``reload``
reads X again (hot in L1), ``registers`` keeps every vector of the run from the first pass
(offered where the longest run fits in half the vector registers: a head, rarely a projection).
"""
from __future__ import annotations

from ..codegen import llvm as cg
from ..ops.elementwise import QKNormOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from . import rowwise as rw


@register_template
class QKNormCpu(QKNormOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        t = task.dims["T"]
        run = max(self.run_lengths(task))  # the longest run a kernel keeps in registers
        shortest = min(self.run_lengths(task))
        reuse = ["reload"]
        if rw.vectors_per_row(run, target.vector_lanes_f32) <= rw.vector_registers(target) // 2:
            reuse.append("registers")
        knobs = [rw.vec_knob(target, run), rw.unroll_knob(shortest), rw.threads_knob(target),
                 Knob("reuse", tuple(reuse))]
        budget = rw.register_budget(target)
        constraints = [
            ("unroll fits the run", lambda c: c["unroll"] == 1 or c["vec"] * c["unroll"] <= shortest),
            ("one token per thread at least", lambda c: c["threads"] <= t),
            ("kept run fits in registers",
             lambda c: c["reuse"] != "registers" or rw.vectors_per_row(run, c["vec"]) <= budget),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        return rw.pick_default(self.space(task, target), [
            dict(vec=lanes, unroll=u, reuse=r) for r in ("registers", "reload") for u in (2, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        t, d = task.dims["T"], task.dims["D"]
        row = self.heads(task) * d
        return rw.row_features(task, {**c, "rows": 1}, row, t, 2, 2.0, accumulators=c["unroll"],
                               bytes_moved=self.min_bytes(task))

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        h, hkv, d = task.dims["H"], task.dims["HKV"], task.dims["D"]
        row = self.heads(task) * d
        q_run, k_run = self.run_lengths(task)  # elements of one RMS row of q, of k
        lanes, unroll, in_registers = c["vec"], c["unroll"], c["reuse"] == "registers"
        eps = float(self.attrs(task)["eps"])
        args = rw.kernel_args(task, self.signature(task))

        def token(ctx: rw.RowContext, t, _rows: int) -> None:
            kb, b, a = ctx.kb, ctx.kb.b, ctx.arrays
            base = b.mul(t, cg.i64(row))

            def normalise(origin, first: int, count: int, length: int, gain: str) -> None:
                """Runs first .. first + count - 1 of ``length`` elements from element ``origin``,
                each one RMS row scaled by ``gain`` (indexed by the offset within the run)."""
                with kb.loop(first, first + count, 1, name=f"{gain}.head") as run:
                    start = b.add(origin, b.mul(run, cg.i64(length)))
                    acc = rw.Accumulators(kb, 1, unroll, lanes, 0.0)
                    kept: list = []

                    def squares(off, u, n) -> None:
                        x = rw.load(kb, a["X"], b.add(start, off), lanes, n)
                        if in_registers:
                            kept.append(x)
                        acc.set(0, u, kb.fma(x, x, acc.get(0, u)))

                    rw.each_vector(kb, length, lanes, unroll, squares, unrolled=in_registers)
                    mean = kb.fmul(acc.sum(0), cg.f32(1.0 / length))
                    scale = kb.splat(kb.fdiv(cg.f32(1.0), kb.call_math("sqrt", kb.fadd(mean, cg.f32(eps)))), lanes)
                    position = iter(kept)

                    def scaled(off, _u, n) -> None:
                        at = b.add(start, off)
                        x = next(position) if in_registers else rw.load(kb, a["X"], at, lanes, n)
                        g = rw.load(kb, a[gain], off, lanes, n)
                        rw.store(kb, kb.fmul(kb.fmul(x, scale), g), a["Y"], at, n)

                    rw.each_vector(kb, length, lanes, unroll, scaled, unrolled=in_registers)

            if self.by_projection(task):  # one run each: the key run starts after the H D query elements
                normalise(base, 0, 1, q_run, "GQ")
                normalise(b.add(base, cg.i64(h * d)), 0, 1, k_run, "GK")
            else:  # head runs of D: the key heads are runs H .. H + HKV - 1 of the token
                normalise(base, 0, h, d, "GQ")
                normalise(base, h, hkv, d, "GK")
            values = b.add(base, cg.i64((h + hkv) * d))  # the value heads, one contiguous run

            def copy(off, _u, n) -> None:
                at = b.add(values, off)
                rw.store(kb, rw.load(kb, a["X"], at, lanes, n), a["Y"], at, n)

            rw.vector_loop(kb, hkv * d, lanes, unroll, copy, name="v")

        return rw.build_row_kernel("qk_norm", task, args, "T", 1, c["threads"], token)
