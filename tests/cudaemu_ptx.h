// The inline-PTX helpers of search_space/codegen/cuda_ptx.py, emulated (tests only).
// tests/cudaemu.py includes this file in place of the first "// BEGIN PTX" ... "// END PTX"
// section of a kernel's source (later such sections are dropped: everything is here), so it
// sees the types the source defined before that section (RawVec).
#pragma once

template <int BYTES> inline void cp_async(void* smem, const void* gmem, bool valid) {
  emu::Copy c{smem, gmem, BYTES, valid};
  if (emu::deferred_copies) emu::fibers[emu::current].open.push_back(c);
  else emu::run_copy(c);
}
inline std::vector<const void*> prefetched;  // what prefetch_l2 named in this launch (emu_prefetched)
inline void prefetch_l2(const void* p) { prefetched.push_back(p); }
inline void cp_async_commit() { emu::cp_async_commit(); }
template <int PENDING> inline void cp_async_wait() { emu::cp_async_wait(PENDING); }

// ldmatrix and mma.sync: the emulated instructions of cudaemu.h (emu_ldmatrix, emu_mma)
inline void ldmatrix_x4(unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3, const void* p) {
  unsigned r[4];
  emu_ldmatrix(4, false, r, p);
  r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
inline void ldmatrix_x2(unsigned& r0, unsigned& r1, const void* p) {
  unsigned r[2];
  emu_ldmatrix(2, false, r, p);
  r0 = r[0]; r1 = r[1];
}

template <typename T> inline void mma_16816(float* c, const unsigned* a, const unsigned* b);
template <> inline void mma_16816<__half>(float* c, const unsigned* a, const unsigned* b) { emu_mma(c, a, b, false); }
template <> inline void mma_16816<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) { emu_mma(c, a, b, true); }

template <int BYTES> inline RawVec<BYTES> ld_stream(const void* p) {
  RawVec<BYTES> v;
  memcpy(&v, p, BYTES);
  return v;
}
template <int BYTES> inline RawVec<BYTES> ld_cached(const void* p) {
  RawVec<BYTES> v;
  memcpy(&v, p, BYTES);
  return v;
}

// ---- Hopper wgmma, emulated: descriptors address the emulator's dynamic shared memory.
inline unsigned smem_u32(const void* p) {
  return (unsigned)(static_cast<const unsigned char*>(p) - emu::dynamic_smem_bytes);
}
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
inline void wgmma_commit() {}
template <int N> inline void wgmma_wait() {}

namespace emu {
// Element (row, k) of a K-major operand described by `desc` (128-byte swizzle only).
inline const unsigned char* gmma_element(unsigned long long desc, int row, int k) {
  if ((desc >> 62) != 1ull) fail("emulated wgmma: only the 128-byte swizzle layout is emulated");
  const unsigned long long start = (desc & 0x3FFFull) << 4;
  const unsigned long long sbo = ((desc >> 32) & 0x3FFFull) << 4;
  const unsigned long long addr = start + (unsigned long long)(row / 8) * sbo + (row % 8) * 128 + k * 2;
  const unsigned long long swizzled = addr ^ (((addr >> 7) & 7) << 4);
  if (swizzled + 2 > SMEM_BYTES) fail("emulated wgmma: descriptor outside shared memory");
  return dynamic_smem_bytes + swizzled;
}
struct WgmmaBox { float* d[128]; unsigned long long da[128], db[128]; };
// D[64 x N] += A[64 x 16] B[N x 16]^T into the 128 threads' accumulators: d[4j .. 4j + 3] of
// warp w, lane 4g + t hold rows 16w + g (+ 8) and columns 8j + 2t (+ 1)
inline void wgmma_accumulate(float* const* d, const float (*A)[16], const float (*B)[16], int N) {
  for (int i = 0; i < 128; ++i) {
    const int w = i / 32, g = (i % 32) / 4, t = i % 4;
    for (int j = 0; j < N / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = 16 * w + g + (e >> 1) * 8, col = 8 * j + 2 * t + (e & 1);
        float sum = d[i][4 * j + e];
        for (int k = 0; k < 16; ++k) sum += A[row][k] * B[col][k];
        d[i][4 * j + e] = sum;
      }
  }
}
static std::vector<WgmmaBox> wgmma_boxes;
}  // namespace emu

