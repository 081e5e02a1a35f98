"""``gemv`` on CUDA: the decode-time linear layer Y[M,N] = X[M,K] @ W[N,K]^T, M = 1..16.

Decode is a stream over W: every weight is read once and used M times, so the kernel's
job is to keep enough bytes in flight to saturate HBM. Schedule: a warp owns ``rows``
rows of W; its lanes read consecutive ``vec``-byte pieces of those rows (one coalesced
512-byte request per warp and row for 16-byte loads), ``unroll`` pieces per row in flight
before the first use, through the non-coherent path without allocating in L1 (weights are
read once). Each loaded W vector meets every X row: X comes from L1 (``x_smem`` = 0) or is
staged once per block in shared memory (1). ``ksplit`` warps share the same rows and
split K between them; their partial sums meet in shared memory. Sums are float32 and are
reduced across the warp with shuffles. Rows past N read the last row (in bounds) and are
never stored; K needs no tail beyond the last ``vec`` piece because ``vec`` divides K.

Decode fusions (``ops/matmul.py``): with ``norm=rmsnorm`` each X value a lane loads is also
squared into that row's sum (the warps of a K split cover K once between them, and their sums
meet with the partial products) and multiplied by the norm weight before use; the rows' scale
1 / rms(X) is applied to the finished sums. With ``residual`` the stored value is R + the sum.
With ``act=swiglu`` a warp's ``rows`` are output columns: it streams each one's gate row and
its up row (N/2 rows further), 2 x ``rows`` rows in all, and stores silu(gate) * up.
W streams from the first instruction either way. A fused GEMV runs in the captured decode step,
so it also takes a programmatic launch (``codegen.cuda_ptx.GRID_DEPENDENCY_HELPERS``): the lanes
of a warp send the leading 128-byte lines of its rows towards L2, a line each (as many as keep
the whole prefetch within a quarter of L2, ``codegen.cuda_ptx.prefetch_lines``), then wait for
the kernel before it to finish, and only then read X or R or write Y (W and G are constant).
It lets the kernel after it launch once its main loop is done: that kernel's prefetch then
meets this one's tail, not lines this one still streams through L2.
"""
from __future__ import annotations

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
from ...ops.matmul import GemvOp, fusions, gated, is_fused, norm_eps, out_width
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .limits import blocks_per_sm, launch_constraints, occupancy, smem_limit


