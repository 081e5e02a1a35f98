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
