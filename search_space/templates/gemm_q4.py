"""``gemm_q4`` on the CPU: prefill matmul with int4 weights, Y[M,N] = X[M,K] @ dequant(WQ)[N,K]^T.

Schedule: the blocked schedule of ``gemm`` (micro tile ``mr x nr``, cache blocks ``mc``,
``nc``, ``kc``, two block orders, tile walk order, threads over outer blocks) with one
change: each W block is dequantised into the per-thread float32 panel instead of copied.
The decode happens in registers — load ``vec`` packed bytes, split the nibbles with a
vector and/shift, convert, shuffle back into k order, then ``q * s - z * s`` with one fma
per vector — and is paid once per W block and X block pass (``mc`` rows reuse it), so for
prefill shapes it is a small share next to the fmas of the micro-kernel. Cache blocks in
K are multiples of the group size, so a panel always holds whole groups.

``compute`` (targets with AVX2): ``f32`` as above, or ``i16``:
an outer-product micro-kernel on int16 dot products, two products per lane where an fma
makes one: ``vpdpwssd`` (AVX-512 VNNI, or AVX-VNNI at 8 lanes), else ``vpmaddwd`` and an
add. Packing X rounds it to int16 per (row, group) with the scale max|x| / 32767 (so
``xpack`` is on); the W panel holds the codes minus their zero point (the centre 8 without
zero points) as int16, each k pair one int32, laid out as columns for the outer product, and a
panel of the group scales beside it.
Per group the int32 sums are converted and scaled once, by the W scale times the X scale.
Rounding X costs a relative error of about 1e-5 on typical activations (``gemv_q4``'s int16
path rounds the same way), within the float32 tolerance.
"""
from __future__ import annotations

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.matmul import GemmQ4Op
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from .gemm import (WeightSource, blocked_gemm_constraints, blocked_gemm_default, blocked_gemm_features,
                   blocked_gemm_knobs, render_blocked_gemm, transpose_square)
from .q4_layout import decode_block, has_vnni, i16_width_constraint, q4_attrs


# (mr, nr vectors) of the int16 outer kernel's default: 8 x 1 ran fastest with AVX-512 VNNI at
# M = 128, 3 x 2 with 16 ymm registers (benchmarks/RESULTS.md); the first tile that fits is taken
I16_TILES = ((8, 1), (3, 2), (6, 1), (4, 2), (4, 1), (2, 4), (2, 2), (1, 4), (1, 2), (1, 1))


