"""``attention_prefill`` on CUDA: flash attention (FlashAttention-2 style), GQA, causal.

Grid (ceil(T / BQ), H, B): a block owns BQ query rows of one head h and reads K/V of head
h // (H / HKV) tile by tile (BK keys), keeping a running max, sum and output per row
(online softmax), so the T x T scores never exist. Causal blocks stop at the diagonal and
mask only the tiles that cross it (or the end of T); the grid runs the longest (last) query
tiles first. A sliding ``window`` (compiled in) also starts a block's key loop at the tile
holding its first row's first visible key and masks the keys below the window in the tiles
that straddle its lower edge. T may be a runtime argument. Two implementations (knob ``impl``):

- ``mma`` (fp16/bf16, D a multiple of 16): tensor cores through mma.sync.m16n8k16 with
  float32 accumulators. Each warp owns ``warp_rows`` = 16 or 32 query rows (one or two
  m-tiles; with two, every K and V fragment read from shared memory feeds two mmas). Q (resident for the whole block),
  K and V tiles go to shared memory with cp.async (16-byte copies, zero-filled past T),
  K/V in a ring of ``stages`` buffers so the next tiles load while this one is computed.
  Rows are padded by 16 bytes, which makes ldmatrix of 8 rows conflict-free. S = Q K^T
  comes from ldmatrix fragments of Q (kept in registers with ``q_regs``) and K; P is
  converted in registers to the A operand of O += P V (V through ldmatrix.trans). The
  output is staged through the warp's own Q rows for coalesced 16-byte stores.
- ``simt`` (any dtype and D): CUDA cores in float32. A warp owns ``warp_rows`` query rows;
  a lane scores keys lane, lane + 32, ... of the tile against them (K in shared memory with
  rows padded by one word: conflict-free columns), then owns output dims lane, lane + 32,
  ... for O += P V, with P broadcast by shuffles. Tiles are loaded (converted to float32)
  by the whole block, one stage.
- ``wgmma`` (Hopper, fp16/bf16, D of 64 or 128): FlashAttention-3 style, a TMA producer
  warpgroup and ``consumers`` warpgroups of 64 query rows on wgmma (``attention_prefill_wgmma``).

Scores are kept in the log2 domain: exp2(s * scale * log2(e) - max * scale * log2(e)).
With ``softcap`` (compiled in; 0 adds nothing to the source) each score becomes
softcap * tanh(scale * q.k / softcap) (tanhf, float32) before the mask, and the log2 domain
is that capped score times log2(e).
"""
from __future__ import annotations

from ...codegen.cuda import (PREAMBLE, VECTOR_HELPERS, bytes_per_block_ok, c_type, dim_scalars, kernel_params,
                             registers_ok, static_dims)
from ...ops.attention import AttentionPrefillOp, _scale
from ...ops.common import ITEMSIZE
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from . import attention_prefill_wgmma as hopper
from .limits import occupancy

LOG2E = 1.4426950408889634


def _mma_ok(task: Task) -> bool:
    return task.dtype in ("float16", "bfloat16") and task.dims["D"] % 16 == 0 and task.dims["D"] <= 256


def _bq(c: dict) -> int:
    if c["impl"] == "wgmma":
        return hopper.block_rows(c)
    return c["warps"] * c["warp_rows"]


def _threads(c: dict) -> int:
    return hopper.threads(c) if c["impl"] == "wgmma" else 32 * c["warps"]


def _smem(task: Task, c: dict) -> int:
    if c["impl"] == "wgmma":
        return hopper.smem_bytes(task, c)
    d = task.dims["D"]
    if c["impl"] == "mma":
        return (_bq(c) + 2 * c["stages"] * c["block_k"]) * (d + 8) * 2
    return 4 * (_bq(c) * d + c["block_k"] * (d + 1) + c["block_k"] * d)


