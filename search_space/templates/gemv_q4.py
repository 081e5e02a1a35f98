"""``gemv_q4`` on the CPU: decode matmul with int4 weights, Y[M,N] = X[M,K] @ dequant(WQ)[N,K]^T.

Schedule: the weights stay packed in memory (half a byte each, the point of int4) and are
decoded in registers: each step loads ``vec`` bytes of a W row, splits them into the codes
of ``vec`` even and ``vec`` odd k with a vector and/shift, and converts them to float. X is
laid out once per call (a prologue on the calling thread, into the workspace) with the even
and odd k of every block of 2 x ``vec`` apart, so each decoded vector meets its X vector
without any shuffle. A tile keeps ``rows`` W rows x ``mtile`` X rows of accumulators.

How the group scale and zero are applied (``scale``):
- ``group``: accumulate sum_k x_k q_k over a group, then fold the group in with one fma
  per accumulator, sum x (q - z) s = s (sum x q - z sum x), using per-lane sums of X per
  group from the prologue; no per-weight arithmetic besides the decode and the fma.
- ``dequant``: dequantise each decoded vector, (q - z) * s, and fma it: two more vector
  ops per weight vector, fewer registers.

``compute`` (targets with AVX2): ``f32`` as above, or ``i16``: the prologue rounds X to
int16 per (row, group) with the scale max|x| / 32767, the codes are split into int16 vectors
and ``vpdpwssd`` (AVX-512 VNNI, or AVX-VNNI at 8 lanes; else ``vpmaddwd`` and an add)
multiplies and adds pairs in int32 — 2 x ``vec`` products per instruction and half the
decode work — and each group is converted to float once, scaled
by the weight scale times the X scale. When a group is shorter than a decoded block
(group 32 with 16 lanes: 64 k per block), lane i of an accumulator holds k 4i..4i+3, so
each group owns a run of lanes and one block folds several groups with per-lane scales.
The centre code 8 is subtracted exactly in int32;
a zero point is folded in float like above. Rounding X costs a relative error of about
1e-5 on typical activations (1e-4 when a few channels are 50x larger than the rest),
within the float32 tolerance; ``f32`` stays exact to float32 rounding.

``prefetch`` > 0 prefetches the bytes that the row block that many blocks ahead will read:
a W row is only K/2 bytes, and several short rows read in an interleaved way are a
pattern the hardware prefetcher follows poorly.

``streams`` walks each thread's row blocks as that many runs side by side (see
``gemv_plan``): a row of K = 2048 is 1 KB, and one run of such rows is a single stream that
the hardware prefetcher follows too short a way ahead for the memory's rate.

``chains`` 2 keeps separate accumulators for the even and odd codes (two dependency
chains, for tiles too small to hide the fma latency); ``unroll`` groups (fold units)
per loop trip;
``kblock`` splits K (a multiple of 128 k, so whole groups) inside panels of 128 W rows,
so that the block of X that every row of the panel meets stays in L1; threads split row
blocks of W. Remainder rows and X rows get smaller tiles. K is a
multiple of the group size (>= 32), so there is no K remainder.
"""
from __future__ import annotations

import math
from itertools import product

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.matmul import GemvQ4Op
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource, Template, register_template
from .gemv import vector_registers
from .gemv_plan import emit_gemv_plan
from .threads import default_thread_counts, threads_knob
from .q4_layout import (decode_block, decode_block_i16, deinterleave_x, has_vnni, i16_unit, i16_width_constraint,
                        lane_spread, q4_attrs, quantize_x_i16)


