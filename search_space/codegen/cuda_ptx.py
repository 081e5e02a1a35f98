"""Inline-PTX helpers for CUDA templates: async copies, ldmatrix, tensor-core mma, streaming loads.

``PTX_HELPERS`` is CUDA C to paste after ``codegen.cuda.PREAMBLE``. Everything in it is
plain sm_80+ PTX (it assembles for sm_90a), wrapped in small ``__device__`` functions so that
templates stay readable:

- ``cp_async<BYTES>(smem, gmem, valid)``: ``cp.async`` of 4, 8 or 16 bytes; when ``valid``
  is false nothing is read and the destination is zero-filled (``src-size`` 0), which is how
  tiles that hang over the edge of a matrix are padded with zeros. 16-byte copies bypass L1
  (``.cg``); smaller ones must go through it (``.ca``), as PTX requires.
- ``ldmatrix_x4/x2`` and ``ldmatrix_x4_trans``: the fragment loads of ``mma.sync``.
- ``mma_16816<T>``: ``mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}`` with float32
  accumulators. Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k16"): lane = 4g + t;
  A regs a0..a3 hold (row g, k 2t..2t+1), (row g+8, same k), (row g, k 2t+8..), (row g+8, k 2t+8..);
  B regs b0, b1 hold (k 2t..2t+1, col g) and (k 2t+8.., col g); C/D c0,c1 are (row g, cols
  2t, 2t+1) and c2,c3 are (row g+8, same cols).
- ``ld_stream<BYTES>(p)``: global loads of data read exactly once (weights in decode), through
  the non-coherent path without allocating in L1 and with a 256-byte L2 prefetch hint.
"""
from __future__ import annotations

