"""The loop plan shared by the CPU gemv kernels (``gemv``, ``gemv_q4``).

A chunk is a range of row blocks of W (``rows`` rows each; threads split the row blocks).
In a row block, X is taken in tiles of ``mtile`` rows, the remainder of M as one smaller
tile; when ``rows`` does not divide N, the last, partial row block is done one row at a
time. K is walked in blocks of ``kblock``: the first block stores its partial sums in Y,
later blocks add to them. With more than one K block, the K blocks run inside panels of
``panel_rows`` W rows, so that the block of X that every row of a panel meets stays in L1
while each W row is still read in runs of a whole K block.

With ``streams`` S > 1 (one K block only), a chunk's row blocks are split into S runs that
are walked side by side: row block i of every run, then i + 1. The rows of one row block
lie in one or two 4 KB pages, and the hardware's stream prefetcher follows one page at a
time, a short way ahead; S runs far apart are S streams it follows at once. Short rows
that take much arithmetic per byte (int4: a row of K = 2048 is 1 KB) otherwise read
memory at about three quarters of the rate the same kernel reaches with S = 2.

The kernel supplies only the tile: ``tile(m0, n0, nrows, mt, k0, klen, first)`` computes
Y[m0:+mt, n0:+nrows] (+)= X[m0:+mt, k0:+klen] . W[n0:+nrows, k0:+klen]^T. K, ``kblock``,
``k0`` and ``klen`` are in the kernel's own unit of K (elements, or groups of them).
"""
from __future__ import annotations

from typing import Callable

from ..codegen import llvm as cg


def emit_gemv_plan(kb: cg.KernelBuilder, tile: Callable[..., None], chunk_begin, chunk_end, *,
                   M: int, N: int, rows: int, mtile: int, K: int, kblock: int, panel_rows: int,
                   streams: int = 1) -> None:
    """Emit the loops over the row blocks [chunk_begin, chunk_end) of a chunk, calling ``tile``."""
    if streams > 1 and kblock != K:
        raise ValueError("streams > 1 needs a single K block")
    b = kb.b

    def row_block(n0, nrows: int, k0, klen: int, first: bool) -> None:
        full = M // mtile
        if full:
            with kb.loop(0, full, 1, name="mt") as mt_i:
                tile(b.mul(mt_i, cg.i64(mtile)), n0, nrows, mtile, k0, klen, first)
        if M % mtile:
            tile(cg.i64(full * mtile), n0, nrows, M % mtile, k0, klen, first)

    def k_block(lo, hi, k0, klen: int, first: bool) -> None:
        with kb.loop(lo, hi, 1, name="rb") as rb:
            n0 = b.mul(rb, cg.i64(rows))
            if N % rows == 0:
                row_block(n0, rows, k0, klen, first)
            else:
                whole = b.icmp_signed("<=", b.add(n0, cg.i64(rows)), cg.i64(N))
                with b.if_else(whole) as (then, otherwise):
                    with then:
                        row_block(n0, rows, k0, klen, first)
                    with otherwise:
                        with kb.loop(n0, N, 1, name="nr") as n:
                            row_block(n, 1, k0, klen, first)

    def k_blocks(lo, hi) -> None:
        full_blocks = K // kblock
        k_block(lo, hi, cg.i64(0), kblock, True)
        if full_blocks > 1:
            with kb.loop(1, full_blocks, 1, name="kb") as kbi:
                k_block(lo, hi, b.mul(kbi, cg.i64(kblock)), kblock, False)
        if K % kblock:
            k_block(lo, hi, cg.i64(full_blocks * kblock), K % kblock, False)

    if kblock == K and streams > 1:
        per_run = b.sdiv(b.sub(chunk_end, chunk_begin), cg.i64(streams))
        with kb.loop(0, per_run, 1, name="run_i") as i:
            for run in range(streams):
                rb = b.add(b.add(chunk_begin, b.mul(per_run, cg.i64(run))), i)
                k_block(rb, b.add(rb, cg.i64(1)), cg.i64(0), K, True)
        # the row blocks left over when S does not divide the chunk
        k_block(b.add(chunk_begin, b.mul(per_run, cg.i64(streams))), chunk_end, cg.i64(0), K, True)
    elif kblock == K:
        k_blocks(chunk_begin, chunk_end)
    else:
        step = max(panel_rows // rows, 1)  # row blocks per panel
        with kb.loop(chunk_begin, chunk_end, step, name="panel") as p0:
            k_blocks(p0, kb.min(b.add(p0, cg.i64(step)), chunk_end))
