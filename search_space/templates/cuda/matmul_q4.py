"""int4 weight-only matmul on CUDA, shared by ``gemv_q4`` and ``gemm_q4``.

Contract (``ops/matmul.py``): Y[M,N] = X[M,K] @ W[N,K]^T with W stored as 4-bit codes
``WQ[N, K/2]`` (low nibble first), per-group ``SCALES`` and optional ``ZEROS`` (group size
G = 32, 64 or 128 along K); ``w = (code - z) * scale``, z = 8 without zero points.

Two schedules (knob ``core``):

- ``mma`` (float16 / bfloat16): the weights are the A operand of m16n8k16 ``mma.sync`` and
  never touch shared memory. A warp owns ``rows`` tiles of 16 W rows. Per 128-wide step of
  K, lane 4g + t loads 16 bytes (32 codes, one group) of rows g and g + 8 of each tile and
  dequantises them in registers: ``(w & 0x000F000F) | 0x6400_6400`` is the half2 pair
  (1024 + c_j, 1024 + c_{j+4}) (0x4300 and 128 for bfloat16), minus (1024 + z) is exact,
  times the scale. Codes j and j + 4 of a word thus share a register, so the k order inside
  the mma is a permutation of the true one; X (the B operand, ``mtile`` x 8 rows per block)
  is staged in shared memory in that same permuted order, ``kc`` columns of K at a time,
  XOR-swizzled by 16-byte unit so the fragment loads of a quarter warp hit distinct banks.
  ``unroll`` steps of weights are in flight before the first is used (``prefetch`` 1 sends the
  first ones towards L2 before X is staged; 2, with X in one chunk, loads them into registers
  before X is staged and each next ``unroll`` steps while the current ones compute, so a
  decode GEMV, a few such rounds per warp, starts streaming at once); ``ksplit`` warps
  share rows and split K, meeting in shared memory. Pieces of K past the end get scale 0.
- ``simt`` (every dtype; the only one for float32): a block takes ``mtile`` x 8 rows of X
  (all of them for decode), a warp owns ``rows`` W rows, each lane
  reads 16-byte pieces (32 codes of one group) and multiplies them with float32 X on CUDA
  cores (``unroll`` pieces in flight): codes become floats exactly through the 2^23 magic
  number, the zero point is applied once per piece through the sum of the X values, the
  scale once per piece.

Rows of W past N read the last row and are not stored; rows of X past M read the last row.

Decode fusions (``gemv_q4``, ``ops/matmul.py``): with ``norm=rmsnorm`` X is normalised as it
is read. ``mma``: a first pass over X gathers each row's 1 / rms in shared memory, and X is
staged as x / rms * g, so the half-precision operand holds normalised values (x * g alone
could leave float16's range for small or large rows). ``simt``: x * g in float32 as each piece
is loaded, the sums of squares riding with the partial products, the rows' 1 / rms applied
to the finished sums. With ``residual`` the stored value is R + the sum. With ``act=swiglu`` a warp's ``rows`` (tiles) are output columns: it streams
the gate's rows and the up projection's N/2 rows further, twice as many, and stores
silu(gate) * up. A fused GEMV runs in the captured decode step and takes a programmatic launch
(``codegen.cuda_ptx.GRID_DEPENDENCY_HELPERS``): the lanes of each warp send the leading 128-byte
lines of its rows of codes towards L2, a line each (as many as keep the whole prefetch within a
quarter of L2: ``codegen.cuda_ptx.prefetch_lines``), and the first line of their scales, and the
pipelined schedule loads its first steps, while the kernel before it ends; it waits for that
kernel before it reads X or R, and lets the kernel after it launch once its main loop is done.
"""
from __future__ import annotations

import itertools
import math

from ...codegen.cuda import PREAMBLE, c_type
from ...codegen.cuda_ptx import (
    L2_LINE,
    PTX_HELPERS,
    grid_dependency_code,
    prefetch_lines,
    programmatic_launch,
)
from ...ops.common import ITEMSIZE
from ...ops.matmul import fusions, gated, is_fused, out_width
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource
from .gemv import fused_output, gate_up_row, rms_scale
from .limits import blocks_per_sm, launch_constraints, occupancy, smem_limit

STEP_K = 128  # K covered by one mma step of a warp (4 lanes x 32 codes)


def cores(task: Task) -> tuple[str, ...]:
    return ("mma", "simt") if task.dtype in ("float16", "bfloat16") else ("simt",)


