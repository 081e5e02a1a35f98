// A CPU emulator for the CUDA C that the templates generate (tests only).
//
// Every CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another in a shuffled order. Barriers (__syncthreads) and warp collectives (shuffles,
// ldmatrix, mma.sync) are rendezvous points: each fiber deposits its operands and yields
// until every live thread of its group has arrived; the last one to arrive computes the
// result for all. A barrier that some threads never reach is reported as a deadlock.
// cp.async copies are either done at once ("eager") or held back until the wait_group that
// retires them ("deferred"): running both catches reads that come before the wait and
// copies that land on data still being read. Shared memory is a static per block (blocks
// never overlap), zero-filled with NaN bytes before each block so stale reads show.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <random>
#include <vector>
#include <ucontext.h>

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <vector_types.h>
#include <vector_functions.h>

#define AUTOTUNE_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
static emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

constexpr size_t STACK_BYTES = 256 << 10;
constexpr size_t SMEM_BYTES = 256 << 10;

struct Copy { void* dst; const void* src; int bytes; bool valid; };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  emu_dim3 tid;
  int linear = 0;
  bool done = false;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                  // issued, not yet committed
};

struct Group {
  int arrived = 0;
  unsigned long generation = 0;
};

static std::vector<Fiber> fibers;
static ucontext_t scheduler;
static int current = -1;
static unsigned long events = 0;  // arrivals and completions: progress for deadlock detection
static bool deferred_copies = false;
static std::vector<Group> warp_groups;
static std::vector<Group> warpgroup_groups;  // 4 consecutive warps (Hopper wgmma)
static Group block_group;
alignas(1024) static unsigned char dynamic_smem_bytes[SMEM_BYTES];
static std::function<void()> kernel_body;
static char failure[512] = {0};

// An untyped pointer that converts to the kernel's declared parameter type.
struct AnyPtr {
  void* p;
  template <typename T> operator T*() const { return static_cast<T*>(p); }
};

inline void fail(const char* what) {
  if (!failure[0]) snprintf(failure, sizeof(failure), "%s", what);
}

inline void yield() { swapcontext(&fibers[current].ctx, &scheduler); }

inline int live_in_warp(int warp) {
  int n = 0, threads = (int)fibers.size();
  for (int i = warp * 32; i < std::min(threads, warp * 32 + 32); ++i) n += !fibers[i].done;
  return n;
}

inline int live_in_warpgroup(int wg) {
  int n = 0, threads = (int)fibers.size();
  for (int i = wg * 128; i < std::min(threads, wg * 128 + 128); ++i) n += !fibers[i].done;
  return n;
}

inline int live_in_block() {
  int n = 0;
  for (auto& f : fibers) n += !f.done;
  return n;
}

// Arrive at `group`; once every live member has arrived (threads that exited count as
// arrived, as on the GPU), whoever notices first runs `last` and releases everyone.
template <typename Live, typename F> inline void rendezvous(Group& group, Live live, F&& last) {
  const unsigned long mine = group.generation;
  ++group.arrived;
  ++events;
  while (group.generation == mine) {
    if (group.arrived >= live()) {
      last();
      group.arrived = 0;
      ++group.generation;
      ++events;
      return;
    }
    yield();
  }
}

inline int lane() { return fibers[current].linear & 31; }
inline int warp() { return fibers[current].linear >> 5; }

// Per-warp mailboxes for collectives: operands in, results out.
struct WarpBox {
  uint64_t in[32];
  uint64_t out[32];
  const void* addr[32];
  unsigned a[32][4], b[32][2];
  float c[32][4];
};
static std::vector<WarpBox> boxes;

inline void run_copy(const Copy& c) {
  if (c.valid) memcpy(c.dst, c.src, c.bytes);
  else memset(c.dst, 0, c.bytes);
}

static void fiber_main() {
  kernel_body();
  Fiber& f = fibers[current];
  for (auto& g : f.groups) for (auto& c : g) run_copy(c);
  for (auto& c : f.open) run_copy(c);
  f.groups.clear();
  f.open.clear();
  f.done = true;
  ++events;
  // A warp or block waiting for this thread may now be complete without it.
  swapcontext(&f.ctx, &scheduler);
}

inline void set_current(int i) {
  current = i;
  threadIdx.x = fibers[i].tid.x;
  threadIdx.y = fibers[i].tid.y;
  threadIdx.z = fibers[i].tid.z;
}

inline bool run_block() {
  const int threads = (int)fibers.size();
  for (int i = 0; i < threads; ++i) {
    Fiber& f = fibers[i];
    f.done = false;
    f.groups.clear();
    f.open.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &scheduler;
    makecontext(&f.ctx, fiber_main, 0);
  }
  int finished = 0;
  while (finished < threads) {
    const unsigned long before = events;
    finished = 0;
    for (int i = 0; i < threads; ++i) {
      if (fibers[i].done) { ++finished; continue; }
      set_current(i);
      swapcontext(&scheduler, &fibers[i].ctx);
      if (failure[0]) return false;
      if (fibers[i].done) ++finished;
    }
    if (finished < threads && events == before) {
      fail("deadlock: some threads wait at a barrier or warp collective that others never reach");
      return false;
    }
  }
  return true;
}

