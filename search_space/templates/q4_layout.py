"""Shared pieces of the int4 weight-only CPU templates (``gemv_q4``, ``gemm_q4``).

The packed layout (see ``ops.matmul``) puts even k in the low nibble and odd k in the high
nibble of each byte. Splitting ``V`` bytes with a vector ``and``/shift yields the codes of
the ``V`` even k and the ``V`` odd k of a block of ``2V`` k, each as one vector. The
kernels then either

- multiply them with X laid out the same way (``deinterleave_x``: per block of 2V k, the V
  even elements then the V odd ones), which costs nothing per weight, or
- interleave them back into k order with two shuffles (``decode_block(..., natural=True)``)
  when the weights are written to a float panel that any X layout can use.

Every block of 2V k lies inside one quantisation group, because K and the group size are
multiples of 32 and 2V <= 32.
"""
from __future__ import annotations

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..task import Task

Q4_GROUPS = (32, 64, 128)


def has_vnni(target, lanes: int) -> bool:
    """Whether ``target`` has ``vpdpwssd`` at this width: AVX-512 VNNI, or AVX-VNNI (VEX, 256
    bits). Without it the int16 paths pair ``vpmaddwd`` with an add."""
    return target.has_feature("avx512vnni") or (lanes == 8 and target.has_feature("avxvnni"))


def i16_width_constraint(target):
    """The constraint of both int16 paths (knob ``compute``): 16 lanes of int16 products are
    zmm instructions, which need avx512bw; 8 lanes run on AVX2."""
    return ("16 lanes of int16 products need avx512bw",
            lambda c: c.get("compute") != "i16" or c["vec"] == 8 or target.has_feature("avx512bw"))


def q4_attrs(op, task: Task) -> tuple[int, bool]:
    """(group size, zero_point) of a q4 task."""
    a = op.attrs(task)
    return int(a["group_size"]), bool(a["zero_point"])


