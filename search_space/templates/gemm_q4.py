"""``gemm_q4`` on the CPU: prefill matmul with int4 weights, Y[M,N] = X[M,K] @ dequant(WQ)[N,K]^T.

Schedule: the blocked schedule of ``gemm`` (micro tile ``mr x nr``, cache blocks ``mc``,
``nc``, ``kc``, two block orders, tile walk order, threads over outer blocks) with one
change: each W block is dequantised into the per-thread float32 panel instead of copied.
The decode happens in registers — load ``vec`` packed bytes, split the nibbles with a
vector and/shift, convert, shuffle back into k order, then ``q * s - z * s`` with one fma
per vector — and is paid once per W block and X block pass (``mc`` rows reuse it), so for
prefill shapes it is a small share next to the fmas of the micro-kernel. Cache blocks in
K are multiples of the group size, so a panel always holds whole groups.
"""
from __future__ import annotations

from ..codegen import llvm as cg
from ..ops.matmul import GemmQ4Op
from ..space import Config, ConfigSpace
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from .gemm import (WeightSource, blocked_gemm_constraints, blocked_gemm_default, blocked_gemm_features,
                   blocked_gemm_knobs, render_blocked_gemm)
from .q4_layout import decode_block, q4_attrs


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
        return ConfigSpace(knobs, blocked_gemm_constraints(d, target))

    def default(self, task: Task, target: Target) -> Config:
        return blocked_gemm_default(self.space(task, target), task, target)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        group, zero_point = q4_attrs(self, task)
        w_bytes = d["N"] * d["K"] / 2 + d["N"] * d["K"] / group * 4 * (2 if zero_point else 1)
        return blocked_gemm_features(task, config.as_dict(), w_bytes)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        group, zero_point = q4_attrs(self, task)
        source = WeightSource(4, "float32", _dequant_panel(task.dims["K"], group, zero_point, min(c["vec"], 16)))
        return render_blocked_gemm(task, c, "gemm_q4", self.signature(task), source)


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
