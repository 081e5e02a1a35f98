"""The Hopper schedule of CUDA ``attention_prefill`` (``impl`` = ``wgmma``), FlashAttention-3 style.

A block owns 64 query rows per consumer warpgroup (``consumers`` = 1 or 2) of one head. A
producer warpgroup, of which one thread works, copies with TMA: the block's Q tile once,
then K and V tiles of ``block_k`` keys through a ring of ``stages`` buffers, each stage
behind a transaction barrier (``full``) and given back by the consumers (``empty``). Every
copy is a box of 64 head dims (128 bytes) in the 128-byte swizzle, zeros past the end of T;
the tensor maps are 4-D (batch, position, head, dim), so a box never crosses into the next
batch or head.

A consumer warpgroup computes S = Q K^T with wgmma (both operands K-major in shared memory),
masks and runs the online softmax in registers (a row's values spread over a quad of lanes),
converts P to 16-bit pairs (the accumulator layout of S is the register layout of wgmma's A
operand) and accumulates O += P V with wgmma taking A from registers and V from shared
memory N-major (V's rows as TMA lays them out are K rows of the B operand). The producer
runs ahead by the ring's depth, so K/V copies overlap the consumers' math; with ``overlap``
the tensor cores also compute S of the next tile and P V of the last one while the
warpgroup runs the softmax (FlashAttention-3's intra-warpgroup pipelining).

A sliding ``window`` moves the first K/V tile the producer copies (``kbase``, as in the other
impls) and adds the window's lower edge to the mask of the tiles that straddle it.
A ``softcap`` turns each tile's S into tanh(s / softcap) in registers before the mask
(``CAP_IN`` and ``SCALE_LOG2`` from the other impls' constants), in the softmax the warpgroup
runs while the tensor cores work.

Only where TMA can describe the arrays: 16-bit dtypes, D a multiple of 64 up to 128, and
one batch when T is a runtime argument (the descriptors are encoded with the T the arrays
were bound at; with one batch a shorter T reads rows the kernel masks anyway).
"""
from __future__ import annotations

from ...codegen.cuda_ptx import PTX_HELPERS, TMA_HELPERS, WGMMA_HELPERS, WGMMA_RS_HELPERS
from ...task import Task
from ...template import ArgSpec
from .limits import setmaxnreg_calls, warp_specialised_registers



_WGMMA = dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0)
SEEDS = (dict(_WGMMA, block_k=128, stages=2, consumers=2, overlap=1), dict(_WGMMA, block_k=64, stages=3, consumers=2,
                                                                          overlap=1),
         dict(_WGMMA, block_k=128, stages=2, consumers=2, overlap=0), dict(_WGMMA, block_k=128, stages=3, consumers=1,
                                                                          overlap=1),
         dict(_WGMMA, block_k=64, stages=2, consumers=1, overlap=0))


def applies(task: Task) -> bool:
    d = task.dims
    return (task.dtype in ("float16", "bfloat16") and d["D"] in (64, 128)
            and ("T" not in task.dynamic or d["B"] == 1))


def block_rows(c: dict) -> int:
    return 64 * c["consumers"]


def threads(c: dict) -> int:
    return 128 * (1 + c["consumers"])


def smem_bytes(task: Task, c: dict) -> int:
    d = task.dims["D"]
    tiles = (block_rows(c) + 2 * c["stages"] * c["block_k"]) * d * 2
    return tiles + 1024 + 8 * (1 + 2 * c["stages"])  # 1 KB to align the tiles, the barriers


def registers(task: Task, c: dict) -> int:
    """Per thread once setmaxnreg has moved them: O (D / 2) and S (block_k / 2) accumulators."""
    need = task.dims["D"] // 2 + c["block_k"] // 2 + (c["block_k"] // 4 if c["overlap"] else 0) + 48
    return warp_specialised_registers(c["consumers"], need)