def decode_block(kb: cg.KernelBuilder, wq, byte_index, lanes: int, natural: bool = False):
    """Codes of the 2 * ``lanes`` k packed in ``lanes`` bytes at ``wq[byte_index]`` as float vectors.

    Returns (even, odd) — the codes of k = 2j and k = 2j + 1 — or, with ``natural``, the
    2 * lanes codes in k order as (first half, second half).
    """
    b = kb.b
    raw = kb.load_vec(wq, byte_index, lanes, cg.I8)
    wide = b.zext(raw, cg.vec(lanes, cg.I32))
    low = b.and_(wide, ir.Constant(cg.vec(lanes, cg.I32), [15] * lanes))
    high = b.lshr(wide, ir.Constant(cg.vec(lanes, cg.I32), [4] * lanes))
    even = b.sitofp(low, cg.vec(lanes, cg.F32))
    odd = b.sitofp(high, cg.vec(lanes, cg.F32))
    if not natural:
        return even, odd
    first = [j // 2 + (lanes if j % 2 else 0) for j in range(lanes)]
    second = [lanes // 2 + j // 2 + (lanes if j % 2 else 0) for j in range(lanes)]
    mask = lambda idx: ir.Constant(cg.vec(lanes, cg.I32), idx)  # noqa: E731
    return b.shuffle_vector(even, odd, mask(first)), b.shuffle_vector(even, odd, mask(second))


def deinterleave_x(kb: cg.KernelBuilder, x, out, rows, K: int, lanes: int, sums=None, group: int = 0) -> None:
    """out[m, blk*2V : +V] = x[m, blk*2V + 2j], out[m, blk*2V + V : +V] = x[m, blk*2V + 2j + 1].

    ``rows`` is an i64 value (the X rows to lay out). With ``sums``, also writes the per-lane
    sums over each group of ``group`` k, ``sums[m, g, 0:V]``, used to fold zero points.
    """
    b = kb.b
    span = 2 * lanes
    evens = ir.Constant(cg.vec(lanes, cg.I32), [2 * j for j in range(lanes)])
    odds = ir.Constant(cg.vec(lanes, cg.I32), [2 * j + 1 for j in range(lanes)])
    per_group = group // span if sums is not None else 0
    with kb.loop(0, rows, 1, name="xm") as m:
        base = b.mul(m, cg.i64(K))
        if sums is None:
            with kb.loop(0, K, span, name="xk") as k:
                at = b.add(base, k)
                lo, hi = kb.load_vec(x, at, lanes), kb.load_vec(x, b.add(at, cg.i64(lanes)), lanes)
                kb.store_vec(b.shuffle_vector(lo, hi, evens), out, at)
                kb.store_vec(b.shuffle_vector(lo, hi, odds), out, b.add(at, cg.i64(lanes)))
        else:
            groups = K // group
            with kb.loop(0, groups, 1, name="xg") as g:
                total = kb.zeros(lanes)
                for blk in range(per_group):
                    at = b.add(base, b.add(b.mul(g, cg.i64(group)), cg.i64(blk * span)))
                    lo, hi = kb.load_vec(x, at, lanes), kb.load_vec(x, b.add(at, cg.i64(lanes)), lanes)
                    even, odd = b.shuffle_vector(lo, hi, evens), b.shuffle_vector(lo, hi, odds)
                    kb.store_vec(even, out, at)
                    kb.store_vec(odd, out, b.add(at, cg.i64(lanes)))
                    total = kb.fadd(total, kb.fadd(even, odd))
                kb.store_vec(total, sums, b.mul(b.add(b.mul(m, cg.i64(groups)), g), cg.i64(lanes)))


I16_LEVELS = 32767.0  # X is rounded to int16 per (row, group): x ~ q * (max|x| / 32767)


def _i16_scale(kb: cg.KernelBuilder, values):
    """(32767 / max|x|, max|x| / 32767) of one group of X: the factor that rounds it to int16
    and the scale that undoes it (both 0 for an all-zero group)."""
    b = kb.b
    xmax = kb.reduce_max(kb.call_math("fabs", values))
    positive = b.fcmp_ordered(">", xmax, cg.f32(0.0))
    return b.select(positive, kb.fdiv(cg.f32(I16_LEVELS), xmax), cg.f32(0.0)), kb.fdiv(xmax, cg.f32(I16_LEVELS))


def i16_unit(group: int, lanes: int) -> int:
    """k per fold unit of the int16 path: a group, or the 4 x ``lanes`` k of one decoded
    block when groups are smaller (then lane i of the accumulator holds k 4i..4i+3, so
    each group owns a run of lanes)."""
    return max(group, 4 * lanes)


def lane_spread(kb: cg.KernelBuilder, values, lanes: int):
    """<P x float> (one value per group of a unit) -> <lanes x float>, each value repeated
    over the lanes its group owns; a scalar is splat."""
    if not isinstance(values.type, ir.VectorType):
        return kb.splat(values, lanes)
    per = lanes // values.type.count
    mask = ir.Constant(cg.vec(lanes, cg.I32), [j // per for j in range(lanes)])
    return kb.b.shuffle_vector(values, ir.Constant(values.type, ir.Undefined), mask)


def quantize_x_i16(kb: cg.KernelBuilder, x, xq, scales, sums, rows, K: int, group: int, lanes: int,
                   symmetric: bool) -> None:
    """Round X to int16 per (row m, group g) for the VNNI path, laid out for the nibble split.

    ``xq[m, k]`` int16: per block of 4 * ``lanes`` k, the 2 * lanes even k then the odd k
    (the order of the codes that ``vec`` packed bytes split into); ``scales[m, g]`` float:
    max|x| / 32767 (0 for an all-zero group); ``sums[m, u, 0:lanes]`` per fold unit u (see
    ``i16_unit``): per lane of ``vpdpwssd`` the sum of the rounded X that lane meets — as
    int32 times -8 when ``symmetric`` (the initial value that subtracts the centre code 8
    exactly), else as float (multiplied by each row's zero point at the end of the unit).
    """
    b = kb.b
    words = 2 * lanes
    span = 2 * words
    unit = i16_unit(group, lanes)
    per_unit = unit // group
    groups = K // group
    i_words, i_lanes = cg.vec(words, cg.I32), cg.vec(lanes, cg.I32)
    picks = lambda idx: ir.Constant(cg.vec(len(idx), cg.I32), idx)  # noqa: E731
    evens, odds = picks(list(range(0, span, 2))), picks(list(range(1, span, 2)))
    pair_lo, pair_hi = picks(list(range(0, words, 2))), picks(list(range(1, words, 2)))
    with kb.loop(0, rows, 1, name="qm") as m:
        with kb.loop(0, K // unit, 1, name="qu") as u:
            base = b.add(b.mul(m, cg.i64(K)), b.mul(u, cg.i64(unit)))
            g0 = b.add(b.mul(m, cg.i64(groups)), b.mul(u, cg.i64(per_unit)))
            inverses = []
            for j in range(per_unit):
                inverse, scale = _i16_scale(kb, kb.load_vec(x, b.add(base, cg.i64(j * group)), group))
                inverses.append(inverse)
                kb.store(scale, scales, b.add(g0, cg.i64(j)))
            lane_sum = ir.Constant(i_lanes, None)
            for blk in range(unit // span):
                at = b.add(base, cg.i64(blk * span))
                v = kb.load_vec(x, at, span)
                if per_unit == 1:
                    inv = kb.splat(inverses[0], span)
                else:  # the k of this block belong to several groups: one factor each
                    packed = ir.Constant(cg.vec(per_unit), None)
                    for j, value in enumerate(inverses):
                        packed = b.insert_element(packed, value, ir.Constant(cg.I32, j))
                    inv = lane_spread(kb, packed, span)
                q = b.fptosi(kb.call_math("rint", kb.fmul(v, inv)), cg.vec(span, cg.I32))
                for half, pick in ((0, evens), (1, odds)):
                    part = b.shuffle_vector(q, ir.Constant(q.type, ir.Undefined), pick)
                    kb.store_vec(b.trunc(part, cg.vec(words, cg.I16)), xq, b.add(at, cg.i64(half * words)), cg.I16)
                    pairs = b.add(b.shuffle_vector(part, ir.Constant(i_words, ir.Undefined), pair_lo),
                                  b.shuffle_vector(part, ir.Constant(i_words, ir.Undefined), pair_hi))
                    lane_sum = b.add(lane_sum, pairs)
            at = b.mul(b.add(b.mul(m, cg.i64(K // unit)), u), cg.i64(lanes))
            if symmetric:
                kb.store_vec(b.mul(lane_sum, ir.Constant(i_lanes, [-8] * lanes)), sums, at, cg.I32)
            else:
                kb.store_vec(b.sitofp(lane_sum, cg.vec(lanes)), sums, at)


def decode_block_i16(kb: cg.KernelBuilder, wq, byte_index, words: int):
    """The codes of the 2 * ``words`` k packed in ``words`` bytes as int16 vectors (even k, odd k)."""
    b = kb.b
    wide = b.zext(kb.load_vec(wq, byte_index, words, cg.I8), cg.vec(words, cg.I16))
    low = b.and_(wide, ir.Constant(cg.vec(words, cg.I16), [15] * words))
    high = b.lshr(wide, ir.Constant(cg.vec(words, cg.I16), [4] * words))
    return low, high


def quantize_x_panel(kb: cg.KernelBuilder, x, xq, scales, m0, mlen, k0, klen, K: int, ld: int, group: int,
                     at, scales_at) -> None:
    """Round X[m0:+mlen, k0:+klen] to int16 per (row, group) for gemm_q4's int16 kernel:
    ``xq[at + r * ld + k]`` (int16, k in natural order, so each k pair is one int32) and
    ``scales[scales_at + r * (ld / group) + g]`` = max|x| / 32767 (0 for an all-zero group).
    ``klen`` (an int or an i64 value) is whole groups."""
    b = kb.b
    with kb.loop(0, mlen, 1, name="qm") as r:
        src = b.add(b.mul(b.add(m0, r), cg.i64(K)), k0)
        with kb.loop(0, klen, group, name="qg") as k:
            values = kb.load_vec(x, b.add(src, k), group)
            inverse, scale = _i16_scale(kb, values)
            g = b.sdiv(k, cg.i64(group))
            kb.store(scale, scales, b.add(scales_at, b.add(b.mul(r, cg.i64(ld // group)), g)))
            q = b.fptosi(kb.call_math("rint", kb.fmul(values, kb.splat(inverse, group))), cg.vec(group, cg.I32))
            kb.store_vec(b.trunc(q, cg.vec(group, cg.I16)), xq, b.add(at, b.add(b.mul(r, cg.i64(ld)), k)), cg.I16)
