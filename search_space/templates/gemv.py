"""``gemv`` on the CPU: the decode-time linear layer, Y[M,N] = X[M,K] @ W[N,K]^T, M = 1..16.

Schedule: each output column n is a dot product along K, the contiguous axis of both X
and W. A tile takes ``rows`` rows of W and ``mtile`` rows of X and keeps
``mtile x rows x unroll`` vector accumulators of ``vec`` lanes; each loaded W vector is
used by every X row in the tile and each X vector by every W row. ``kblock`` splits K so
that the X rows of a block stay in L1 while a panel of 64 W rows streams past (for
several X rows, X would otherwise come from L2 at every step). Threads split the row
blocks of W. Remainders of N, M and K are handled by smaller tiles and masked loads.

bfloat16 (X, W, Y raw 16-bit words, float32 accumulation): ``dot`` = ``bf16`` feeds raw
word pairs to the AVX-512 BF16 ``vdpbf16ps`` (2 x ``vec`` products per instruction, on
targets with avx512bf16); ``widen`` widens both operands to float32 by shifting and uses
fmas. Each output is rounded to bfloat16 (nearest even) once its dot product is complete,
so K is not split into blocks (``kblock`` is 0) for bfloat16.

Weight-only bfloat16 or float16 (``weight=bfloat16`` or ``weight=float16`` on a float32 task:
X and Y float32, W raw 16-bit words): the float32 schedule and knobs, each W vector widened
as it is loaded (bfloat16 by shifting, float16 by ``vcvtph2ps``), so a decode step streams
half the bytes of float32 W. Streamed from memory, a weight-only bfloat16 kernel read W
slower than float32 kernels do (on a 2-core Intel VM: 17-20 GB/s against 28-30), so
weight-only kernels also take ``prefetch``: each W row is prefetched that many bytes ahead of
its loads (0: none; 24-30 GB/s there).
"""
from __future__ import annotations

import math
from itertools import product

from ..codegen import llvm as cg
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import KernelSource, Template, register_template
from ..ops.common import ITEMSIZE
from ..ops.matmul import GemvOp
from .gemv_plan import emit_gemv_plan
from .threads import default_thread_counts, threads_knob

PANEL_ROWS = 64  # W rows that share one pass over the K blocks (kblock > 0)
PREFETCH_BYTES = (0, 1024, 2048)  # how far ahead a weight-only kernel prefetches each W row


def vector_registers(target: Target) -> int:
    return 32 if target.vector_bits >= 512 else 16


