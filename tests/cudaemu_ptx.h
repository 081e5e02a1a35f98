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
inline void prefetch_l2(const void*) {}
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
    for (int i = 0; i < 128; ++i) {
      const int w = i / 32, g = (i % 32) / 4, t = i % 4;
      for (int j = 0; j < N / 8; ++j)
        for (int e = 0; e < 4; ++e) {
          const int row = 16 * w + g + (e >> 1) * 8, col = 8 * j + 2 * t + (e & 1);
          float s = box.d[i][4 * j + e];
          for (int k = 0; k < 16; ++k) s += A[row][k] * B[col][k];
          box.d[i][4 * j + e] = s;
        }
    }
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

// cp.async.bulk.tensor.2d with the emulator's descriptor (tests/cudaemu.py, encode_tensor_map):
// the box of box_rows x box_cols elements at (row, col), zeros where it leaves the matrix,
// stored row after row; with the 128-byte swizzle, 16-byte chunk c of a 128-byte row r lands
// at chunk c ^ (r % 8), as the wgmma descriptors read it.
template <typename Map> inline void tma_load_2d(void* dst, const Map* map, int col, int row, unsigned long long* bar) {
  const unsigned long long* w = map->raw;
  if (w[0] != 0x50414D54ull) { emu::fail("tma_load_2d: the tensor map was not encoded (cuTensorMapEncodeTiled)"); return; }
  const unsigned char* base = reinterpret_cast<const unsigned char*>(w[1]);
  const long long rows = (long long)w[2], cols = (long long)w[3], stride = (long long)w[4];
  const int box_rows = (int)w[5], box_cols = (int)w[6], es = (int)w[7], swizzle = (int)w[8];
  const int row_bytes = box_cols * es, total = box_rows * row_bytes;
  const unsigned offset = emu::smem_offset(dst);
  if (swizzle != 0 && (swizzle != 128 || row_bytes != 128)) { emu::fail("tma_load_2d: only 128-byte rows with the 128-byte swizzle (or none) are emulated"); return; }
  if (offset % (swizzle ? 1024 : 128)) { emu::fail("tma_load_2d: shared destination not aligned (1024 bytes when swizzled, else 128)"); return; }
  unsigned char* out = emu::smem_at(offset, total);
  std::vector<unsigned char> box(total, 0);
  for (int r = 0; r < box_rows; ++r)
    for (int c = 0; c < box_cols; ++c) {
      const long long gr = (long long)row + r, gc = (long long)col + c;
      if (gr < 0 || gr >= rows || gc < 0 || gc >= cols) continue;
      unsigned addr = (unsigned)(r * row_bytes + c * es);
      if (swizzle) addr ^= ((addr >> 7) & 7u) << 4;
      memcpy(&box[addr], base + gr * stride + gc * es, es);
    }
  emu::Mbarrier& b = emu::mbarrier_at(bar);
  b.copies.push_back(emu::PendingTma{box, out});
  if (!emu::deferred_copies) emu::mbarrier_land(b);
}

// TMA store: the box in shared memory (laid out as tma_load_2d lays it) to the matrix, only
// the elements inside it. Done at once, or (deferred runs) when the thread next waits for its
// bulk groups' reads, reading shared memory then: a kernel that reuses the box before that
// wait stores what it wrote over it, and one that never waits stores nothing.
namespace emu {
struct PendingStore { const unsigned long long* map; int col, row; unsigned offset; };
static std::vector<std::vector<PendingStore>> pending_stores;  // per thread of the block
inline void run_store(const PendingStore& s) {
  const unsigned long long* w = s.map;
  unsigned char* base = reinterpret_cast<unsigned char*>(w[1]);
  const long long rows = (long long)w[2], cols = (long long)w[3], stride = (long long)w[4];
  const int box_rows = (int)w[5], box_cols = (int)w[6], es = (int)w[7], swizzle = (int)w[8];
  const int row_bytes = box_cols * es;
  const unsigned char* box = smem_at(s.offset, box_rows * row_bytes);
  for (int r = 0; r < box_rows; ++r)
    for (int c = 0; c < box_cols; ++c) {
      const long long gr = (long long)s.row + r, gc = (long long)s.col + c;
      if (gr < 0 || gr >= rows || gc < 0 || gc >= cols) continue;
      unsigned addr = (unsigned)(r * row_bytes + c * es);
      if (swizzle) addr ^= ((addr >> 7) & 7u) << 4;
      memcpy(base + gr * stride + gc * es, box + addr, es);
    }
}
}  // namespace emu

template <typename Map> inline void tma_store_2d(const Map* map, int col, int row, const void* src) {
  const unsigned long long* w = map->raw;
  if (w[0] != 0x50414D54ull) { emu::fail("tma_store_2d: the tensor map was not encoded (cuTensorMapEncodeTiled)"); return; }
  const int row_bytes = (int)(w[6] * w[7]), swizzle = (int)w[8];
  const unsigned offset = emu::smem_offset(src);
  if (swizzle != 0 && (swizzle != 128 || row_bytes != 128)) { emu::fail("tma_store_2d: only 128-byte rows with the 128-byte swizzle (or none) are emulated"); return; }
  if (offset % (swizzle ? 1024 : 128)) { emu::fail("tma_store_2d: shared source not aligned (1024 bytes when swizzled, else 128)"); return; }
  emu::PendingStore s{w, col, row, offset};
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
