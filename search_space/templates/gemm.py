"""``gemm`` on the CPU: Y[M,N] = X[M,K] @ W[N,K]^T for any M, N, K, in float32 or bfloat16.

Schedule: both operands are contiguous along K, so the micro-kernel is a register block
of ``mr x nr`` dot products, each a vector accumulator of ``vec`` lanes running along K:
per K step it loads ``mr`` X vectors and ``nr`` W vectors and issues ``mr * nr`` fmas. At
the end of a K block the ``nr`` accumulators of each X row are folded into one vector of
sums with shuffles and added into Y. Around it, cache blocks of ``mc`` X rows, ``nc`` W
rows and ``kc`` of K, in one of two orders (``nkm``: W block outermost, reused by every X
block; ``mnk``: X block outermost), and the tile loop inside a block walks W panels or X
panels first (``inner``). ``pack`` copies each W block into a contiguous per-thread buffer,
``xpack`` each X block (rows K apart crowd a few cache sets when K is a power of two).
Threads split the W blocks (``nkm``) or the (X block, W block) pairs (``mnk``).

bfloat16 (X, W and Y as raw 16-bit words, float32 accumulation): with ``dot`` = ``bf16``
(targets with avx512bf16) the micro-kernel feeds raw pairs of X and W words to
``vdpbf16ps``, 2 x ``vec`` products per instruction; with ``widen`` it widens them to
float32 by shifting (packing widens W once per block) and uses fmas. Y is rounded to
bfloat16 (nearest even) when it is final: directly by the micro-kernel when K is one
block, otherwise from a float32 copy of Y in the workspace once a block's K loop is done.

Weight-only bfloat16 or float16 (``weight=bfloat16`` or ``weight=float16`` on a float32 task:
X and Y float32, W raw 16-bit words): the float32 knobs; W is widened where it is read
(bfloat16 by shifting, float16 by ``vcvtph2ps``), once per block when packed (the copy and
the transposed panel of the outer-product kernel hold float32), at every K step of the
micro-kernel when not.

Edges: blocks are whole multiples of the micro tile, so only the last M and N tiles can be
partial; they get their own micro-kernels with the exact sizes, and the K remainder of a
block is read with masked loads. Nothing reads or writes outside the arrays.

Dynamic M (``--dynamic M``: a prefill's token rows): M is the entry's int64 argument, the
number of M blocks (and of ``mnk`` chunks) is found at run time, and the last partial M tile
runs as pieces of 4, 2 and 1 rows, as the remainder's bits say, so three edge micro-kernels
cover every M. The blocks and the workspace keep the sizes of the M the task was tuned at.

``render_blocked_gemm`` is the schedule itself, parameterised by how W reaches the
micro-kernel (``WeightSource``): ``gemm_q4`` reuses it with a panel that dequantises int4,
or, on its int16 path (``dot="i16"``), with a panel of int16 code pairs and their group scales
for an outer-product kernel on ``vpdpwssd``, X rounded to int16 as it is packed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import llvmlite.ir as ir

from ..codegen import llvm as cg
from ..ops.common import ITEMSIZE
from ..ops.matmul import GemmOp
from ..space import Config, ConfigSpace, Knob
from ..target import Target
from ..task import Task
from ..template import ArgSpec, KernelSource, Template, register_template
from .gemv import vector_registers
from .q4_layout import quantize_x_panel
from .threads import default_thread_counts, threads_knob


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def is_outer(c: dict) -> bool:
    """Whether a config runs an outer-product micro-kernel: gemm's ``kernel=outer``, or
    gemm_q4's int16 path (``compute=i16``), which is one."""
    return c.get("kernel") == "outer" or c.get("compute") == "i16"


def n_tile(c: dict) -> int:
    """Columns of Y per micro tile: ``nr`` dot products, or ``nr`` vectors (outer)."""
    return c["nr"] * c["vec"] if is_outer(c) else c["nr"]


def effective_blocks(d: dict, c: dict) -> tuple[int, int, int]:
    """(mc, nc, kc) as rendered: 0 means the whole dim; blocks are whole micro tiles."""
    nt = n_tile(c)
    mc = min(_round_up(c["mc"] or d["M"], c["mr"]), _round_up(d["M"], c["mr"]))
    nc = min(_round_up(c["nc"] or d["N"], nt), _round_up(d["N"], nt))
    kc = min(c["kc"] or d["K"], d["K"])
    return mc, nc, kc


def has_bf16_dot(target: Target) -> bool:
    return target.has_feature("avx512bf16")


def blocked_gemm_knobs(d: dict, target: Target, kc_values=(256, 512, 1024, 2048), pack: bool = True) -> list[Knob]:
    """The cache-blocking and micro-tile knobs shared by gemm and gemm_q4."""
    lanes = target.vector_lanes_f32
    knobs = [
        Knob("mr", tuple(v for v in (1, 2, 3, 4, 6, 8) if v <= d["M"])),
        Knob("nr", tuple(v for v in (1, 2, 3, 4, 6, 8) if v <= d["N"])),
        Knob("vec", tuple(v for v in (8, 16) if v <= lanes) or (lanes,)),
        Knob("unroll", (1, 2, 4)),
        Knob("kc", (0,) + tuple(v for v in kc_values if v < d["K"])),
        Knob("mc", (0,) + tuple(v for v in (32, 64, 128, 256) if v < d["M"])),
        Knob("nc", (0,) + tuple(v for v in (48, 192, 768) if v < d["N"])),
        Knob("order", ("nkm", "mnk")),
        Knob("inner", ("nm", "mn")),
    ]
    if pack:
        knobs.append(Knob("pack", (0, 1)))
    knobs.append(Knob("xpack", (0, 1), legacy=0))  # logs from before X packing existed: not packed
    knobs.append(threads_knob(target))
    return knobs