def chunk_values(task: Task, m_rows: int, target: Target) -> tuple[int, ...]:
    """X chunk lengths along K: multiples of 128 up to K (rounded up), fitting in shared memory."""
    K = task.dims["K"]
    size = ITEMSIZE[task.dtype]
    whole = -(-K // STEP_K) * STEP_K
    values = [v for v in (256, 512, 1024, 2048, 4096) if v < whole] + [whole]
    fitting = tuple(v for v in values if m_rows * v * size <= smem_limit(target))
    return fitting or (STEP_K,)


def q4_knobs(task: Task, target: Target, mtiles: tuple[int, ...]) -> list[Knob]:
    M, K = task.dims["M"], task.dims["K"]
    m_rows = min(M, 8 * max(mtiles))
    span = STEP_K if "mma" in cores(task) else 1024  # K one warp of a split covers at least
    return [
        Knob("core", cores(task)),
        Knob("warps", (2, 4, 8)),
        Knob("rows", (1, 2, 4)),
        Knob("ksplit", tuple(v for v in (1, 2, 4, 8) if v == 1 or v * span <= K)),
        Knob("unroll", (1, 2, 4)),
        Knob("mtile", mtiles),
        Knob("kc", chunk_values(task, m_rows, target)),
        Knob("prefetch", (0, 1, 2) if "mma" in cores(task) else (0,)),
    ]


def q4_constraints(task: Task, target: Target, knobs: list[Knob]) -> list:
    K = task.dims["K"]
    by_name = {k.name: k.values for k in knobs}
    whole_k = by_name["kc"][-1]  # the largest chunk that fits: all of K only when that fits
    one_chunk = -(-K // STEP_K) * STEP_K
    return [
        ("ksplit divides warps", lambda c: c["warps"] % c["ksplit"] == 0),
        ("mma row tiles are 1 or 2 per warp (with act=swiglu: a gate and an up tile)",
         lambda c: c["core"] == "simt" or loaded_rows(task, c) <= 2),
        ("K split gives every warp work",
         lambda c: c["ksplit"] == 1 or c["ksplit"] * (STEP_K if c["core"] == "mma" else 1024) <= K),
        ("the SIMT schedule keeps at most 2 pieces in flight (4 spill its 32 floats of X a row)",
         lambda c: c["core"] == "mma" or c["unroll"] <= 2),
        ("the SIMT schedule has no K chunks (kc stays at its last value) and no prefetch",
         lambda c: c["core"] == "mma" or (c["kc"] == whole_k and c["prefetch"] == 0)),
        ("the pipelined weights (prefetch 2) need X in one chunk and at most 4 steps x row tiles a buffer",
         lambda c: c["prefetch"] < 2 or (c["kc"] == one_chunk and c["unroll"] * loaded_rows(task, c) <= 4)),
        ("split-K partials fit in shared memory",
         lambda c: c["ksplit"] == 1 or _partials(task, c) <= 32),
    ] + launch_constraints(target, lambda c: 32 * c["warps"], lambda c: smem_bytes(task, c),
                           lambda c: registers(task, c))


def loaded_rows(task: Task, c: dict) -> int:
    """W rows (SIMT) or row tiles (mma) a warp streams: ``rows``, twice that with ``act=swiglu``."""
    return c["rows"] * (2 if gated(task) else 1)


def _partials(task: Task, c: dict) -> int:
    """Floats per lane a K split exchanges through shared memory (SIMT with the norm: each X
    row's sum of squares too)."""
    if c["core"] == "mma":
        return loaded_rows(task, c) * c["mtile"] * 4
    return m_rows(task, c) * (loaded_rows(task, c) + fusions(task)[0])


def m_rows(task: Task, c: dict) -> int:
    return min(task.dims["M"], 8 * c["mtile"])


def smem_bytes(task: Task, c: dict) -> int:
    size = ITEMSIZE[task.dtype]
    red = 4 * 32 * c["warps"] * _partials(task, c) if c["ksplit"] > 1 else 0
    if c["core"] == "mma":
        return m_rows(task, c) * (c["kc"] * size + 4 * fusions(task)[0]) + red
    return red


def registers(task: Task, c: dict) -> int:
    zp = 2 if task.attr.get("zero_point") else 1
    rows = loaded_rows(task, c)
    if c["core"] == "mma":
        raw = c["unroll"] * rows * 2 * (4 + zp) * (2 if c["prefetch"] == 2 else 1)  # 2: two buffers
        return rows * c["mtile"] * 4 + raw + rows * 4 + c["mtile"] * 4 + 48
    # SIMT: fitted to ptxas on sm_90a (gemv_q4 and gemm_q4, M 1..128, 1-4 rows, fp32 and fp16):
    # the accumulators plus the X values each W row is multiplied by (up to 8 X rows at a time)
    norm = fusions(task)[0]
    m = m_rows(task, c)
    return (5 * m * rows) // 4 + m * norm + 6 * rows * min(m, 8) + c["unroll"] * rows * (4 + zp) + 32 * norm + 44


def rows_per_block(c: dict) -> int:
    per_warp = 16 * c["rows"] if c["core"] == "mma" else c["rows"]
    return per_warp * (c["warps"] // c["ksplit"])


def grid(task: Task, c: dict) -> tuple[int, int, int]:
    M, N = task.dims["M"], out_width(task)
    return (math.ceil(N / rows_per_block(c)), math.ceil(M / (8 * c["mtile"])), 1)


def q4_space(task: Task, target: Target, mtiles: tuple[int, ...]) -> ConfigSpace:
    knobs = q4_knobs(task, target, mtiles)
    return ConfigSpace(knobs, q4_constraints(task, target, knobs))


def q4_default(space: ConfigSpace, task: Task, target: Target) -> Config:
    """Tensor cores where the dtype allows; enough warps to cover memory latency (16 per SM
    for decode, 8 for larger M): decode has few 16-row tiles, so K is split between warps."""
    M, N = task.dims["M"], task.dims["N"]
    sms = target.sm_count or 132
    want = (16 if M <= 16 else 8) * sms
    kcs = space.knob("kc").values
    core = space.knob("core").values[0]
    tries = []
    # SIMT: 2 W rows a warp, else 1 where 2 would not fit in registers with this M tile
    for mtile, rows in itertools.product(sorted(space.knob("mtile").values, reverse=True),
                                         (1,) if core == "mma" else (2, 1)):
        for ksplit in (1, 2, 4):
            for kc in sorted(kcs, reverse=True) if core == "mma" else kcs[-1:]:
                for warps, unroll in ((4, 2), (4, 1), (2, 1), (8, 2)):
                    values = {"core": core, "warps": warps, "rows": rows, "ksplit": ksplit, "unroll": unroll,
                              "mtile": mtile, "kc": kc, "prefetch": 1 if core == "mma" else 0}
                    per_warp = 16 * rows if core == "mma" else rows
                    warps_total = math.ceil(N / per_warp) * ksplit * math.ceil(M / (8 * mtile))
                    tries.append((min(warps_total, want), values))
    # the first valid config with enough warps, else the one with the most warps
    best = None
    for warps_total, values in tries:
        if space.accepts(values) and (best is None or warps_total > best[0]):
            best = (warps_total, values)
    return space.from_values(best[1]) if best else next(iter(space))


def q4_features(op, task: Task, config: Config, target: Target) -> dict[str, float]:
    M, K = task.dims["M"], task.dims["K"]
    c = config.as_dict()
    threads = 32 * c["warps"]
    gx, gy, _ = grid(task, c)
    blocks = gx * gy
    smem = smem_bytes(task, c)
    resident = max(blocks_per_sm(threads, smem, registers(task, c), target), 1)
    sms = target.sm_count or 132
    size = ITEMSIZE[task.dtype]
    norm, residual = fusions(task)
    weights = op.min_bytes(task) - size * (M * K + M * out_width(task) * (1 + residual) + K * norm)
    moved = weights * gy + size * ((M + norm) * K * gx + M * out_width(task) * (1 + residual))
    return {
        "threads": threads,
        "vector_lanes": 32,
        "unroll": c["unroll"],
        "accumulators": _partials(task, c),
        "parallel_chunks": blocks,
        "chunks_per_thread": blocks / (sms * resident),
        "waves": blocks / (sms * resident),
        "tile_bytes_l1": float(m_rows(task, c) * c["kc"] * size) if c["core"] == "mma" else 0.0,
        "shared_bytes": smem,
        "registers": registers(task, c),
        "occupancy": occupancy(threads, smem, registers(task, c), target),
        "bytes_moved": moved,
        "arith_intensity": op.flops(task) / moved,
        "packed": 1.0 if c["core"] == "mma" else 0.0,
        "n_tail_fraction": (gx * rows_per_block(c) - out_width(task)) / out_width(task),
        "m_tail_fraction": (gy * 8 * c["mtile"] - M) / M,
        "k_tail_fraction": (-K % STEP_K) / K if c["core"] == "mma" else 0.0,
    }


def q4_render(op, task: Task, config: Config, target: Target) -> KernelSource:
    c = config.as_dict()
    code = mma_code(task, c, target) if c["core"] == "mma" else simt_code(task, c, target)
    smem = m_rows(task, c) * c["kc"] * ITEMSIZE[task.dtype] if c["core"] == "mma" else 0
    launch = (("block", (32 * c["warps"], 1, 1)), ("grid", grid(task, c)), ("smem", smem))
    return KernelSource("cuda", code, op.op, op.signature(task),
                        launch + (programmatic_launch(target) if is_fused(task) else ()))


def _params(task: Task, zp: bool) -> str:
    """The kernel's parameters (``MatmulQ4.signature``)."""
    norm, residual = fusions(task)
    return ("const T_* __restrict__ X, " + ("const T_* __restrict__ G, " if norm else "")
            + "const uint8_t* __restrict__ WQ,\n    const T_* __restrict__ SCALES"
            + (", const T_* __restrict__ ZEROS" if zp else "") + (", const T_* __restrict__ R" if residual else "")
            + ", T_* __restrict__ Y")


def _reduce_and_store(task: Task, c: dict, values: str, count: int, store: str) -> str:
    """Sum ``count`` per-lane partials over the K-split warps of a row group, then ``store``."""
    KS = c["ksplit"]
    if KS == 1:
        return store
    groups = c["warps"] // KS
    return f"""
  __shared__ float red[{groups}][{KS}][{count}][32];
  #pragma unroll
  for (int v = 0; v < {count}; ++v) red[group][part][v][lane] = {values}[v];
  __syncthreads();
  if (part == 0) {{
    #pragma unroll
    for (int v = 0; v < {count}; ++v) {{
      float s = 0.0f;
      #pragma unroll
      for (int p = 0; p < {KS}; ++p) s += red[group][p][v][lane];
      {values}[v] = s;
    }}
{store}
  }}"""


# ----------------------------------------------------------------------------- mma


def mma_code(task: Task, c: dict, target: Target) -> str:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    attrs = task.attr
    G = attrs.get("group_size", 128)
    zp = bool(attrs.get("zero_point", False))
    T = c_type(task.dtype)
    bf16 = task.dtype == "bfloat16"
    T2 = "__nv_bfloat162" if bf16 else "__half2"
    magic = "0x43004300u" if bf16 else "0x64006400u"
    bias = 128.0 if bf16 else 1024.0
    RO, NT, U, KS, WARPS = c["rows"], c["mtile"], c["unroll"], c["ksplit"], c["warps"]  # RO: output tiles a warp owns
    RW = loaded_rows(task, c)  # W row tiles it streams
    glu = gated(task)
    NO = out_width(task)
    KC = c["kc"]
    MR = m_rows(task, c)
    threads = 32 * WARPS
    rpb = rows_per_block(c)
    units_row = KC // 8
    norm = fusions(task)[0]
    helpers, trigger, wait = grid_dependency_code(is_fused(task))
    zero_line = "\n        prefetch_l2(ZEROS + row_off_s[rt][h]);" if zp else ""
    trigger_line = trigger.lstrip("\n") + "\n" if trigger else ""  # after the main loop
    if wait:  # the leading lines of the warp's rows (g and g + 8 of each tile) head for L2 while the kernel before ends
        wait = f"""
  for (int j = part * 4 + t; j < {prefetch_lines(target, N, K // 2)}; j += {KS * 4}) {{
    #pragma unroll
    for (int rt = 0; rt < {RW}; ++rt)
      #pragma unroll
      for (int h = 0; h < 2; ++h) prefetch_l2(WQ + row_off_q[rt][h] + j * {L2_LINE});
  }}
  if (part == 0 && t == 0) {{  // and the first line of their scales{" and zero points" if zp else ""}
    #pragma unroll
    for (int rt = 0; rt < {RW}; ++rt)
      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        prefetch_l2(SCALES + row_off_s[rt][h]);{zero_line}
      }}
  }}""" + wait
    if zp:
        zero_load = "zr[u][rt][h] = inb ? ZEROS[row_off_s[rt][h] + grp] : T_(0.0f);"
        zero_value = f"__hadd2(h2(zr[u][rt][h]), h2(T_({bias}f)))"
    else:
        zero_load = ""
        zero_value = f"h2(T_({bias + 8.0}f))"
    zero_regs = f"T_ zr[{U}][{RW}][2];" if zp else ""
    if glu:  # tile rt < RO: the gate's rows; RO + rt: the up projection's, N/2 further
        row_of_tile = f"""      long long n = nb + (rt % {RO}) * 16 + g + h * 8;
      n = {gate_up_row(task, "n", f"rt >= {RO}")};"""
    else:
        row_of_tile = f"""      long long n = nb + rt * 16 + g + h * 8;
      n = n < {N} ? n : {N - 1};"""
    ssq_decl = f"""
  __shared__ float ssq[{MR}];  // each X row's sum of squares, then its 1 / rms (the norm)
  if (threadIdx.x < {MR}) ssq[threadIdx.x] = 0.0f;""" if norm else ""
    # the norm's first pass: every row's 1 / rms before X is staged (reads of X hit L2 / L1)
    row_scales = f"""  __syncthreads();  // the row sums are zeroed
  for (int i = threadIdx.x; i < {MR * (K // 8)}; i += {threads}) {{
    const int row = i / {K // 8};
    const int m = mx0 + row < {M} ? mx0 + row : {M - 1};
    float xf[8];
    unpack_f32<T_, 16>(ld_cached<16>(X + (long long)m * {K} + (i % {K // 8}) * 8), xf);
    float sq = 0.0f;
    #pragma unroll
    for (int e = 0; e < 8; ++e) sq = fmaf(xf[e], xf[e], sq);
    atomicAdd(&ssq[row], sq);
  }}
  __syncthreads();
  if (threadIdx.x < {MR}) ssq[threadIdx.x] = {rms_scale(task, "ssq[threadIdx.x]")};
  __syncthreads();
""" if norm else ""
    prefetch = ""
    if c["prefetch"] == 1:  # the first weights head for L2 while X is staged
        prefetch = f"""
  #pragma unroll
  for (int u = 0; u < {U}; ++u) {{
    const int kb = (part + u * {KS}) * {STEP_K} + 32 * t;
    if (kb < {K}) {{
      #pragma unroll
      for (int rt = 0; rt < {RW}; ++rt)
        #pragma unroll
        for (int h = 0; h < 2; ++h) prefetch_l2(WQ + row_off_q[rt][h] + kb / 2);
    }}
  }}"""
    # output tile rt (with act=swiglu: its gate in accumulator tile rt, its up in tile RO + rt)
    up = f"acc[(({RO} + rt) * {NT} + nt) * 4 + e]" if glu else ""
    store = f"""
  #pragma unroll
  for (int rt = 0; rt < {RO}; ++rt)
    #pragma unroll
    for (int nt = 0; nt < {NT}; ++nt)
      #pragma unroll
      for (int e = 0; e < 4; ++e) {{
        const long long n = nb + rt * 16 + g + (e >> 1) * 8;
        const int m = mx0 + nt * 8 + 2 * t + (e & 1);
        if (n < {NO} && m < {M}) Y[(long long)m * {NO} + n] = {fused_output(task, f"acc[(rt * {NT} + nt) * 4 + e]", "m", "n", None, up)};
      }}"""

    # the norm: x / rms * g as it is staged
    norm_x = """
        {
          float xf[8], gf[8];
          unpack_f32<T_, 16>(x, xf);
          unpack_f32<T_, 16>(ld_cached<16>(G + k), gf);
          const float scale = ssq[row];
          T_ h[8];
          #pragma unroll
          for (int e = 0; e < 8; ++e) h[e] = from_f32<T_>(xf[e] * scale * gf[e]);
          memcpy(&x, h, 16);
        }""" if norm else ""
    stage_x = f"""    for (int i = threadIdx.x; i < {MR * units_row}; i += {threads}) {{
      const int row = i / {units_row};
      const int q = i % {units_row};
      const int k = c0 + q * 8;
      RawVec<16> v;
      if (k < {K}) {{
        const int m = mx0 + row < {M} ? mx0 + row : {M - 1};
        {"" if norm else "const "}RawVec<16> x = ld_cached<16>(X + (long long)m * {K} + k);{norm_x}
        // k order inside a unit becomes 0,4,1,5,2,6,3,7: the order codes are paired in
        v.w[0] = __byte_perm(x.w[0], x.w[2], 0x5410);
        v.w[1] = __byte_perm(x.w[0], x.w[2], 0x7632);
        v.w[2] = __byte_perm(x.w[1], x.w[3], 0x5410);
        v.w[3] = __byte_perm(x.w[1], x.w[3], 0x7632);
      }} else {{
        v.w[0] = v.w[1] = v.w[2] = v.w[3] = 0u;
      }}
      xs[xunit(row, q)] = v;
    }}
"""
    compute = f"""      #pragma unroll
      for (int u = 0; u < {U}; ++u) {{
        const int s = s0 + u * {KS};
        if (s < steps) {{
          T2_ scale2[{RW}][2], zero2[{RW}][2];
          #pragma unroll
          for (int rt = 0; rt < {RW}; ++rt)
            #pragma unroll
            for (int h = 0; h < 2; ++h) {{
              scale2[rt][h] = h2(sc[u][rt][h]);
              zero2[rt][h] = {zero_value};
            }}
          #pragma unroll
          for (int i = 0; i < 4; ++i) {{
            RawVec<16> xv[{NT}];
            #pragma unroll
            for (int nt = 0; nt < {NT}; ++nt) {{
              const int row = nt * 8 + g < {MR} ? nt * 8 + g : {MR - 1};
              xv[nt] = xs[xunit(row, s * {STEP_K // 8} + 4 * t + i)];
            }}
            #pragma unroll
            for (int hh = 0; hh < 2; ++hh) {{
              unsigned a[{RW}][4];
              #pragma unroll
              for (int rt = 0; rt < {RW}; ++rt)
                #pragma unroll
                for (int h = 0; h < 2; ++h)
                  #pragma unroll
                  for (int j = 0; j < 2; ++j) {{
                    const unsigned codes = ((wr[u][rt][h].w[i] >> (4 * (2 * hh + j))) & 0x000F000Fu) | {magic};
                    a[rt][h + 2 * j] = as_u32(__hmul2(__hsub2(as_h2(codes), zero2[rt][h]), scale2[rt][h]));
                  }}
              #pragma unroll
              for (int nt = 0; nt < {NT}; ++nt) {{
                const unsigned b[2] = {{xv[nt].w[2 * hh], xv[nt].w[2 * hh + 1]}};
                #pragma unroll
                for (int rt = 0; rt < {RW}; ++rt) mma_16816<T_>(&acc[(rt * {NT} + nt) * 4], a[rt], b);
              }}
            }}
          }}
        }}
      }}
"""

    def load_steps(w: str, sc: str, zr: str, first: str) -> str:
        """Loads of the weights, scales (and zero points) of the ``U`` steps from ``first`` on
        into the registers ``w``, ``sc`` (and ``zr``)."""
        zl = zero_load.replace("zr[", zr + "[")
        return f"""      #pragma unroll
      for (int u = 0; u < {U}; ++u) {{
        const int kb = c0 + ({first} + u * {KS}) * {STEP_K} + 32 * t;
        const bool inb = {first} + u * {KS} < steps && kb < {K};
        const int grp = kb / {G};
        #pragma unroll
        for (int rt = 0; rt < {RW}; ++rt)
          #pragma unroll
          for (int h = 0; h < 2; ++h) {{
            if (inb) {w}[u][rt][h] = ld_stream<16>(WQ + row_off_q[rt][h] + kb / 2);
            else {w}[u][rt][h].w[0] = {w}[u][rt][h].w[1] = {w}[u][rt][h].w[2] = {w}[u][rt][h].w[3] = 0u;
            {sc}[u][rt][h] = inb ? SCALES[row_off_s[rt][h] + grp] : T_(0.0f);  // scale 0: no contribution
            {zl}
          }}
      }}
"""

    if c["prefetch"] < 2:
        main_loop = f"""  for (int c0 = 0; c0 < {K}; c0 += {KC}) {{
    __syncthreads();  // the previous chunk of X is no longer read
{stage_x}    __syncthreads();
    const int steps = (min({KC}, {K} - c0) + {STEP_K - 1}) / {STEP_K};
    for (int s0 = part; s0 < steps; s0 += {KS * U}) {{
      RawVec<16> wr[{U}][{RW}][2];
      T_ sc[{U}][{RW}][2];
      {zero_regs}
{load_steps("wr", "sc", "zr", "s0")}{compute}    }}
  }}
"""
    else:  # one chunk of X: the first steps' weights load before X is staged, the next ones' while these compute
        zero_next = f"T_ zn[{U}][{RW}][2];" if zp else ""
        zero_copy = "zr[u][rt][h] = zn[u][rt][h];" if zp else ""
        main_loop = f"""  const int c0 = 0;
  const int steps = {-(-K // STEP_K)};
  RawVec<16> wn[{U}][{RW}][2];
  T_ sn[{U}][{RW}][2];
  {zero_next}
{load_steps("wn", "sn", "zn", "part")}{wait}{row_scales}{stage_x}  __syncthreads();
  for (int s0 = part; s0 < steps; s0 += {KS * U}) {{
      RawVec<16> wr[{U}][{RW}][2];
      T_ sc[{U}][{RW}][2];
      {zero_regs}
      #pragma unroll
      for (int u = 0; u < {U}; ++u)
        #pragma unroll
        for (int rt = 0; rt < {RW}; ++rt)
          #pragma unroll
          for (int h = 0; h < 2; ++h) {{
            wr[u][rt][h] = wn[u][rt][h];
            sc[u][rt][h] = sn[u][rt][h];
            {zero_copy}
          }}
{load_steps("wn", "sn", "zn", f"s0 + {KS * U}")}{compute}  }}
"""
    return PREAMBLE + PTX_HELPERS + helpers + f"""
typedef {T} T_;
typedef {T2} T2_;

__device__ __forceinline__ T2_ h2(T_ v) {{ T2_ r; r.x = v; r.y = v; return r; }}
__device__ __forceinline__ T2_ as_h2(unsigned u) {{ T2_ r; memcpy(&r, &u, 4); return r; }}
__device__ __forceinline__ unsigned as_u32(T2_ v) {{ unsigned u; memcpy(&u, &v, 4); return u; }}

// 16-byte unit q of X row `row` in shared memory: XOR-swizzled within aligned groups of 4 units.
__device__ __forceinline__ int xunit(int row, int q) {{ return row * {units_row} + (q ^ (((q >> 3) & 1) << 1) ^ (row & 1)); }}

extern "C" __global__ void __launch_bounds__({threads}) {task.op}({_params(task, zp)}) {{
  extern __shared__ __align__(16) unsigned char smem_raw[];
  RawVec<16>* xs = reinterpret_cast<RawVec<16>*>(smem_raw);{ssq_decl}
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = warp / {KS};
  const int part = warp % {KS};
  const int g = lane >> 2;
  const int t = lane & 3;
  const long long nb = (long long)blockIdx.x * {rpb} + group * {16 * RO};
  const int mx0 = blockIdx.y * {8 * NT};

  long long row_off_q[{RW}][2], row_off_s[{RW}][2];
  #pragma unroll
  for (int rt = 0; rt < {RW}; ++rt)
    #pragma unroll
    for (int h = 0; h < 2; ++h) {{
{row_of_tile}
      row_off_q[rt][h] = n * {K // 2};
      row_off_s[rt][h] = n * {K // G};
    }}
  float acc[{RW * NT * 4}];
  #pragma unroll
  for (int i = 0; i < {RW * NT * 4}; ++i) acc[i] = 0.0f;

{prefetch}{wait if c["prefetch"] < 2 else ""}
{row_scales if c["prefetch"] < 2 else ""}{main_loop}{trigger_line}{_reduce_and_store(task, c, "acc", RW * NT * 4, store)}
}}
"""


# ----------------------------------------------------------------------------- SIMT


def simt_code(task: Task, c: dict, target: Target) -> str:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    attrs = task.attr
    G = attrs.get("group_size", 128)
    zp = bool(attrs.get("zero_point", False))
    T = c_type(task.dtype)
    size = ITEMSIZE[task.dtype]
    RO, KS, WARPS, U = c["rows"], c["ksplit"], c["warps"], c["unroll"]  # RO: output columns a warp owns
    R = loaded_rows(task, c)  # W rows it streams
    glu = gated(task)
    NO = out_width(task)
    MT = m_rows(task, c)  # X rows of this block
    threads = 32 * WARPS
    rpb = rows_per_block(c)
    pieces = K // 32
    xbytes = 16
    xvecs = 32 * size // xbytes  # 16-byte loads per 32 X values
    per_vec = xbytes // size
    norm = fusions(task)[0]
    sums = MT * R + MT * norm  # the partial products, then each X row's sum of squares (the norm)
    zero_load = "z[u][r] = to_f32(ZEROS[row_off_s[r] + grp]);" if zp else "z[u][r] = 8.0f;"
    # column r (with act=swiglu: its gate in accumulator r, its up in RO + r)
    up = f"acc[m * {R} + {RO} + r]" if glu else ""
    store = f"""
  if (lane == 0) {{
    #pragma unroll
    for (int r = 0; r < {RO}; ++r) {{
      const long long n = n0 + r;
      if (n < {NO}) {{
        #pragma unroll
        for (int m = 0; m < {MT}; ++m)
          if (m0 + m < {M}) Y[(long long)(m0 + m) * {NO} + n] = {fused_output(task, f"acc[m * {R} + r]", "m0 + m", "n", f"acc[{MT * R} + m]", up)};
      }}
    }}
  }}"""
    if glu:  # column n's gate row, then its up row N/2 further
        row_of = f"""    const long long n = {gate_up_row(task, f"n0 + r % {RO}", f"r >= {RO}")};"""
    else:
        row_of = f"""    const long long n = n0 + r < {N} ? n0 + r : {N - 1};"""
    g_load = f"""
        float gw[32];
        #pragma unroll
        for (int v = 0; v < {xvecs}; ++v)
          unpack_f32<T_, {xbytes}>(ld_cached<{xbytes}>(G + k + v * {per_vec}), gw + v * {per_vec});""" if norm else ""
    x_norm = f"""
          #pragma unroll
          for (int j = 0; j < 32; ++j) {{
            acc[{MT * R} + m] = fmaf(x[j], x[j], acc[{MT * R} + m]);
            x[j] *= gw[j];
          }}""" if norm else ""
    helpers, trigger, wait = grid_dependency_code(is_fused(task))
    zero_line = "\n      prefetch_l2(ZEROS + row_off_s[r]);" if zp else ""
    if wait:  # the leading lines of the warp's rows head for L2 (a lane a line) while the kernel before ends
        wait = f"""
  for (int j = part * 32 + lane; j < {prefetch_lines(target, N, K // 2)}; j += {KS * 32}) {{
    #pragma unroll
    for (int r = 0; r < {R}; ++r) prefetch_l2(WQ + row_off_q[r] + j * {L2_LINE});
  }}
  if (part == 0 && lane == 0) {{  // and the first line of their scales{" and zero points" if zp else ""}
    #pragma unroll
    for (int r = 0; r < {R}; ++r) {{
      prefetch_l2(SCALES + row_off_s[r]);{zero_line}
    }}
  }}""" + wait
    return PREAMBLE + PTX_HELPERS + helpers + f"""
typedef {T} T_;

extern "C" __global__ void __launch_bounds__({threads}) {task.op}({_params(task, zp)}) {{
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = warp / {KS};
  const int part = warp % {KS};
  const long long n0 = (long long)blockIdx.x * {rpb} + group * {RO};
  const int m0 = blockIdx.y * {MT};
  long long row_off_q[{R}], row_off_s[{R}];
  #pragma unroll
  for (int r = 0; r < {R}; ++r) {{
{row_of}
    row_off_q[r] = n * {K // 2};
    row_off_s[r] = n * {K // G};
  }}{wait}
  float acc[{sums}];
  #pragma unroll
  for (int i = 0; i < {sums}; ++i) acc[i] = 0.0f;
  for (int p0 = part * 32 + lane; p0 < {pieces}; p0 += {KS * 32 * U}) {{
    RawVec<16> w[{U}][{R}];
    float s[{U}][{R}], z[{U}][{R}];
    #pragma unroll
    for (int u = 0; u < {U}; ++u) {{
      const int p = p0 + u * {KS * 32};
      if (p < {pieces}) {{
        const int k = p * 32;
        const int grp = k / {G};
        #pragma unroll
        for (int r = 0; r < {R}; ++r) {{
          w[u][r] = ld_stream<16>(WQ + row_off_q[r] + k / 2);
          s[u][r] = to_f32(SCALES[row_off_s[r] + grp]);
          {zero_load}
        }}
      }}
    }}
    #pragma unroll
    for (int u = 0; u < {U}; ++u) {{
      const int p = p0 + u * {KS * 32};
      if (p < {pieces}) {{
        const int k = p * 32;{g_load}
        #pragma unroll
        for (int m = 0; m < {MT}; ++m) {{
          const long long xm = m0 + m < {M} ? m0 + m : {M - 1};
          float x[32];
          #pragma unroll
          for (int v = 0; v < {xvecs}; ++v)
            unpack_f32<T_, {xbytes}>(ld_cached<{xbytes}>(X + xm * {K} + k + v * {per_vec}), x + v * {per_vec});{x_norm}
          float xsum = 0.0f;
          #pragma unroll
          for (int j = 0; j < 32; ++j) xsum += x[j];
          #pragma unroll
          for (int r = 0; r < {R}; ++r) {{
            float dot = 0.0f;
            #pragma unroll
            for (int i = 0; i < 4; ++i)
              #pragma unroll
              for (int j = 0; j < 8; ++j) {{
                // 2^23 + code, exactly, minus 2^23: the code as a float
                const float code = __uint_as_float(((w[u][r].w[i] >> (4 * j)) & 0xFu) | 0x4B000000u) - 8388608.0f;
                dot = fmaf(x[8 * i + j], code, dot);
              }}
            acc[m * {R} + r] = fmaf(s[u][r], dot - z[u][r] * xsum, acc[m * {R} + r]);
          }}
        }}
      }}
    }}
  }}{trigger}
  #pragma unroll
  for (int i = 0; i < {sums}; ++i) acc[i] = warp_sum(acc[i]);
{_reduce_and_store(task, c, "acc", sums, store)}
}}
"""