@register_template
class GemmQ4Cpu(GemmQ4Op, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d = task.dims
        # K blocks hold whole groups: every kc value is a multiple of 128, and so is the
        # remainder of K (a multiple of the group size) after whole blocks
        knobs = blocked_gemm_knobs(d, target, kc_values=(256, 512, 1024, 2048), pack=False)
        constraints = blocked_gemm_constraints(d, target)
        if _has_i16(task, target, self):
            knobs.insert(0, Knob("compute", ("f32", "i16"), legacy="f32"))  # f32: the only path before i16
            constraints.append(("the int16 path rounds X as it packs it", lambda c: c["compute"] == "f32" or c["xpack"]))
            constraints.append(i16_width_constraint(target))
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        if "compute" in space.names:  # int16 products, X blocks packed once for all W blocks
            return blocked_gemm_default(space, task, target, {"compute": "i16", "xpack": 1, "order": "mnk"},
                                        tiles=I16_TILES)
        return blocked_gemm_default(space, task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        group, zero_point = q4_attrs(self, task)
        w_bytes = d["N"] * d["K"] / 2 + d["N"] * d["K"] / group * 4 * (2 if zero_point else 1)
        return blocked_gemm_features(task, config.as_dict(), w_bytes)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        group, zero_point = q4_attrs(self, task)
        if c.get("compute") == "i16":
            panel = _pairs_panel(task.dims["K"], group, zero_point, c["nr"] * c["vec"], c["vec"])
            source = WeightSource(2, "int16", panel, group)
            return render_blocked_gemm(task, c, "gemm_q4", self.signature(task), source, dot="i16",
                                       vnni=has_vnni(target, c["vec"]))
        source = WeightSource(4, "float32", _dequant_panel(task.dims["K"], group, zero_point, min(c["vec"], 16)))
        return render_blocked_gemm(task, c, "gemm_q4", self.signature(task), source)


def _has_i16(task: Task, target: Target, op) -> bool:
    """The int16 path: int16 dot products (AVX2 at least)."""
    return target.has_feature("avx2")


def _pairs_panel(K: int, group: int, zero_point: bool, width: int, lanes: int):
    """W rows [n0, n0+nlen) as int16 codes minus their zero point (8 without zero points; a
    whole number 0..16, so code - z fits int16 and the X products stay exact) for the int16 outer
    kernel: k pairs as int32 columns, ``panel[n // width][k / 2][n % width]``, squares of
    ``lanes`` x ``lanes`` pairs transposed in registers; and their scales,
    ``scales[n // width][g][n % width]``. Columns past nlen are zero in both."""
    groups = K // group

    def fill(kb, inputs, dst, n0, nlen, k0, klen: int, kc: int, _K: int, scales) -> None:
        b = kb.b
        WQ, S = inputs[1], inputs[2]
        Z = inputs[3] if zero_point else None
        ld = b.mul(b.sdiv(b.add(nlen, cg.i64(width - 1)), cg.i64(width)), cg.i64(width))
        last = b.sub(nlen, cg.i64(1))
        i_lanes = cg.vec(lanes, cg.I32)
        const = lambda v: ir.Constant(i_lanes, [v] * lanes)  # noqa: E731

        def tile_of(nt, per_tile: int):
            return b.mul(b.sdiv(nt, cg.i64(width)), cg.i64(per_tile))

        with kb.loop(0, ld, lanes, name="tn") as nt:
            pairs_at = b.add(tile_of(nt, width * kc // 2), b.srem(nt, cg.i64(width)))
            with kb.loop(0, klen // 2, lanes, name="tk") as kt:
                # the 2 * lanes k of this step lie in one group (q4_layout)
                g = b.sdiv(b.add(k0, b.mul(kt, cg.i64(2))), cg.i64(group)) if Z is not None else None
                rows = []
                for i in range(lanes):
                    n = b.add(nt, cg.i64(i))
                    byte = b.add(b.mul(b.add(n0, kb.min(n, last)), cg.i64(K // 2)), b.add(b.sdiv(k0, cg.i64(2)), kt))
                    wide = b.zext(kb.load_vec(WQ, byte, lanes, cg.I8), i_lanes)
                    zero = const(8)  # symmetric codes: this renders as before zero points took this path
                    if Z is not None:
                        at = b.add(b.mul(b.add(n0, kb.min(n, last)), cg.i64(groups)), g)
                        zero = kb.splat(b.fptosi(kb.load(Z, at), cg.I32), lanes)
                    low = b.sub(b.and_(wide, const(15)), zero)
                    high = b.sub(b.lshr(wide, const(4)), zero)
                    pair = b.or_(b.and_(low, const(0xFFFF)), b.shl(high, const(16)))
                    rows.append(b.select(b.icmp_signed("<", n, nlen), pair, ir.Constant(i_lanes, None)))
                for k2, column in enumerate(transpose_square(kb, rows)):
                    at = b.add(pairs_at, b.mul(b.add(kt, cg.i64(k2)), cg.i64(width)))
                    kb.store_vec(column, dst, at, cg.I32)
        g0 = b.sdiv(k0, cg.i64(group))
        with kb.loop(0, ld, 1, name="sn") as r:
            source = b.add(b.mul(b.add(n0, kb.min(r, last)), cg.i64(groups)), g0)
            column = b.add(tile_of(r, width * (kc // group)), b.srem(r, cg.i64(width)))
            inside = b.icmp_signed("<", r, nlen)
            for gi in range(klen // group):
                value = b.select(inside, kb.load(S, b.add(source, cg.i64(gi))), cg.f32(0.0))
                kb.store(value, scales, b.add(column, cg.i64(gi * width)))
    return fill


def _dequant_panel(K: int, group: int, zero_point: bool, lanes: int):
    """Fill a float32 panel with dequantised W rows: (code - z) * s, in k order."""
    span = 2 * lanes
    groups = K // group

    def fill(kb, inputs, dst, n0, nlen, k0, klen: int, kc: int, _K: int) -> None:
        b = kb.b
        WQ, S = inputs[1], inputs[2]
        Z = inputs[3] if zero_point else None
        with kb.loop(0, nlen, 1, name="pk") as r:
            n = b.add(n0, r)
            out = b.mul(r, cg.i64(kc))
            g0 = b.sdiv(k0, cg.i64(group))
            with kb.loop(0, klen // group, 1, name="pg") as gi:
                g = b.add(g0, gi)
                at = b.add(b.mul(n, cg.i64(groups)), g)
                scale = kb.load(S, at)
                zero = kb.load(Z, at) if zero_point else cg.f32(8.0)
                s_vec = kb.splat(scale, lanes)
                offset = kb.splat(kb.fmul(kb.fsub(cg.f32(0.0), zero), scale), lanes)
                for blk in range(group // span):
                    k = b.add(b.mul(g, cg.i64(group)), cg.i64(blk * span))
                    byte = b.add(b.mul(n, cg.i64(K // 2)), b.sdiv(k, cg.i64(2)))
                    first, second = decode_block(kb, WQ, byte, lanes, natural=True)
                    local = b.add(out, b.sub(k, k0))
                    kb.store_vec(kb.fma(first, s_vec, offset), dst, local)
                    kb.store_vec(kb.fma(second, s_vec, offset), dst, b.add(local, cg.i64(lanes)))
    return fill
