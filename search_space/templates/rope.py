"""``rope`` on the CPU: rotate-half rotary embedding of X[T, H, D] at positions P[T].

For i < D/2: a = P[t] f_i with f_i = theta^(-2i/D) (or its linear / llama3 / yarn / longrope scaling,
``runtime.rope_frequencies``); Y[i] = X[i] cos a - X[i+D/2] sin a and
Y[i+D/2] = X[i+D/2] cos a + X[i] sin a, cos and sin multiplied by the attention factor of yarn
and longrope (``rotation_scale``; no multiply where it is 1, every other rope type). Angles reach
thousands of radians (positions x frequencies near 1), where a float32 angle is already off by 1e-4: the angle is formed
and reduced in float64 (``KernelBuilder.sincos``), the frequencies are float64 constants
computed at render time like the reference does, and only the reduced angle is float32.
With ``rotary_dim`` R < D (partial rotary) D above reads R, and dims R .. D - 1 of each head are
copied.

The ``table`` knob: ``per_token`` computes cos and sin of every (token, frequency) once,
into the calling thread's share of a workspace, and reuses them for all H heads (the
float64 work amortised over heads); ``per_head`` recomputes them next to each use (no
table traffic; pays only for very few heads). ``heads`` heads are rotated together,
sharing each loaded cos/sin vector. One token is one parallel chunk; T may be dynamic.
"""
from __future__ import annotations

import llvmlite.ir as ir

from runtime.rope_frequencies import frequencies_of_attrs, rotary_dim_of, rotation_scale

from ..codegen import llvm as cg
from ..ops.elementwise import RopeOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource, Template, register_template
from . import rowwise as rw

TABLES = ("per_token", "per_head")
HEAD_BLOCKS = (1, 2, 4)
F64_LANES = 16  # angles per step when filling the table: float64 reduction, one float32 vector of results