def vector_bytes(task: Task) -> tuple[int, ...]:
    """Load widths (bytes) whose element count divides K, so no piece straddles a row end."""
    size = ITEMSIZE[task.dtype]
    widths = tuple(b for b in (16, 8, 4) if b >= size and task.dims["K"] % (b // size) == 0)
    return widths or (size,)


@register_template
class GemvCuda(GemvOp, Template):
    target_kind = "cuda"
    dtypes = ("float16", "bfloat16", "float32")
    fusable = True

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        M, N, K = (task.dims[d] for d in ("M", "N", "K"))
        size = ITEMSIZE[task.dtype]
        x_bytes = M * K * size
        narrowest = 32 * min(vector_bytes(task)) // size  # K one warp covers per step, at least
        knobs = [
            Knob("warps", (1, 2, 4, 8)),
            Knob("rows", tuple(r for r in (1, 2, 4) if r <= N)),
            Knob("ksplit", tuple(v for v in (1, 2, 4, 8) if v == 1 or v * narrowest <= K)),
            Knob("vec", vector_bytes(task)),
            Knob("unroll", tuple(v for v in (1, 2, 4) if v == 1 or v * narrowest <= K)),
            Knob("x_smem", (0, 1) if x_bytes <= smem_limit(target) // 2 else (0,)),
        ]
        constraints = [
            ("ksplit divides warps", lambda c: c["warps"] % c["ksplit"] == 0),
            ("every warp of a K split gets a piece of K",
             lambda c: c["ksplit"] == 1 or c["ksplit"] * 32 * (c["vec"] // size) <= K),
            ("unrolled pieces fit in K", lambda c: c["unroll"] == 1
             or c["ksplit"] * 32 * (c["vec"] // size) * c["unroll"] <= K),
        ]
        constraints += launch_constraints(target, lambda c: 32 * c["warps"], lambda c: _smem_bytes(task, c),
                                          lambda c: _registers(task, c))
        return ConfigSpace(knobs, constraints)

    def seed_configs(self, task: Task, target: Target) -> list[dict]:
        """Decode GEMV schedules that stream W well on Hopper (hand-picked on the H200; K split
        over 8 warps was the best of 22016x4096 there and is the one that fills the SMs when N
        has few rows, as in 4096x4096)."""
        return [dict(warps=w, rows=r, ksplit=k, vec=16, unroll=u, x_smem=0)
                for w, r, k, u in ((4, 1, 1, 4), (8, 1, 8, 2), (4, 2, 1, 4), (8, 2, 8, 2), (8, 1, 1, 4), (8, 2, 2, 2),
                                   (4, 4, 1, 2), (8, 1, 2, 4), (2, 2, 1, 4), (4, 1, 4, 2))]

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        vec = space.knob("vec").values[0]
        rows = 2 if task.dims["M"] <= 4 else 1
        for values in ({"warps": 4, "rows": rows, "ksplit": 1, "vec": vec, "unroll": 4, "x_smem": 0},
                       {"warps": 4, "rows": rows, "ksplit": 1, "vec": vec, "unroll": 2, "x_smem": 0},
                       {"warps": 4, "rows": 1, "ksplit": 1, "vec": vec, "unroll": 1, "x_smem": 0}):
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        M, N, K = (task.dims[d] for d in ("M", "N", "K"))
        c = config.as_dict()
        size = ITEMSIZE[task.dtype]
        lanes = c["vec"] // size
        threads = 32 * c["warps"]
        rows_per_block = c["rows"] * c["warps"] // c["ksplit"]
        blocks = _blocks(task, c)
        loaded = _loaded_rows(task, c)
        smem = _smem_bytes(task, c)
        resident = max(blocks_per_sm(threads, smem, _registers(task, c), target), 1)
        sms = target.sm_count or 132
        norm, residual = fusions(task)
        x_reads = blocks * (M + norm) * K * size  # every block reads all of X (and G) from L1/L2
        moved = size * (N * K + M * out_width(task) * (1 + residual)) + x_reads
        return {
            "threads": threads,
            "vector_lanes": lanes,
            "unroll": c["unroll"],
            "accumulators": M * loaded,
            "loads_per_fma": (M + loaded) / (M * loaded),
            "parallel_chunks": blocks,
            "chunks_per_thread": blocks / (sms * resident),
            "waves": blocks / (sms * resident),
            "tile_bytes_l1": float(c["vec"] * c["unroll"] * loaded * threads),
            "shared_bytes": smem,
            "registers": _registers(task, c),
            "occupancy": occupancy(threads, smem, _registers(task, c), target),
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": c["ksplit"] * 32 / max(K / lanes, 1),
            "n_tail_fraction": (blocks * rows_per_block - out_width(task)) / out_width(task),
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        launch = (("block", (32 * config["warps"], 1, 1)), ("grid", (_blocks(task, config.as_dict()), 1, 1)),
                  ("smem", _dynamic_smem(task, config.as_dict())))
        return KernelSource("cuda", _code(task, config.as_dict(), target), "gemv", self.signature(task),
                            launch + (programmatic_launch(target) if is_fused(task) else ()))


def _blocks(task: Task, c: dict) -> int:
    return math.ceil(out_width(task) / (c["rows"] * c["warps"] // c["ksplit"]))


def _loaded_rows(task: Task, c: dict) -> int:
    """W rows a warp streams: its ``rows``, twice that with ``act=swiglu`` (gate and up rows)."""
    return c["rows"] * (2 if gated(task) else 1)


def _dynamic_smem(task: Task, c: dict) -> int:
    return task.dims["M"] * task.dims["K"] * ITEMSIZE[task.dtype] if c["x_smem"] else 0


def _smem_bytes(task: Task, c: dict) -> int:
    norm = fusions(task)[0]
    reduce = 4 * task.dims["M"] * (_loaded_rows(task, c) + norm) * c["warps"] if c["ksplit"] > 1 else 0
    return _dynamic_smem(task, c) + reduce


def _registers(task: Task, c: dict) -> int:
    words = max(c["vec"] // 4, 1)
    lanes = c["vec"] // ITEMSIZE[task.dtype]
    norm = fusions(task)[0]
    rows = _loaded_rows(task, c)
    return (task.dims["M"] * (rows + norm) + c["unroll"] * rows * words + rows * lanes
            + lanes * (1 + norm) + 24)


def rms_scale(task: Task, ss: str) -> str:
    """The C expression 1 / rms of an X row from its sum of squares ``ss`` (``norm=rmsnorm``)."""
    return f"rsqrtf({ss} * {1.0 / task.dims['K']!r}f + {norm_eps(task)!r}f)"


def gate_up_row(task: Task, column: str, up: str) -> str:
    """The C expression of the W row a gated GEMV (``act=swiglu``) streams for output column
    ``column`` (clamped to the last column: never stored): the gate's, or where ``up`` holds the
    up projection's, N/2 rows further."""
    width = out_width(task)
    return f"({column} < {width} ? {column} : {width - 1}) + ({up} ? {width} : 0)"


def fused_output(task: Task, value: str, m: str, n: str, ss: str | None, up: str = "") -> str:
    """The C expression a decode GEMV stores at Y[m, n] from the finished float sum ``value``
    (with ``act=swiglu``: the gate's, and ``up`` the up projection's): each scaled by
    1 / rms(X row m) from its sum of squares ``ss`` with ``norm=rmsnorm`` (None: the sums are of
    normalised X already), then silu(gate) * up, plus R[m, n] with ``residual``
    (``ops/matmul.py``); in the task's dtype."""
    norm, residual = fusions(task)
    scale = f" * {rms_scale(task, ss)}" if norm and ss is not None else ""
    out = f"{value}{scale}"
    if up:
        gate = f"({out})"
        out = f"{gate} / (1.0f + __expf(-{gate})) * ({up}{scale})"
    if residual:
        out = f"{out} + to_f32(R[(long long)({m}) * {out_width(task)} + ({n})])"
    return f"from_f32<T_>({out})"


def _code(task: Task, c: dict, target: Target) -> str:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    T = c_type(task.dtype)
    size = ITEMSIZE[task.dtype]
    VB = c["vec"]
    V = VB // size
    RO, U, WARPS, KS = c["rows"], c["unroll"], c["warps"], c["ksplit"]  # RO: output columns a warp owns
    R = _loaded_rows(task, c)  # W rows it streams
    glu = gated(task)
    NO = out_width(task)
    GROUPS = WARPS // KS
    STRIDE = KS * 32 * V  # elements between one warp's consecutive pieces of a row
    STEP = STRIDE * U
    KMAIN = K // STEP * STEP
    norm, residual = fusions(task)
    x_src = "xs" if c["x_smem"] else "X"
    x_load = (f"*reinterpret_cast<const RawVec<{VB}>*>(xs + m * K_ + k)" if c["x_smem"]
              else f"ld_cached<{VB}>(X + m * K_ + k)")
    stage_x = ""
    if c["x_smem"]:
        stage_x = f"""
  extern __shared__ __align__(16) unsigned char smem_raw[];
  {T}* xs = reinterpret_cast<{T}*>(smem_raw);
  for (int i = threadIdx.x; i < M_ * K_ / {V}; i += {32 * WARPS})
    *reinterpret_cast<RawVec<{VB}>*>(xs + i * {V}) = ld_cached<{VB}>(X + i * {V});
  __syncthreads();"""
    # the norm: the lane's X values squared into ss (before the weight G scales them)
    ss_param = ", float (&ss)[M_], const T_* __restrict__ G" if norm else ""
    ss_args = ", ss, G" if norm else ""
    g_load = f"""
  float gf[{V}];
  unpack_f32<T_, {VB}>(ld_cached<{VB}>(G + k), gf);""" if norm else ""
    x_norm = f"""
    #pragma unroll
    for (int e = 0; e < {V}; ++e) {{
      ss[m] = fmaf(xf[e], xf[e], ss[m]);
      xf[e] *= gf[e];
    }}""" if norm else ""
    ss_decl = """
  float ss[M_];
  #pragma unroll
  for (int m = 0; m < M_; ++m) ss[m] = 0.0f;""" if norm else ""
    ss_sum = """
  #pragma unroll
  for (int m = 0; m < M_; ++m) ss[m] = warp_sum(ss[m]);""" if norm else ""

    # the norm's row sums travel with the partial products through a K split
    parts = "M_ * R_ + M_" if norm else "M_ * R_"
    keep_ss = """
    #pragma unroll
    for (int m = 0; m < M_; ++m) red[group][part][M_ * R_ + m] = ss[m];""" if norm else ""

    def sum_ss(row: str) -> str:
        return f"""
      float sq = 0.0f;
      #pragma unroll
      for (int p = 0; p < {KS}; ++p) sq += red[group][p][M_ * R_ + {row}];""" if norm else ""

    # a K split's warps leave their sums in shared memory; the first warp of each group adds them up
    partials = f"""
  __shared__ float red[{GROUPS}][{KS}][{parts}];
  if (lane == 0) {{
    #pragma unroll
    for (int m = 0; m < M_; ++m)
      #pragma unroll
      for (int r = 0; r < R_; ++r) red[group][part][m * R_ + r] = acc[m][r];{keep_ss}
  }}
  __syncthreads();"""
    if KS == 1:  # with act=swiglu a warp's column r has its gate in accumulator r and its up in RO + r
        columns, width = (RO, NO) if glu else ("R_", "N_")
        epilogue = f"""
  if (lane == 0) {{
    #pragma unroll
    for (int r = 0; r < {columns}; ++r) {{
      const long long n = n0 + r;
      if (n < {width}) {{
        #pragma unroll
        for (int m = 0; m < M_; ++m) Y[m * {width} + n] = {fused_output(task, "acc[m][r]", "m", "n", "ss[m]", f"acc[m][{RO} + r]" if glu else "")};
      }}
    }}
  }}"""
    elif glu:
        epilogue = partials + f"""
  if (part == 0) {{
    for (int i = lane; i < M_ * {RO}; i += 32) {{
      const int m = i / {RO}, r = i % {RO};
      float g = 0.0f, u = 0.0f;
      #pragma unroll
      for (int p = 0; p < {KS}; ++p) {{
        g += red[group][p][m * R_ + r];
        u += red[group][p][m * R_ + {RO} + r];
      }}{sum_ss("m")}
      const long long n = n0 + r;
      if (n < {NO}) Y[m * {NO} + n] = {fused_output(task, "g", "m", "n", "sq", up="u")};
    }}
  }}"""
    else:
        epilogue = partials + f"""
  if (part == 0) {{
    for (int i = lane; i < M_ * R_; i += 32) {{
      float s = 0.0f;
      #pragma unroll
      for (int p = 0; p < {KS}; ++p) s += red[group][p][i];{sum_ss("i / R_")}
      const long long n = n0 + i % R_;
      if (n < N_) Y[(i / R_) * N_ + n] = {fused_output(task, "s", "(i / R_)", "n", "sq")};
    }}
  }}"""
    if glu:  # column n's gate row, then its up row N/2 further
        row = gate_up_row(task, f"n0 + r % {RO}", f"r >= {RO}")
        row_pointers = f"  for (int r = 0; r < R_; ++r) wrow[r] = W + ({row}) * K_;"
    else:
        row_pointers = "  for (int r = 0; r < R_; ++r) wrow[r] = W + (n0 + r < N_ ? n0 + r : N_ - 1) * K_;  // clamp: never stored"
    g_param = "const T_* __restrict__ G, " if norm else ""
    r_param = "const T_* __restrict__ R, " if residual else ""
    helpers, trigger, wait = grid_dependency_code(is_fused(task))
    if wait:  # a programmatic launch: the leading lines of the warp's rows head for L2 (a lane a line) while the kernel before ends
        wait = f"""
  for (int j = part * 32 + lane; j < {prefetch_lines(target, N, K * size)}; j += {KS * 32}) {{
    #pragma unroll
    for (int r = 0; r < R_; ++r) prefetch_l2(wrow[r] + j * {L2_LINE // size});
  }}""" + wait.rstrip("\n") + stage_x  # X staged (x_smem) after the wait
        start = ""
    else:
        start = stage_x
    return PREAMBLE + PTX_HELPERS + helpers + f"""
typedef {T} T_;
constexpr int M_ = {M};
constexpr long long N_ = {N};
constexpr int K_ = {K};
constexpr int R_ = {R};

// One piece: {V} elements of each of the R rows at column k, against every X row.
__device__ __forceinline__ void gemv_piece(float (&acc)[M_][R_], const RawVec<{VB}> (&w)[R_],
                                           const T_* __restrict__ {x_src}, int k{ss_param}) {{
  float wf[R_][{V}];
  #pragma unroll
  for (int r = 0; r < R_; ++r) unpack_f32<T_, {VB}>(w[r], wf[r]);{g_load}
  #pragma unroll
  for (int m = 0; m < M_; ++m) {{
    float xf[{V}];
    unpack_f32<T_, {VB}>({x_load}, xf);{x_norm}
    #pragma unroll
    for (int r = 0; r < R_; ++r)
      #pragma unroll
      for (int e = 0; e < {V}; ++e) acc[m][r] = fmaf(xf[e], wf[r][e], acc[m][r]);
  }}
}}

extern "C" __global__ void __launch_bounds__({32 * WARPS}) gemv(const T_* __restrict__ X, {g_param}const T_* __restrict__ W,
                                                           {r_param}T_* __restrict__ Y) {{
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int group = warp / {KS};
  const int part = warp % {KS};
  const long long n0 = (long long)blockIdx.x * {RO * GROUPS} + group * {"R_" if not glu else RO};{start}
  const T_* wrow[R_];
  #pragma unroll
{row_pointers}{wait}
  float acc[M_][R_];
  #pragma unroll
  for (int m = 0; m < M_; ++m)
    #pragma unroll
    for (int r = 0; r < R_; ++r) acc[m][r] = 0.0f;{ss_decl}
  const int lane_k = (part * 32 + lane) * {V};
  for (int k0 = 0; k0 < {KMAIN}; k0 += {STEP}) {{
    RawVec<{VB}> w[{U}][R_];
    #pragma unroll
    for (int u = 0; u < {U}; ++u)
      #pragma unroll
      for (int r = 0; r < R_; ++r) w[u][r] = ld_stream<{VB}>(wrow[r] + k0 + u * {STRIDE} + lane_k);
    #pragma unroll
    for (int u = 0; u < {U}; ++u) gemv_piece(acc, w[u], {x_src}, k0 + u * {STRIDE} + lane_k{ss_args});
  }}
  #pragma unroll
  for (int u = 0; u < {U}; ++u) {{
    const int k = {KMAIN} + u * {STRIDE} + lane_k;
    if (k < K_) {{
      RawVec<{VB}> w[R_];
      #pragma unroll
      for (int r = 0; r < R_; ++r) w[r] = ld_stream<{VB}>(wrow[r] + k);
      gemv_piece(acc, w, {x_src}, k{ss_args});
    }}
  }}{trigger}
  #pragma unroll
  for (int m = 0; m < M_; ++m)
    #pragma unroll
    for (int r = 0; r < R_; ++r) acc[m][r] = warp_sum(acc[m][r]);{ss_sum}{epilogue}
}}
"""
