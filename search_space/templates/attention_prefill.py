"""``attention_prefill`` on the CPU: flash-style grouped-query attention over a prompt.

Schedule. A tile is ``bq`` query tokens x ``hs`` of the query heads that share one KV
head: R = hs * bq query rows that all read the same K/V rows, so every loaded K/V tile
serves all of them (grouped-query reuse). The tile's queries are packed transposed,
Qt[D][R] (pre-scaled by the softmax scale when ``scale_at = q``), and the keys are walked
in blocks of ``bk``:

- scores, transposed: St[key][row] = K[key,:] . Qt[:,row], an outer-product micro-kernel
  that broadcasts K elements and runs along vectors of query rows (``mr`` keys x ``nr``
  row vectors of accumulators). K needs no packing, and the softmax statistics of a query
  row become lanes of vectors: the block max and sum are vertical max/add over key rows.
- online softmax: per query row a running max m and sum l; a block raises m to m', the
  accumulator is rescaled by exp(m - m') and the block's scores become exp(s - m').
- P.V: O[row,:] = O[row,:] * rescale + sum_k P[k,row] V[k,:], the same outer-product
  micro-kernel over ``mr`` rows x ``nr`` vectors of D, the rescale fused into the
  accumulator load.

So the T x T score matrix never exists; per thread there is one Qt, one St block, one
O accumulator (R x D) and the row statistics, all in a workspace. Causal attention walks
only key blocks that start at or before the tile's last query token; blocks entirely at or
below the tile's first token need no mask, and only the blocks across the diagonal are
masked (scores of future keys become -inf before the exp).

A sliding ``window`` narrows the causal mask from below: a tile walks keys from the window
start of its first token (max(0, t0 - window + 1)); the blocks before the window start of its
last token are masked on both edges (a row may see no key of such a block: its exponentials
are taken against a running max of 0 rather than -inf, so they are 0, never NaN), the rest as
without a window.

A ``softcap`` caps each block's scaled scores in place (softcap * tanh(s / softcap)) before
its softmax; the scale is then applied to the packed queries (``scale_at = q``).

Any shape works: partial query tiles clamp the rows they read and write only valid rows,
partial key blocks clamp the key rows of the last micro tile and use only valid scores, a
D that is not a multiple of the vector width is read with masked loads. With T dynamic the
kernel reads T from its int64 argument and nothing depends on a compiled-in T. Parallel
chunks are (batch, KV head, head subgroup, query tile) units; ``order = zigzag`` visits the
query tiles of a head as first, last, second, second to last..., so that contiguous ranges
of chunks carry equal causal work.
"""
from __future__ import annotations

import math
from itertools import product

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.attention import AttentionPrefillOp, _scale
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource, Template, register_template
from .gemv import vector_registers
from .threads import default_thread_counts, threads_knob

MAX_ROWS = 256  # query rows per tile: bounds the per-thread workspace


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _divisors(n: int) -> tuple[int, ...]:
    return tuple(v for v in range(1, n + 1) if n % v == 0)


def _fitting(values: tuple[int, ...], limit: int) -> tuple[int, ...]:
    """The values below ``limit`` and the smallest one at or above it: larger ones act alike."""
    below = tuple(v for v in values if v < limit)
    above = [v for v in values if v >= limit]
    return below + ((above[0],) if above else ())


