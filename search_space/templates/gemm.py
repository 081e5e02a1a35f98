"""``gemm`` on the CPU: Y[M,N] = X[M,K] @ W[N,K]^T for any M, N, K.

Schedule: both operands are contiguous along K, so the micro-kernel is a register block
of ``mr x nr`` dot products, each a vector accumulator of ``vec`` lanes running along K:
per K step it loads ``mr`` X vectors and ``nr`` W vectors and issues ``mr * nr`` fmas. At
the end of a K block the ``nr`` accumulators of each X row are folded into one vector of
sums with shuffles and added into Y. Around it, cache blocks of ``mc`` X rows, ``nc`` W
rows and ``kc`` of K, in one of two orders (``nkm``: W block outermost, reused by every X
block; ``mnk``: X block outermost), and the tile loop inside a block walks W panels or X
panels first (``inner``). ``pack`` copies each W block into a contiguous per-thread buffer.
Threads split the outermost blocks.

Edges: blocks are whole multiples of the micro tile, so only the last M and N tiles can be
partial; they get their own micro-kernels with the exact sizes, and the K remainder of a
block is read with masked loads. Nothing reads or writes outside the arrays.
"""
from __future__ import annotations

import math

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource, Template, register_template
from .gemv import vector_registers
from ..ops.matmul import GemmOp


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def effective_blocks(d: dict, c: dict) -> tuple[int, int, int]:
    """(mc, nc, kc) as rendered: 0 means the whole dim; blocks are whole micro tiles."""
    mc = min(_round_up(c["mc"] or d["M"], c["mr"]), _round_up(d["M"], c["mr"]))
    nc = min(_round_up(c["nc"] or d["N"], c["nr"]), _round_up(d["N"], c["nr"]))
    kc = min(c["kc"] or d["K"], d["K"])
    return mc, nc, kc