PTX_HELPERS = r"""
template <int BYTES> struct RawVec;
template <> struct RawVec<16> { unsigned w[4]; };
template <> struct RawVec<8> { unsigned w[2]; };
template <> struct RawVec<4> { unsigned w[1]; };
template <> struct RawVec<2> { unsigned short h[1]; };

// BEGIN PTX (a CPU emulator swaps this section for its own definitions)
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

template <int BYTES> __device__ __forceinline__ void cp_async(void* smem, const void* gmem, bool valid);
template <> __device__ __forceinline__ void cp_async<16>(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
               :: "r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 16 : 0) : "memory");
}
template <> __device__ __forceinline__ void cp_async<8>(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n"
               :: "r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 8 : 0) : "memory");
}
template <> __device__ __forceinline__ void cp_async<4>(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n"
               :: "r"(smem_u32(smem)), "l"(gmem), "r"(valid ? 4 : 0) : "memory");
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];\n" :: "l"(p)); }

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int PENDING> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" :: "n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(smem_u32(p)));
}

__device__ __forceinline__ void ldmatrix_x2(unsigned& r0, unsigned& r1, const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1) : "r"(smem_u32(p)));
}

template <typename T> __device__ __forceinline__ void mma_16816(float* c, const unsigned* a, const unsigned* b);
template <> __device__ __forceinline__ void mma_16816<__half>(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <> __device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
               "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
               : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <int BYTES> __device__ __forceinline__ RawVec<BYTES> ld_stream(const void* p);
template <> __device__ __forceinline__ RawVec<16> ld_stream<16>(const void* p) {
  RawVec<16> v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3]) : "l"(p));
  return v;
}
template <> __device__ __forceinline__ RawVec<8> ld_stream<8>(const void* p) {
  RawVec<8> v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0, %1}, [%2];\n"
               : "=r"(v.w[0]), "=r"(v.w[1]) : "l"(p));
  return v;
}
template <> __device__ __forceinline__ RawVec<4> ld_stream<4>(const void* p) {
  RawVec<4> v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];\n" : "=r"(v.w[0]) : "l"(p));
  return v;
}
template <> __device__ __forceinline__ RawVec<2> ld_stream<2>(const void* p) {
  RawVec<2> v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.u16 %0, [%1];\n" : "=h"(v.h[0]) : "l"(p));
  return v;
}

// Cached read-only loads (activations that every block reads again).
template <int BYTES> __device__ __forceinline__ RawVec<BYTES> ld_cached(const void* p);
template <> __device__ __forceinline__ RawVec<16> ld_cached<16>(const void* p) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  RawVec<16> v; v.w[0] = u.x; v.w[1] = u.y; v.w[2] = u.z; v.w[3] = u.w; return v;
}
template <> __device__ __forceinline__ RawVec<8> ld_cached<8>(const void* p) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  RawVec<8> v; v.w[0] = u.x; v.w[1] = u.y; return v;
}
template <> __device__ __forceinline__ RawVec<4> ld_cached<4>(const void* p) {
  RawVec<4> v; v.w[0] = __ldg(reinterpret_cast<const unsigned*>(p)); return v;
}
template <> __device__ __forceinline__ RawVec<2> ld_cached<2>(const void* p) {
  RawVec<2> v; v.h[0] = __ldg(reinterpret_cast<const unsigned short*>(p)); return v;
}
// END PTX

// Widen the elements packed in a raw vector to float: ELEMS = BYTES / sizeof(T).
template <typename T, int BYTES> __device__ __forceinline__ void unpack_f32(const RawVec<BYTES>& v, float* out);
#define AUTOTUNE_UNPACK_WORDS(T, BYTES, BODY) \
  template <> __device__ __forceinline__ void unpack_f32<T, BYTES>(const RawVec<BYTES>& v, float* out) { \
    _Pragma("unroll") for (int i = 0; i < BYTES / 4; ++i) { const unsigned u = v.w[i]; BODY } }
AUTOTUNE_UNPACK_WORDS(float, 16, out[i] = __uint_as_float(u);)
AUTOTUNE_UNPACK_WORDS(float, 8, out[i] = __uint_as_float(u);)
AUTOTUNE_UNPACK_WORDS(float, 4, out[i] = __uint_as_float(u);)
AUTOTUNE_UNPACK_WORDS(__half, 16, { const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u)); out[2 * i] = f.x; out[2 * i + 1] = f.y; })
AUTOTUNE_UNPACK_WORDS(__half, 8, { const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u)); out[2 * i] = f.x; out[2 * i + 1] = f.y; })
AUTOTUNE_UNPACK_WORDS(__half, 4, { const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&u)); out[2 * i] = f.x; out[2 * i + 1] = f.y; })
AUTOTUNE_UNPACK_WORDS(__nv_bfloat16, 16, { out[2 * i] = __uint_as_float(u << 16); out[2 * i + 1] = __uint_as_float(u & 0xffff0000u); })
AUTOTUNE_UNPACK_WORDS(__nv_bfloat16, 8, { out[2 * i] = __uint_as_float(u << 16); out[2 * i + 1] = __uint_as_float(u & 0xffff0000u); })
AUTOTUNE_UNPACK_WORDS(__nv_bfloat16, 4, { out[2 * i] = __uint_as_float(u << 16); out[2 * i + 1] = __uint_as_float(u & 0xffff0000u); })
#undef AUTOTUNE_UNPACK_WORDS
template <> __device__ __forceinline__ void unpack_f32<__half, 2>(const RawVec<2>& v, float* out) {
  out[0] = __half2float(__ushort_as_half(v.h[0]));
}
template <> __device__ __forceinline__ void unpack_f32<__nv_bfloat16, 2>(const RawVec<2>& v, float* out) {
  out[0] = __uint_as_float(static_cast<unsigned>(v.h[0]) << 16);
}
"""


def _wgmma_function(n: int, ab: str, ctype: str) -> str:
    """``wgmma_m64k16<N, T>``: D[64 x N] (+)= A[64 x 16] B[N x 16]^T, both from shared memory."""
    regs = n // 2
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    names = ",".join(f"%{i}" for i in range(regs))
    return f"""template <> __device__ __forceinline__ void wgmma_m64k16<{n}, {ctype}>(float* d, unsigned long long da,
                                                                          unsigned long long db) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 2}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab} {{{names}}}, %{regs}, %{regs + 1}, p, 1, 1, 0, 0;\\n}}\\n"
               : {outs}
               : "l"(da), "l"(db), "n"(1));
}}"""


