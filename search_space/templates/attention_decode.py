"""``attention_decode`` on the CPU: one query per (batch, head) against a KV cache, split-KV.

Schedule. The work unit is (batch, KV head, split): the ``split`` splits cut the valid
cache positions [0, L) into equal ranges, so that several threads can share one sequence.
A unit walks its range in blocks of ``bk`` cache rows and keeps, for each of the G query
heads that read this KV head, a running max, a running sum and an accumulator of D:

- scores: each cache row K[s, :] is loaded once for all G heads; a register tile of ``hr``
  heads x ``kr`` rows of dot products runs along D (``vec`` lanes, ``unroll`` steps) and
  is folded into one vector of hr x kr scores with shuffles (scaled, stored per head).
- online softmax per head over the block (vectors of scores, lanes past the range masked).
- P.V: accumulators of ``hr`` heads x ``nv`` vectors of D, each V row loaded once per
  tile and used by all hr heads; the rescale by exp(m - m') is fused into the load.

Prefetch: ``prefetch`` keys ahead, K rows in the score loop and V rows in the P.V loop.
``v_prefetch`` = ``with_k`` also asks for each V row while its K row is scored, a whole
block before P.V reads it; with ``in_pv`` the first V rows of every block are read cold,
each block's pipeline drains at the switch from K to V. With 8 query heads per KV head
(D = 64) the score loop is long enough to hide them: 16 -> 20 GB/s read cold on two cores.

With a sliding ``window`` the valid range is [max(0, L - window), L) (the query sits at position
L - 1); the splits cut that range, so the work and the knobs follow the window, not L.

A ``softcap`` caps each scaled score s as softcap * tanh(s / softcap) where it is stored.

With one split a unit normalises its accumulators into O. With more, each unit leaves
(max, sum, accumulator) in the workspace and a combine step merges the splits of every
(batch, head). S (the cache capacity, the row stride of K and V) and L (valid rows) are
always runtime arguments: one kernel serves every L <= S, and splits that are empty for a
short L leave a neutral partial (max -inf, sum 0) that the combine step weighs by zero.
"""
from __future__ import annotations

import math
from itertools import product

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.attention import AttentionDecodeOp, _scale
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource, Template, register_template
from .attention_prefill import _divisors, _fitting, _round_up, space_basics, vector_tiles
from .threads import default_thread_counts, threads_knob


class _Layout:
    """Workspace offsets in floats: per-unit partials, then per-thread score scratch."""

    def __init__(self, d: dict, c: dict):
        self.G = d["H"] // d["HKV"]
        self.lanes = c["vec"]
        self.Dp = _round_up(d["D"], self.lanes)
        self.units = d["B"] * d["HKV"] * c["split"]
        self.stats = _round_up(3 * self.G, 16)             # m[G], l[G], alpha[G]
        self.per_unit = _round_up(self.stats + self.G * self.Dp, 16)
        self.Sp = _round_up(_round_up(c["bk"], c["kr"]), self.lanes)  # scores row: bk keys + clamped tail
        self.scratch = self.units * self.per_unit
        self.per_thread = _round_up(self.G * self.Sp, 16)

    def floats(self, threads: int) -> int:
        return self.scratch + threads * self.per_thread