def vector_tiles(n: int, lanes: int, width: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Cut a row of ``n`` values into tiles of ``width`` vectors: (number of full tiles of
    whole vectors, the edge tiles as (first vector, vectors, valid lanes of the last))."""
    whole, tail = divmod(n, lanes)
    full = whole // width
    first = full * width
    rest = [lanes] * (whole - first) + ([tail] if tail else [])
    edges = []
    for i in range(0, len(rest), width):
        part = rest[i:i + width]
        edges.append((first + i, len(part), part[-1]))
    return full, edges


def space_basics(task: Task, target: Target) -> tuple[dict[str, int], int, int, int]:
    """What the spaces of both CPU attention templates start from: the dims, the float32
    lanes and vector registers of the target, and G, the query heads per KV head."""
    d = task.dims
    return d, target.vector_lanes_f32, vector_registers(target), d["H"] // d["HKV"]


class _Layout:
    """Sizes derived from a task and a config: tile rows, padding, workspace offsets (floats)."""

    def __init__(self, d: dict, c: dict):
        self.G = d["H"] // d["HKV"]
        self.hs, self.bq, self.bk, self.lanes = c["hs"], c["bq"], c["bk"], c["vec"]
        self.R = self.hs * self.bq
        self.Rp = _round_up(self.R, self.lanes)
        self.Dp = _round_up(d["D"], self.lanes)
        self.nsub = self.G // self.hs
        key_rows = _round_up(self.bk, c["mr"])
        self.qt = 0
        self.st = self.qt + d["D"] * self.Rp
        self.oacc = self.st + key_rows * self.Rp
        self.m = self.oacc + self.R * self.Dp + c["mr"] * self.Dp
        self.l = self.m + self.Rp
        self.alpha = self.l + self.Rp
        self.per_thread = _round_up(self.alpha + self.Rp, 16)  # 64-byte aligned slices

    def chunks(self, d: dict, t: int) -> int:
        return d["B"] * d["HKV"] * self.nsub * math.ceil(t / self.bq)


@register_template
class AttentionPrefillCpu(AttentionPrefillOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d, lanes, regs, G = space_basics(task, target)
        causal = bool(self.attrs(task)["causal"])
        knobs = [
            Knob("bq", _fitting((4, 8, 16, 32, 64, 128), d["T"])),
            Knob("hs", _divisors(G)),
            Knob("bk", _fitting((16, 32, 64, 128, 256), d["T"])),
            Knob("vec", tuple(v for v in (8, 16) if v <= lanes) or (lanes,)),
            Knob("mr", (1, 2, 3, 4, 6, 8)),
            Knob("nr", (1, 2, 3, 4)),
            Knob("unroll", (1, 2, 4)),
            # scale the packed queries once, or fold the scale into each exp's argument
            Knob("scale_at", ("q", "exp") if _scale(self, task) > 0 and not self.attrs(task)["softcap"] else ("q",)),
            Knob("order", ("zigzag", "linear") if causal else ("linear",)),
            threads_knob(target),
        ]

        def vectors(c) -> int:
            lay = _Layout(d, c)
            return max(lay.Rp, lay.Dp) // c["vec"]

        constraints = [
            ("micro tile fits in registers", lambda c: c["mr"] * c["nr"] + c["nr"] + 1 <= regs),
            ("rows per tile bounded", lambda c: c["hs"] * c["bq"] <= MAX_ROWS),
            ("micro tile no wider than the tile", lambda c: c["nr"] <= vectors(c)),
            ("micro tile no taller than the tile", lambda c: c["mr"] <= max(c["hs"] * c["bq"], 1)),
            ("a thread gets a chunk", lambda c: c["threads"] == 1 or _Layout(d, c).chunks(d, d["T"]) >= c["threads"]),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        d = task.dims
        G = d["H"] // d["HKV"]
        lanes = min(16, target.vector_lanes_f32)
        hs = max(v for v in _divisors(G) if v <= 8)
        bq = min(space.knob("bq").values, key=lambda v: abs(v * hs - 64))
        bk = min(space.knob("bk").values, key=lambda v: abs(v - 64))
        for threads, (mr, nr) in product(default_thread_counts(task, target), ((6, 4), (4, 4), (4, 2), (2, 2), (1, 1))):
            values = {"bq": bq, "hs": hs, "bk": bk, "vec": lanes, "mr": mr, "nr": nr, "unroll": 1,
                      "scale_at": "q", "order": space.knob("order").values[0], "threads": threads}
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        c = config.as_dict()
        lay = _Layout(d, c)
        chunks = lay.chunks(d, d["T"])
        n_q = math.ceil(d["T"] / c["bq"])
        # K/V rows each query tile reads: all keys, or those up to its last token when causal
        # (from its first token's window start under a window)
        window = self.attrs(task)["window"]
        if self.attrs(task)["causal"]:
            keys = sum(min((i + 1) * c["bq"], d["T"]) - (max(0, i * c["bq"] - window + 1) if window else 0)
                       for i in range(n_q))
        else:
            keys = n_q * d["T"]
        tiles = d["B"] * d["HKV"] * lay.nsub
        moved = 4.0 * (tiles * keys * 2 * d["D"] + 2 * d["B"] * d["T"] * d["H"] * d["D"])
        return {
            "threads": c["threads"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": c["mr"] * c["nr"],
            "loads_per_fma": (c["mr"] + c["nr"]) / (c["mr"] * c["nr"]),
            "parallel_chunks": chunks,
            "chunks_per_thread": chunks / c["threads"],
            "tile_bytes_l1": 4.0 * (c["mr"] * d["D"] + d["D"] * c["nr"] * c["vec"]),
            "tile_bytes_l2": 4.0 * lay.per_thread + 8.0 * c["bk"] * d["D"],
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": 1.0 / c["bk"],
            "k_tail_fraction": (d["T"] % c["bk"]) / d["T"],
            "m_tail_fraction": (lay.Rp - lay.R) / lay.Rp + (d["T"] % c["bq"]) / d["T"],
            "n_tail_fraction": (lay.Dp - d["D"]) / lay.Dp,
            "packed": 1.0,
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return _render(task, config.as_dict(), _scale(self, task), bool(self.attrs(task)["causal"]),
                       self.attrs(task)["window"], float(self.attrs(task)["softcap"]))


def outer_micro_kernel(module: ir.Module, name: str, mt: int, nt: int, lanes: int, last: int,
                       a_kstride: int, ldb: int, ldc: int, rescale: bool, unroll: int) -> ir.Function:
    """C[mt, nt vectors] (=|*alpha+=) sum_k A[i,k] * B[k, :]: broadcast A, vectors of B.

    Arguments: ``mt`` row pointers of A (element k of row i at a_i[k * a_kstride]), B (row
    k at b[k * ldb]), C (row i at c[i * ldc]), alpha (rescale factor of row i at alpha[i])
    and the runtime length ``klen``. ``last`` lanes of the last B vector are valid (masked
    loads where it is less than a vector); C is padded scratch, stored whole.
    """
    types = [cg.PTR] * (mt + 3) + [cg.I64]
    fn = ir.Function(module, ir.FunctionType(cg.VOID, types), name=name)
    fn.linkage = "internal"
    for arg in fn.args[:-1]:
        arg.add_attribute("noalias")
    kb = cg.KernelBuilder(fn)
    b = kb.b
    a_rows, bp, cp, alpha, klen = fn.args[:mt], fn.args[mt], fn.args[mt + 1], fn.args[mt + 2], fn.args[mt + 3]
    slots = [[kb.local(cg.vec(lanes)) for _ in range(nt)] for _ in range(mt)]
    for i in range(mt):
        factor = kb.splat(kb.load(alpha, i), lanes) if rescale else None
        for j in range(nt):
            init = kb.fmul(kb.load_vec(cp, i * ldc + j * lanes, lanes), factor) if rescale else kb.zeros(lanes)
            b.store(init, slots[i][j])

    def step(k) -> None:
        row = b.mul(k, cg.i64(ldb))
        bv = []
        for j in range(nt):
            at = b.add(row, cg.i64(j * lanes))
            bv.append(kb.masked_load_vec(bp, at, lanes, cg.i64(last)) if j == nt - 1 and last < lanes
                      else kb.load_vec(bp, at, lanes))
        a_at = b.mul(k, cg.i64(a_kstride)) if a_kstride != 1 else k
        for i in range(mt):
            a = kb.splat(kb.load(a_rows[i], a_at), lanes)
            for j in range(nt):
                b.store(kb.fma(a, bv[j], b.load(slots[i][j])), slots[i][j])

    if unroll > 1:
        main = b.mul(b.sdiv(klen, cg.i64(unroll)), cg.i64(unroll))
        with kb.loop(0, main, unroll, name="ku") as k:
            for u in range(unroll):
                step(b.add(k, cg.i64(u)))
        start = main
    else:
        start = cg.i64(0)
    with kb.loop(start, klen, 1, name="k") as k:
        step(k)
    for i in range(mt):
        for j in range(nt):
            kb.store_vec(b.load(slots[i][j]), cp, i * ldc + j * lanes)
    kb.ret()
    return fn


def transpose(kb: cg.KernelBuilder, rows: list) -> list:
    """Transpose a square block held as ``n`` vectors of ``n`` lanes (n a power of two).

    Stage h swaps, in every pair of rows (i, i + h), the lanes with bit h set in row i
    with the lanes with bit h clear in row i + h; after the stages h = n/2, ..., 1 the
    block is transposed: log2(n) stages of n two-source shuffles.
    """
    n = len(rows)
    m = list(rows)
    lo = None
    h = n // 2
    while h >= 1:
        lo = ir.Constant(cg.vec(n, cg.I32), [x if not x & h else n + x - h for x in range(n)])
        hi = ir.Constant(cg.vec(n, cg.I32), [x + h if not x & h else n + x for x in range(n)])
        for i in range(n):
            if not i & h:
                a, c = m[i], m[i + h]
                m[i], m[i + h] = kb.b.shuffle_vector(a, c, lo), kb.b.shuffle_vector(a, c, hi)
        h //= 2
    return m


def _render(task: Task, c: dict, scale: float, causal: bool, window: int = 0, softcap: float = 0.0) -> KernelSource:
    d = task.dims
    B, H, HKV, D = d["B"], d["H"], d["HKV"], d["D"]
    lay = _Layout(d, c)
    G, hs, bq, bk, lanes, R, Rp, Dp = lay.G, lay.hs, lay.bq, lay.bk, lay.lanes, lay.R, lay.Rp, lay.Dp
    mr, nr, unroll, threads = c["mr"], c["nr"], c["unroll"], c["threads"]
    dynamic = "T" in task.dynamic
    fold = c["scale_at"] == "exp"
    row_vectors = Rp // lanes
    d_vectors = Dp // lanes
    d_last = D - (d_vectors - 1) * lanes  # valid lanes of the last D vector

    module = cg.new_module("attention_prefill")
    n_scalars = 1 if dynamic else 0
    body, kb = cg.chunk_body(module, "attention_prefill_chunk", n_pointers=5, n_scalars=n_scalars)
    Q, K, V, O, WS = body.args[:5]
    T = body.args[5] if dynamic else cg.i64(d["T"])
    chunk_begin, chunk_end, thread = body.args[-3:]
    b = kb.b
    one = cg.i64(1)

    micro: dict[tuple, ir.Function] = {}

    def kernel(kind: str, mt: int, nt: int, last: int) -> ir.Function:
        key = (kind, mt, nt, last)
        if key not in micro:
            if kind == "score":   # St[key, rows] = K[key, :] . Qt[:, rows]
                micro[key] = outer_micro_kernel(module, f"score_{mt}x{nt}", mt, nt, lanes, last,
                                                a_kstride=1, ldb=Rp, ldc=Rp, rescale=False, unroll=unroll)
            else:                 # Oacc[rows, :] = Oacc * alpha + P^T[:, rows]^T . V[keys, :]
                micro[key] = outer_micro_kernel(module, f"pv_{mt}x{nt}_{last}", mt, nt, lanes, last,
                                                a_kstride=Rp, ldb=HKV * D, ldc=Dp, rescale=True, unroll=unroll)
        return micro[key]

    ws = kb.gep(WS, b.mul(thread, cg.i64(lay.per_thread)))
    qt, st, oacc = kb.gep(ws, lay.qt), kb.gep(ws, lay.st), kb.gep(ws, lay.oacc)
    m_buf, l_buf, alpha_buf = kb.gep(ws, lay.m), kb.gep(ws, lay.l), kb.gep(ws, lay.alpha)
    neg_inf = cg.f32(float("-inf"))
    # token offset (within the tile) of each query row, as lanes of the row vectors; padding
    # rows take offset 0 so that they always see key 0 and their statistics stay finite
    token_type = ir.ArrayType(cg.I32, Rp)
    row_token = ir.GlobalVariable(module, token_type, name="row_token")
    row_token.global_constant = True
    row_token.linkage = "internal"
    row_token.initializer = ir.Constant(token_type, [r // hs if r < R else 0 for r in range(Rp)])

    n_q = b.sdiv(b.add(T, cg.i64(bq - 1)), cg.i64(bq))
    with kb.loop(chunk_begin, chunk_end, 1, name="chunk") as chunk:
        unit = b.sdiv(chunk, n_q)
        qi = b.srem(chunk, n_q)
        if c["order"] == "zigzag":  # first, last, second, second to last, ...
            half = b.sdiv(qi, cg.i64(2))
            odd = b.icmp_signed("!=", b.srem(qi, cg.i64(2)), cg.i64(0))
            qb = b.select(odd, b.sub(b.sub(n_q, one), half), half)
        else:
            qb = qi
        bi = b.sdiv(unit, cg.i64(HKV * lay.nsub))
        rest = b.srem(unit, cg.i64(HKV * lay.nsub))
        g = b.sdiv(rest, cg.i64(lay.nsub))
        h0 = b.add(b.mul(g, cg.i64(G)), b.mul(b.srem(rest, cg.i64(lay.nsub)), cg.i64(hs)))
        t0 = b.mul(qb, cg.i64(bq))
        n_valid = kb.min(bq, b.sub(T, t0))
        bt = b.mul(bi, T)

        # -- pack Qt[d][row] (scaled): blocks of `lanes` rows x `lanes` of D, transposed in
        # registers; rows of missing tokens and padding rows are zeros
        q_factor = kb.splat(cg.f32(scale), lanes) if not fold else None
        d_whole, d_tail = divmod(D, lanes)
        for v in range(row_vectors):
            sources = []
            for r in range(v * lanes, (v + 1) * lanes):
                if r >= R:
                    sources.append(None)
                    continue
                tq, hh = divmod(r, hs)
                valid = b.icmp_signed("<", cg.i64(tq), n_valid)
                t = b.add(t0, kb.min(tq, b.sub(n_valid, one)))
                offset = b.mul(b.add(b.mul(b.add(bt, t), cg.i64(H)), b.add(h0, cg.i64(hh))), cg.i64(D))
                sources.append((valid, offset))

            def pack(d0, count: int) -> None:
                rows = []
                for source in sources:
                    if source is None:
                        rows.append(kb.zeros(lanes))
                        continue
                    valid, offset = source
                    at = b.add(offset, d0)
                    x = kb.load_vec(Q, at, lanes) if count == lanes else kb.masked_load_vec(Q, at, lanes, cg.i64(count))
                    if q_factor is not None:
                        x = kb.fmul(x, q_factor)
                    rows.append(b.select(valid, x, kb.zeros(lanes)))
                for i, column in enumerate(transpose(kb, rows)[:count]):
                    kb.store_vec(column, qt, b.add(b.mul(b.add(d0, cg.i64(i)), cg.i64(Rp)), cg.i64(v * lanes)))

            if d_whole:
                with kb.loop(0, d_whole * lanes, lanes, name="qd") as d0:
                    pack(d0, lanes)
            if d_tail:
                pack(cg.i64(d_whole * lanes), d_tail)
        for v in range(row_vectors):
            kb.store_vec(kb.splat(neg_inf, lanes), m_buf, v * lanes)
            kb.store_vec(kb.zeros(lanes), l_buf, v * lanes)
        with kb.loop(0, R * Dp // lanes, 1, name="oz") as i:
            kb.store_vec(kb.zeros(lanes), oacc, b.mul(i, cg.i64(lanes)))

        kv_base = b.mul(b.add(b.mul(bt, cg.i64(HKV)), g), cg.i64(D))  # K[b, 0, g, 0]

        def key_block(k0, nk, masked: bool) -> None:
            """One block of nk (>= 1) keys starting at k0: scores, online softmax, P.V."""
            # scores St[0:nk][0:Rp]; the last micro tile repeats the last key for missing rows
            n_tiles = b.sdiv(b.add(nk, cg.i64(mr - 1)), cg.i64(mr))

            def score_panel(c0, nt: int) -> None:
                fn = kernel("score", mr, nt, lanes)
                with kb.loop(0, n_tiles, 1, name="kt") as kt:
                    first = b.mul(kt, cg.i64(mr))
                    rows = []
                    for i in range(mr):
                        key = b.add(k0, kb.min(b.add(first, cg.i64(i)), b.sub(nk, one)))
                        rows.append(kb.ptr(kb.gep(K, b.add(kv_base, b.mul(key, cg.i64(HKV * D))))))
                    b.call(fn, rows + [kb.ptr(kb.gep(qt, c0)),
                                       kb.ptr(kb.gep(st, b.add(b.mul(first, cg.i64(Rp)), c0))),
                                       kb.ptr(alpha_buf), cg.i64(D)])

            full, edges = vector_tiles(Rp, lanes, nr)
            if full:
                with kb.loop(0, full, 1, name="sp") as sp:
                    score_panel(b.mul(sp, cg.i64(nr * lanes)), nr)
            for first_vector, nt, _ in edges:
                score_panel(cg.i64(first_vector * lanes), nt)

            if softcap:  # the scaled scores (scale_at = q) capped in place: softcap * tanh(s / softcap)
                inverse, cap = kb.splat(cg.f32(1.0 / softcap), lanes), kb.splat(cg.f32(softcap), lanes)
                with kb.loop(0, nk, 1, name="cap") as k:
                    for v in range(row_vectors):
                        at = b.add(b.mul(k, cg.i64(Rp)), cg.i64(v * lanes))
                        kb.store_vec(kb.fmul(kb.tanh(kb.fmul(kb.load_vec(st, at, lanes), inverse)), cap), st, at)

            # online softmax over the block, one vector of query rows at a time
            rel = b.sub(k0, t0)  # key index relative to the tile's first token
            vscale = kb.splat(cg.f32(scale), lanes)
            with kb.loop(0, row_vectors, 1, name="sv") as v:
                col = b.mul(v, cg.i64(lanes))
                tq_lanes = kb.load_vec(row_token, col, lanes, cg.I32) if masked else None

                def score(k):
                    s = kb.load_vec(st, b.add(b.mul(k, cg.i64(Rp)), col), lanes)
                    if masked:  # future keys of each row's token score -inf, and under a window past ones
                        key = kb.splat(b.trunc(b.add(rel, k), cg.I32), lanes)
                        seen = b.icmp_signed("<=", key, tq_lanes)
                        if window:
                            lower = kb.splat(b.trunc(b.add(rel, b.add(k, cg.i64(window))), cg.I32), lanes)
                            seen = b.and_(seen, b.icmp_signed(">", lower, tq_lanes))
                        s = b.select(seen, s, kb.splat(neg_inf, lanes))
                    return s

                mx = kb.local(cg.vec(lanes), name="mx")
                b.store(kb.splat(neg_inf, lanes), mx)
                with kb.loop(0, nk, 1, name="sm") as k:
                    old, s = b.load(mx), score(k)
                    b.store(b.select(b.fcmp_ordered(">", old, s), old, s), mx)
                m_old = kb.load_vec(m_buf, col, lanes)
                block_max = kb.fmul(b.load(mx), vscale) if fold else b.load(mx)
                m_new = kb.fmax(m_old, block_max)
                kb.store_vec(m_new, m_buf, col)
                if masked and window:  # a row that has seen no key yet: exponentials against 0, not -inf
                    m_new = b.select(b.fcmp_ordered("==", m_new, kb.splat(neg_inf, lanes)), kb.zeros(lanes), m_new)
                alpha = kb.exp(kb.fsub(m_old, m_new))
                kb.store_vec(alpha, alpha_buf, col)
                neg = b.fneg(m_new)
                total = kb.local(cg.vec(lanes), name="sum")
                b.store(kb.zeros(lanes), total)
                with kb.loop(0, nk, 1, name="se") as k:
                    s = score(k)
                    p = kb.exp(kb.fma(s, vscale, neg) if fold else kb.fadd(s, neg))
                    kb.store_vec(p, st, b.add(b.mul(k, cg.i64(Rp)), col))
                    b.store(kb.fadd(b.load(total), p), total)
                kb.store_vec(kb.fma(kb.load_vec(l_buf, col, lanes), alpha, b.load(total)), l_buf, col)

            # Oacc[0:R] = Oacc * alpha + P^T . V[k0:k0+nk]
            v_base = b.add(kv_base, b.mul(k0, cg.i64(HKV * D)))

            def pv_panel(c0, nt: int, last: int) -> None:
                bp = kb.ptr(kb.gep(V, b.add(v_base, c0)))

                def pv_tile(r0, mt: int) -> None:
                    rows = [kb.ptr(kb.gep(st, b.add(r0, cg.i64(i)))) for i in range(mt)]
                    c_at = b.add(b.mul(r0, cg.i64(Dp)), c0)
                    b.call(kernel("pv", mt, nt, last), rows + [bp, kb.ptr(kb.gep(oacc, c_at)),
                                                               kb.ptr(kb.gep(alpha_buf, r0)), nk])

                if R // mr:
                    with kb.loop(0, R // mr, 1, name="rt") as rt:
                        pv_tile(b.mul(rt, cg.i64(mr)), mr)
                if R % mr:
                    pv_tile(cg.i64(R - R % mr), R % mr)

            full, edges = vector_tiles(D, lanes, nr)
            if full:
                with kb.loop(0, full, 1, name="dp") as dp:
                    pv_panel(b.mul(dp, cg.i64(nr * lanes)), nr, lanes)
            for first_vector, nt, last in edges:
                pv_panel(cg.i64(first_vector * lanes), nt, last)

        # keys visible to the tile: [kstart, kend); blocks wholly at or below its first token
        # (or, without causality, every full block) need no mask. Under a window the keys
        # before kmid (the window start of its last token) are masked on both edges first.
        t1 = b.add(t0, n_valid)
        kstart = cg.i64(0)
        if window:
            kstart = kb.max(b.sub(t0, cg.i64(window - 1)), cg.i64(0))
            kmid = kb.min(kb.max(b.sub(t1, cg.i64(window)), kstart), t1)
            n_low = b.sdiv(b.add(b.sub(kmid, kstart), cg.i64(bk - 1)), cg.i64(bk))
            with kb.loop(0, n_low, 1, name="kw") as kwi:
                k0 = b.add(kstart, b.mul(kwi, cg.i64(bk)))
                key_block(k0, kb.min(bk, b.sub(kmid, k0)), True)
            kstart = kmid
        if causal:
            kend = t1
            unmasked = b.sdiv(kb.max(b.sub(b.add(t0, one), kstart), cg.i64(0)), cg.i64(bk))
        else:
            kend = T
            unmasked = b.sdiv(T, cg.i64(bk))
        with kb.loop(0, unmasked, 1, name="kb") as kbi:
            key_block(b.add(kstart, b.mul(kbi, cg.i64(bk))), cg.i64(bk), False)
        first_rest = b.add(kstart, b.mul(unmasked, cg.i64(bk)))
        n_rest = b.sdiv(b.add(b.sub(kend, first_rest), cg.i64(bk - 1)), cg.i64(bk))
        with kb.loop(0, n_rest, 1, name="kr") as kri:
            k0 = b.add(first_rest, b.mul(kri, cg.i64(bk)))
            key_block(k0, kb.min(bk, b.sub(kend, k0)), causal)

        # O rows of valid tokens = Oacc / l
        with kb.loop(0, n_valid, 1, name="ot") as tq:
            for hh in range(hs):
                r = b.add(b.mul(tq, cg.i64(hs)), cg.i64(hh))
                inv = kb.splat(kb.fdiv(cg.f32(1.0), kb.load(l_buf, r)), lanes)
                dst = b.mul(b.add(b.mul(b.add(bt, b.add(t0, tq)), cg.i64(H)), b.add(h0, cg.i64(hh))), cg.i64(D))
                for j in range(d_vectors):
                    value = kb.fmul(kb.load_vec(oacc, b.add(b.mul(r, cg.i64(Dp)), cg.i64(j * lanes)), lanes), inv)
                    at = b.add(dst, cg.i64(j * lanes))
                    if j == d_vectors - 1 and d_last < lanes:
                        kb.masked_store_vec(value, O, at, cg.i64(d_last))
                    else:
                        kb.store_vec(value, O, at)
    kb.ret()

    def n_chunks(ekb: cg.KernelBuilder, args: list):
        eb = ekb.b
        t = args[5] if dynamic else cg.i64(d["T"])
        tiles = eb.sdiv(eb.add(t, cg.i64(bq - 1)), cg.i64(bq))
        return eb.mul(tiles, cg.i64(B * HKV * lay.nsub))

    cg.parallel_entry(module, "attention_prefill", body, n_pointers=5, n_scalars=n_scalars,
                      threads=threads, n_chunks=n_chunks)
    args = AttentionPrefillOp().signature(task) + (
        ArgSpec("workspace", "workspace", "uint8", (), nbytes=4 * lay.per_thread * threads),)
    if dynamic:
        args += (ArgSpec("T", "scalar", "int64"),)
    return KernelSource("llvm", str(module), "attention_prefill", args, (("threads", threads),))