def _wgmma_rs_function(n: int, ab: str, ctype: str) -> str:
    """``wgmma_m64k16_rs_nmajor<N, T>``: D[64 x N] (+)= A[64 x 16] B[16 x N], A from registers
    (four 16-bit pairs per thread, the mma.m16n8k16 A fragment of the thread's warp's 16 rows),
    B from shared memory stored N-major (its K rows contiguous in N: V in attention)."""
    regs = n // 2
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    names = ",".join(f"%{i}" for i in range(regs))
    a = ", ".join(f"%{regs + i}" for i in range(4))
    return f"""template <> __device__ __forceinline__ void wgmma_m64k16_rs_nmajor<{n}, {ctype}>(float* d, const unsigned* a,
                                                                                   unsigned long long db) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, %{regs + 5}, 0;\\n"
               "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{ab}.{ab} {{{names}}}, {{{a}}}, %{regs + 4}, p, 1, 1, 1;\\n}}\\n"
               : {outs}
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "n"(1));
}}"""


WGMMA_SIZES = (16, 32, 64, 128, 256)

# Hopper warpgroup MMA (sm_90a): 128 threads issue m64nNk16 together, operands read from
# shared memory through descriptors. ``gmma_desc_sw128`` describes a K-major tile stored in
# rows of 128 bytes (64 half-precision elements) whose 16-byte chunks are XOR-swizzled by
# the row index modulo 8 (the 128-byte swizzle), rows contiguous, 8-row groups 1024 bytes
# apart (stride byte offset), the tile 1024-byte aligned; stepping 16 elements along K
# inside the row adds 32 bytes to the start address. Accumulator registers d[4j .. 4j + 3]
# of warp w, lane 4g + t hold rows 16w + g (+ 8) and columns 8j + 2t (+ 1).
WGMMA_HELPERS = "\n// BEGIN PTX (wgmma; a CPU emulator swaps this section for its own definitions)\n" + r"""
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" :: "n"(N) : "memory");
}
template <int N, typename T> __device__ __forceinline__ void wgmma_m64k16(float* d, unsigned long long da,
                                                                         unsigned long long db);
""" + "\n".join(_wgmma_function(n, ab, ct) for n in WGMMA_SIZES
                for ab, ct in (("f16", "__half"), ("bf16", "__nv_bfloat16"))) + "\n// END PTX\n" + r"""
// Shared-memory matrix descriptor: start address >> 4 (bits 0-13), leading byte offset >> 4
// (16-29; unused by swizzled K-major tiles, 1 by convention), stride byte offset >> 4
// (32-45: 1024 bytes between 8-row groups), layout (62-63: 1 = 128-byte swizzle).
__device__ __forceinline__ unsigned long long gmma_desc_sw128(const void* tile) {
  const unsigned long long addr = smem_u32(tile);
  return ((addr & 0x3FFFFull) >> 4) | (1ull << 16) | ((1024ull >> 4) << 32) | (1ull << 62);
}
"""