def tensor_maps(task: Task, c: dict) -> tuple[ArgSpec, ...]:
    """Boxes of (1 batch, rows, 1 head, 64 dims) of Q, K and V."""
    dt = task.dtype
    return (ArgSpec("Q_map", "tensor_map", dt, (1, block_rows(c), 1, 64), of="Q", swizzle=128),
            ArgSpec("K_map", "tensor_map", dt, (1, c["block_k"], 1, 64), of="K", swizzle=128),
            ArgSpec("V_map", "tensor_map", dt, (1, c["block_k"], 1, 64), of="V", swizzle=128))


def kernel(task: Task, c: dict, common: str, params: str, block_coords: str, capped: bool = False) -> str:
    """The kernel source; ``common`` defines E, B, H, HKV, G, D, BQ, BK, CAUSAL, WINDOW, SCALE_LOG2 and T
    (and CAP_IN where ``capped``: the scores are soft-capped)."""
    pack = "__floats2half2_rn" if task.dtype == "float16" else "__floats2bfloat162_rn"
    dec, inc = setmaxnreg_calls(c["consumers"])
    return (common + PTX_HELPERS + WGMMA_HELPERS + WGMMA_RS_HELPERS + TMA_HELPERS
            + f"constexpr int CONSUMERS = {c['consumers']};\nconstexpr int STAGES = {c['stages']};\n"
            + _KERNEL.replace("@PARAMS@", params).replace("@BLOCK_COORDS@", block_coords)
            .replace("@PACK@", pack).replace("@LOOP@", _OVERLAPPED if c["overlap"] else _SERIAL)
            .replace("@DEC@", dec).replace("@INC@", inc).replace("@CAP@", _CAP if capped else ""))


# soft-capping: S (q . k) becomes tanh(s / SOFTCAP), float32, before the mask; SCALE_LOG2 (SOFTCAP * log2(e))
# takes it on to the capped score in the log2 domain
_CAP = r"""#pragma unroll
  for (int i = 0; i < BK / 2; ++i) sc[i] = tanhf(sc[i] * CAP_IN);   // soft-capped
"""


