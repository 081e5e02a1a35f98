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