# Warpgroup MMA with A from registers and B stored N-major (sm_90a), for attention's O += P V
# (after ``WGMMA_HELPERS``): ``wgmma_m64k16_rs_nmajor<N, T>`` and its B descriptor
# ``gmma_desc_sw128_nmajor``. Kept apart so the kernels that do not use them render as before.
WGMMA_RS_HELPERS = ("\n// BEGIN PTX (wgmma, A from registers; a CPU emulator swaps this section for its own)\n"
                    + """template <int N, typename T> __device__ __forceinline__ void wgmma_m64k16_rs_nmajor(
    float* d, const unsigned* a, unsigned long long db);
""" + "\n".join(_wgmma_rs_function(n, ab, ct) for n in WGMMA_SIZES
                for ab, ct in (("f16", "__half"), ("bf16", "__nv_bfloat16"))) + "\n// END PTX\n" + r"""
// The B descriptor of an N-major tile (K rows of N, as TMA lays out V's rows): 128-byte
// lines hold 64 elements of N, 8 lines (8 K) make a 1024-byte swizzle atom (stride byte
// offset), and the next 64 elements of N are ``lbo`` bytes further (leading byte offset).
__device__ __forceinline__ unsigned long long gmma_desc_sw128_nmajor(const void* tile, unsigned lbo) {
  const unsigned long long addr = smem_u32(tile);
  return ((addr & 0x3FFFFull) >> 4) | ((unsigned long long)((lbo >> 4) & 0x3FFF) << 16) | ((1024ull >> 4) << 32)
         | (1ull << 62);
}
""")

# Hopper's tensor memory accelerator and transaction barriers (sm_90a), for warp-specialised
# pipelines: one producer thread copies tiles with ``tma_load_2d`` (a box of a matrix, as the
# descriptor ``TensorMap`` the host encoded says, swizzled as the descriptor says, zeros past
# the matrix edges) and the copy completes ``bytes`` of the stage's ``full`` barrier; the
# consumers wait on that barrier's phase, and give the stage back by arriving on its
# ``empty`` barrier. ``mbar_wait(bar, parity)`` returns once the phase of that parity has
# completed: parity 1 at first (the phase before the first, complete by definition).
# ``setmaxnreg_*`` moves registers from the producer warpgroup to the consumers. ``tma_store_2d``
# writes a box from shared memory back (an epilogue), ``named_barrier_sync`` syncs a warpgroup.
TMA_HELPERS = r"""
struct __align__(64) TensorMap { unsigned long long raw[16]; };  // CUtensorMap, passed by value
""" + "\n// BEGIN PTX (TMA and mbarrier; a CPU emulator swaps this section for its own definitions)\n" + r"""
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" :: "r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void fence_mbarrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" :: "r"(smem_u32(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned long long* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" :: "r"(smem_u32(bar)) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(unsigned long long* bar, unsigned parity) {
  unsigned done;
  asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
               : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
  return done != 0;
}
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
  while (!mbar_try_wait(bar, parity)) {}
}
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int col, int row, unsigned long long* bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
               :: "r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(map)), "r"(col), "r"(row),
                  "r"(smem_u32(bar)) : "memory");
}
// TMA store of a shared-memory box to the matrix (elements past its edges are not written);
// the bulk group's reads of shared memory are waited for before that memory is reused.
__device__ __forceinline__ void tma_store_2d(const TensorMap* map, int col, int row, const void* src) {
  asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n"
               :: "l"(reinterpret_cast<unsigned long long>(map)), "r"(col), "r"(row), "r"(smem_u32(src)) : "memory");
}
__device__ __forceinline__ void tma_store_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void tma_store_wait_read() { asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"); }
// bar.sync on barrier ``id`` (1-15; 0 is __syncthreads) among ``threads`` threads
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" :: "r"(id), "r"(threads) : "memory");
}
// Thread block clusters: this block's rank, a barrier of every thread of the cluster, an
// arrival on the mbarrier at the same shared offset in block ``rank``, and a TMA load whose
// box lands in every block of ``mask`` (same offset), completing bytes on each one's barrier.
__device__ __forceinline__ unsigned cluster_ctarank() {
  unsigned rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_cluster(unsigned long long* bar, unsigned rank) {
  asm volatile("{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
               "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n"
               :: "r"(smem_u32(bar)), "r"(rank) : "memory");
}
__device__ __forceinline__ void tma_load_2d_multicast(void* dst, const TensorMap* map, int col, int row,
                                                      unsigned long long* bar, unsigned short mask) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
               " [%0], [%1, {%2, %3}], [%4], %5;\n"
               :: "r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(map)), "r"(col), "r"(row),
                  "r"(smem_u32(bar)), "h"(mask) : "memory");
}
__device__ __forceinline__ void tma_load_4d(void* dst, const TensorMap* map, int c0, int c1, int c2, int c3,
                                            unsigned long long* bar) {
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], [%6];\n"
               :: "r"(smem_u32(dst)), "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3),
                  "r"(smem_u32(bar)) : "memory");
}
template <int REGS> __device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
template <int REGS> __device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" :: "n"(REGS));
}
// Ties registers that wgmma reads or writes (accumulators, A fragments) to the point of the call:
// the PTX ISA leaves it undefined when other code writes them between a wgmma.fence and the
// wgmma, or touches them before the wait_group that completes it, so the compiler must not move
// such writes or reads across the fence or the wait. Emits no instruction.
template <int N> __device__ __forceinline__ void fence_operands(float* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i]) :: "memory");
}
template <int N> __device__ __forceinline__ void fence_operands(unsigned* r) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i]) :: "memory");
}
// END PTX
"""