def blocked_gemm_constraints(d: dict, target: Target) -> list:
    regs = vector_registers(target)

    def outer_blocks(c) -> int:
        mc, nc, _ = effective_blocks(d, c)
        n_blocks = math.ceil(d["N"] / nc)
        return n_blocks if c["order"] == "nkm" else math.ceil(d["M"] / mc) * n_blocks

    def registers(c) -> int:
        """Accumulators (int16 path: int32 ones per group besides the float32 ones) plus the X
        (dot) or W (outer) vectors of a step."""
        accumulators = c["mr"] * c["nr"] * (2 if c.get("compute") == "i16" else 1)
        return accumulators + (c["nr"] if is_outer(c) else c["mr"]) + 1

    return [
        ("micro tile fits in registers", lambda c: registers(c) <= regs),
        ("a thread gets an outer block", lambda c: c["threads"] == 1 or outer_blocks(c) >= c["threads"]),
    ]


DOT_TILES = ((4, 6), (4, 4), (2, 4), (2, 2), (1, 2), (1, 1))  # (mr, nr), the first the space accepts


def blocked_gemm_default(space: ConfigSpace, task: Task, target: Target, extra: dict | None = None,
                         tiles: tuple[tuple[int, int], ...] = DOT_TILES) -> Config:
    d = task.dims
    lanes = target.vector_lanes_f32
    for threads in default_thread_counts(task, target):
        for mr, nr in tiles:
            values = {"mr": mr, "nr": nr, "vec": min(16, lanes), "unroll": 1,
                      "kc": 512 if d["K"] > 512 else 0, "mc": 128 if d["M"] > 128 else 0,
                      "nc": 192 if d["N"] > 192 else 0, "order": "nkm", "inner": "nm", "pack": 1,
                      "xpack": 0, "threads": threads, **(extra or {})}
            values = {k: v for k, v in values.items() if k in space.names}
            if space.accepts(values):
                return space.from_values(values)
    return next(iter(space))


def blocked_gemm_features(task: Task, c: dict, w_bytes: float, elem: int = 4) -> dict[str, float]:
    """Analytic features of the blocked schedule; ``w_bytes`` is W's size in memory."""
    d = task.dims
    mc, nc, kc = effective_blocks(d, c)
    m_blocks, n_blocks = math.ceil(d["M"] / mc), math.ceil(d["N"] / nc)
    chunks = n_blocks if c["order"] == "nkm" else m_blocks * n_blocks
    # bytes that cross from memory/L3: W once per X block pass unless it stays cached
    w_passes = m_blocks if c["order"] == "mnk" else 1
    moved = (w_bytes * w_passes + elem * d["M"] * d["K"] * n_blocks
             + 4.0 * d["M"] * d["N"] * math.ceil(d["K"] / kc))
    return {
        "threads": c["threads"],
        "vector_lanes": c["vec"],
        "unroll": c["unroll"],
        "accumulators": c["mr"] * c["nr"],
        "loads_per_fma": (c["mr"] + c["nr"]) / (c["mr"] * c["nr"]),
        "parallel_chunks": chunks,
        "chunks_per_thread": chunks / c["threads"],
        "tile_bytes_l1": elem * (c["nr"] if c["inner"] == "nm" else c["mr"]) * kc,
        "tile_bytes_l2": elem * (mc if c["inner"] == "nm" else nc) * kc,
        "tile_bytes_l3": elem * nc * kc,
        "bytes_moved": moved,
        "arith_intensity": 2.0 * d["M"] * d["N"] * d["K"] / moved,
        "reduction_share": 1.0 / max(kc / c["vec"], 1.0),
        "k_tail_fraction": (d["K"] % c["vec"]) / d["K"],
        "m_tail_fraction": (d["M"] % c["mr"]) / d["M"],
        "n_tail_fraction": (d["N"] % n_tile(c)) / d["N"],
        "packed": c.get("pack", 1),
    }