@register_template
class GemvCpu(GemvOp, Template):
    target_kind = "cpu"
    dtypes = ("float32", "bfloat16")
    weight_dtypes = ("bfloat16", "float16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d = task.dims
        lanes = target.vector_lanes_f32
        regs = vector_registers(target)
        bf16 = task.dtype == "bfloat16"
        knobs = [Knob("dot", ("bf16", "widen") if target.has_feature("avx512bf16") else ("widen",))] if bf16 else []
        knobs += [
            Knob("rows", tuple(v for v in (1, 2, 4, 8) if v <= d["N"])),
            Knob("mtile", tuple(v for v in (1, 2, 4, 8, 16) if v <= d["M"])),
            Knob("vec", tuple(v for v in (4, 8, 16) if v <= lanes)),
            Knob("unroll", (1, 2, 4)),
            Knob("kblock", (0,) + (() if bf16 else tuple(v for v in (256, 1024) if v < d["K"]))),
            threads_knob(target),
        ]
        if self.weight_dtype(task) != task.dtype:  # weight-only
            knobs.append(Knob("prefetch", PREFETCH_BYTES))
        constraints = [
            ("accumulators fit in registers",
             lambda c: c["mtile"] * c["rows"] * c["unroll"] + c["mtile"] * c["unroll"] + 1 <= regs),
            ("kblock is a multiple of the vector step",
             lambda c: c["kblock"] % (c["vec"] * c["unroll"] * (2 if c.get("dot") == "bf16" else 1)) == 0),
            ("one row block per thread at least",
             lambda c: c["threads"] == 1 or math.ceil(d["N"] / c["rows"]) >= c["threads"]),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        lanes = target.vector_lanes_f32
        # (mtile, rows, unroll): with several X rows, each W vector loaded serves mtile of them.
        # Read cold on two cores at 11008x4096 these took M=2 6.1 ms, M=4 6.3, M=8 8.0, M=16
        # 10.6, against 7.1, 8.9, 13.3 and 20.9 with one X row per tile.
        tiles = [(m, rows, unroll) for m, rows, unroll in ((8, 2, 1), (4, 2, 2), (4, 2, 1), (2, 4, 2), (2, 4, 1))
                 if m <= task.dims["M"]]
        tiles += [(1, 4, 2), (1, 4, 1), (1, 2, 1), (1, 1, 1)]
        for threads, (mtile, rows, unroll) in product(default_thread_counts(task, target), tiles):
            values = {"rows": rows, "mtile": mtile, "vec": lanes, "unroll": unroll, "kblock": 0, "threads": threads}
            if task.dtype == "bfloat16":
                values["dot"] = space.knob("dot").values[0]
            if "prefetch" in space.names:
                values["prefetch"] = 1024
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        c = config.as_dict()
        chunks = math.ceil(d["N"] / c["rows"])
        passes_over_w = math.ceil(d["M"] / c["mtile"])
        klen = c["kblock"] or d["K"]
        elem = float(ITEMSIZE[task.dtype])
        w_elem = float(ITEMSIZE[self.weight_dtype(task)])
        moved = w_elem * d["N"] * d["K"] * passes_over_w + elem * d["M"] * d["N"]
        return {
            "threads": c["threads"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": c["mtile"] * c["rows"] * c["unroll"],
            "loads_per_fma": (c["mtile"] + c["rows"]) / (c["mtile"] * c["rows"]),
            "parallel_chunks": chunks,
            "chunks_per_thread": chunks / c["threads"],
            "tile_bytes_l1": (elem * c["mtile"] + w_elem * c["rows"]) * c["vec"] * c["unroll"],
            "tile_bytes_l2": (elem * c["mtile"] + w_elem * c["rows"]) * klen,
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "k_tail_fraction": (d["K"] % (c["vec"] * c["unroll"])) / d["K"],
            "n_tail_fraction": (d["N"] % c["rows"]) / d["N"],
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return _render(task, config.as_dict(), target)


def _render(task: Task, c: dict, target: Target) -> KernelSource:
    d = task.dims
    M, N, K = d["M"], d["N"], d["K"]
    rows, mtile, lanes, unroll = c["rows"], c["mtile"], c["vec"], c["unroll"]
    kblock = c["kblock"] or K
    bf16 = task.dtype == "bfloat16"
    w_dtype = GemvOp().weight_dtype(task)  # 16-bit words when bfloat16 (the task's or weight-only) or float16
    dot = "bf16" if bf16 and c["dot"] == "bf16" else "fma"
    x_el = cg.I16 if bf16 else cg.F32
    w_el = cg.F32 if w_dtype == "float32" else cg.I16
    ahead = c.get("prefetch", 0) // ITEMSIZE[w_dtype]  # in W elements
    width = 2 * lanes if dot == "bf16" else lanes  # elements per vector step
    module = cg.new_module("gemv")
    body, kb = cg.chunk_body(module, "gemv_chunk", n_pointers=3, n_scalars=0)
    X, W, Y, chunk_begin, chunk_end, _thread = body.args
    b = kb.b

    def tile(m0, n0, nrows: int, mt: int, k0, klen: int, first: bool) -> None:
        """Y[m0:m0+mt, n0:n0+nrows] (+)= X[m0:+mt, k0:+klen] @ W[n0:+nrows, k0:+klen]^T."""
        acc = [[[kb.zeros(lanes) for _ in range(unroll)] for _ in range(nrows)] for _ in range(mt)]
        slots = [[[kb.local(cg.vec(lanes)) for _ in range(unroll)] for _ in range(nrows)] for _ in range(mt)]
        for m in range(mt):
            for r in range(nrows):
                for u in range(unroll):
                    b.store(acc[m][r][u], slots[m][r][u])
        x_rows = [b.mul(b.add(m0, cg.i64(m)), cg.i64(K)) for m in range(mt)]
        w_rows = [b.mul(b.add(n0, cg.i64(r)), cg.i64(K)) for r in range(nrows)]

        def load(base, at, count, el, dtype):
            v = kb.masked_load_vec(base, at, width, count, el) if count is not None else kb.load_vec(base, at, width, el)
            return kb.words_to_f32(v, dtype) if el == cg.I16 and dot == "fma" else v

        def step(k, u: int, count=None) -> None:
            xs = [load(X, b.add(b.add(x_rows[m], k0), k), count, x_el, task.dtype) for m in range(mt)]
            for r in range(nrows):
                at = b.add(b.add(w_rows[r], k0), k)
                if ahead and count is None and u == 0:  # once per unrolled step: about once a cache line
                    kb.prefetch(W, b.add(at, cg.i64(ahead)), w_el)
                w = load(W, at, count, w_el, w_dtype)
                for m in range(mt):
                    slot = slots[m][r][u]
                    acc = b.load(slot)
                    b.store(kb.dot_bf16(acc, xs[m], w) if dot == "bf16" else kb.fma(xs[m], w, acc), slot)

        span = width * unroll
        main = klen - klen % span
        if main:
            with kb.loop(0, main, span, name="k") as k:
                for u in range(unroll):
                    step(b.add(k, cg.i64(u * width)), u)
        k = main
        u = 0
        while klen - k >= width:
            step(cg.i64(k), u % unroll)
            k += width
            u += 1
        if klen - k:
            step(cg.i64(k), u % unroll, count=cg.i64(klen - k))
        for m in range(mt):
            for r in range(nrows):
                total = b.load(slots[m][r][0])
                for u in range(1, unroll):
                    total = kb.fadd(total, b.load(slots[m][r][u]))
                s = kb.reduce_add(total)
                at = b.add(b.mul(b.add(m0, cg.i64(m)), cg.i64(N)), b.add(n0, cg.i64(r)))
                if bf16:  # K is one block: the sum is final
                    kb.store(kb.f32_to_bf16(s), Y, at, cg.I16)
                    continue
                if not first:
                    s = kb.fadd(kb.load(Y, at), s)
                kb.store(s, Y, at)

    emit_gemv_plan(kb, tile, chunk_begin, chunk_end, M=M, N=N, rows=rows, mtile=mtile, K=K, kblock=kblock,
                   panel_rows=PANEL_ROWS)
    kb.ret()

    chunks = math.ceil(N / rows)
    cg.parallel_entry(module, "gemv", body, n_pointers=3, n_scalars=0, threads=c["threads"], n_chunks=chunks)
    return KernelSource("llvm", str(module), "gemv", GemvOp().signature(task), (("threads", c["threads"]),))