_KERNEL = r"""
#define FULL 0xffffffffu
constexpr int BLOCK_THREADS = 128 * (1 + CONSUMERS);
constexpr int DB = D / 64;                 // 64-dim boxes (128-byte lines) per row
constexpr int Q_BYTES = BQ * D * 2, KV_BYTES = BK * D * 2;

__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  auto v = @PACK@(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

// S = Q K^T of a warpgroup's 64 rows and a tile's BK keys, issued (not waited for): k-steps
// of 16 dims, 4 per 64-dim box, both operands K-major
__device__ __forceinline__ void issue_qk(float* sc, const E* q, const E* k) {
#pragma unroll
  for (int i = 0; i < BK / 2; ++i) sc[i] = 0.0f;
  fence_operands<BK / 2>(sc);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    wgmma_m64k16<BK, E>(sc, gmma_desc_sw128(q + (kk / 4) * BQ * 64 + (kk % 4) * 16),
                        gmma_desc_sw128(k + (kk / 4) * BK * 64 + (kk % 4) * 16));
  wgmma_commit();
}

// O += P V, issued: keys 16kk .. 16kk + 15 of P are p[4kk .. 4kk + 3] (wgmma's A fragment);
// V's BK rows are the K rows of an N-major B, D wide over DB boxes
__device__ __forceinline__ void issue_pv(float* o, unsigned* p, const E* v) {
  fence_operands<D / 2>(o);
  fence_operands<BK / 4>(p);
  wgmma_fence();
#pragma unroll
  for (int kk = 0; kk < BK / 16; ++kk)
    wgmma_m64k16_rs_nmajor<D, E>(o, p + 4 * kk, gmma_desc_sw128_nmajor(v + kk * 16 * 64, BK * 128));
  wgmma_commit();
}

// Mask keys past T, above the diagonal and below the window (only in tiles that reach them;
// a row whose keys are all masked so far keeps weights 0: the -inf guard), then the online
// softmax: sc becomes P (unnormalised), m_r and l_r move on, corr is what O is to be scaled
// by. sc[4n + i] is row gid (+ 8 for i >= 2), key 8n + 2 tig (+ 1 for odd i); a quad of lanes
// shares each row.
__device__ __forceinline__ void softmax_tile(float* sc, float* m_r, float* l_r, float* corr, long long k0,
                                             long long qrow0, long long T, int gid, int tig) {
@CAP@  if (k0 + BK > T || (CAUSAL && k0 + BK - 1 > qrow0) || (WINDOW > 0 && k0 + WINDOW <= qrow0 + 15)) {
#pragma unroll
    for (int n = 0; n < BK / 8; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const long long key = k0 + n * 8 + tig * 2 + (i & 1);
        const long long qrow = qrow0 + gid + (i >> 1) * 8;
        if (key >= T || (CAUSAL && key > qrow) || (WINDOW > 0 && key + WINDOW <= qrow)) sc[4 * n + i] = -INFINITY;
      }
  }
  float mx[2] = {m_r[0], m_r[1]};
#pragma unroll
  for (int n = 0; n < BK / 8; ++n) {
    mx[0] = fmaxf(mx[0], fmaxf(sc[4 * n], sc[4 * n + 1]));
    mx[1] = fmaxf(mx[1], fmaxf(sc[4 * n + 2], sc[4 * n + 3]));
  }
  float base[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 1));
    mx[r] = fmaxf(mx[r], __shfl_xor_sync(FULL, mx[r], 2));
    base[r] = mx[r] == -INFINITY ? 0.0f : mx[r] * SCALE_LOG2;   // no key yet: weights stay 0
    corr[r] = exp2f(m_r[r] * SCALE_LOG2 - base[r]);
    m_r[r] = mx[r];
    l_r[r] *= corr[r];
  }
#pragma unroll
  for (int n = 0; n < BK / 8; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      sc[4 * n + i] = exp2f(fmaf(sc[4 * n + i], SCALE_LOG2, -base[i >> 1]));
      l_r[i >> 1] += sc[4 * n + i];
    }
}

__device__ __forceinline__ void scale_o(float* o, const float* corr) {
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    o[4 * n] *= corr[0]; o[4 * n + 1] *= corr[0];
    o[4 * n + 2] *= corr[1]; o[4 * n + 3] *= corr[1];
  }
}

__device__ __forceinline__ void pack_p(const float* sc, unsigned* p) {
#pragma unroll
  for (int i = 0; i < BK / 4; ++i) p[i] = pack2(sc[2 * i], sc[2 * i + 1]);
}

extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1) attention_prefill_wgmma(
    const __grid_constant__ TensorMap map_q, const __grid_constant__ TensorMap map_k,
    const __grid_constant__ TensorMap map_v, @PARAMS@) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // tiles of 128-byte lines in the 128-byte swizzle, 1024-byte aligned: Q [DB][BQ][64],
  // K and V [STAGES][DB][BK][64]
  E* const Qs = reinterpret_cast<E*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  E* const Ks = Qs + BQ * D;
  E* const Vs = Ks + STAGES * BK * D;
  unsigned long long* const q_full = reinterpret_cast<unsigned long long*>(Vs + STAGES * BK * D);
  unsigned long long* const full = q_full + 1;
  unsigned long long* const empty = full + STAGES;
@BLOCK_COORDS@
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], CONSUMERS);
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (wg == 0) {  // producer
    @DEC@
    if (threadIdx.x == 0) {
      mbar_arrive_expect_tx(q_full, Q_BYTES);
      for (int db = 0; db < DB; ++db) tma_load_4d(Qs + db * BQ * 64, &map_q, db * 64, h, (int)q0, b, q_full);
      for (int j = 0; j < n_tiles; ++j) {
        const int s = j % STAGES;
        mbar_wait(&empty[s], ((j / STAGES) & 1) ^ 1u);
        mbar_arrive_expect_tx(&full[s], 2 * KV_BYTES);
        for (int db = 0; db < DB; ++db) {
          tma_load_4d(Ks + (s * DB + db) * BK * 64, &map_k, db * 64, kvh, (int)kbase + j * BK, b, &full[s]);
          tma_load_4d(Vs + (s * DB + db) * BK * 64, &map_v, db * 64, kvh, (int)kbase + j * BK, b, &full[s]);
        }
      }
    }
    return;
  }

  // consumers: warpgroup cw owns rows cw * 64 .. + 63 of the tile, warp w of it 16 of those
  @INC@
  const int cw = wg - 1, warp = (threadIdx.x >> 5) & 3, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
  const int row_w = cw * 64 + warp * 16;
  const bool signals = (threadIdx.x & 127) == 0;
  const E* const Qw = Qs + cw * 64 * 64;  // this warpgroup's rows of each 64-dim box of Q
  float o[D / 2], sc[BK / 2], corr[2];
  unsigned p[BK / 4];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) o[i] = 0.0f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.0f, 0.0f};
  mbar_wait(q_full, 0);
@LOOP@
  // finish the rows: full sums over the quad, normalise, store pairs of dims
  float inv[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = l_r[r];
    l += __shfl_xor_sync(FULL, l, 1);
    l += __shfl_xor_sync(FULL, l, 2);
    inv[r] = l > 0.0f ? 1.0f / l : 0.0f;
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const long long row = q0 + row_w + gid + r * 8;
    if (row < T) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        *reinterpret_cast<unsigned*>(Ob + row * q_stride + n * 8 + tig * 2) =
            pack2(o[4 * n + 2 * r] * inv[r], o[4 * n + 2 * r + 1] * inv[r]);
    }
  }
}
"""