@register_template
class AttentionDecodeCpu(AttentionDecodeOp, Template):
    target_kind = "cpu"
    dtypes = ("float32",)

    def check(self, task: Task) -> None:
        super().check(task)
        if self.per_sequence(task):
            raise ValueError("attention_decode on the cpu takes the length as a scalar: lengths=per_sequence is "
                             "for CUDA graphs")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d, lanes, regs, G = space_basics(task, target)
        rows = self.read_rows(task)  # the cache rows a call reads: L, or the window's
        vecs = tuple(v for v in (4, 8, 16) if v <= lanes) or (lanes,)
        knobs = [
            Knob("split", tuple(v for v in (1, 2, 4, 8, 16, 32) if v == 1 or rows >= 16 * v)),
            Knob("bk", _fitting((16, 32, 64, 128, 256), rows)),
            Knob("kr", (1, 2, 4, 8)),
            Knob("hr", tuple(v for v in _divisors(G) if v <= 8)),
            Knob("vec", vecs),
            Knob("nv", tuple(v for v in (1, 2, 4, 8) if v == 1 or v * min(vecs) <= _round_up(d["D"], min(vecs)))),
            Knob("unroll", (1, 2, 4)),
            Knob("prefetch", (0, 2, 4, 8, 16)),
            Knob("v_prefetch", ("with_k", "in_pv"), legacy="in_pv"),  # logs from before: V in P.V only
            threads_knob(target),
        ]
        constraints = [
            ("score tile folds into one vector", lambda c: c["hr"] * c["kr"] <= c["vec"]),
            ("score tile fits in registers",
             lambda c: c["hr"] * c["kr"] * c["unroll"] + c["hr"] + c["kr"] <= regs),
            ("value tile fits in registers", lambda c: c["hr"] * (c["nv"] + 1) + c["nv"] + 1 <= regs),
            ("value tile no wider than D", lambda c: c["nv"] == 1 or (c["nv"] - 1) * c["vec"] < d["D"]),
            ("a thread gets a unit", lambda c: c["threads"] == 1 or d["B"] * d["HKV"] * c["split"] >= c["threads"]),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        lanes = min(16, target.vector_lanes_f32)
        hr = max(space.knob("hr").values)
        bk = min(space.knob("bk").values, key=lambda v: abs(v - 64))
        # one key per score tile: all G heads' dot products of a K row fold together, and
        # the Q rows stay in L1 as memory operands (measured best at G = 4, D = 128)
        for threads, (kr, nv) in product(default_thread_counts(task, target), ((1, 4), (1, 2), (2, 2), (1, 1))):
            values = {"split": 1, "bk": bk, "kr": kr, "hr": hr, "vec": lanes, "nv": nv, "unroll": 1,
                      "prefetch": 8, "v_prefetch": "with_k", "threads": threads}
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        c = config.as_dict()
        lay = _Layout(d, c)
        rows = self.read_rows(task)
        moved = 4.0 * (2 * d["B"] * d["HKV"] * rows * d["D"] + 2 * d["B"] * d["H"] * d["D"]
                       + (2 * lay.units * lay.per_unit if c["split"] > 1 else 0))
        chunk = math.ceil(rows / c["split"])
        return {
            "threads": c["threads"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": max(c["hr"] * c["kr"] * c["unroll"], c["hr"] * c["nv"]),
            "loads_per_fma": (c["hr"] + c["kr"]) / (c["hr"] * c["kr"]),
            "parallel_chunks": lay.units,
            "chunks_per_thread": lay.units / c["threads"],
            "tile_bytes_l1": 4.0 * c["bk"] * d["D"] * 2,
            "tile_bytes_l2": 4.0 * (lay.per_unit + lay.per_thread),
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": (lay.G * c["split"]) / max(lay.G * rows, 1),
            "k_tail_fraction": (chunk % c["bk"]) / chunk,
            "n_tail_fraction": (lay.Dp - d["D"]) / lay.Dp,
            "packed": 0.0,
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        return _render(task, config.as_dict(), _scale(self, task), self.attrs(task)["window"],
                       float(self.attrs(task)["softcap"]))


def _render(task: Task, c: dict, scale: float, window: int = 0, softcap: float = 0.0) -> KernelSource:
    d = task.dims
    B, H, HKV, D = d["B"], d["H"], d["HKV"], d["D"]
    lay = _Layout(d, c)
    G, lanes, Dp, Sp = lay.G, lay.lanes, lay.Dp, lay.Sp
    split, bk, kr, hr, nv, unroll, threads = (c[k] for k in ("split", "bk", "kr", "hr", "nv", "unroll", "threads"))
    neg_inf = cg.f32(float("-inf"))
    module = cg.new_module("attention_decode")
    body, kb = cg.chunk_body(module, "attention_decode_chunk", n_pointers=5, n_scalars=2)
    Q, K, V, O, WS, S, L, chunk_begin, chunk_end, thread = body.args
    b = kb.b
    one = cg.i64(1)
    scores = kb.gep(WS, b.add(cg.i64(lay.scratch), b.mul(thread, cg.i64(lay.per_thread))))
    d_panels, d_edges = vector_tiles(D, lanes, nv)
    d_whole, d_tail = divmod(D, lanes)

    def load_d(base, at, count: int):
        """Vector ``vector`` of a D-long row: masked where it holds fewer than ``lanes`` values."""
        return (kb.masked_load_vec(base, at, lanes, cg.i64(count)) if count < lanes
                else kb.load_vec(base, at, lanes))

    # the rows read: [start, L), start = max(0, L - window) under a sliding window
    start = kb.max(b.sub(L, cg.i64(window)), cg.i64(0)) if window else cg.i64(0)
    chunk_len = b.sdiv(b.add(b.sub(L, start), cg.i64(split - 1)), cg.i64(split))
    with kb.loop(chunk_begin, chunk_end, 1, name="unit") as unit:
        bg = b.sdiv(unit, cg.i64(split))            # b * HKV + g
        si = b.srem(unit, cg.i64(split))
        g = b.srem(bg, cg.i64(HKV))
        bi = b.sdiv(bg, cg.i64(HKV))
        c0 = b.add(start, b.mul(si, chunk_len))
        c1 = kb.min(L, b.add(c0, chunk_len))
        part = kb.gep(WS, b.mul(unit, cg.i64(lay.per_unit)))
        m_buf, l_buf, alpha_buf = part, kb.gep(part, G), kb.gep(part, 2 * G)
        acc = kb.gep(part, lay.stats)
        q_row0 = b.mul(b.add(b.mul(bi, cg.i64(H)), b.mul(g, cg.i64(G))), cg.i64(D))  # Q[b, g*G, 0]
        kv_row0 = b.mul(bg, S)                                                         # cache row of s = 0

        with kb.loop(0, G, 1, name="init") as h:
            kb.store(neg_inf, m_buf, h)
            kb.store(cg.f32(0.0), l_buf, h)
        with kb.loop(0, G * Dp // lanes, 1, name="zero") as i:
            kb.store_vec(kb.zeros(lanes), acc, b.mul(i, cg.i64(lanes)))

        span = b.sub(c1, c0)
        n_blocks = b.sdiv(b.add(kb.b.select(b.icmp_signed(">", span, cg.i64(0)), span, cg.i64(0)),
                                cg.i64(bk - 1)), cg.i64(bk))
        with kb.loop(0, n_blocks, 1, name="blk") as blk:
            k0 = b.add(c0, b.mul(blk, cg.i64(bk)))
            nk = kb.min(bk, b.sub(c1, k0))
            row0 = b.add(kv_row0, k0)  # cache row of the block's first key
            last_key = b.sub(b.sub(c1, k0), one)  # prefetches stay inside the unit's range
            # -- scores[h][j] = scale * Q[h] . K[k0 + j], hr heads x kr keys per register tile
            n_ktiles =  b.sdiv(b.add(nk, cg.i64(kr - 1)), cg.i64(kr))
            with kb.loop(0, G // hr, 1, name="ht") as ht:
                h0 = b.mul(ht, cg.i64(hr))
                q_rows = [b.add(q_row0, b.mul(b.add(h0, cg.i64(i)), cg.i64(D))) for i in range(hr)]
                with kb.loop(0, n_ktiles, 1, name="kt") as kt:
                    j0 = b.mul(kt, cg.i64(kr))
                    k_rows = [b.mul(b.add(row0, kb.min(b.add(j0, cg.i64(i)), b.sub(nk, one))), cg.i64(D))
                              for i in range(kr)]
                    if c["prefetch"]:  # K rows a few keys ahead, into L2: keeps the miss queue full
                        for i in range(kr):
                            ahead = b.add(row0, kb.min(b.add(j0, cg.i64(i + c["prefetch"])), last_key))
                            for line in range(0, D, 16):
                                kb.prefetch(K, b.add(b.mul(ahead, cg.i64(D)), cg.i64(line)), locality=2)
                    if c["v_prefetch"] == "with_k":  # the V rows of the keys scored now, for P.V
                        for i in range(kr):
                            for line in range(0, D, 16):
                                kb.prefetch(V, b.add(k_rows[i], cg.i64(line)), locality=2)
                    slots = [[[kb.local(cg.vec(lanes), name="dot") for _ in range(unroll)] for _ in range(kr)]
                             for _ in range(hr)]
                    for row in slots:
                        for per_key in row:
                            for slot in per_key:
                                b.store(kb.zeros(lanes), slot)

                    def step(dd, u: int, count: int) -> None:
                        ks = [load_d(K, b.add(k_rows[i], dd), count) for i in range(kr)]
                        for h in range(hr):
                            qv = load_d(Q, b.add(q_rows[h], dd), count)
                            for i in range(kr):
                                slot = slots[h][i][u]
                                b.store(kb.fma(qv, ks[i], b.load(slot)), slot)

                    main = d_whole // unroll * unroll
                    if main:
                        with kb.loop(0, main * lanes, lanes * unroll, name="d") as dd:
                            for u in range(unroll):
                                step(b.add(dd, cg.i64(u * lanes)), u, lanes)
                    for v in range(main, d_whole):
                        step(cg.i64(v * lanes), v % unroll, lanes)
                    if d_tail:
                        step(cg.i64(d_whole * lanes), 0, d_tail)
                    dots = []
                    for h in range(hr):
                        for i in range(kr):
                            total = b.load(slots[h][i][0])
                            for u in range(1, unroll):
                                total = kb.fadd(total, b.load(slots[h][i][u]))
                            dots.append(total)
                    sums, width = kb.reduce_add_many(dots)
                    sums = kb.fmul(sums, ir.Constant(sums.type, [scale] * width))
                    if softcap:  # softcap * tanh(s / softcap)
                        sums = kb.fmul(kb.tanh(kb.fmul(sums, ir.Constant(sums.type, [1.0 / softcap] * width))),
                                       ir.Constant(sums.type, [softcap] * width))
                    for h in range(hr):
                        at = b.add(b.mul(b.add(h0, cg.i64(h)), cg.i64(Sp)), j0)
                        if kr == 1:
                            kb.store(b.extract_element(sums, ir.Constant(cg.I32, h)), scores, at)
                        else:
                            part_v = b.shuffle_vector(sums, sums, ir.Constant(cg.vec(kr, cg.I32),
                                                                              list(range(h * kr, h * kr + kr))))
                            kb.store_vec(part_v, scores, at)

            # -- online softmax per head over the block's nk scores
            n_vec = b.sdiv(b.add(nk, cg.i64(lanes - 1)), cg.i64(lanes))
            with kb.loop(0, G, 1, name="sh") as h:
                row = b.mul(h, cg.i64(Sp))

                def block_scores(jv):
                    j = b.mul(jv, cg.i64(lanes))
                    s = kb.load_vec(scores, b.add(row, j), lanes)
                    return b.select(kb.lane_mask(lanes, b.sub(nk, j)), s, kb.splat(neg_inf, lanes)), j

                mx = kb.local(cg.vec(lanes), name="mx")
                b.store(kb.splat(neg_inf, lanes), mx)
                with kb.loop(0, n_vec, 1, name="mx") as jv:
                    b.store(kb.fmax(b.load(mx), block_scores(jv)[0]), mx)
                m_old = kb.load(m_buf, h)
                m_new = kb.fmax(m_old, kb.reduce_max(b.load(mx)))
                kb.store(kb.exp(kb.fsub(m_old, m_new)), alpha_buf, h)
                kb.store(m_new, m_buf, h)
                neg = kb.splat(b.fneg(m_new), lanes)
                total = kb.local(cg.vec(lanes), name="sum")
                b.store(kb.zeros(lanes), total)
                with kb.loop(0, n_vec, 1, name="ex") as jv:
                    s, j = block_scores(jv)
                    p = kb.exp(kb.fadd(s, neg))
                    kb.store_vec(p, scores, b.add(row, j))
                    b.store(kb.fadd(b.load(total), p), total)
                kb.store(kb.fma(kb.load(l_buf, h), kb.load(alpha_buf, h), kb.reduce_add(b.load(total))), l_buf, h)

            # -- acc[h] = acc[h] * alpha[h] + sum_j p[h][j] V[k0 + j]
            def value_tile(h0, v0, nvec: int, last: int) -> None:
                tile = [[kb.local(cg.vec(lanes), name="o") for _ in range(nvec)] for _ in range(hr)]
                for h in range(hr):
                    hh = b.add(h0, cg.i64(h))
                    factor = kb.splat(kb.load(alpha_buf, hh), lanes)
                    for v in range(nvec):
                        at = b.add(b.mul(hh, cg.i64(Dp)), b.add(v0, cg.i64(v * lanes)))
                        b.store(kb.fmul(kb.load_vec(acc, at, lanes), factor), tile[h][v])
                with kb.loop(0, nk, 1, name="pv") as j:
                    vrow = b.add(b.mul(b.add(row0, j), cg.i64(D)), v0)
                    if c["prefetch"]:
                        ahead = b.add(row0, kb.min(b.add(j, cg.i64(c["prefetch"])), last_key))
                        for line in range(0, nvec * lanes, 16):
                            kb.prefetch(V, b.add(b.add(b.mul(ahead, cg.i64(D)), v0), cg.i64(line)), locality=2)
                    vs = [load_d(V, b.add(vrow, cg.i64(v * lanes)), last if v == nvec - 1 else lanes)
                          for v in range(nvec)]
                    for h in range(hr):
                        p = kb.splat(kb.load(scores, b.add(b.mul(b.add(h0, cg.i64(h)), cg.i64(Sp)), j)), lanes)
                        for v in range(nvec):
                            b.store(kb.fma(p, vs[v], b.load(tile[h][v])), tile[h][v])
                for h in range(hr):
                    for v in range(nvec):
                        at = b.add(b.mul(b.add(h0, cg.i64(h)), cg.i64(Dp)), b.add(v0, cg.i64(v * lanes)))
                        kb.store_vec(b.load(tile[h][v]), acc, at)

            with kb.loop(0, G // hr, 1, name="vt") as ht:
                h0 = b.mul(ht, cg.i64(hr))
                if d_panels:
                    with kb.loop(0, d_panels, 1, name="vp") as vp:
                        value_tile(h0, b.mul(vp, cg.i64(nv * lanes)), nv, lanes)
                for first, nvec, last in d_edges:
                    value_tile(h0, cg.i64(first * lanes), nvec, last)

        if split == 1:  # normalise straight into O
            _write_output(kb, O, b.add(b.mul(bi, cg.i64(H)), b.mul(g, cg.i64(G))), G, D, lanes, Dp,
                          lambda h: (kb.fdiv(cg.f32(1.0), kb.load(l_buf, h)), acc))
    kb.ret()

    name = "attention_decode"
    if split == 1:
        cg.parallel_entry(module, name, body, 5, 2, threads, lay.units)
    else:
        cg.parallel_entry(module, f"{name}_split", body, 5, 2, threads, lay.units)
        _combine(module, f"{name}_combine", task, lay, split)
        entry = cg.kernel_function(module, name, 5, 2)
        ekb = cg.KernelBuilder(entry)
        for part_name in (f"{name}_split", f"{name}_combine"):
            ekb.b.call(module.get_global(part_name), list(entry.args))
        ekb.ret()
    args = AttentionDecodeOp().signature(task) + (
        ArgSpec("workspace", "workspace", "uint8", (), nbytes=4 * lay.floats(threads)),
        ArgSpec("S", "scalar", "int64"), ArgSpec("L", "scalar", "int64"))
    return KernelSource("llvm", str(module), name, args, (("threads", threads),))


def _write_output(kb: cg.KernelBuilder, O, head0, G: int, D: int, lanes: int, Dp: int, source) -> None:
    """O[head0 + h, :] = factor(h) * row(h)[:D] for h < G; ``source(h)`` gives (factor, rows base)."""
    b = kb.b
    d_whole, d_tail = divmod(D, lanes)
    with kb.loop(0, G, 1, name="out") as h:
        factor, base = source(h)
        factor = kb.splat(factor, lanes)
        dst = b.mul(b.add(head0, h), cg.i64(D))
        src = b.mul(h, cg.i64(Dp))
        if d_whole:
            with kb.loop(0, d_whole * lanes, lanes, name="od") as dd:
                kb.store_vec(kb.fmul(kb.load_vec(base, b.add(src, dd), lanes), factor), O, b.add(dst, dd))
        if d_tail:
            at = cg.i64(d_whole * lanes)
            value = kb.fmul(kb.load_vec(base, b.add(src, at), lanes), factor)
            kb.masked_store_vec(value, O, b.add(dst, at), cg.i64(d_tail))


def _combine(module: ir.Module, name: str, task: Task, lay: _Layout, split: int) -> None:
    """O[b, h] = sum_i w_i acc_i / sum_i w_i l_i with w_i = exp(m_i - max_i m_i), one (b, KV head) per chunk."""
    d = task.dims
    H, D = d["H"], d["D"]
    G, lanes, Dp = lay.G, lay.lanes, lay.Dp
    body, kb = cg.chunk_body(module, f"{name}_chunk", n_pointers=5, n_scalars=2)
    Q, K, V, O, WS, S, L, begin, end, thread = body.args
    b = kb.b
    with kb.loop(begin, end, 1, name="bg") as bg:
        first = b.mul(bg, cg.i64(split))  # unit of split 0
        part0 = kb.gep(WS, b.mul(first, cg.i64(lay.per_unit)))
        out = kb.gep(part0, lay.stats)  # split 0's accumulator becomes the weighted total, in place
        with kb.loop(0, G, 1, name="h") as h:
            top = kb.local(cg.F32, name="top")
            b.store(cg.f32(float("-inf")), top)
            with kb.loop(0, split, 1, name="i") as i:
                part = kb.gep(WS, b.mul(b.add(first, i), cg.i64(lay.per_unit)))
                b.store(kb.fmax(b.load(top), kb.load(part, h)), top)
            den = kb.local(cg.F32, name="den")
            b.store(cg.f32(0.0), den)
            with kb.loop(0, split, 1, name="w") as i:
                part = kb.gep(WS, b.mul(b.add(first, i), cg.i64(lay.per_unit)))
                weight = kb.exp(kb.fsub(kb.load(part, h), b.load(top)))
                b.store(kb.fma(weight, kb.load(part, b.add(h, cg.i64(G))), b.load(den)), den)
                wv = kb.splat(weight, lanes)
                row = b.add(cg.i64(lay.stats), b.mul(h, cg.i64(Dp)))
                with kb.loop(0, Dp, lanes, name="cd") as dd:
                    src = kb.load_vec(part, b.add(row, dd), lanes)
                    at = b.add(b.mul(h, cg.i64(Dp)), dd)
                    with_self = b.icmp_signed("==", i, cg.i64(0))
                    old = b.select(with_self, kb.zeros(lanes), kb.load_vec(out, at, lanes))
                    kb.store_vec(kb.fma(wv, src, old), out, at)
            # stash 1/den where split 0 kept alpha (no longer needed)
            kb.store(kb.fdiv(cg.f32(1.0), b.load(den)), part0, b.add(h, cg.i64(2 * G)))
        _write_output(kb, O, b.mul(bg, cg.i64(G)), G, D, lanes, Dp,
                      lambda h: (kb.load(part0, b.add(h, cg.i64(2 * G))), out))
    kb.ret()
    cg.parallel_entry(module, name, body, 5, 2, 1, d["B"] * d["HKV"])