@register_template
class GemmCpu(GemmOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d = task.dims
        lanes = target.vector_lanes_f32
        regs = vector_registers(target)
        cores = max(target.cores, 1)
        # values that cannot apply to this shape are left out, so the space stays dense
        knobs = [
            Knob("mr", tuple(v for v in (1, 2, 3, 4, 6, 8) if v <= d["M"])),
            Knob("nr", tuple(v for v in (1, 2, 3, 4, 6, 8) if v <= d["N"])),
            Knob("vec", tuple(v for v in (8, 16) if v <= lanes) or (lanes,)),
            Knob("unroll", (1, 2, 4)),
            Knob("kc", (0,) + tuple(v for v in (256, 512, 1024, 2048) if v < d["K"])),
            Knob("mc", (0,) + tuple(v for v in (32, 64, 128, 256) if v < d["M"])),
            Knob("nc", (0,) + tuple(v for v in (48, 192, 768) if v < d["N"])),
            Knob("order", ("nkm", "mnk")),
            Knob("inner", ("nm", "mn")),
            Knob("pack", (0, 1)),
            Knob("threads", tuple(sorted({1, cores}))),
        ]

        def outer_blocks(c) -> int:
            mc, nc, _ = effective_blocks(d, c)
            return math.ceil(d["N"] / nc) if c["order"] == "nkm" else math.ceil(d["M"] / mc)

        constraints = [
            ("micro tile fits in registers", lambda c: c["mr"] * c["nr"] + c["mr"] + 1 <= regs),
            ("a thread gets an outer block", lambda c: c["threads"] == 1 or outer_blocks(c) >= c["threads"]),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        d = task.dims
        lanes = target.vector_lanes_f32
        for mr, nr in ((4, 6), (4, 4), (2, 4), (2, 2), (1, 2), (1, 1)):
            values = {"mr": mr, "nr": nr, "vec": min(16, lanes), "unroll": 1,
                      "kc": 512 if d["K"] > 512 else 0, "mc": 128 if d["M"] > 128 else 0,
                      "nc": 192 if d["N"] > 192 else 0, "order": "nkm", "inner": "nm", "pack": 1,
                      "threads": 1}
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        c = config.as_dict()
        mc, nc, kc = effective_blocks(d, c)
        m_blocks, n_blocks = math.ceil(d["M"] / mc), math.ceil(d["N"] / nc)
        chunks = n_blocks if c["order"] == "nkm" else m_blocks
        # bytes that cross from memory/L3: W once per X block pass unless it stays cached
        w_passes = m_blocks if c["order"] == "mnk" else 1
        moved = 4.0 * (d["N"] * d["K"] * w_passes + d["M"] * d["K"] * n_blocks + d["M"] * d["N"] * math.ceil(d["K"] / kc))
        return {
            "threads": c["threads"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": c["mr"] * c["nr"],
            "loads_per_fma": (c["mr"] + c["nr"]) / (c["mr"] * c["nr"]),
            "parallel_chunks": chunks,
            "chunks_per_thread": chunks / c["threads"],
            "tile_bytes_l1": 4.0 * (c["nr"] if c["inner"] == "nm" else c["mr"]) * kc,
            "tile_bytes_l2": 4.0 * (mc if c["inner"] == "nm" else nc) * kc,
            "tile_bytes_l3": 4.0 * nc * kc,
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": 1.0 / max(kc / c["vec"], 1.0),
            "k_tail_fraction": (d["K"] % c["vec"]) / d["K"],
            "m_tail_fraction": (d["M"] % c["mr"]) / d["M"],
            "n_tail_fraction": (d["N"] % c["nr"]) / d["N"],
            "packed": c["pack"],
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return _render(task, config.as_dict())


def _micro_kernel(module: ir.Module, mt: int, nt: int, klen: int, lanes: int, unroll: int,
                  K: int, ldw: int, N: int) -> ir.Function:
    """Y[mt, nt] (+)= X[mt, klen] . W[nt, klen]: pointers at the tile corners, a first flag."""
    fn = ir.Function(module, ir.FunctionType(cg.VOID, [cg.PTR, cg.PTR, cg.PTR, cg.I1]),
                     name=f"micro_{mt}x{nt}_k{klen}")
    fn.linkage = "internal"
    for arg in fn.args[:3]:
        arg.add_attribute("noalias")
    kb = cg.KernelBuilder(fn)
    b = kb.b
    x, w, y, first = fn.args
    slots = [[kb.local(cg.vec(lanes)) for _ in range(nt)] for _ in range(mt)]
    for row in slots:
        for slot in row:
            b.store(kb.zeros(lanes), slot)

    def step(k, count=None) -> None:
        def load(base, row: int, stride: int):
            at = b.add(cg.i64(row * stride), k)
            return kb.load_vec(base, at, lanes) if count is None else kb.masked_load_vec(base, at, lanes, count)

        xs = [load(x, i, K) for i in range(mt)]
        for j in range(nt):
            wv = load(w, j, ldw)
            for i in range(mt):
                b.store(kb.fma(xs[i], wv, b.load(slots[i][j])), slots[i][j])

    span = lanes * unroll
    main = klen - klen % span
    if main:
        with kb.loop(0, main, span, name="k") as k:
            for u in range(unroll):
                step(b.add(k, cg.i64(u * lanes)))
    k = main
    while klen - k >= lanes:
        step(cg.i64(k))
        k += lanes
    if klen - k:
        step(cg.i64(k), count=cg.i64(klen - k))

    for i in range(mt):
        sums, width = kb.reduce_add_many([b.load(slots[i][j]) for j in range(nt)])
        at = cg.i64(i * N)
        with b.if_else(first) as (then, otherwise):
            with then:
                _store_row(kb, sums, width, nt, y, at)
            with otherwise:
                old = kb.load_vec(y, at, width) if nt == width else kb.masked_load_vec(y, at, width, cg.i64(nt))
                _store_row(kb, kb.fadd(old, sums), width, nt, y, at)
    kb.ret()
    return fn


def _store_row(kb: cg.KernelBuilder, value, width: int, nt: int, y, at) -> None:
    if width == 1:
        kb.store(kb.b.extract_element(value, ir.Constant(cg.I32, 0)) if isinstance(value.type, ir.VectorType)
                 else value, y, at)
    elif nt == width:
        kb.store_vec(value, y, at)
    else:
        kb.masked_store_vec(value, y, at, cg.i64(nt))


def _render(task: Task, c: dict) -> KernelSource:
    d = task.dims
    M, N, K = d["M"], d["N"], d["K"]
    mr, nr, lanes, unroll = c["mr"], c["nr"], c["vec"], c["unroll"]
    mc, nc, kc = effective_blocks(d, c)
    pack = bool(c["pack"])
    ldw = kc if pack else K
    module = cg.new_module("gemm")
    micro: dict[tuple[int, int, int], ir.Function] = {}

    def kernel_for(mt: int, nt: int, klen: int) -> ir.Function:
        key = (mt, nt, klen)
        if key not in micro:
            micro[key] = _micro_kernel(module, mt, nt, klen, lanes, unroll, K, ldw, N)
        return micro[key]

    body, kb = cg.chunk_body(module, "gemm_chunk", n_pointers=4, n_scalars=0)
    X, W, Y, WS, chunk_begin, chunk_end, thread = body.args
    b = kb.b
    ws = kb.gep(WS, b.mul(thread, cg.i64(nc * kc))) if pack else None

    def block(m0, mlen, n0, nlen, k0, klen: int, first) -> None:
        """All micro tiles of Y[m0:+mlen, n0:+nlen] for the K block [k0, k0+klen)."""
        if pack:
            with kb.loop(0, nlen, 1, name="pk") as r:
                src = kb.gep(W, b.add(b.mul(b.add(n0, r), cg.i64(K)), k0))
                kb.memcpy(kb.gep(ws, b.mul(r, cg.i64(kc))), src, 4 * klen)

        def w_ptr(jn):
            return kb.gep(ws, b.mul(jn, cg.i64(kc))) if pack else kb.gep(W, b.add(b.mul(b.add(n0, jn), cg.i64(K)), k0))

        def call(im, jn, mt: int, nt: int) -> None:
            xp = kb.gep(X, b.add(b.mul(b.add(m0, im), cg.i64(K)), k0))
            yp = kb.gep(Y, b.add(b.mul(b.add(m0, im), cg.i64(N)), b.add(n0, jn)))
            b.call(kernel_for(mt, nt, klen), [kb.ptr(xp), kb.ptr(w_ptr(jn)), kb.ptr(yp), first])

        m_full = b.sdiv(mlen, cg.i64(mr))
        n_full = b.sdiv(nlen, cg.i64(nr))
        m_edge, n_edge = M % mr, N % nr

        def m_tiles(jn, nt: int) -> None:
            with kb.loop(0, m_full, 1, name="it") as it:
                call(b.mul(it, cg.i64(mr)), jn, mr, nt)
            if m_edge:
                with b.if_then(b.icmp_signed("!=", b.srem(mlen, cg.i64(mr)), cg.i64(0))):
                    call(b.mul(m_full, cg.i64(mr)), jn, m_edge, nt)

        def n_tiles(im, mt: int) -> None:
            with kb.loop(0, n_full, 1, name="jt") as jt:
                call(im, b.mul(jt, cg.i64(nr)), mt, nr)
            if n_edge:
                with b.if_then(b.icmp_signed("!=", b.srem(nlen, cg.i64(nr)), cg.i64(0))):
                    call(im, b.mul(n_full, cg.i64(nr)), mt, n_edge)

        if c["inner"] == "nm":
            with kb.loop(0, n_full, 1, name="jt") as jt:
                m_tiles(b.mul(jt, cg.i64(nr)), nr)
            if n_edge:
                with b.if_then(b.icmp_signed("!=", b.srem(nlen, cg.i64(nr)), cg.i64(0))):
                    m_tiles(b.mul(n_full, cg.i64(nr)), n_edge)
        else:
            with kb.loop(0, m_full, 1, name="it") as it:
                n_tiles(b.mul(it, cg.i64(mr)), mr)
            if m_edge:
                with b.if_then(b.icmp_signed("!=", b.srem(mlen, cg.i64(mr)), cg.i64(0))):
                    n_tiles(b.mul(m_full, cg.i64(mr)), m_edge)

    def k_blocks(emit) -> None:
        """Call emit(k0, klen, first) over the K blocks: full ones in a loop, then the rest."""
        full = K // kc
        with kb.loop(0, full, 1, name="kb") as kbi:
            emit(b.mul(kbi, cg.i64(kc)), kc, b.icmp_signed("==", kbi, cg.i64(0)))
        if K % kc:
            emit(cg.i64(full * kc), K % kc, ir.Constant(cg.I1, 1 if full == 0 else 0))

    def extent(start, block: int, total: int):
        return kb.min(block, b.sub(cg.i64(total), start))

    if c["order"] == "nkm":
        with kb.loop(chunk_begin, chunk_end, 1, name="nb") as nb:
            n0 = b.mul(nb, cg.i64(nc))
            nlen = extent(n0, nc, N)

            def per_k(k0, klen, first):
                with kb.loop(0, math.ceil(M / mc), 1, name="mb") as mb:
                    m0 = b.mul(mb, cg.i64(mc))
                    block(m0, extent(m0, mc, M), n0, nlen, k0, klen, first)
            k_blocks(per_k)
        chunks = math.ceil(N / nc)
    else:
        with kb.loop(chunk_begin, chunk_end, 1, name="mb") as mb:
            m0 = b.mul(mb, cg.i64(mc))
            mlen = extent(m0, mc, M)
            with kb.loop(0, math.ceil(N / nc), 1, name="nb") as nb:
                n0 = b.mul(nb, cg.i64(nc))
                nlen = extent(n0, nc, N)
                k_blocks(lambda k0, klen, first: block(m0, mlen, n0, nlen, k0, klen, first))
        chunks = math.ceil(M / mc)
    kb.ret()

    cg.parallel_entry(module, "gemm", body, n_pointers=4, n_scalars=0, threads=c["threads"], n_chunks=chunks)
    workspace = 4 * nc * kc * c["threads"] if pack else 0
    args = GemmOp().signature(task) + (ArgSpec("workspace", "workspace", "uint8", (), nbytes=max(workspace, 64)),)
    return KernelSource("llvm", str(module), "gemm", args, (("threads", c["threads"]),))