def _registers(task: Task, c: dict) -> int:
    if c["impl"] == "wgmma":
        return hopper.registers(task, c)
    d = task.dims["D"]
    if c["impl"] == "mma":
        mt = c["warp_rows"] // 16
        return 40 + mt * (d // 2 + c["block_k"] // 2 + (d // 4 if c["q_regs"] else 4))
    kpl, dpl = c["block_k"] // 32, -(-d // 32)
    return 40 + c["warp_rows"] * (dpl + 2 * kpl + 2) + kpl


@register_template
class AttentionPrefillCuda(AttentionPrefillOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        mma = _mma_ok(task)
        max_warps = (target.max_threads_per_block or 1024) // 32
        knobs = [
            Knob("impl", ("mma", "simt") if mma else ("simt",)),
            Knob("warps", tuple(w for w in (2, 4, 8) if w <= max_warps)),
            Knob("warp_rows", ((16, 32) if mma else ()) + (1, 2, 4)),
            Knob("block_k", (32, 64, 128)),
            Knob("stages", (1, 2, 3)),
            Knob("q_regs", (0, 1) if mma else (0,)),
            Knob("consumers", (1, 2) if hopper.applies(task) else (1,), legacy=1),
            Knob("overlap", (0, 1) if hopper.applies(task) else (0,), legacy=0),
        ]
        if hopper.applies(task):  # appended: the indices of the other impls' configs stay
            knobs[0] = Knob("impl", knobs[0].values + ("wgmma",))
        hopper_ok = target.has_hopper_instructions
        constraints = [
            ("wgmma needs sm_90a", lambda c: c["impl"] != "wgmma" or hopper_ok),
            ("mma warps own 16 or 32 query rows, simt warps 1 to 4",
             lambda c: (c["warp_rows"] >= 16) == (c["impl"] != "simt")),
            ("mma pipelines 2 or 3 stages, simt loads one",
             lambda c: (c["stages"] >= 2) if c["impl"] != "simt" else c["stages"] == 1),
            ("wgmma: warpgroups of 4 warps of 16 rows, Q from shared memory, 64 or 128 keys a tile",
             lambda c: c["impl"] != "wgmma" or (c["warps"] == 4 and c["warp_rows"] == 16 and c["q_regs"] == 0
                                                and c["block_k"] >= 64)),
            ("consumer warpgroups and their overlap are wgmma options",
             lambda c: c["impl"] == "wgmma" or (c["consumers"] == 1 and c["overlap"] == 0)),
            ("Q fragments in registers are an mma option", lambda c: c["impl"] == "mma" or c["q_regs"] == 0),
            ("simt tiles are 32 or 64 keys", lambda c: c["impl"] != "simt" or c["block_k"] <= 64),
            ("registers fit the block", lambda c: registers_ok(_registers(task, c), _threads(c), target)),
            # ptxas hoists fragment loads: leave about 30 registers above the accumulators
            ("mma accumulators leave room for fragments", lambda c: c["impl"] != "mma" or _registers(task, c) <= 224),
            ("tiles fit in shared memory", lambda c: bytes_per_block_ok(_smem(task, c), target)),
        ]
        return ConfigSpace(knobs, constraints)

    def seed_configs(self, task: Task, target: Target) -> list[dict]:
        """The Hopper schedule first where it applies (a tuner with priors measures these first)."""
        return [dict(s) for s in hopper.SEEDS] if hopper.applies(task) else []

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        preferences = [dict(impl="mma", warps=4, warp_rows=16, block_k=64, stages=2, q_regs=1),
                       dict(impl="mma", warps=4, warp_rows=16, block_k=32, stages=2, q_regs=0),
                       dict(impl="simt", warps=4, warp_rows=2, block_k=32, stages=1, q_regs=0),
                       dict(impl="simt", warps=4, warp_rows=1, block_k=32, stages=1, q_regs=0)]
        for values in preferences:
            if space.accepts(values):
                return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        d = task.dims
        bq = _bq(c)
        q_tiles = -(-d["T"] // bq)
        blocks = q_tiles * d["H"] * d["B"]
        causal, window = bool(self.attrs(task)["causal"]), self.attrs(task)["window"]
        kv_tiles = sum(-(-min(d["T"], (i + 1) * bq) // c["block_k"]) if causal else -(-d["T"] // c["block_k"])
                       for i in range(q_tiles))
        if window:  # the tiles wholly before each query tile's window are skipped
            kv_tiles -= sum(max(0, i * bq - window + 1) // c["block_k"] for i in range(q_tiles))
        itemsize = ITEMSIZE[task.dtype]
        moved = self.min_bytes(task) + d["B"] * d["H"] * kv_tiles * 2 * c["block_k"] * d["D"] * itemsize
        per_sm = max(1, min(2048 // _threads(c), (target.max_shared_memory_per_block or 48 << 10)
                            // max(_smem(task, c), 1)))
        pairs_computed = d["B"] * d["H"] * kv_tiles * bq * c["block_k"]
        return {
            "threads": _threads(c) // 32,
            "unroll": c["stages"],
            "accumulators": (c["warp_rows"] // 16 * d["D"] // 2 if c["impl"] != "simt"
                             else c["warp_rows"] * -(-d["D"] // 32)),
            "parallel_chunks": blocks,
            "waves": blocks / (max(target.sm_count, 1) * per_sm),
            "tile_bytes_l1": _smem(task, c),
            "shared_bytes": _smem(task, c),
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "m_tail_fraction": (q_tiles * bq - d["T"]) / (q_tiles * bq),
            "k_tail_fraction": 1.0 - self.pairs(task) * d["B"] * d["H"] / max(pairs_computed, 1),
            "packed": 1.0 if c["impl"] != "simt" else 0.0,
            "registers": _registers(task, c),
            "occupancy": occupancy(_threads(c), _smem(task, c), _registers(task, c), target),
            "loads_per_fma": 2.0 / bq if c["impl"] != "simt" else 1.0 / c["warp_rows"],
            "vector_lanes": 8 if c["impl"] != "simt" else 1,
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        d = task.dims
        args = self.signature(task) + dim_scalars(task)
        bq = _bq(c)
        common = (
            PREAMBLE + VECTOR_HELPERS
            + f"typedef {c_type(task.dtype)} E;\n"
            f"constexpr int B = {d['B']};\nconstexpr int H = {d['H']};\nconstexpr int HKV = {d['HKV']};\n"
            f"constexpr int G = H / HKV;\nconstexpr int D = {d['D']};\n"
            f"constexpr int WARPS = {c['warps']};\nconstexpr int THREADS = WARPS * 32;\n"
            f"constexpr int BQ = {bq};\nconstexpr int BK = {c['block_k']};\n"
            f"constexpr bool CAUSAL = {'true' if self.attrs(task)['causal'] else 'false'};\n"
            f"constexpr long long WINDOW = {self.attrs(task)['window']};   // 0: no sliding window\n"
            + _scaling(_scale(self, task), float(self.attrs(task)["softcap"]))
            + static_dims(task, ("T",)))
        capped = bool(self.attrs(task)["softcap"])
        if c["impl"] == "wgmma":
            args = hopper.tensor_maps(task, c) + args  # descriptors first (see runtime.abi)
            code = hopper.kernel(task, c, common, kernel_params(self.signature(task) + dim_scalars(task)),
                                 _BLOCK_COORDS, capped)
            entry = "attention_prefill_wgmma"
        elif c["impl"] == "mma":
            mma_type = "f16" if task.dtype == "float16" else "bf16"
            pack = "__floats2half2_rn" if task.dtype == "float16" else "__floats2bfloat162_rn"
            code = (common + f"constexpr int STAGES = {c['stages']};\nconstexpr bool Q_REGS = {'true' if c['q_regs'] else 'false'};\n"
                    f"constexpr int MT = {c['warp_rows'] // 16};   // m-tiles of 16 rows per warp\n"
                    + _MMA_KERNEL.replace("@MMA_TYPE@", mma_type).replace("@PACK@", pack)
                    .replace("@PARAMS@", kernel_params(args)).replace("@CAP@\n", _MMA_CAP if capped else ""))
            entry = "attention_prefill_mma"
        else:
            code = (common + f"constexpr int R = {c['warp_rows']};\n"
                    + _SIMT_KERNEL.replace("@PARAMS@", kernel_params(args))
                    .replace("@Q_SCALE@", "CAP_IN" if capped else "SCALE_LOG2")
                    .replace("@CAP@", _SIMT_CAP if capped else ""))
            entry = "attention_prefill_simt"
        grid_x = f"(T + {bq - 1}) // {bq}" if "T" in task.dynamic else -(-d["T"] // bq)
        launch = (("block", (_threads(c), 1, 1)), ("grid", (grid_x, d["H"], d["B"])), ("smem", _smem(task, c)))
        return KernelSource("cuda", code, entry, tuple(args), launch)


def _scaling(scale: float, softcap: float) -> str:
    """The constants that take q . k to the log2 domain: SCALE_LOG2 = scale * log2(e), or with a
    soft cap CAP_IN (q . k to s / softcap, whose tanh the kernels take) and SCALE_LOG2 = softcap *
    log2(e) (that tanh to the capped score in the log2 domain)."""
    if not softcap:
        return f"constexpr float SCALE_LOG2 = {scale * LOG2E!r}f;\n"
    return (f"constexpr float SOFTCAP = {softcap!r}f;   // soft-capping: a scaled score s becomes "
            "SOFTCAP * tanh(s / SOFTCAP)\n"
            f"constexpr float CAP_IN = {scale / softcap!r}f;   // q . k -> s / SOFTCAP\n"
            f"constexpr float SCALE_LOG2 = {softcap * LOG2E!r}f;   "
            "// tanh(s / SOFTCAP) -> the capped score in the log2 domain\n")


# With a soft cap, the scores of the mma kernel (q . k) become tanh(s / SOFTCAP) before the mask
# (masked keys then get -inf as before); SCALE_LOG2 takes them on as usual.
_MMA_CAP = r"""    // soft-capping: tanh(s / SOFTCAP), in float32 (SCALE_LOG2 makes it SOFTCAP * tanh(.) * log2(e))
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[mt][nt][i] = tanhf(s[mt][nt][i] * CAP_IN);
"""
# The simt kernel's q is pre-scaled by CAP_IN instead: its scores are s / SOFTCAP, capped in
# the log2 domain before the mask.
_SIMT_CAP = "s[r][kp] = tanhf(s[r][kp]) * SCALE_LOG2;   // soft-capped, log2 domain\n        "


# Where a block's work lies, the same in both kernels (written into each at @BLOCK_COORDS@
# when this module loads): its query tile (the last ones first when causal: they have the
# most keys), head, batch and KV head, the base pointers of its rows, and the number of
# key tiles it visits (causal: up to the diagonal; with a window, from the tile holding the
# first key its first row sees: kbase, the first key of visit 0).
_BLOCK_COORDS = r"""
  const int qt = CAUSAL ? (int)gridDim.x - 1 - (int)blockIdx.x : (int)blockIdx.x;
  const int h = blockIdx.y, b = blockIdx.z, kvh = h / G;
  const long long q0 = (long long)qt * BQ;
  const long long q_stride = (long long)H * D, kv_stride = (long long)HKV * D;
  const E* Qb = Q + ((long long)b * T * H + h) * D;
  const E* Kb = K + ((long long)b * T * HKV + kvh) * D;
  const E* Vb = V + ((long long)b * T * HKV + kvh) * D;
  E* Ob = O + ((long long)b * T * H + h) * D;
  const long long kv_len = CAUSAL ? (q0 + BQ < T ? q0 + BQ : T) : T;
  const int j0 = WINDOW > 0 && q0 >= WINDOW ? (int)((q0 - WINDOW + 1) / BK) : 0;
  const long long kbase = (long long)j0 * BK;
  const int n_tiles = (int)((kv_len + BK - 1) / BK) - j0;
""".strip("\n")

_MMA_KERNEL = r"""
#define FULL 0xffffffffu
constexpr int LDS = D + 8;          // padded row: 8 rows of an ldmatrix hit 8 distinct bank groups
constexpr int KSTEPS = D / 16;      // k-steps of S = Q K^T
constexpr int NT = BK / 8;          // n-tiles (8 keys) of S
constexpr int DT = D / 8;           // n-tiles (8 dims) of O
constexpr int CPR = D / 8;          // 16-byte chunks per row

#ifndef AUTOTUNE_EMULATE
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
// 16 bytes global -> shared; src_bytes = 0 writes zeros (rows past the end of T).
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, unsigned src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" :: "r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(N) : "memory");
}
__device__ __forceinline__ void ldsm_x4(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(unsigned addr, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}
// c (16x8, f32) += a (16x16, row) * b (16x8, col)
__device__ __forceinline__ void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.@MMA_TYPE@.@MMA_TYPE@.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
#else  // tests run this source on the CPU through an emulator of these instructions
__device__ __forceinline__ unsigned smem_u32(const void* p) { return emu::smem_offset(p); }
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, unsigned n) { emu::cp_async16(dst, src, n); }
__device__ __forceinline__ void cp_async_commit() { emu::cp_async_commit(); }
template <int N> __device__ __forceinline__ void cp_async_wait() { emu::cp_async_wait(N); }
__device__ __forceinline__ void ldsm_x4(unsigned a, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  emu::ldmatrix_x4(a, false, r0, r1, r2, r3);
}
__device__ __forceinline__ void ldsm_x4_t(unsigned a, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  emu::ldmatrix_x4(a, true, r0, r1, r2, r3);
}
__device__ __forceinline__ void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                         unsigned b0, unsigned b1) {
  emu::mma16816<E>(c, a0, a1, a2, a3, b0, b1);
}
#endif
// two floats -> one register of two 16-bit values, lo in the low half (the lower column)
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  auto v = @PACK@(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// ROWS rows (from row0, stride in elements) of D elements into a padded shared tile.
template <int ROWS>
__device__ __forceinline__ void load_tile(E* dst, const E* src, long long stride, long long row0, long long rows) {
  constexpr int CHUNKS = ROWS * CPR;
  // not unrolled: unrolled copies keep one 64-bit address each alive and crowd out the accumulators
#pragma unroll 1
  for (int i = 0; i < (CHUNKS + THREADS - 1) / THREADS; ++i) {
    const int chunk = i * THREADS + threadIdx.x;
    if (CHUNKS % THREADS == 0 || chunk < CHUNKS) {
      const int r = chunk / CPR, c = chunk % CPR;
      const bool ok = row0 + r < rows;
      const E* g = src + (ok ? row0 + r : 0) * stride + c * 8;   // a valid address even when unused
      cp_async16(smem_u32(dst + r * LDS + c * 8), g, ok ? 16u : 0u);
    }
  }
}

extern "C" __global__ void __launch_bounds__(THREADS) attention_prefill_mma(@PARAMS@) {
  extern __shared__ __align__(128) unsigned char smem[];
  E* Qs = reinterpret_cast<E*>(smem);      // [BQ][LDS]
  E* Ks = Qs + BQ * LDS;                    // [STAGES][BK][LDS]
  E* Vs = Ks + STAGES * BK * LDS;           // [STAGES][BK][LDS]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;   // mma fragment coordinates
@BLOCK_COORDS@

  load_tile<BQ>(Qs, Qb, q_stride, q0, T);
  load_tile<BK>(Ks, Kb, kv_stride, kbase, T);
  load_tile<BK>(Vs, Vb, kv_stride, kbase, T);
  cp_async_commit();
#pragma unroll
  for (int s = 1; s < STAGES - 1; ++s) {
    if (s < n_tiles) {
      load_tile<BK>(Ks + s * BK * LDS, Kb, kv_stride, kbase + (long long)s * BK, T);
      load_tile<BK>(Vs + s * BK * LDS, Vb, kv_stride, kbase + (long long)s * BK, T);
    }
    cp_async_commit();   // always: keeps the group count in step with the tile index
  }

  const int row_w = warp * 16 * MT;   // this warp's first row in the tile; m-tile mt starts 16 * mt later
  unsigned qf[Q_REGS ? MT : 1][Q_REGS ? KSTEPS : 1][4];
  float o[MT][DT][4];
  float m_r[MT][2], l_r[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < DT; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.0f;
    m_r[mt][0] = m_r[mt][1] = -INFINITY;
    l_r[mt][0] = l_r[mt][1] = 0.0f;
  }

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<STAGES - 2>();   // tile j (and Q) have landed for this thread ...
    __syncthreads();               // ... and for every thread; tile j - 1 is consumed by all
    {
      const int jn = j + STAGES - 1;
      if (jn < n_tiles) {
        load_tile<BK>(Ks + (jn % STAGES) * BK * LDS, Kb, kv_stride, kbase + (long long)jn * BK, T);
        load_tile<BK>(Vs + (jn % STAGES) * BK * LDS, Vb, kv_stride, kbase + (long long)jn * BK, T);
      }
      cp_async_commit();
    }
    if (Q_REGS && j == 0) {
#pragma unroll
      for (int mt = 0; mt < (Q_REGS ? MT : 1); ++mt)
#pragma unroll
        for (int kk = 0; kk < (Q_REGS ? KSTEPS : 1); ++kk)
          ldsm_x4(smem_u32(Qs + (row_w + mt * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8),
                  qf[mt][kk][0], qf[mt][kk][1], qf[mt][kk][2], qf[mt][kk][3]);
    }
    const E* Kt = Ks + (j % STAGES) * BK * LDS;
    const E* Vt = Vs + (j % STAGES) * BK * LDS;

    // S = Q K^T for this warp's rows and the BK keys of the tile; a K fragment serves every m-tile
    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < NT; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        if constexpr (Q_REGS) {
          a[mt][0] = qf[mt][kk][0]; a[mt][1] = qf[mt][kk][1]; a[mt][2] = qf[mt][kk][2]; a[mt][3] = qf[mt][kk][3];
        } else {
          ldsm_x4(smem_u32(Qs + (row_w + mt * 16 + (lane & 15)) * LDS + kk * 16 + (lane >> 4) * 8),
                  a[mt][0], a[mt][1], a[mt][2], a[mt][3]);
        }
      }
#pragma unroll
      for (int np = 0; np < NT / 2; ++np) {
        unsigned b0, b1, b2, b3;
        const int mi = lane >> 3;   // matrix this lane addresses: (keys +0/+8) x (dims +0/+8)
        ldsm_x4(smem_u32(Kt + (np * 16 + (mi >> 1) * 8 + (lane & 7)) * LDS + kk * 16 + (mi & 1) * 8), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(s[mt][2 * np], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);
          mma16816(s[mt][2 * np + 1], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b2, b3);
        }
      }
    }

@CAP@
    // mask keys past T, above the diagonal and below the window, only in tiles that reach them
    // (a row may meet a tile wholly below its window first: the softmax's -inf guard keeps it 0)
    const long long k0 = kbase + (long long)j * BK;
    if (k0 + BK > T || (CAUSAL && k0 + BK - 1 > q0 + row_w)
        || (WINDOW > 0 && k0 + WINDOW <= q0 + row_w + 16 * MT - 1)) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const long long key = k0 + nt * 8 + tig * 2 + (i & 1);
            const long long qrow = q0 + row_w + mt * 16 + gid + (i >> 1) * 8;
            if (key >= T || (CAUSAL && key > qrow) || (WINDOW > 0 && key + WINDOW <= qrow)) s[mt][nt][i] = -INFINITY;
          }
    }

    // online softmax; per m-tile a lane holds rows gid (r = 0) and gid + 8 (r = 1), a quad shares a row
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float mx[2] = {m_r[mt][0], m_r[mt][1]};
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
        mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
      }
      float base[2], corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 1));
        mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 2));
        base[r] = mx[r] == -INFINITY ? 0.0f : mx[r] * SCALE_LOG2;   // no key yet: weights stay 0
        corr[r] = exp2f(m_r[mt][r] * SCALE_LOG2 - base[r]);
        m_r[mt][r] = mx[r];
        l_r[mt][r] *= corr[r];
      }
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        s[mt][nt][0] = exp2f(fmaf(s[mt][nt][0], SCALE_LOG2, -base[0]));
        s[mt][nt][1] = exp2f(fmaf(s[mt][nt][1], SCALE_LOG2, -base[0]));
        s[mt][nt][2] = exp2f(fmaf(s[mt][nt][2], SCALE_LOG2, -base[1]));
        s[mt][nt][3] = exp2f(fmaf(s[mt][nt][3], SCALE_LOG2, -base[1]));
        l_r[mt][0] += s[mt][nt][0] + s[mt][nt][1];
        l_r[mt][1] += s[mt][nt][2] + s[mt][nt][3];
      }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        o[mt][dt][0] *= corr[0]; o[mt][dt][1] *= corr[0];
        o[mt][dt][2] *= corr[1]; o[mt][dt][3] *= corr[1];
      }
    }

    // O += P V: the S accumulators of n-tiles 2kk, 2kk+1 are the A fragment of k-step kk;
    // a V fragment serves every m-tile
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned p[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        p[mt][0] = pack2(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        p[mt][1] = pack2(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        p[mt][2] = pack2(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        p[mt][3] = pack2(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < DT / 2; ++dp) {
        unsigned b0, b1, b2, b3;
        const int mi = lane >> 3;   // matrix this lane addresses: (keys +0/+8) x (dims +0/+8)
        ldsm_x4_t(smem_u32(Vt + (kk * 16 + (mi & 1) * 8 + (lane & 7)) * LDS + dp * 16 + (mi >> 1) * 8), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma16816(o[mt][2 * dp], p[mt][0], p[mt][1], p[mt][2], p[mt][3], b0, b1);
          mma16816(o[mt][2 * dp + 1], p[mt][0], p[mt][1], p[mt][2], p[mt][3], b2, b3);
        }
      }
    }
  }

  // finish the rows: full sums over the quad, normalise, stage in this warp's own Q rows
  __syncwarp();   // every lane of the warp is done reading its Q rows
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float l = l_r[mt][r];
      l += __shfl_xor_sync(FULL, l, 1);
      l += __shfl_xor_sync(FULL, l, 2);
      inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
    }
    E* Ow = Qs + (row_w + mt * 16) * LDS;
#pragma unroll
    for (int dt = 0; dt < DT; ++dt) {
      *reinterpret_cast<unsigned*>(Ow + gid * LDS + dt * 8 + tig * 2) = pack2(o[mt][dt][0] * inv[0], o[mt][dt][1] * inv[0]);
      *reinterpret_cast<unsigned*>(Ow + (gid + 8) * LDS + dt * 8 + tig * 2) = pack2(o[mt][dt][2] * inv[1], o[mt][dt][3] * inv[1]);
    }
  }
  __syncwarp();
  E* Ow = Qs + row_w * LDS;
#pragma unroll
  for (int i = 0; i < (16 * MT * CPR + 31) / 32; ++i) {
    const int chunk = i * 32 + lane;
    if ((16 * MT * CPR) % 32 == 0 || chunk < 16 * MT * CPR) {
      const int r = chunk / CPR, c = chunk % CPR;
      const long long t = q0 + row_w + r;
      if (t < T) *reinterpret_cast<uint4*>(Ob + t * q_stride + c * 8) = *reinterpret_cast<const uint4*>(Ow + r * LDS + c * 8);
    }
  }
}
""".replace("@BLOCK_COORDS@", _BLOCK_COORDS)

_SIMT_KERNEL = r"""
#define FULL 0xffffffffu
constexpr int KPL = BK / 32;            // keys per lane
constexpr int DPL = (D + 31) / 32;      // output dims per lane
constexpr int LDK = D + 1;              // K rows padded: lanes reading one column hit distinct banks

extern "C" __global__ void __launch_bounds__(THREADS) attention_prefill_simt(@PARAMS@) {
  extern __shared__ __align__(16) float smem[];
  float* Qs = smem;                  // [BQ][D], pre-scaled by scale * log2(e)
  float* Ks = Qs + BQ * D;           // [BK][LDK]
  float* Vs = Ks + BK * LDK;         // [BK][D]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
@BLOCK_COORDS@

  for (int i = threadIdx.x; i < BQ * D; i += THREADS) {
    const long long t = q0 + i / D;
    Qs[i] = t < T ? to_f32(Qb[t * q_stride + i % D]) * @Q_SCALE@ : 0.0f;
  }
  float acc[R][DPL], m[R], l[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.0f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.0f;
  }
  const int row_w = warp * R;

  for (int j = 0; j < n_tiles; ++j) {
    const long long k0 = kbase + (long long)j * BK;
    __syncthreads();   // the previous tile is consumed (and Q is stored, on the first pass)
    for (int i = threadIdx.x; i < BK * D; i += THREADS) {
      const int r = i / D, d = i % D;
      const long long key = k0 + r;
      const bool ok = key < T;
      Ks[r * LDK + d] = ok ? to_f32(Kb[key * kv_stride + d]) : 0.0f;
      Vs[i] = ok ? to_f32(Vb[key * kv_stride + d]) : 0.0f;
    }
    __syncthreads();

    float s[R][KPL];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int kp = 0; kp < KPL; ++kp) s[r][kp] = 0.0f;
#pragma unroll 4
    for (int d = 0; d < D; ++d) {
      float kv[KPL];
#pragma unroll
      for (int kp = 0; kp < KPL; ++kp) kv[kp] = Ks[(lane + 32 * kp) * LDK + d];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float qv = Qs[(row_w + r) * D + d];
#pragma unroll
        for (int kp = 0; kp < KPL; ++kp) s[r][kp] = fmaf(qv, kv[kp], s[r][kp]);
      }
    }
    float p[R][KPL];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const long long qrow = q0 + row_w + r;
      float mx = -INFINITY;
#pragma unroll
      for (int kp = 0; kp < KPL; ++kp) {
        const long long key = k0 + lane + 32 * kp;
        @CAP@if (key >= T || (CAUSAL && key > qrow) || (WINDOW > 0 && key + WINDOW <= qrow)) s[r][kp] = -INFINITY;
        mx = fmaxf(mx, s[r][kp]);
      }
      const float mn = fmaxf(m[r], warp_max(mx));
      const float base = mn == -INFINITY ? 0.0f : mn;   // no key yet: weights stay 0
      const float corr = exp2f(m[r] - base);
      float sum = 0.0f;
#pragma unroll
      for (int kp = 0; kp < KPL; ++kp) { p[r][kp] = exp2f(s[r][kp] - base); sum += p[r][kp]; }
      l[r] = l[r] * corr + warp_sum(sum);
      m[r] = mn;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] *= corr;
    }
#pragma unroll
    for (int kp = 0; kp < KPL; ++kp) {
#pragma unroll 4
      for (int src = 0; src < 32; ++src) {
        const int key = kp * 32 + src;
        float pk[R];
#pragma unroll
        for (int r = 0; r < R; ++r) pk[r] = __shfl_sync(FULL, p[r][kp], src);
#pragma unroll
        for (int i = 0; i < DPL; ++i) {
          const int d = lane + 32 * i;
          if (D % 32 == 0 || d < D) {
            const float vv = Vs[key * D + d];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r][i] = fmaf(pk[r], vv, acc[r][i]);
          }
        }
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const long long t = q0 + row_w + r;
    if (t < T) {
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        const int d = lane + 32 * i;
        if (D % 32 == 0 || d < D) Ob[t * q_stride + d] = from_f32<E>(acc[r][i] * inv);
      }
    }
  }
}
""".replace("@BLOCK_COORDS@", _BLOCK_COORDS)