inline int launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, bool deferred,
                  unsigned seed) {
  failure[0] = 0;
  deferred_copies = deferred;
  const int threads = (int)(bx * by * bz);
  fibers.assign(threads, Fiber());
  for (int i = 0; i < threads; ++i) {
    fibers[i].stack.resize(STACK_BYTES);
    fibers[i].linear = i;
    fibers[i].tid.x = i % bx;
    fibers[i].tid.y = (i / bx) % by;
    fibers[i].tid.z = i / (bx * by);
  }
  warp_groups.assign((threads + 31) / 32, Group());
  warpgroup_groups.assign((threads + 127) / 128, Group());
  boxes.assign((threads + 31) / 32, WarpBox());
  blockDim.x = bx; blockDim.y = by; blockDim.z = bz;
  gridDim.x = gx; gridDim.y = gy; gridDim.z = gz;
  std::vector<unsigned long> order((size_t)gx * gy * gz);
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  for (unsigned long b : order) {
    blockIdx.x = b % gx;
    blockIdx.y = (b / gx) % gy;
    blockIdx.z = b / ((unsigned long)gx * gy);
    memset(dynamic_smem_bytes, 0xff, sizeof(dynamic_smem_bytes));  // NaN bytes: stale reads show
    block_group = Group();
    for (auto& g : warp_groups) g = Group();
    for (auto& g : warpgroup_groups) g = Group();
    if (!run_block()) return 1;
  }
  return 0;
}

}  // namespace emu

// ------------------------------------------------------------------ CUDA built-ins

inline void __syncthreads() {
  emu::rendezvous(emu::block_group, [] { return emu::live_in_block(); }, [] {});
}
inline void __syncwarp(unsigned = 0xffffffffu) {
  const int w = emu::warp();
  emu::rendezvous(emu::warp_groups[w], [w] { return emu::live_in_warp(w); }, [] {});
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T> inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
  uint64_t u = 0;
  memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T> inline T emu_from_bits(uint64_t u) {
  T v;
  memcpy(&v, &u, sizeof(T));
  return v;
}

// Each lane reads the operand of lane src(lane); lanes outside the warp read their own.
template <typename T, typename Src> inline T emu_shuffle(T v, Src src) {
  const int w = emu::warp(), l = emu::lane();
  emu::WarpBox& box = emu::boxes[w];
  box.in[l] = emu_bits(v);
  emu::rendezvous(emu::warp_groups[w], [w] { return emu::live_in_warp(w); }, [&] {
    for (int i = 0; i < 32; ++i) {
      const int s = src(i);
      box.out[i] = (s >= 0 && s < 32) ? box.in[s] : box.in[i];
    }
  });
  return emu_from_bits<T>(box.out[l]);
}
template <typename T> inline T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  return emu_shuffle(v, [=](int i) { return (i ^ mask) < ((i / width) * width + width) ? (i ^ mask) : i; });
}
template <typename T> inline T __shfl_sync(unsigned, T v, int src, int width = 32) {
  return emu_shuffle(v, [=](int i) { return (i / width) * width + (src % width); });
}
template <typename T> inline T __shfl_down_sync(unsigned, T v, unsigned d, int width = 32) {
  return emu_shuffle(v, [=](int i) { return (int)((i % width) + d) < width ? i + (int)d : i; });
}
template <typename T> inline T __shfl_up_sync(unsigned, T v, unsigned d, int width = 32) {
  return emu_shuffle(v, [=](int i) { return (i % width) >= (int)d ? i - (int)d : i; });
}

template <typename T> inline T __ldg(const T* p) { return *p; }
template <typename T> inline T __ldcg(const T* p) { return *p; }
template <typename T> inline T __ldcs(const T* p) { return *p; }
template <typename T> inline void __stcg(T* p, T v) { *p = v; }
template <typename T> inline void __stcs(T* p, T v) { *p = v; }

inline float __uint_as_float(unsigned u) { return emu_from_bits<float>(u); }
inline unsigned __float_as_uint(float f) { return (unsigned)emu_bits(f); }
inline float __int_as_float(int u) { return emu_from_bits<float>((unsigned)u); }
inline int __float_as_int(float f) { return (int)emu_bits(f); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __tanf(float x) { return tanf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = sinf(x); *c = cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __log2f(float x) { return log2f(x); }
inline float __exp10f(float x) { return powf(10.0f, x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  const uint64_t v = ((uint64_t)y << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= (unsigned)((v >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
}
using std::max;
using std::min;
inline long long min(long long a, int b) { return a < b ? a : b; }
inline long long max(long long a, int b) { return a > b ? a : b; }

inline int atomicAdd(int* p, int v) { int o = *p; *p += v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p += v; return o; }
inline unsigned atomicInc(unsigned* p, unsigned limit) { unsigned o = *p; *p = o >= limit ? 0u : o + 1u; return o; }
inline float atomicAdd(float* p, float v) { float o = *p; *p += v; return o; }
inline unsigned atomicExch(unsigned* p, unsigned v) { unsigned o = *p; *p = v; return o; }
inline int atomicExch(int* p, int v) { int o = *p; *p = v; return o; }
inline unsigned atomicCAS(unsigned* p, unsigned cmp, unsigned v) { unsigned o = *p; if (o == cmp) *p = v; return o; }
inline int atomicMax(int* p, int v) { int o = *p; if (v > o) *p = v; return o; }