template <int N, typename T> inline void wgmma_m64k16(float* d, unsigned long long da, unsigned long long db) {
  const bool bf16 = sizeof(T) == 2 && std::is_same<T, __nv_bfloat16>::value;
  const int me = emu::fibers[emu::current].linear;
  const int wg = me / 128;
  if ((int)emu::wgmma_boxes.size() <= wg) emu::wgmma_boxes.resize(wg + 1);
  emu::WgmmaBox& box = emu::wgmma_boxes[wg];
  box.d[me % 128] = d;
  box.da[me % 128] = da;
  box.db[me % 128] = db;
  emu::rendezvous(emu::warpgroup_groups[wg], [wg] { return emu::live_in_warpgroup(wg); }, [&] {
    for (int i = 1; i < 128; ++i)
      if (box.da[i] != box.da[0] || box.db[i] != box.db[0]) emu::fail("emulated wgmma: descriptors differ across the warpgroup");
    auto value = [&](const unsigned char* p) {
      unsigned short h;
      memcpy(&h, p, 2);
      return bf16 ? emu_from_bits<float>((uint64_t)((unsigned)h << 16)) : __half2float(__ushort_as_half(h));
    };
    static float A[64][16], B[256][16];
    for (int r = 0; r < 64; ++r)
      for (int k = 0; k < 16; ++k) A[r][k] = value(emu::gmma_element(box.da[0], r, k));
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < 16; ++k) B[n][k] = value(emu::gmma_element(box.db[0], n, k));
    emu::wgmma_accumulate(box.d, A, B, N);
  });
}

namespace emu {
// Element (k, n) of an N-major operand described by `desc` (128-byte swizzle only): 64
// elements of N per 128-byte line, 8 lines of K per 1024-byte atom (stride byte offset),
// the next 64 of N ``leading byte offset`` further.
inline const unsigned char* gmma_element_nmajor(unsigned long long desc, int k, int n) {
  if ((desc >> 62) != 1ull) fail("emulated wgmma: only the 128-byte swizzle layout is emulated");
  const unsigned long long start = (desc & 0x3FFFull) << 4;
  const unsigned long long lbo = ((desc >> 16) & 0x3FFFull) << 4;
  const unsigned long long sbo = ((desc >> 32) & 0x3FFFull) << 4;
  const unsigned long long addr = start + (unsigned long long)(n / 64) * lbo + (unsigned long long)(k / 8) * sbo
                                  + (k % 8) * 128 + (n % 64) * 2;
  const unsigned long long swizzled = addr ^ (((addr >> 7) & 7) << 4);
  if (swizzled + 2 > SMEM_BYTES) fail("emulated wgmma: descriptor outside shared memory");
  return dynamic_smem_bytes + swizzled;
}
struct WgmmaRsBox { float* d[128]; unsigned a[128][4]; unsigned long long db[128]; };
static std::vector<WgmmaRsBox> wgmma_rs_boxes;
}  // namespace emu

// A from registers: thread 32w + 4g + t holds rows 16w + g (+8) of A as mma.m16n8k16's A
// fragment does (a[0]: row g, k 2t and 2t + 1 in the low and high halves; a[1]: row g + 8;
// a[2], a[3]: the same at k + 8); B N-major from shared memory.
template <int N, typename T> inline void wgmma_m64k16_rs_nmajor(float* d, const unsigned* a, unsigned long long db) {
  const bool bf16 = std::is_same<T, __nv_bfloat16>::value;
  const int me = emu::fibers[emu::current].linear;
  const int wg = me / 128;
  if ((int)emu::wgmma_rs_boxes.size() <= wg) emu::wgmma_rs_boxes.resize(wg + 1);
  emu::WgmmaRsBox& box = emu::wgmma_rs_boxes[wg];
  box.d[me % 128] = d;
  for (int i = 0; i < 4; ++i) box.a[me % 128][i] = a[i];
  box.db[me % 128] = db;
  emu::rendezvous(emu::warpgroup_groups[wg], [wg] { return emu::live_in_warpgroup(wg); }, [&] {
    for (int i = 1; i < 128; ++i)
      if (box.db[i] != box.db[0]) emu::fail("emulated wgmma: descriptors differ across the warpgroup");
    static float A[64][16], B[256][16];
    for (int i = 0; i < 128; ++i) {
      const int w = i / 32, g = (i % 32) / 4, t = i % 4;
      for (int half = 0; half < 2; ++half) {
        const int k0 = 2 * t + 8 * half;
        A[16 * w + g][k0] = emu_lo(box.a[i][2 * half], bf16);
        A[16 * w + g][k0 + 1] = emu_hi(box.a[i][2 * half], bf16);
        A[16 * w + g + 8][k0] = emu_lo(box.a[i][2 * half + 1], bf16);
        A[16 * w + g + 8][k0 + 1] = emu_hi(box.a[i][2 * half + 1], bf16);
      }
    }
    for (int n = 0; n < N; ++n)
      for (int k = 0; k < 16; ++k) {
        unsigned short h;
        memcpy(&h, emu::gmma_element_nmajor(box.db[0], k, n), 2);
        B[n][k] = bf16 ? emu_from_bits<float>((uint64_t)((unsigned)h << 16)) : __half2float(__ushort_as_half(h));
      }
    emu::wgmma_accumulate(box.d, A, B, N);
  });
}