def _align64(nbytes: int) -> int:
    return -(-nbytes // 64) * 64


PANEL_ROWS = 128  # W rows that share one pass over K blocks (kblock > 0)


def _registers_needed(c) -> int:
    """Vector registers a tile keeps live: its accumulators plus a few for the decoded
    weights, scale and zero (X vectors are fma memory operands and need none for long)."""
    per_tile = c["mtile"] * c["rows"]
    return per_tile * c["chains"] + (per_tile if c["scale"] == "group" else 0) + 6


@register_template
class GemvQ4Cpu(GemvQ4Op, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d = task.dims
        group, _ = q4_attrs(self, task)
        lanes = target.vector_lanes_f32
        regs = vector_registers(target)
        groups = d["K"] // group
        int16 = target.has_feature("avx2")  # int16 dot products: vpdpwssd, or vpmaddwd and an add
        # legacy: logs of CPUs without avx512vnni, from before it was offered there, ran f32
        knobs = [Knob("compute", ("f32", "i16"), legacy="f32")] if int16 else []
        knobs += [
            Knob("rows", tuple(v for v in (1, 2, 4, 8) if v <= d["N"])),
            Knob("mtile", tuple(v for v in (1, 2, 4, 8, 16) if v <= d["M"])),
            Knob("vec", tuple(v for v in (8, 16) if v <= lanes) or (lanes,)),
            Knob("scale", ("group", "dequant")),
            Knob("chains", (1, 2)),
            Knob("unroll", tuple(v for v in (1, 2) if v <= groups)),
            Knob("kblock", (0,) + tuple(v for v in (512, 2048) if v < d["K"])),
            Knob("prefetch", (0, 1, 2, 4)),
            Knob("streams", (1, 2, 4), legacy=1),  # logs from before streams: one run
            threads_knob(target),
        ]
        constraints = [
            ("accumulators fit in registers", lambda c: _registers_needed(c) <= regs),
            ("int16 products are folded per group", lambda c: c.get("compute") != "i16" or c["scale"] == "group"),
            ("K is whole int16 blocks", lambda c: c.get("compute") != "i16" or d["K"] % i16_unit(group, c["vec"]) == 0),
            i16_width_constraint(target),
            ("one row block per thread at least",
             lambda c: c["threads"] == 1 or math.ceil(d["N"] / c["rows"]) >= c["threads"]),
            ("streams walk one K block", lambda c: c["streams"] == 1 or c["kblock"] == 0),
            ("one row block per stream at least",
             lambda c: math.ceil(d["N"] / c["rows"]) >= c["threads"] * c["streams"]),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        lanes = min(16, target.vector_lanes_f32)
        # one X row: one W row at a time (a W row is a short stream; several interleaved
        # ones starve the hardware prefetcher); more X rows: share each decoded W vector
        tiles = ((1, 1), (1, 2)) if task.dims["M"] <= 2 else ((2, 4), (2, 2), (1, 2), (1, 1))
        # two streams and a prefetch two row blocks ahead: 0.45 ms against 0.88 ms for one
        # stream without, gate/up of a 1.1B model (11264 x 2048) read cold on two cores;
        # the int16 products where the target has them (twice the f32 rate in cache)
        computes = ("i16", "f32") if "compute" in space.names else (None,)
        for threads, (rows, mtile), streams, compute in product(default_thread_counts(task, target), tiles,
                                                                (2, 1), computes):
            values = {"rows": rows, "mtile": mtile, "vec": lanes, "scale": "group", "chains": 1,
                      "unroll": 1, "kblock": 0, "prefetch": 2, "streams": streams, "threads": threads}
            if compute is not None:
                values["compute"] = compute
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        c = config.as_dict()
        group, zero_point = q4_attrs(self, task)
        chunks = math.ceil(d["N"] / c["rows"])
        passes = math.ceil(d["M"] / c["mtile"])
        klen = c["kblock"] or d["K"]
        weight_bytes = d["N"] * d["K"] / 2 + d["N"] * d["K"] / group * 4 * (2 if zero_point else 1)
        moved = weight_bytes + 4.0 * (d["M"] * d["K"] * 2 + d["M"] * d["N"])
        return {
            "threads": c["threads"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": _registers_needed(c),
            "loads_per_fma": (2 * c["mtile"] + c["rows"]) / (2 * c["mtile"] * c["rows"]),
            "parallel_chunks": chunks,
            "chunks_per_thread": chunks / c["threads"],
            "tile_bytes_l1": c["rows"] * c["vec"] + 8.0 * c["mtile"] * c["vec"],
            "tile_bytes_l2": c["rows"] * klen / 2 * passes + 4.0 * d["M"] * klen,
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": 1.0 / max(group / (2 * c["vec"]), 1.0),
            "n_tail_fraction": (d["N"] % c["rows"]) / d["N"],
            "m_tail_fraction": (d["M"] % c["mtile"]) / d["M"],
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return _render(self, task, config.as_dict(), has_vnni(target, config["vec"]))


def _render(op: GemvQ4Cpu, task: Task, c: dict, dot_vnni: bool) -> KernelSource:
    """``dot_vnni``: the int16 products are ``vpdpwssd`` (else ``vpmaddwd`` and an add)."""
    d = task.dims
    M, N, K = d["M"], d["N"], d["K"]
    group, zero_point = q4_attrs(op, task)
    rows, mtile, lanes, chains, unroll = c["rows"], c["mtile"], c["vec"], c["chains"], c["unroll"]
    prefetch = c["prefetch"]
    vnni = c.get("compute", "f32") == "i16"
    folded = c["scale"] == "group"
    groups = K // group
    span = 4 * lanes if vnni else 2 * lanes  # k per decoded block
    # the loops run over fold units: one group, or for int16 with small groups one block of
    # several groups (each owning a run of accumulator lanes)
    unit = i16_unit(group, lanes) if vnni else group
    per_unit = unit // group
    units = K // unit
    kblock = (c["kblock"] or K) // unit  # in units
    blocks_per_unit = unit // span
    n_ptr = 6 if zero_point else 5
    # workspace: X laid out (float32, or int16 with a scale per group), then per-lane group sums
    x_bytes = (2 if vnni else 4) * M * K
    scales_at = _align64(x_bytes)
    sums_at = scales_at + (_align64(4 * M * groups) if vnni else 0)
    workspace = sums_at + (4 * M * units * lanes if folded else 0)

    module = cg.new_module("gemv_q4")

    # -- prologue: X laid out for the nibble split (and its group sums), once per call
    prologue = cg.kernel_function(module, "gemv_q4_layout", n_ptr)
    prologue.linkage = "internal"
    pk = cg.KernelBuilder(prologue)
    x_in, p_ws = prologue.args[0], prologue.args[n_ptr - 1]
    p_sums = pk.gep(p_ws, sums_at, cg.I8) if folded else None
    if vnni:
        quantize_x_i16(pk, x_in, p_ws, pk.gep(p_ws, scales_at, cg.I8), p_sums, cg.i64(M), K, group, lanes,
                       symmetric=not zero_point)
    else:
        deinterleave_x(pk, x_in, p_ws, cg.i64(M), K, lanes, sums=p_sums, group=group)
    pk.ret()

    body, kb = cg.chunk_body(module, "gemv_q4_chunk", n_pointers=n_ptr, n_scalars=0)
    b = kb.b
    WQ, S = body.args[1], body.args[2]
    Z = body.args[3] if zero_point else None
    Y, WS = body.args[n_ptr - 2], body.args[n_ptr - 1]
    chunk_begin, chunk_end = body.args[n_ptr], body.args[n_ptr + 1]
    XL = WS  # X is read by the prologue only; the chunks read its layout in the workspace
    XSCALE = kb.gep(WS, scales_at, cg.I8) if vnni else None
    XSUM = kb.gep(WS, sums_at, cg.I8) if folded else None
    acc_type = cg.vec(lanes, cg.I32) if vnni else cg.vec(lanes)
    x_el, x_width = (cg.I16, 2 * lanes) if vnni else (cg.F32, lanes)

    def tile(m0, n0, nrows: int, mt: int, u0, nu: int, first: bool) -> None:
        """Y[m0:+mt, n0:+nrows] (+)= X[m0:+mt, units u0:+nu] . W[n0:+nrows, same]^T."""
        # acc: the running sums (dequant) or one group's sum x q (group); tot: scaled sums (group)
        acc = [[[kb.local(acc_type) for _ in range(chains)] for _ in range(nrows)] for _ in range(mt)]
        tot = [[kb.local(cg.vec(lanes), "tot") for _ in range(nrows)] for _ in range(mt)] if folded else None

        def clear(slots, value=None) -> None:
            for m in range(mt):
                for r in range(nrows):
                    cells = slots[m][r] if isinstance(slots[m][r], list) else [slots[m][r]]
                    for i, slot in enumerate(cells):
                        init = ir.Constant(slot.type.pointee, None)
                        b.store(value(m) if value is not None and i == 0 else init, slot)

        clear(tot if folded else acc)
        x_rows = [b.mul(b.add(m0, cg.i64(m)), cg.i64(K)) for m in range(mt)]
        w_rows = [b.mul(b.add(n0, cg.i64(r)), cg.i64(K // 2)) for r in range(nrows)]
        s_rows = [b.mul(b.add(n0, cg.i64(r)), cg.i64(groups)) for r in range(nrows)]

        def unit_sums(m, u):
            at = b.mul(b.add(b.mul(b.add(m0, cg.i64(m)), cg.i64(units)), u), cg.i64(lanes))
            return kb.load_vec(XSUM, at, lanes, cg.I32 if vnni and not zero_point else cg.F32)

        def per_group(base, row, g):
            """The unit's value(s) of a per-group array: a scalar, or <per_unit x float>."""
            at = b.add(row, g)
            return kb.load(base, at) if per_unit == 1 else kb.load_vec(base, at, per_unit)

        def one_unit(u) -> None:
            g = b.mul(u, cg.i64(per_unit))  # first group of the unit
            if prefetch:
                # a W row is only K/2 bytes, too short a stream for the hardware prefetcher:
                # fetch the same bytes of the row block `prefetch` blocks ahead (clamped to W)
                for r in range(nrows):
                    ahead = kb.min(b.add(n0, cg.i64(r + prefetch * rows)), cg.i64(N - 1))
                    at = b.add(b.mul(ahead, cg.i64(K // 2)), b.mul(u, cg.i64(unit // 2)))
                    kb.prefetch(WQ, at, cg.I8, locality=3)
            scale = [per_group(S, s_rows[r], g) for r in range(nrows)]
            zero = [per_group(Z, s_rows[r], g) if zero_point else cg.f32(8.0) for r in range(nrows)]
            if vnni and not zero_point:
                # start from -8 * (sum of X per lane): the centre code is subtracted exactly
                clear(acc, lambda m: unit_sums(m, u))
            elif folded:
                clear(acc)
            else:
                s_vec = [kb.splat(s, lanes) for s in scale]
                z_vec = [kb.splat(z, lanes) for z in zero]
            for blk in range(blocks_per_unit):
                k = b.add(b.mul(u, cg.i64(unit)), cg.i64(blk * span))
                kbyte = b.add(b.mul(u, cg.i64(unit // 2)), cg.i64(blk * span // 2))
                xs = [(kb.load_vec(XL, b.add(x_rows[m], k), x_width, x_el),
                       kb.load_vec(XL, b.add(b.add(x_rows[m], k), cg.i64(x_width)), x_width, x_el))
                      for m in range(mt)]
                for r in range(nrows):
                    if vnni:
                        even, odd = decode_block_i16(kb, WQ, b.add(w_rows[r], kbyte), 2 * lanes)
                    else:
                        even, odd = decode_block(kb, WQ, b.add(w_rows[r], kbyte), lanes)
                    if not folded:
                        even = kb.fmul(kb.fsub(even, z_vec[r]), s_vec[r])
                        odd = kb.fmul(kb.fsub(odd, z_vec[r]), s_vec[r])
                    for m in range(mt):
                        slots = acc[m][r]
                        for slot, wv, xv in ((slots[0], even, xs[m][0]), (slots[-1], odd, xs[m][1])):
                            old = b.load(slot)
                            b.store(kb.dot_i16(old, wv, xv, dot_vnni) if vnni else kb.fma(xv, wv, old), slot)
            if folded:
                for m in range(mt):
                    x_scale = per_group(XSCALE, b.mul(b.add(m0, cg.i64(m)), cg.i64(groups)), g) if vnni else None
                    xsum = unit_sums(m, u) if zero_point or not vnni else None
                    for r in range(nrows):
                        part = b.load(acc[m][r][0])
                        for ch in range(1, chains):
                            part = b.add(part, b.load(acc[m][r][ch])) if vnni else kb.fadd(part, b.load(acc[m][r][ch]))
                        if vnni:
                            part = b.sitofp(part, cg.vec(lanes))
                        if xsum is not None:
                            # sum x (q - z) = sum x q - z sum x, then one scale per group
                            minus_z = kb.fsub(ir.Constant(zero[r].type, None), zero[r])
                            part = kb.fma(lane_spread(kb, minus_z, lanes), xsum, part)
                        if not vnni:
                            factor = kb.splat(scale[r], lanes)
                        elif per_unit == 1:
                            factor = kb.splat(kb.fmul(scale[r], x_scale), lanes)
                        else:
                            factor = lane_spread(kb, kb.fmul(scale[r], x_scale), lanes)
                        b.store(kb.fma(part, factor, b.load(tot[m][r])), tot[m][r])

        trips = nu // unroll
        if trips:
            with kb.loop(0, trips, 1, name="u") as ui:
                for j in range(unroll):
                    one_unit(b.add(u0, b.add(b.mul(ui, cg.i64(unroll)), cg.i64(j))))
        for j in range(nu % unroll):
            one_unit(b.add(u0, cg.i64(trips * unroll + j)))
        for m in range(mt):
            for r in range(nrows):
                if folded:
                    total = b.load(tot[m][r])
                else:
                    total = b.load(acc[m][r][0])
                    for ch in range(1, chains):
                        total = kb.fadd(total, b.load(acc[m][r][ch]))
                s = kb.reduce_add(total)
                at = b.add(b.mul(b.add(m0, cg.i64(m)), cg.i64(N)), b.add(n0, cg.i64(r)))
                if not first:
                    s = kb.fadd(kb.load(Y, at), s)
                kb.store(s, Y, at)

    # K in fold units: a K block is whole units
    emit_gemv_plan(kb, tile, chunk_begin, chunk_end, M=M, N=N, rows=rows, mtile=mtile, K=units, kblock=kblock,
                   panel_rows=PANEL_ROWS, streams=c["streams"])
    kb.ret()

    chunks = math.ceil(N / rows)
    cg.parallel_entry(module, "gemv_q4", body, n_pointers=n_ptr, n_scalars=0, threads=c["threads"],
                      n_chunks=chunks, prologue=prologue)
    args = op.signature(task) + (ArgSpec("workspace", "workspace", "uint8", (), nbytes=workspace),)
    return KernelSource("llvm", str(module), "gemv_q4", args, (("threads", c["threads"]),))