def padded(half: int) -> int:
    """Table and frequency rows padded to whole vectors of the widest width: no masks needed."""
    step = max(rw.VECTOR_WIDTHS)
    return -(-half // step) * step


@register_template
class RopeCpu(RopeOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        t, h = task.dims["T"], task.dims["H"]
        half = rotary_dim_of(task.dims["D"], self.attrs(task)) // 2
        knobs = [rw.vec_knob(target, half), rw.unroll_knob(half),
                 Knob("heads", tuple(v for v in HEAD_BLOCKS if v == 1 or v <= h)),
                 rw.threads_knob(target), rw.stores_knob(task, target), Knob("table", TABLES)]
        constraints = [
            ("unroll fits the row", lambda c: c["unroll"] == 1 or c["vec"] * c["unroll"] <= half),
            ("one token per thread at least", lambda c: c["threads"] <= t),
            ("vectors fit in registers",  # per unrolled vector: cos, sin, and lo, hi of each head
             lambda c: c["unroll"] * (2 + 2 * c["heads"]) <= rw.vector_registers(target)),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        lanes = target.vector_lanes_f32
        return rw.pick_default(self.space(task, target), [
            dict(vec=lanes, unroll=u, heads=hb, stores="cached", table="per_token")
            for hb in (2, 1) for u in (2, 1)], task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        t, h, d = task.dims["T"], task.dims["H"], task.dims["D"]
        step = c["vec"] * c["unroll"]
        return {
            "threads": c["threads"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": c["heads"] * c["unroll"] * 2,
            "parallel_chunks": t,
            "chunks_per_thread": t / c["threads"],
            "tile_bytes_l1": 4.0 * (2 * c["heads"] + 2) * d,
            "tile_bytes_l2": 4.0 * 2 * h * d,
            "bytes_moved": self.min_bytes(task),
            "arith_intensity": self.flops(task) / self.min_bytes(task),
            "n_tail_fraction": ((d // 2) % step) / (d // 2),
            "packed": float(c["table"] == "per_token"),
        }

    def workspace(self, task: Task, config: Config) -> tuple[ArgSpec, ...]:
        if config["table"] != "per_token":
            return ()
        nbytes = 4 * 2 * padded(rotary_dim_of(task.dims["D"], self.attrs(task)) // 2) * config["threads"]  # cos and sin rows, per thread
        return (ArgSpec("TABLE", "workspace", "float32", nbytes=nbytes),)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        h, d = task.dims["H"], task.dims["D"]
        rotary = rotary_dim_of(d, self.attrs(task))  # the first rotary dims turn, the rest are copied
        half, width = rotary // 2, padded(rotary // 2)
        lanes, unroll, heads = c["vec"], c["unroll"], c["heads"]
        streaming = c["stores"] == "streaming"
        # the reference's frequencies, bit for bit: float64, scaled as the rope type says
        freqs = [float(f) for f in frequencies_of_attrs(d, self.attrs(task))] + [0.0] * (width - half)
        scale = rotation_scale(self.attrs(task))  # yarn's or longrope's attention factor: cos and sin times it
        args = rw.kernel_args(task, self.signature(task), self.workspace(task, config))
        table = {}

        def prepare(module: ir.Module) -> None:
            array = ir.ArrayType(cg.F64, width)
            gv = ir.GlobalVariable(module, array, name="rope_freqs")
            gv.initializer = ir.Constant(array, freqs)
            gv.global_constant = True
            gv.linkage = "internal"
            table["freqs"] = gv

        def angles(kb: cg.KernelBuilder, position, at, n_lanes: int):
            """float64 angles position * f[at : at + n_lanes]."""
            f = kb.load_vec(kb.b.bitcast(table["freqs"], cg.F64.as_pointer()), at, n_lanes, cg.F64)
            return kb.fmul(kb.splat(position, n_lanes), f)

        def scaled(kb: cg.KernelBuilder, sin, cos):
            """(sin, cos) times the rotation scale; as they are where it is 1."""
            if scale == 1.0:
                return sin, cos
            factor = kb.splat(cg.f32(scale), sin.type.count)
            return kb.fmul(sin, factor), kb.fmul(cos, factor)

        def token(ctx: rw.RowContext, t, _rows: int) -> None:
            kb, b, a = ctx.kb, ctx.kb.b, ctx.arrays
            position = b.sitofp(kb.load(a["P"], t, cg.I32), cg.F64)
            if c["table"] == "per_token":
                slot = b.mul(ctx.thread, cg.i64(2 * width))
                with kb.loop(0, width, F64_LANES, name="f") as i:
                    sin, cos = scaled(kb, *kb.sincos(angles(kb, position, i, F64_LANES)))
                    kb.store_vec(cos, a["TABLE"], b.add(slot, i))
                    kb.store_vec(sin, a["TABLE"], b.add(slot, b.add(i, cg.i64(width))))

                def cos_sin(off):
                    return (kb.load_vec(a["TABLE"], b.add(slot, off), lanes),
                            kb.load_vec(a["TABLE"], b.add(slot, b.add(off, cg.i64(width))), lanes))
            else:
                def cos_sin(off):
                    sin, cos = scaled(kb, *kb.sincos(angles(kb, position, off, lanes)))
                    return cos, sin

            def rotate(first_head, count_heads: int):
                """The vector step rotating heads first_head .. first_head + count_heads - 1."""
                def step(off, _u, count) -> None:
                    cos, sin = cos_sin(off)
                    for k in range(count_heads):
                        head = b.add(b.mul(t, cg.i64(h)), b.add(first_head, cg.i64(k)))
                        lo_at = b.add(b.mul(head, cg.i64(d)), off)
                        hi_at = b.add(lo_at, cg.i64(half))
                        lo = rw.load(kb, a["X"], lo_at, lanes, count)
                        hi = rw.load(kb, a["X"], hi_at, lanes, count)
                        rw.store(kb, kb.fsub(kb.fmul(lo, cos), kb.fmul(hi, sin)), a["Y"], lo_at, count, streaming)
                        rw.store(kb, kb.fma(lo, sin, kb.fmul(hi, cos)), a["Y"], hi_at, count, streaming)
                return step

            whole = h // heads
            if whole:
                with kb.loop(0, whole, 1, name="hb") as hb:
                    first = b.mul(hb, cg.i64(heads))
                    rw.vector_loop(kb, half, lanes, unroll, rotate(first, heads))
            for k in range(whole * heads, h):
                rw.vector_loop(kb, half, lanes, unroll, rotate(cg.i64(k), 1))
            if rotary < d:  # partial rotary: the dims past it pass through
                with kb.loop(0, h, 1, name="hp") as head:
                    row = b.add(b.mul(b.add(b.mul(t, cg.i64(h)), head), cg.i64(d)), cg.i64(rotary))

                    def copy(off, _u, count) -> None:
                        at = b.add(row, off)
                        rw.store(kb, rw.load(kb, a["X"], at, lanes, count), a["Y"], at, count, streaming)
                    rw.vector_loop(kb, d - rotary, lanes, 1, copy)

        return rw.build_row_kernel("rope", task, args, "T", 1, c["threads"], token, prepare=prepare,
                                   streaming=streaming)