# Programmatic dependent launch (sm_90+), for the kernels of a captured decode step. Where the
# graph joins a kernel to the one before it by a programmatic edge (``runtime.cuda_graph``), the
# kernel may start while that one still runs: it reads only constant data (weights) until
# ``grid_dependency_wait()`` returns, which is when the kernel before it has finished and its
# writes are visible; and ``launch_dependents()`` lets the kernel after it start the same way
# (once every block has called it or ended: its first call in a block counts for the block).
# Launched plainly (tuning, a call per kernel) both are no-ops, as they are below sm_90 and on
# the CPU emulator (no ``__CUDA_ARCH__``). A kernel that uses them says so in its launch
# (``PROGRAMMATIC``): the runtime joins only such kernels by programmatic edges.
GRID_DEPENDENCY_HELPERS = r"""
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
"""
PROGRAMMATIC = ("programmatic", True)  # the ``KernelSource.launch`` entry of such a kernel


def grid_dependency_code(on: bool) -> tuple[str, str, str]:
    """(helpers, trigger, wait) of a kernel that takes a programmatic launch, each empty unless
    ``on``: the helpers above, the statement that lets its dependents launch (a small kernel's
    first statement; a GEMV's after its main loop, so that the next kernel's weights head for L2
    as this one's stream ends, not while it still streams them out of L2) and the statement from
    which it may read what the kernel before it writes, and write anything."""
    if not on:
        return "", "", ""
    return (GRID_DEPENDENCY_HELPERS, "\n  launch_dependents();",
            "\n  grid_dependency_wait();  // other kernels' data and the outputs only from here\n")


PREFETCH_L2_SHARE = 4  # a kernel sends at most 1/4 of the L2 of weights ahead of its wait
L2_LINE = 128  # bytes a prefetch_l2 brings in


def prefetch_lines(target, rows: int, row_bytes: int) -> int:
    """How many 128-byte lines of each of its ``rows`` weight rows (``row_bytes`` each) a
    programmatically launched GEMV sends towards L2 before its wait: all of them while the whole
    matrix fits in a quarter of the target's L2, else the leading lines that do (at least one).
    The overlap with the kernel before lasts a few microseconds; a prefetch larger than L2 would
    evict its own first lines before the main loop reads them, and the weights would cross from
    memory twice."""
    budget = (target.l2_bytes or 50 << 20) / PREFETCH_L2_SHARE
    whole = -(-row_bytes // L2_LINE)
    return min(whole, max(1, int(budget // (rows * L2_LINE))))


def programmatic_launch(target) -> tuple:
    """The launch entries of a kernel that uses the helpers above: ``PROGRAMMATIC`` where the
    target's GPUs have programmatic launches (sm_90 on), nothing where the helpers compile away."""
    digits = "".join(ch for ch in target.arch if ch.isdigit())
    return (PROGRAMMATIC,) if target.kind == "cuda" and digits and int(digits) >= 90 else ()