// ---- Hopper TMA and transaction barriers, emulated. An mbarrier's 8 shared bytes hold a
// magic word and the index of its state here (shared memory starts each block as NaN bytes,
// so a barrier used before mbar_init is caught). A TMA copy lands at once, or (deferred
// runs) only when a thread next waits on its barrier: a read of the stage before that wait
// sees the NaN bytes or the previous tile.
namespace emu {
constexpr unsigned MBAR_MAGIC = 0xB4A1u;
struct PendingTma { std::vector<unsigned char> bytes; unsigned char* dst; };
struct Mbarrier { int expected = 0, pending = 0; long long tx = 0; unsigned phase = 0; std::vector<PendingTma> copies; };
static std::vector<Mbarrier> mbarriers;

inline Mbarrier& mbarrier_at(unsigned long long* bar) {
  smem_offset(bar);  // inside dynamic shared memory
  if (reinterpret_cast<uintptr_t>(bar) % 8) fail("mbarrier not 8-byte aligned");
  const unsigned long long word = *bar;
  if ((word >> 32) != MBAR_MAGIC || (word & 0xffffffffull) >= mbarriers.size()) {
    fail("mbarrier used before mbar_init (or overwritten)");
    static Mbarrier dummy;
    return dummy;
  }
  return mbarriers[word & 0xffffffffull];
}
inline void mbarrier_progress(Mbarrier& b) {
  if (b.pending < 0) fail("mbarrier: more arrivals than its count");
  if (b.pending == 0 && b.tx == 0) {
    b.phase ^= 1u;
    b.pending = b.expected;
    ++events;
  }
}
inline void mbarrier_land(Mbarrier& b) {
  for (auto& c : b.copies) {
    memcpy(c.dst, c.bytes.data(), c.bytes.size());
    b.tx -= (long long)c.bytes.size();
  }
  if (!b.copies.empty()) {
    b.copies.clear();
    mbarrier_progress(b);
  }
}
}  // namespace emu

inline void mbar_init(unsigned long long* bar, unsigned count) {
  emu::smem_offset(bar);
  emu::Mbarrier b;
  b.expected = b.pending = (int)count;
  emu::mbarriers.push_back(b);
  *bar = ((unsigned long long)emu::MBAR_MAGIC << 32) | (unsigned long long)(emu::mbarriers.size() - 1);
}
inline void fence_mbarrier_init() {}
inline void mbar_arrive(unsigned long long* bar) {
  emu::Mbarrier& b = emu::mbarrier_at(bar);
  --b.pending;
  ++emu::events;
  emu::mbarrier_progress(b);
}
inline void mbar_arrive_expect_tx(unsigned long long* bar, unsigned bytes) {
  emu::Mbarrier& b = emu::mbarrier_at(bar);
  b.tx += bytes;
  mbar_arrive(bar);
}
inline bool mbar_try_wait(unsigned long long* bar, unsigned parity) {
  emu::Mbarrier& b = emu::mbarrier_at(bar);
  emu::mbarrier_land(b);
  return b.phase != (parity & 1u);
}
inline void mbar_wait(unsigned long long* bar, unsigned parity) {
  while (!mbar_try_wait(bar, parity) && !emu::failure[0]) emu::yield();
}
template <int REGS> inline void setmaxnreg_inc() {}
template <int REGS> inline void setmaxnreg_dec() {}
template <int N, typename R> inline void fence_operands(R*) {}  // a compiler barrier on a GPU