# One tile after the other: S, softmax, P V, each waited for.
_SERIAL = r"""
  for (int j = 0; j < n_tiles; ++j) {
    const int s = j % STAGES;
    mbar_wait(&full[s], (j / STAGES) & 1);
    issue_qk(sc, Qw, Ks + s * DB * BK * 64);
    wgmma_wait<0>();
    fence_operands<BK / 2>(sc);
    softmax_tile(sc, m_r, l_r, corr, kbase + (long long)j * BK, q0 + row_w, T, gid, tig);
    scale_o(o, corr);
    pack_p(sc, p);
    issue_pv(o, p, Vs + s * DB * BK * 64);
    wgmma_wait<0>();
    fence_operands<D / 2>(o);
    if (signals) mbar_arrive(&empty[s]);   // this warpgroup is done with the stage
  }
"""

# FlashAttention-3's intra-warpgroup overlap: the tensor cores compute S of tile j and
# O += P V of tile j - 1 while the warpgroup runs tile j's softmax; O is rescaled once
# the P V in flight is done.
_OVERLAPPED = r"""
  mbar_wait(&full[0], 0);
  issue_qk(sc, Qw, Ks);
  wgmma_wait<0>();
  fence_operands<BK / 2>(sc);
  softmax_tile(sc, m_r, l_r, corr, kbase, q0 + row_w, T, gid, tig);   // O is 0: nothing to rescale
  pack_p(sc, p);
  for (int j = 1; j < n_tiles; ++j) {
    const int s = j % STAGES, prev = (j - 1) % STAGES;
    mbar_wait(&full[s], (j / STAGES) & 1);
    issue_qk(sc, Qw, Ks + s * DB * BK * 64);    // S of tile j ...
    issue_pv(o, p, Vs + prev * DB * BK * 64);   // ... and P V of tile j - 1, both in flight
    wgmma_wait<1>();                            // S is done
    fence_operands<BK / 2>(sc);
    softmax_tile(sc, m_r, l_r, corr, kbase + (long long)j * BK, q0 + row_w, T, gid, tig);
    wgmma_wait<0>();                            // P V of tile j - 1 is done: its stage and O are free
    fence_operands<D / 2>(o);
    if (signals) mbar_arrive(&empty[prev]);
    scale_o(o, corr);
    pack_p(sc, p);
  }
  issue_pv(o, p, Vs + ((n_tiles - 1) % STAGES) * DB * BK * 64);
  wgmma_wait<0>();
  fence_operands<D / 2>(o);
  if (signals) mbar_arrive(&empty[(n_tiles - 1) % STAGES]);
"""