@register_template
class GemmCpu(GemmOp, Template):
    target_kind = "cpu"
    dtypes = ("float32", "bfloat16")
    weight_dtypes = ("bfloat16", "float16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d = task.dims
        knobs = blocked_gemm_knobs(d, target)
        constraints = blocked_gemm_constraints(d, target)
        if task.dtype == "bfloat16":
            knobs.insert(0, Knob("dot", ("bf16", "widen") if has_bf16_dot(target) else ("widen",)))
            if "M" in task.dynamic:  # partial sums over K blocks would need a copy of Y sized by M
                constraints.append(("a dynamic M rounds Y from registers (one K block)", lambda c: c["kc"] == 0))
        else:
            knobs.insert(0, Knob("kernel", ("dot", "outer"), legacy="dot"))  # the only kernel before "outer"
            constraints.append(("the outer-product kernel reads a packed W", lambda c: c["kernel"] == "dot" or c["pack"]))
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        extra = {"dot": "bf16" if has_bf16_dot(target) else "widen"} if task.dtype == "bfloat16" else {"kernel": "dot"}
        if task.dtype == "bfloat16" and "M" in task.dynamic:
            extra["kc"] = 0  # see the space's constraint
        return blocked_gemm_default(self.space(task, target), task, target, extra)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        d = task.dims
        elem = 2 if task.dtype == "bfloat16" else 4
        w_elem = ITEMSIZE[self.weight_dtype(task)]
        return blocked_gemm_features(task, config.as_dict(), w_elem * d["N"] * d["K"], elem)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        bf16 = task.dtype == "bfloat16"
        w_dtype = self.weight_dtype(task)
        weight_only = w_dtype != task.dtype  # bfloat16 or float16 W, float32 X and Y
        dot = c.get("dot", "fma") if bf16 else "fma"
        if dot == "bf16":
            # raw words into vdpbf16ps: the panel is a plain copy of bfloat16 W rows
            source = WeightSource(2, "bfloat16", _copy_panel(2) if c["pack"] else None)
        elif bf16 or (weight_only and c["kernel"] == "dot"):
            source = WeightSource(4, "float32", _widen_panel(c["vec"], w_dtype)) if c["pack"] else \
                WeightSource(2, w_dtype, None)
        elif c["kernel"] == "outer":
            panel = _transpose_panel(c["nr"] * c["vec"], c["vec"], w_dtype)
            return render_blocked_gemm(task, c, "gemm", GemmOp().signature(task), WeightSource(4, "float32", panel),
                                       dot="outer")
        else:
            source = WeightSource(4, "float32", _copy_panel(4) if c["pack"] else None)
        return render_blocked_gemm(task, c, "gemm", GemmOp().signature(task), source,
                                   dot="bf16" if dot == "bf16" else "fma")


# ----------------------------------------------------------------------------- the schedule

# fill(kb, inputs, dst, n0, nlen, k0, klen, kc): W rows [n0, n0+nlen) x [k0, k0+klen) into
# the panel dst (row stride kc elements of the panel's dtype)
PanelFill = Callable[..., None]


@dataclass(frozen=True)
class WeightSource:
    """How W reaches the micro-kernel: from a per-thread panel filled by ``fill`` (element
    size ``panel_bytes``, dtype ``dtype``), or straight from the input W (``fill`` None)."""

    panel_bytes: int
    dtype: str
    fill: PanelFill | None
    # > 0: the panel holds int16 codes, k pairs side by side for vpdpwssd, and ``fill`` also
    # writes the float32 scale of every (group of this many k, column) to a second panel
    group: int = 0


def _copy_panel(elem: int) -> PanelFill:
    def fill(kb, inputs, dst, n0, nlen, k0, klen: int, kc: int, K: int) -> None:
        b = kb.b
        with kb.loop(0, nlen, 1, name="pk") as r:
            src = kb.gep(inputs[1], b.add(b.mul(b.add(n0, r), cg.i64(K)), k0), _elem(elem))
            kb.memcpy(kb.gep(dst, b.mul(r, cg.i64(kc)), _elem(elem)), src, elem * klen)
    return fill


def transpose_square(kb: cg.KernelBuilder, rows: list) -> list:
    """Transpose T vectors of T lanes (T a power of two): log2(T) stages of two-source
    shuffles, stage j swapping bit j of the row index with bit j of the lane index."""
    b = kb.b
    t = len(rows)
    rows = list(rows)
    bit = 1
    while bit < t:
        keep = [c if not c & bit else t + (c ^ bit) for c in range(t)]
        take = [c | bit if not c & bit else t + c for c in range(t)]
        out = list(rows)
        for r in range(t):
            if r & bit:
                continue
            lo, hi = rows[r], rows[r | bit]
            out[r] = b.shuffle_vector(lo, hi, ir.Constant(cg.vec(t, cg.I32), keep))
            out[r | bit] = b.shuffle_vector(lo, hi, ir.Constant(cg.vec(t, cg.I32), take))
        rows, bit = out, bit * 2
    return rows


def _transpose_panel(width: int, lanes: int, dtype: str) -> PanelFill:
    """W rows [n0, n0+nlen) as columns for the outer-product kernel, one micro panel after
    the other: panel[n // width][k][n % width] (``width`` = the micro tile's columns), the
    columns past nlen zero. Squares of ``lanes`` x ``lanes`` are transposed in registers.
    ``dtype``: W's storage; bfloat16 or float16 words are widened to float32 as they are loaded."""
    widen = dtype != "float32"
    el = cg.I16 if widen else cg.F32

    def fill(kb, inputs, dst, n0, nlen, k0, klen: int, kc: int, K: int) -> None:
        b = kb.b
        W = inputs[1]
        ld = b.mul(b.sdiv(b.add(nlen, cg.i64(width - 1)), cg.i64(width)), cg.i64(width))
        last = b.sub(nlen, cg.i64(1))

        def column_at(k, nt):
            """Panel offset of (k, column nt) in the micro-panel layout."""
            tile = b.sdiv(nt, cg.i64(width))
            return b.add(b.mul(tile, cg.i64(width * kc)), b.add(b.mul(k, cg.i64(width)), b.srem(nt, cg.i64(width))))

        def square(nt, kt, count: int) -> None:
            rows = []
            for i in range(lanes):
                n = b.add(nt, cg.i64(i))
                at = b.add(b.mul(b.add(n0, kb.min(n, last)), cg.i64(K)), b.add(k0, kt))
                v = kb.load_vec(W, at, lanes, el) if count == lanes else \
                    kb.masked_load_vec(W, at, lanes, cg.i64(count), el)
                v = kb.words_to_f32(v, dtype) if widen else v
                rows.append(b.select(b.icmp_signed("<", n, nlen), v, kb.zeros(lanes)))
            for c, column in enumerate(transpose_square(kb, rows)[:count]):
                kb.store_vec(column, dst, column_at(b.add(kt, cg.i64(c)), nt))

        with kb.loop(0, ld, lanes, name="tn") as nt:
            full = klen - klen % lanes
            if full:
                with kb.loop(0, full, lanes, name="tk") as kt:
                    square(nt, kt, lanes)
            if klen % lanes:
                square(nt, cg.i64(full), klen % lanes)
    return fill


def _widen_panel(lanes: int, dtype: str) -> PanelFill:
    """W rows of ``dtype`` (bfloat16 or float16 words) widened to float32 once per block, so
    the micro-kernel reads floats."""
    def fill(kb, inputs, dst, n0, nlen, k0, klen: int, kc: int, K: int) -> None:
        b = kb.b
        W = inputs[1]
        with kb.loop(0, nlen, 1, name="pk") as r:
            src = b.add(b.mul(b.add(n0, r), cg.i64(K)), k0)
            out = b.mul(r, cg.i64(kc))
            main = klen - klen % lanes
            if main:
                with kb.loop(0, main, lanes, name="pw") as k:
                    raw = kb.load_vec(W, b.add(src, k), lanes, cg.I16)
                    kb.store_vec(kb.words_to_f32(raw, dtype), dst, b.add(out, k))
            if klen % lanes:
                rest = cg.i64(klen % lanes)
                raw = kb.masked_load_vec(W, b.add(src, cg.i64(main)), lanes, rest, cg.I16)
                kb.masked_store_vec(kb.words_to_f32(raw, dtype), dst, b.add(out, cg.i64(main)), rest)
    return fill


def _elem(nbytes: int) -> ir.Type:
    return {1: cg.I8, 2: cg.I16, 4: cg.F32}[nbytes]


def _tile_function(module: ir.Module, name: str, mt: int, nv: int,
                   lanes: int) -> tuple[ir.Function, cg.KernelBuilder, list[list[ir.Value]]]:
    """The frame of a micro-kernel: an internal ``void name(x, w, y, first)`` whose three
    arrays never alias, its builder, and ``mt x nv`` vector accumulators set to zero."""
    fn = ir.Function(module, ir.FunctionType(cg.VOID, [cg.PTR, cg.PTR, cg.PTR, cg.I1]), name=name)
    fn.linkage = "internal"
    for arg in fn.args[:3]:
        arg.add_attribute("noalias")
    kb = cg.KernelBuilder(fn)
    slots = [[kb.local(cg.vec(lanes)) for _ in range(nv)] for _ in range(mt)]
    for row in slots:
        for slot in row:
            kb.b.store(kb.zeros(lanes), slot)
    return fn, kb, slots


_TAGS = {"float32": "f", "bfloat16": "b", "float16": "h"}  # a micro-kernel's operand dtypes in its name


def _micro_kernel(module: ir.Module, mt: int, nt: int, klen: int, lanes: int, unroll: int,
                  ldx: int, ldw: int, N: int, x_dtype: str, w_dtype: str, dot: str, y_bf16: bool) -> ir.Function:
    """Y[mt, nt] (+)= X[mt, klen] . W[nt, klen]: pointers at the tile corners, a first flag.

    ``x_dtype``, ``w_dtype``: float32, or bfloat16 / float16 words. ``dot`` "fma": float32
    fmas, 16-bit operands widened after loading; "bf16": raw bfloat16 word pairs into
    vdpbf16ps (a K step covers 2 x lanes elements). ``y_bf16``: the tile is final (one K
    block) and is stored rounded to bfloat16.
    """
    tag = f"{_TAGS[x_dtype]}{_TAGS[w_dtype]}{dot}{'b' if y_bf16 else 'f'}"
    fn, kb, slots = _tile_function(module, f"micro_{mt}x{nt}_k{klen}_x{ldx}_{tag}", mt, nt, lanes)
    b = kb.b
    x, w, y, first = fn.args
    width = 2 * lanes if dot == "bf16" else lanes  # elements per K step

    def step(k, count=None) -> None:
        def load(base, row: int, stride: int, dtype: str):
            at = b.add(cg.i64(row * stride), k)
            words = dtype != "float32"
            el = cg.I16 if words else cg.F32
            v = kb.load_vec(base, at, width, el) if count is None else kb.masked_load_vec(base, at, width, count, el)
            return kb.words_to_f32(v, dtype) if words and dot == "fma" else v

        xs = [load(x, i, ldx, x_dtype) for i in range(mt)]
        for j in range(nt):
            wv = load(w, j, ldw, w_dtype)
            for i in range(mt):
                acc = b.load(slots[i][j])
                b.store(kb.dot_bf16(acc, xs[i], wv) if dot == "bf16" else kb.fma(xs[i], wv, acc), slots[i][j])

    span = width * unroll
    main = klen - klen % span
    if main:
        with kb.loop(0, main, span, name="k") as k:
            for u in range(unroll):
                step(b.add(k, cg.i64(u * width)))
    k = main
    while klen - k >= width:
        step(cg.i64(k))
        k += width
    if klen - k:
        step(cg.i64(k), count=cg.i64(klen - k))

    for i in range(mt):
        sums, sum_width = kb.reduce_add_many([b.load(slots[i][j]) for j in range(nt)])
        at = cg.i64(i * N)
        if y_bf16:
            _store_row(kb, kb.f32_to_bf16(sums), sum_width, nt, y, at, cg.I16)
            continue
        with b.if_else(first) as (then, otherwise):
            with then:
                _store_row(kb, sums, sum_width, nt, y, at)
            with otherwise:
                old = kb.load_vec(y, at, sum_width) if nt == sum_width else \
                    kb.masked_load_vec(y, at, sum_width, cg.i64(nt))
                _store_row(kb, kb.fadd(old, sums), sum_width, nt, y, at)
    kb.ret()
    return fn


def _outer_kernel(module: ir.Module, mt: int, nv: int, nt: int, klen: int, lanes: int, unroll: int,
                  x_strides: tuple[int, int], ldp: int, N: int) -> ir.Function:
    """Y[mt, nt] (+)= X[mt, klen] . P[klen, nv x lanes]: the outer-product micro-kernel.

    P is the transposed W micro panel (k-major, rows ``ldp`` apart); per k it loads ``nv``
    vectors of P and broadcasts one X element per row into ``mt x nv`` fmas, so the
    accumulators are ready-made rows of Y: no reductions, the last vector stored with a
    mask when ``nt`` is not whole vectors. X element (i, k) is at i * x_strides[0] + k *
    x_strides[1] (row-major X, or a packed block with the tile's rows interleaved)."""
    fn, kb, slots = _tile_function(module, f"outer_{mt}x{nv}v{nt}_k{klen}_x{x_strides[0]}_{x_strides[1]}",
                                   mt, nv, lanes)
    b = kb.b
    x, p, y, first = fn.args

    def step(k) -> None:
        row = b.mul(k, cg.i64(ldp))
        ws = [kb.load_vec(p, b.add(row, cg.i64(j * lanes)), lanes) for j in range(nv)]
        for i in range(mt):
            xb = kb.splat(kb.load(x, b.add(cg.i64(i * x_strides[0]), b.mul(k, cg.i64(x_strides[1])))), lanes)
            for j in range(nv):
                b.store(kb.fma(xb, ws[j], b.load(slots[i][j])), slots[i][j])

    main = klen - klen % unroll
    if main:
        with kb.loop(0, main, unroll, name="k") as k:
            for u in range(unroll):
                step(b.add(k, cg.i64(u)))
    for k in range(main, klen):
        step(cg.i64(k))

    _store_rows(kb, slots, nt, lanes, N, y, first)
    return fn


def _outer_i16_kernel(module: ir.Module, mt: int, nv: int, nt: int, klen: int, lanes: int, unroll: int,
                      group: int, ldx: int, ldp: int, N: int, vnni: bool) -> ir.Function:
    """Y[mt, nt] (+)= sum over groups of (Xq . Pq) * x scale * w scale: the int16 outer kernel.

    ``void f(xq, xs, p, ps, y, first)``: ``xq`` the tile's int16 X rows (``ldx`` apart),
    ``xs`` their scales per group (``ldx / group`` apart), ``p`` the W micro panel of int32
    pairs (k pair-major, ``ldp`` pairs a row: (code(k) - 8, code(k+1) - 8) as two int16),
    ``ps`` its scales ([group][column], ``ldp`` apart). Per k pair: ``nv`` W vectors and one
    broadcast X pair per row into ``vpdpwssd`` (two products per lane; without ``vnni``,
    ``vpmaddwd`` and an add); per group the int32 sums turn into floats with one fma each. The sums stay far from overflow: |x| <= 32767,
    |code - 8| <= 8, so a group of 128 k adds at most 2^25."""
    fn = ir.Function(module, ir.FunctionType(cg.VOID, [cg.PTR] * 5 + [cg.I1]),
                     name=f"outer_i16_{mt}x{nv}v{nt}_k{klen}_x{ldx}")
    fn.linkage = "internal"
    for arg in fn.args[:5]:
        arg.add_attribute("noalias")
    kb = cg.KernelBuilder(fn)
    b = kb.b
    xq, xs, p, ps, y, first = fn.args
    i_lanes, pairs = cg.vec(lanes, cg.I32), cg.vec(2 * lanes, cg.I16)
    sums = [[kb.local(cg.vec(lanes)) for _ in range(nv)] for _ in range(mt)]
    dots = [[kb.local(i_lanes) for _ in range(nv)] for _ in range(mt)]
    for row in sums:
        for slot in row:
            b.store(kb.zeros(lanes), slot)
    steps = group // 2  # k pairs per group

    def step(k2) -> None:
        row = b.mul(k2, cg.i64(ldp))
        ws = [b.bitcast(kb.load_vec(p, b.add(row, cg.i64(j * lanes)), lanes, cg.I32), pairs) for j in range(nv)]
        for i in range(mt):
            xb = b.bitcast(kb.splat(kb.load(xq, b.add(cg.i64(i * ldx // 2), k2), cg.I32), lanes), pairs)
            for j in range(nv):
                b.store(kb.dot_i16(b.load(dots[i][j]), xb, ws[j], vnni), dots[i][j])

    with kb.loop(0, klen // group, 1, name="g") as g:
        for row in dots:
            for slot in row:
                b.store(ir.Constant(i_lanes, None), slot)
        first_pair = b.mul(g, cg.i64(steps))
        with kb.loop(0, steps, unroll, name="k") as k:
            for u in range(unroll):
                step(b.add(first_pair, b.add(k, cg.i64(u))))
        w_scales = [kb.load_vec(ps, b.add(b.mul(g, cg.i64(ldp)), cg.i64(j * lanes)), lanes) for j in range(nv)]
        for i in range(mt):
            x_scale = kb.splat(kb.load(xs, b.add(cg.i64(i * (ldx // group)), g)), lanes)
            for j in range(nv):
                exact = b.sitofp(b.load(dots[i][j]), cg.vec(lanes))
                b.store(kb.fma(exact, kb.fmul(w_scales[j], x_scale), b.load(sums[i][j])), sums[i][j])

    _store_rows(kb, sums, nt, lanes, N, y, first)
    return fn


def _store_rows(kb: cg.KernelBuilder, slots, nt: int, lanes: int, N: int, y, first) -> None:
    """An outer kernel's end: its accumulators are rows of Y (``nt`` columns, the last
    vector masked), stored when ``first``, else added to Y."""
    b = kb.b
    for i, row in enumerate(slots):
        for j, slot in enumerate(row):
            at = cg.i64(i * N + j * lanes)
            count = min(lanes, nt - j * lanes)
            acc = b.load(slot)
            with b.if_else(first) as (then, otherwise):
                with then:
                    _store_row(kb, acc, lanes, count, y, at)
                with otherwise:
                    old = kb.load_vec(y, at, lanes) if count == lanes else kb.masked_load_vec(y, at, lanes, cg.i64(count))
                    _store_row(kb, kb.fadd(old, acc), lanes, count, y, at)
    kb.ret()


def _store_row(kb: cg.KernelBuilder, value, width: int, nt: int, y, at, element: ir.Type = cg.F32) -> None:
    if width == 1:
        kb.store(kb.b.extract_element(value, ir.Constant(cg.I32, 0)) if isinstance(value.type, ir.VectorType)
                 else value, y, at, element)
    elif nt == width:
        kb.store_vec(value, y, at, element)
    else:
        kb.masked_store_vec(value, y, at, cg.i64(nt), element)


def _round_region(kb: cg.KernelBuilder, src, dst, m0, mlen, n0, nlen, N: int, lanes: int) -> None:
    """dst[m, n] = bfloat16(src[m, n]) over rows [m0, m0+mlen) and columns [n0, n0+nlen)."""
    b = kb.b
    with kb.loop(m0, b.add(m0, mlen), 1, name="cm") as m:
        row = b.add(b.mul(m, cg.i64(N)), n0)
        full = b.mul(b.sdiv(nlen, cg.i64(lanes)), cg.i64(lanes))
        with kb.loop(0, full, lanes, name="cn") as n:
            at = b.add(row, n)
            kb.store_vec(kb.f32_to_bf16(kb.load_vec(src, at, lanes)), dst, at, cg.I16)
        rest = b.sub(nlen, full)
        with b.if_then(b.icmp_signed(">", rest, cg.i64(0))):
            at = b.add(row, full)
            value = kb.f32_to_bf16(kb.masked_load_vec(src, at, lanes, rest))
            kb.masked_store_vec(value, dst, at, rest, cg.I16)


def render_blocked_gemm(task: Task, c: dict, name: str, signature: tuple[ArgSpec, ...], weights: WeightSource,
                        dot: str = "fma", vnni: bool = True) -> KernelSource:
    """The blocked schedule for Y = X @ W^T. ``signature``: the operator's arrays, inputs
    first (X, then whatever ``weights.fill`` reads), Y last; a workspace is appended.
    ``vnni``: the int16 kernel (``dot="i16"``) has ``vpdpwssd``, else it pairs ``vpmaddwd``
    with an add."""
    d = task.dims
    M, N, K = d["M"], d["N"], d["K"]
    mr, lanes, unroll = c["mr"], c["vec"], c["unroll"]
    i16 = dot == "i16"  # int16 X rounded as it is packed, int16 W pairs: the int16 outer kernel
    outer = dot in ("outer", "i16")
    group = weights.group
    if i16 and not (group and c["xpack"]):
        raise ValueError("gemm: the int16 kernel needs a grouped int16 weight panel and a packed X")
    nr = n_tile(dict(c, kernel="outer" if outer else "dot"))  # columns per micro tile
    mc, nc, kc = effective_blocks(d, dict(c, kernel="outer" if outer else "dot"))
    bf16 = task.dtype == "bfloat16"
    pack = weights.fill is not None
    xpack = bool(c["xpack"])
    ldw = kc if pack else K
    ldx = kc if xpack else K
    scratch_y = bf16 and kc < K  # partial sums of a bfloat16 Y live in a float32 copy
    n_in = len(signature) - 1
    n_ptr = n_in + 2
    # a dynamic M (prefill token rows) is the entry's one scalar: blocks and the M edge are
    # found at run time, and the kernel serves any M with the workspace sized at the tuned one
    dynamic = "M" in task.dynamic
    if dynamic and scratch_y:
        raise ValueError("gemm: a bfloat16 Y split over K blocks keeps float32 partial sums sized by M, "
                         "so M cannot be dynamic there")
    module = cg.new_module(name)
    micro: dict[tuple, ir.Function] = {}

    def kernel_for(mt: int, nt: int, klen: int) -> ir.Function:
        key = (mt, nt, klen)
        if key not in micro:
            if i16:
                micro[key] = _outer_i16_kernel(module, mt, -(-nt // lanes), nt, klen, lanes, unroll, group, kc, nr, N,
                                               vnni)
            elif outer:
                x_strides = (1, mr) if xpack else (K, 1)
                micro[key] = _outer_kernel(module, mt, -(-nt // lanes), nt, klen, lanes, unroll, x_strides, nr, N)
            else:
                micro[key] = _micro_kernel(module, mt, nt, klen, lanes, unroll, ldx, ldw, N, task.dtype,
                                           weights.dtype, dot, bf16 and not scratch_y)
        return micro[key]

    n_scalars = 1 if dynamic else 0
    body, kb = cg.chunk_body(module, f"{name}_chunk", n_pointers=n_ptr, n_scalars=n_scalars)
    inputs = list(body.args[:n_in])
    Y, WS = body.args[n_in], body.args[n_in + 1]
    chunk_begin, chunk_end, thread = body.args[n_ptr + n_scalars:n_ptr + n_scalars + 3]
    b = kb.b
    rows = body.args[n_ptr] if dynamic else cg.i64(M)  # M as the code sees it
    x_el = cg.I16 if bf16 or i16 else cg.F32
    w_el = cg.F32 if weights.dtype == "float32" else cg.I16  # 16-bit words: bfloat16, float16, int16
    panel_bytes = weights.panel_bytes * nc * kc if pack else 0
    w_scales_at = _round_up(panel_bytes, 64)  # the int16 path's panel of W scales follows the codes
    if i16:
        panel_bytes = w_scales_at + 4 * nc * (kc // group)
    x_elem = 2 if bf16 or i16 else 4
    k_blocks_n = math.ceil(K / kc)
    # mnk packs an X block once for all its K blocks (reused by every W block of the
    # thread); nkm packs the one K block it is about to use
    x_slots = k_blocks_n if c["order"] == "mnk" else 1
    x_panel_bytes = x_elem * mc * kc * x_slots if xpack else 0
    x_scales_at = x_panel_bytes  # int16 X: the scales of every (row, group) after the rows
    if i16:
        x_panel_bytes += 4 * mc * (kc // group) * x_slots
    per_thread = _round_up(panel_bytes, 64) + x_panel_bytes
    threads = c["threads"]
    mine = kb.gep(WS, b.mul(thread, cg.i64(per_thread)), cg.I8)
    ws = mine if pack else None
    x_panel = kb.gep(mine, cg.i64(_round_up(panel_bytes, 64)), cg.I8) if xpack else None
    x_scales = kb.gep(x_panel, cg.i64(x_scales_at), cg.I8) if i16 else None
    w_scales = kb.gep(ws, cg.i64(w_scales_at), cg.I8) if i16 else None
    acc_y = kb.gep(WS, cg.i64(_round_up(per_thread * threads, 64)), cg.I8) if scratch_y else Y
    X = inputs[0]

    def x_slot(k0):
        """Element offset of the packed X block of the K block at k0."""
        return b.mul(b.sdiv(k0, cg.i64(kc)), cg.i64(mc * kc)) if x_slots > 1 else cg.i64(0)

    def x_scale_slot(k0):
        """Element offset of the int16 X scales of the K block at k0: ``[row][group]``."""
        return b.mul(b.sdiv(k0, cg.i64(kc)), cg.i64(mc * (kc // group))) if x_slots > 1 else cg.i64(0)

    def pack_x(m0, mlen, k0, klen) -> None:
        """Copy X[m0:+mlen, k0:+klen] to its slot, rows kc apart: X rows K apart can crowd
        a few cache sets (K a power of two). The int16 path rounds it on the way."""
        if i16:
            quantize_x_panel(kb, X, x_panel, x_scales, m0, mlen, k0, klen, K, kc, group, x_slot(k0),
                             x_scale_slot(k0))
            return
        with kb.loop(0, mlen, 1, name="px") as r:
            src = b.add(b.mul(b.add(m0, r), cg.i64(K)), k0)
            if outer:  # rows of a micro tile interleaved: [r // mr][k][r % mr]
                tile = b.mul(b.sdiv(r, cg.i64(mr)), cg.i64(mr * kc))
                lane = b.add(x_slot(k0), b.add(tile, b.srem(r, cg.i64(mr))))
                with kb.loop(0, klen, 1, name="pxk") as k:
                    kb.store(kb.load(X, b.add(src, k)), x_panel, b.add(lane, b.mul(k, cg.i64(mr))))
            else:
                dst = kb.gep(x_panel, b.add(x_slot(k0), b.mul(r, cg.i64(kc))), x_el)
                nbytes = x_elem * klen if isinstance(klen, int) else b.mul(klen, cg.i64(x_elem))
                kb.memcpy(dst, kb.gep(X, src, x_el), nbytes)

    def block(m0, mlen, n0, nlen, k0, klen: int, first) -> None:
        """All micro tiles of Y[m0:+mlen, n0:+nlen] for the K block [k0, k0+klen)."""
        if i16:
            weights.fill(kb, inputs, ws, n0, nlen, k0, klen, kc, K, w_scales)
        elif pack:
            weights.fill(kb, inputs, ws, n0, nlen, k0, klen, kc, K)
        if xpack and x_slots == 1:
            pack_x(m0, mlen, k0, klen)

        def w_ptr(jn):
            if outer:  # the micro panel of columns [jn, jn + nr) of the transposed panel
                return kb.gep(ws, b.mul(jn, cg.i64(kc)), w_el)
            if pack:
                return kb.gep(ws, b.mul(jn, cg.i64(kc)), w_el)
            return kb.gep(inputs[1], b.add(b.mul(b.add(n0, jn), cg.i64(K)), k0), w_el)

        def call(im, jn, mt: int, nt: int, i0=None) -> None:
            # rows [im + i0, +mt) of the tile at im, a multiple of mr: in either packed layout
            # the tile starts at im * kc; the outer kernel's interleaves its rows (stride 1)
            i0 = cg.i64(0) if i0 is None else i0
            if i16:  # rows kc apart, their scales kc / group apart
                row = b.add(im, i0)
                xp = kb.gep(x_panel, b.add(x_slot(k0), b.mul(row, cg.i64(kc))), cg.I16)
            elif xpack:
                row = b.add(b.mul(im, cg.i64(kc)), i0 if outer else b.mul(i0, cg.i64(kc)))
                xp = kb.gep(x_panel, b.add(x_slot(k0), row), x_el)
            else:
                xp = kb.gep(X, b.add(b.mul(b.add(m0, b.add(im, i0)), cg.i64(K)), k0), x_el)
            y_el = cg.I16 if bf16 and not scratch_y else cg.F32
            yp = kb.gep(acc_y, b.add(b.mul(b.add(m0, b.add(im, i0)), cg.i64(N)), b.add(n0, jn)), y_el)
            if i16:  # the scales of the X rows and of the W micro panel beside each
                xsp = kb.gep(x_scales, b.add(x_scale_slot(k0), b.mul(row, cg.i64(kc // group))))
                wsp = kb.gep(w_scales, b.mul(jn, cg.i64(kc // group)))
                args = [kb.ptr(xp), kb.ptr(xsp), kb.ptr(w_ptr(jn)), kb.ptr(wsp), kb.ptr(yp), first]
            else:
                args = [kb.ptr(xp), kb.ptr(w_ptr(jn)), kb.ptr(yp), first]
            b.call(kernel_for(mt, nt, klen), args)

        m_full = b.sdiv(mlen, cg.i64(mr))
        n_full = b.sdiv(nlen, cg.i64(nr))
        m_edge, n_edge = M % mr, N % nr

        def m_edge_tile(emit) -> None:
            """``emit(im, mt, i0)`` for the last, partial tile of M rows: its exact size when M
            is compiled in; with a dynamic M, pieces of 4, 2 and 1 rows as the remainder's bits say."""
            rest = b.srem(mlen, cg.i64(mr))
            tile = b.mul(m_full, cg.i64(mr))
            if not dynamic:
                if m_edge:
                    with b.if_then(b.icmp_signed("!=", rest, cg.i64(0))):
                        emit(tile, m_edge, None)
                return
            piece = (1 << (mr - 1).bit_length()) >> 1  # the largest power of two below mr (0: mr = 1)
            while piece:
                with b.if_then(b.icmp_signed("!=", b.and_(rest, cg.i64(piece)), cg.i64(0))):
                    emit(tile, piece, b.and_(rest, cg.i64(-2 * piece)))  # after the larger pieces' rows
                piece >>= 1

        def m_tiles(jn, nt: int) -> None:
            with kb.loop(0, m_full, 1, name="it") as it:
                call(b.mul(it, cg.i64(mr)), jn, mr, nt)
            m_edge_tile(lambda im, mt, i0: call(im, jn, mt, nt, i0))

        def n_tiles(im, mt: int, i0=None) -> None:
            with kb.loop(0, n_full, 1, name="jt") as jt:
                call(im, b.mul(jt, cg.i64(nr)), mt, nr, i0)
            if n_edge:
                with b.if_then(b.icmp_signed("!=", b.srem(nlen, cg.i64(nr)), cg.i64(0))):
                    call(im, b.mul(n_full, cg.i64(nr)), mt, n_edge, i0)

        if c["inner"] == "nm":
            with kb.loop(0, n_full, 1, name="jt") as jt:
                m_tiles(b.mul(jt, cg.i64(nr)), nr)
            if n_edge:
                with b.if_then(b.icmp_signed("!=", b.srem(nlen, cg.i64(nr)), cg.i64(0))):
                    m_tiles(b.mul(n_full, cg.i64(nr)), n_edge)
        else:
            with kb.loop(0, m_full, 1, name="it") as it:
                n_tiles(b.mul(it, cg.i64(mr)), mr)
            m_edge_tile(n_tiles)

    def k_blocks(emit) -> None:
        """Call emit(k0, klen, first) over the K blocks: full ones in a loop, then the rest."""
        full = K // kc
        with kb.loop(0, full, 1, name="kb") as kbi:
            emit(b.mul(kbi, cg.i64(kc)), kc, b.icmp_signed("==", kbi, cg.i64(0)))
        if K % kc:
            emit(cg.i64(full * kc), K % kc, ir.Constant(cg.I1, 1 if full == 0 else 0))

    def extent(start, block: int, total):
        return kb.min(block, b.sub(total if isinstance(total, ir.Value) else cg.i64(total), start))

    m_blocks = b.sdiv(b.add(rows, cg.i64(mc - 1)), cg.i64(mc))

    if c["order"] == "nkm":
        with kb.loop(chunk_begin, chunk_end, 1, name="nb") as nb:
            n0 = b.mul(nb, cg.i64(nc))
            nlen = extent(n0, nc, N)

            def per_k(k0, klen, first):
                with kb.loop(0, m_blocks, 1, name="mb") as mb:
                    m0 = b.mul(mb, cg.i64(mc))
                    block(m0, extent(m0, mc, rows), n0, nlen, k0, klen, first)
            k_blocks(per_k)
            if scratch_y:
                _round_region(kb, acc_y, Y, cg.i64(0), rows, n0, nlen, N, lanes)
        chunks = math.ceil(N / nc)
    else:
        # a chunk is one (X block, W block) pair, X block major: a thread walks the W
        # blocks of one X block in turn (the X block stays cached), and a shape with a
        # single X block still splits over threads
        n_blocks = math.ceil(N / nc)
        with kb.loop(chunk_begin, chunk_end, 1, name="mn") as pair:
            m0 = b.mul(b.sdiv(pair, cg.i64(n_blocks)), cg.i64(mc))
            mlen = extent(m0, mc, rows)
            nb = b.srem(pair, cg.i64(n_blocks))
            n0 = b.mul(nb, cg.i64(nc))
            nlen = extent(n0, nc, N)
            if xpack:  # a new X block for this thread: pack all its K blocks
                fresh = b.or_(b.icmp_signed("==", nb, cg.i64(0)), b.icmp_signed("==", pair, chunk_begin))
                with b.if_then(fresh):
                    with kb.loop(0, K, kc, name="pxk") as k0:
                        pack_x(m0, mlen, k0, kb.min(kc, b.sub(cg.i64(K), k0)))
            k_blocks(lambda k0, klen, first: block(m0, mlen, n0, nlen, k0, klen, first))
            if scratch_y:
                _round_region(kb, acc_y, Y, m0, mlen, n0, nlen, N, lanes)
        if dynamic:
            def chunks(entry_kb: cg.KernelBuilder, entry_args: list) -> ir.Value:
                eb = entry_kb.b
                return eb.mul(eb.sdiv(eb.add(entry_args[n_ptr], cg.i64(mc - 1)), cg.i64(mc)), cg.i64(n_blocks))
        else:
            chunks = math.ceil(M / mc) * n_blocks
    kb.ret()

    cg.parallel_entry(module, name, body, n_pointers=n_ptr, n_scalars=n_scalars, threads=threads, n_chunks=chunks)
    workspace = _round_up(per_thread * threads, 64) + (4 * M * N if scratch_y else 0)
    args = tuple(signature) + (ArgSpec("workspace", "workspace", "uint8", (), nbytes=max(workspace, 64)),)
    args += tuple(ArgSpec(d, "scalar", "int64") for d in task.dynamic)
    return KernelSource("llvm", str(module), name, args, (("threads", threads),))