// cp.async.bulk.tensor.Nd with the emulator's descriptor (tests/cudaemu.py, encode_tensor_map):
// the box at ``coords`` (innermost first), zeros where it leaves the tensor, stored innermost
// dim fastest; with the 128-byte swizzle, 16-byte chunk c of 128-byte line r lands at chunk
// c ^ (r % 8), as the wgmma descriptors read it.
namespace emu {
struct TmaBox {
  unsigned char* base; int rank, es, swizzle; long long dims[5], strides[5]; int box[5]; int bytes;
};
inline bool tma_box(const unsigned long long* w, TmaBox& t, const char* what) {
  if ((w[0] >> 32) != 0x50414D54ull) { fail(what); return false; }
  t.base = reinterpret_cast<unsigned char*>(w[1]);
  t.rank = (int)((w[0] >> 24) & 0xff); t.es = (int)((w[0] >> 16) & 0xff); t.swizzle = (int)(w[0] & 0xffff);
  t.bytes = t.es;
  for (int i = 0; i < t.rank; ++i) {
    t.dims[i] = (long long)w[2 + i];
    t.strides[i] = i == 0 ? t.es : (long long)w[7 + i - 1];
    t.box[i] = (int)w[11 + i];
    t.bytes *= t.box[i];
  }
  if (t.swizzle != 0 && (t.swizzle != 128 || t.box[0] * t.es != 128)) {
    fail("TMA: only boxes of 128-byte lines with the 128-byte swizzle (or no swizzle) are emulated");
    return false;
  }
  return true;
}
// every element of the box: its offset in shared memory (swizzled) and in global memory, or -1 outside
template <typename F> inline void tma_each(const TmaBox& t, const int* coords, F&& f) {
  int index[5] = {0, 0, 0, 0, 0};
  for (int linear = 0; linear < t.bytes / t.es; ++linear) {
    long long global = 0;
    bool inside = true;
    for (int i = 0; i < t.rank; ++i) {
      const long long at = (long long)coords[i] + index[i];
      inside = inside && at >= 0 && at < t.dims[i];
      global += at * t.strides[i];
    }
    unsigned addr = (unsigned)(linear * t.es);
    if (t.swizzle) addr ^= ((addr >> 7) & 7u) << 4;
    f(addr, inside ? global : -1);
    for (int i = 0; i < t.rank && ++index[i] == t.box[i]; ++i) index[i] = 0;
  }
}
}  // namespace emu

template <typename Map> inline void tma_load(void* dst, const Map* map, const int* coords, unsigned long long* bar) {
  emu::TmaBox t;
  if (!emu::tma_box(map->raw, t, "tma_load: the tensor map was not encoded (cuTensorMapEncodeTiled)")) return;
  const unsigned offset = emu::smem_offset(dst);
  if (offset % (t.swizzle ? 1024 : 128)) { emu::fail("tma_load: shared destination not aligned (1024 bytes when swizzled, else 128)"); return; }
  unsigned char* out = emu::smem_at(offset, t.bytes);
  std::vector<unsigned char> box(t.bytes, 0);
  emu::tma_each(t, coords, [&](unsigned addr, long long global) {
    if (global >= 0) memcpy(&box[addr], t.base + global, t.es);
  });
  emu::Mbarrier& b = emu::mbarrier_at(bar);
  b.copies.push_back(emu::PendingTma{box, out});
  if (!emu::deferred_copies) emu::mbarrier_land(b);
}
template <typename Map> inline void tma_load_2d(void* dst, const Map* map, int col, int row, unsigned long long* bar) {
  const int coords[2] = {col, row};
  tma_load(dst, map, coords, bar);
}
template <typename Map> inline void tma_load_4d(void* dst, const Map* map, int c0, int c1, int c2, int c3,
                                                unsigned long long* bar) {
  const int coords[4] = {c0, c1, c2, c3};
  tma_load(dst, map, coords, bar);
}

// TMA store: the box in shared memory (laid out as tma_load_2d lays it) to the matrix, only
// the elements inside it. Done at once, or (deferred runs) when the thread next waits for its
// bulk groups' reads, reading shared memory then: a kernel that reuses the box before that
// wait stores what it wrote over it, and one that never waits stores nothing.
namespace emu {
struct PendingStore { const unsigned long long* map; int coords[5]; unsigned offset; };
static std::vector<std::vector<PendingStore>> pending_stores;  // per thread of the block
inline void run_store(const PendingStore& s) {
  TmaBox t;
  if (!tma_box(s.map, t, "tma_store: the tensor map was not encoded (cuTensorMapEncodeTiled)")) return;
  const unsigned char* box = smem_at(s.offset, t.bytes);
  tma_each(t, s.coords, [&](unsigned addr, long long global) {
    if (global >= 0) memcpy(t.base + global, box + addr, t.es);
  });
}
}  // namespace emu

template <typename Map> inline void tma_store_2d(const Map* map, int col, int row, const void* src) {
  emu::TmaBox t;
  if (!emu::tma_box(map->raw, t, "tma_store: the tensor map was not encoded (cuTensorMapEncodeTiled)")) return;
  const unsigned offset = emu::smem_offset(src);
  if (offset % (t.swizzle ? 1024 : 128)) { emu::fail("tma_store: shared source not aligned (1024 bytes when swizzled, else 128)"); return; }
  emu::PendingStore s{map->raw, {col, row, 0, 0, 0}, offset};
  if (!emu::deferred_copies) { emu::run_store(s); return; }
  const int me = emu::fibers[emu::current].linear;
  if ((int)emu::pending_stores.size() <= me) emu::pending_stores.resize(me + 1);
  emu::pending_stores[me].push_back(s);
}
inline void tma_store_commit() {}
inline void tma_store_wait_read() {
  const int me = emu::fibers[emu::current].linear;
  if ((int)emu::pending_stores.size() <= me) return;
  for (auto& s : emu::pending_stores[me]) emu::run_store(s);
  emu::pending_stores[me].clear();
}
namespace emu { static std::vector<Group> named_barriers(16 * MAX_CLUSTER); }  // per block
inline void named_barrier_sync(int id, int threads) {
  if (id < 1 || id > 15) { emu::fail("named barrier id outside 1-15"); return; }
  emu::rendezvous(emu::named_barriers[emu::fibers[emu::current].rank * 16 + id], [threads] { return threads; }, [] {});
}

// ---- Thread block clusters: the blocks of a cluster run side by side (cudaemu.h), each with
// its own shared memory; a shared address is the same offset in every block of the cluster.
namespace emu {
template <typename T> inline T* in_block(T* p, int rank) {  // ``p`` of this block, in block ``rank``
  unsigned char* c = reinterpret_cast<unsigned char*>(p);
  return reinterpret_cast<T*>(smem_pool[rank] + (c - smem_pool[fibers[current].rank]));
}
template <typename F> inline void as_block(int rank, F&& f) {  // run ``f`` addressing block ``rank``'s shared memory
  unsigned char* mine = dynamic_smem_bytes;
  dynamic_smem_bytes = smem_pool[rank];
  f();
  dynamic_smem_bytes = mine;
}
}  // namespace emu
inline unsigned cluster_ctarank() { return (unsigned)emu::fibers[emu::current].rank; }
inline void cluster_sync() {
  emu::rendezvous(emu::cluster_group, [] { return emu::live_in_cluster(); }, [] {});
}
inline void mbar_arrive_cluster(unsigned long long* bar, unsigned rank) {
  if ((int)rank >= emu::cluster_size) { emu::fail("mbarrier arrive on a block outside the cluster"); return; }
  if (!emu::live_in_block((int)rank)) { emu::fail("mbarrier arrive on a block that has exited (its shared memory is gone)"); return; }
  unsigned long long* remote = emu::in_block(bar, (int)rank);
  emu::as_block((int)rank, [&] { mbar_arrive(remote); });
}
// the box lands at the same offset in every block of ``mask`` and completes its bytes on the
// barrier at the same offset there
template <typename Map> inline void tma_load_2d_multicast(void* dst, const Map* map, int col, int row,
                                                          unsigned long long* bar, unsigned short mask) {
  if (mask >> emu::cluster_size) { emu::fail("TMA multicast to a block outside the cluster"); return; }
  for (int r = 0; r < emu::cluster_size; ++r)
    if (mask & (1u << r)) {
      if (!emu::live_in_block(r)) { emu::fail("TMA multicast into a block that has exited"); return; }
      void* there = emu::in_block(static_cast<unsigned char*>(dst), r);
      unsigned long long* barrier = emu::in_block(bar, r);
      emu::as_block(r, [&] { tma_load_2d(there, map, col, row, barrier); });
    }
}
