// A CPU emulator for the CUDA C that the templates generate (tests only).
//
// Every CUDA thread of a block is a fiber on one OS thread; blocks run one after
// another in a shuffled order. Barriers (__syncthreads) and warp collectives (shuffles,
// ldmatrix, mma.sync) are rendezvous points: each fiber deposits its operands and yields
// until every live thread of its group has arrived; the last one to arrive computes the
// result for all. A barrier that some threads never reach is reported as a deadlock.
// cp.async copies are either done at once ("eager") or held back until the wait_group that
// retires them ("deferred"): running both catches reads that come before the wait and
// copies that land on data still being read. Shared memory is a static per block (blocks
// never overlap), filled with NaN bytes before each block so stale reads show. A kernel
// declared with __cluster_dims__(n, 1, 1) runs its blocks n at a time, a cluster's threads
// side by side as fibers of one scheduler, each block with its own shared memory (static
// __shared__ variables excepted: those are one per cluster here).
//
// Sources reach the emulated instructions in one of two ways: the inline-PTX helpers of
// search_space/codegen/cuda_ptx.py are swapped for cudaemu_ptx.h, and a source may call the
// emu:: functions at the end of this file itself under #ifdef AUTOTUNE_EMULATE (offsets into
// dynamic shared memory, as the hardware's shared addresses are).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>
#include <sys/mman.h>
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
#define __grid_constant__
#define __cluster_dims__(...)

// The emulator's state and scheduler (below, under CUDAEMU_RUNTIME) are compiled once into
// an object that every kernel's library links: each library has its own copy, and each
// kernel compiles only its own code. Hidden: no library's state binds to another's.
#pragma GCC visibility push(hidden)

struct emu_dim3 { unsigned x = 0, y = 0, z = 0; };
extern emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

constexpr size_t STACK_BYTES = 256 << 10;
constexpr size_t SMEM_BYTES = 256 << 10;
constexpr int MAX_THREADS = 1024;  // per block, as on the GPU
constexpr int MAX_CLUSTER = 2;      // blocks of a cluster the emulator runs together

// ``bytes`` land at ``dst``: the first ``src_bytes`` from ``src`` (all of them when negative),
// zeros for the rest (all zeros when not ``valid``), as cp.async's src-size operand says.
struct Copy { void* dst; const void* src; int bytes; bool valid; int src_bytes = -1; };

// A fiber's saved context. On x86-64 a switch saves and restores the callee-saved registers,
// the SSE and x87 control words and the stack pointer (cudaemu_switch, a dozen instructions);
// glibc's swapcontext also saves the signal mask, a system call per switch, and switching
// was most of the time a kernel took to emulate. Elsewhere, and where control-flow protection
// (shadow stacks) is compiled in, swapcontext it is.
#if defined(__x86_64__) && !defined(__CET__)
struct Context { void* sp = nullptr; };
extern "C" void cudaemu_switch(void** save_sp, void* load_sp);
inline void switch_context(Context& from, Context& to) { cudaemu_switch(&from.sp, to.sp); }
#else
struct Context { ucontext_t uc; };
inline void switch_context(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif
// A context that, switched to, runs ``entry`` on ``stack`` (``entry`` must never return).
void start_context(Context& context, char* stack, size_t bytes, void (*entry)());

struct Fiber {
  Context ctx;
  char* stack = nullptr;  // STACK_BYTES of ``stacks``
  emu_dim3 tid;
  emu_dim3 bid;   // its block
  int rank = 0;   // its block's rank in the cluster
  int linear = 0; // unique within the cluster: rank * threads per block + thread
  bool done = false;
  std::vector<std::vector<Copy>> groups;  // committed cp.async groups, oldest first
  std::vector<Copy> open;                  // issued, not yet committed
};

struct Group {
  int arrived = 0;
  unsigned long generation = 0;
};

extern std::vector<Fiber> fibers;
extern Context scheduler;
extern int current;
extern unsigned long events;  // arrivals and completions: progress for deadlock detection
extern bool deferred_copies;
extern std::vector<Group> warp_groups;
extern std::vector<Group> warpgroup_groups;  // 4 consecutive warps (Hopper wgmma)
extern Group block_groups[MAX_CLUSTER];
extern Group cluster_group;
extern int cluster_size;
alignas(1024) extern unsigned char smem_pool[MAX_CLUSTER][SMEM_BYTES];
extern unsigned char* dynamic_smem_bytes;  // the current thread's block's
extern size_t dynamic_smem_size;  // what the launch asked for (emu_set_dynamic_smem)
extern std::function<void()> kernel_body;
extern char failure[512];

// An untyped pointer that converts to the kernel's declared parameter type.
struct AnyPtr {
  void* p;
  template <typename T> operator T*() const { return static_cast<T*>(p); }
};

inline void fail(const char* what) {
  if (!failure[0]) snprintf(failure, sizeof(failure), "%s", what);
}

inline void yield() { switch_context(fibers[current].ctx, scheduler); }

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

inline int live_in_block(int rank) {
  int n = 0;
  for (auto& f : fibers) n += !f.done && f.rank == rank;
  return n;
}

inline int live_in_cluster() {
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
extern std::vector<WarpBox> boxes;

inline void run_copy(const Copy& c) {
  const int from_src = !c.valid ? 0 : (c.src_bytes < 0 || c.src_bytes > c.bytes ? c.bytes : c.src_bytes);
  if (from_src) memcpy(c.dst, c.src, from_src);
  memset(static_cast<unsigned char*>(c.dst) + from_src, 0, c.bytes - from_src);
}

// Runs the grid, each block's threads as fibers; 0, or 1 with ``failure`` saying why.
int launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, bool deferred,
           unsigned seed, int cluster = 1);

#ifdef CUDAEMU_RUNTIME
}  // namespace emu

#include <random>  // here only: in the header every kernel's compile paid for its templates (0.13 s)

emu_dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace emu {

std::vector<Fiber> fibers;
Context scheduler;
int current = -1;
unsigned long events = 0;
bool deferred_copies = false;
std::vector<Group> warp_groups;
std::vector<Group> warpgroup_groups;
Group block_groups[MAX_CLUSTER];
Group cluster_group;
int cluster_size = 1;
alignas(1024) unsigned char smem_pool[MAX_CLUSTER][SMEM_BYTES];
unsigned char* dynamic_smem_bytes = smem_pool[0];
size_t dynamic_smem_size = SMEM_BYTES;
std::function<void()> kernel_body;
char failure[512] = {0};
std::vector<WarpBox> boxes;
// Every fiber's stack, mapped once and never cleared: pages a kernel never reaches cost nothing.
static char* stacks = nullptr;

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
  switch_context(f.ctx, scheduler);  // never resumed: the next block starts every fiber afresh
}

#if defined(__x86_64__) && !defined(__CET__)
// cudaemu_switch(save_sp, load_sp): push the callee-saved registers and the control words,
// store the stack pointer in *save_sp, take load_sp as the stack pointer, pop what that
// stack holds and return to where it left off.
asm(R"(
  .text
  .globl cudaemu_switch
  .hidden cudaemu_switch
  .type cudaemu_switch, @function
cudaemu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size cudaemu_switch, .-cudaemu_switch
)");

void start_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  // a stack as cudaemu_switch leaves it: control words, six registers, then where its ret
  // goes (entry, which finds the stack as a call leaves it: 8 bytes past 16-byte alignment)
  auto top = (reinterpret_cast<uintptr_t>(stack) + bytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;  // entry's own return address: it never returns
  *--sp = reinterpret_cast<void*>(entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  uint32_t words[2] = {0, 0};
  asm volatile("stmxcsr %0" : "=m"(words[0]));
  asm volatile("fnstcw %0" : "=m"(words[1]));
  --sp;
  memcpy(sp, words, sizeof(words));
  context.sp = sp;
}
#else
void start_context(Context& context, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&context.uc);
  context.uc.uc_stack.ss_sp = stack;
  context.uc.uc_stack.ss_size = bytes;
  context.uc.uc_link = &scheduler.uc;
  makecontext(&context.uc, entry, 0);
}
#endif

static void set_current(int i) {
  current = i;
  threadIdx = fibers[i].tid;
  blockIdx = fibers[i].bid;
  dynamic_smem_bytes = smem_pool[fibers[i].rank];
}

static bool run_block() {
  const int threads = (int)fibers.size();
  for (int i = 0; i < threads; ++i) {
    Fiber& f = fibers[i];
    f.done = false;
    f.groups.clear();
    f.open.clear();
    start_context(f.ctx, f.stack, STACK_BYTES, fiber_main);
  }
  int finished = 0;
  while (finished < threads) {
    const unsigned long before = events;
    finished = 0;
    for (int i = 0; i < threads; ++i) {
      if (fibers[i].done) { ++finished; continue; }
      set_current(i);
      switch_context(scheduler, fibers[i].ctx);
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

int launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, bool deferred,
           unsigned seed, int cluster) {
  failure[0] = 0;
  deferred_copies = deferred;
  const int threads = (int)(bx * by * bz);
  if (threads < 1 || threads > MAX_THREADS) {
    fail("a block of more than 1024 threads (or none)");
    return 1;
  }
  if (cluster < 1 || cluster > MAX_CLUSTER || gx % cluster) {
    fail("a cluster the emulator cannot run (more than 2 blocks, or a grid not a multiple of it)");
    return 1;
  }
  cluster_size = cluster;
  if (!stacks) {
    void* mapped = mmap(nullptr, STACK_BYTES * MAX_THREADS * MAX_CLUSTER, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mapped == MAP_FAILED) {
      fail("cannot map the fibers' stacks");
      return 1;
    }
    stacks = static_cast<char*>(mapped);
  }
  const int all = threads * cluster;  // a cluster's threads run together
  fibers.assign(all, Fiber());
  for (int i = 0; i < all; ++i) {
    const int t = i % threads;
    fibers[i].stack = stacks + STACK_BYTES * i;
    fibers[i].linear = i;
    fibers[i].rank = i / threads;
    fibers[i].tid.x = t % bx;
    fibers[i].tid.y = (t / bx) % by;
    fibers[i].tid.z = t / (bx * by);
  }
  warp_groups.assign((all + 31) / 32, Group());
  warpgroup_groups.assign((all + 127) / 128, Group());
  boxes.assign((all + 31) / 32, WarpBox());
  blockDim.x = bx; blockDim.y = by; blockDim.z = bz;
  gridDim.x = gx; gridDim.y = gy; gridDim.z = gz;
  std::vector<unsigned long> order((size_t)(gx / cluster) * gy * gz);  // clusters, in a shuffled order
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::mt19937 rng(seed);
  std::shuffle(order.begin(), order.end(), rng);
  const unsigned cx = gx / cluster;
  for (unsigned long b : order) {
    for (auto& f : fibers) {
      f.bid.x = (unsigned)(b % cx) * cluster + f.rank;
      f.bid.y = (unsigned)((b / cx) % gy);
      f.bid.z = (unsigned)(b / ((unsigned long)cx * gy));
    }
    memset(smem_pool, 0xff, SMEM_BYTES * cluster);  // NaN bytes: stale reads show
    for (auto& g : block_groups) g = Group();
    cluster_group = Group();
    for (auto& g : warp_groups) g = Group();
    for (auto& g : warpgroup_groups) g = Group();
    if (!run_block()) return 1;
  }
  return 0;
}
#endif  // CUDAEMU_RUNTIME

}  // namespace emu

// ------------------------------------------------------------------ CUDA built-ins

inline void __syncthreads() {
  const int rank = emu::fibers[emu::current].rank;
  emu::rendezvous(emu::block_groups[rank], [rank] { return emu::live_in_block(rank); }, [] {});
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

// ------------------------------------------------------------------ tensor-core instructions

inline float emu_lo(unsigned u, bool bf16) {
  const unsigned short h = (unsigned short)(u & 0xffff);
  return bf16 ? emu_from_bits<float>((uint64_t)((unsigned)h << 16)) : __half2float(__ushort_as_half(h));
}
inline float emu_hi(unsigned u, bool bf16) {
  const unsigned short h = (unsigned short)(u >> 16);
  return bf16 ? emu_from_bits<float>((uint64_t)((unsigned)h << 16)) : __half2float(__ushort_as_half(h));
}

// mma.m16n8k16 with the fragment layout of the PTX ISA (lane = 4g + t).
inline void emu_mma(float* c, const unsigned* a, const unsigned* b, bool bf16) {
  const int w = emu::warp(), l = emu::lane();
  emu::WarpBox& box = emu::boxes[w];
  for (int i = 0; i < 4; ++i) { box.a[l][i] = a[i]; box.c[l][i] = c[i]; }
  box.b[l][0] = b[0];
  box.b[l][1] = b[1];
  emu::rendezvous(emu::warp_groups[w], [w] { return emu::live_in_warp(w); }, [&] {
    float A[16][16], B[16][8], C[16][8];
    for (int i = 0; i < 32; ++i) {
      const int g = i / 4, t = i % 4;
      for (int half = 0; half < 2; ++half) {
        const int k0 = 2 * t + 8 * half;
        A[g][k0] = emu_lo(box.a[i][2 * half], bf16);
        A[g][k0 + 1] = emu_hi(box.a[i][2 * half], bf16);
        A[g + 8][k0] = emu_lo(box.a[i][2 * half + 1], bf16);
        A[g + 8][k0 + 1] = emu_hi(box.a[i][2 * half + 1], bf16);
        B[k0][g] = emu_lo(box.b[i][half], bf16);
        B[k0 + 1][g] = emu_hi(box.b[i][half], bf16);
      }
      C[g][2 * t] = box.c[i][0];
      C[g][2 * t + 1] = box.c[i][1];
      C[g + 8][2 * t] = box.c[i][2];
      C[g + 8][2 * t + 1] = box.c[i][3];
    }
    for (int m = 0; m < 16; ++m)
      for (int n = 0; n < 8; ++n) {
        float s = C[m][n];
        for (int k = 0; k < 16; ++k) s += A[m][k] * B[k][n];
        C[m][n] = s;
      }
    for (int i = 0; i < 32; ++i) {
      const int g = i / 4, t = i % 4;
      box.c[i][0] = C[g][2 * t];
      box.c[i][1] = C[g][2 * t + 1];
      box.c[i][2] = C[g + 8][2 * t];
      box.c[i][3] = C[g + 8][2 * t + 1];
    }
  });
  for (int i = 0; i < 4; ++i) c[i] = box.c[l][i];
}

// ldmatrix.m8n8.x{count}[.trans].b16: lane 8j + r gives the address of row r of matrix j.
// Without .trans lane 4g + t receives, in register j, row g's columns 2t and 2t + 1 of
// matrix j; with .trans, column g's rows 2t and 2t + 1.
inline void emu_ldmatrix(int count, bool trans, unsigned* regs, const void* p) {
  const int w = emu::warp(), l = emu::lane();
  emu::WarpBox& box = emu::boxes[w];
  if (reinterpret_cast<uintptr_t>(p) % 16) emu::fail("ldmatrix row address not 16-byte aligned");
  box.addr[l] = p;
  emu::rendezvous(emu::warp_groups[w], [w] { return emu::live_in_warp(w); }, [&] {
    for (int i = 0; i < 32; ++i)
      for (int j = 0; j < count; ++j) {
        unsigned v;
        if (!trans) {
          memcpy(&v, static_cast<const unsigned char*>(box.addr[8 * j + i / 4]) + 4 * (i % 4), 4);
        } else {
          const unsigned char* r0 = static_cast<const unsigned char*>(box.addr[8 * j + 2 * (i % 4)]);
          const unsigned char* r1 = static_cast<const unsigned char*>(box.addr[8 * j + 2 * (i % 4) + 1]);
          unsigned short lo, hi;
          memcpy(&lo, r0 + 2 * (i / 4), 2);
          memcpy(&hi, r1 + 2 * (i / 4), 2);
          v = lo | ((unsigned)hi << 16);
        }
        box.a[i][j] = v;
      }
  });
  for (int j = 0; j < count; ++j) regs[j] = box.a[l][j];
}

// The instructions for sources that call them under #ifdef AUTOTUNE_EMULATE: shared memory
// addressed by offsets into the launch's dynamic shared memory, as ``cvta`` gives them.
namespace emu {
inline unsigned smem_offset(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < dynamic_smem_bytes || c >= dynamic_smem_bytes + dynamic_smem_size) {
    fail("shared address outside dynamic shared memory");
    return 0;
  }
  return (unsigned)(c - dynamic_smem_bytes);
}
inline unsigned char* smem_at(unsigned offset, unsigned bytes) {
  if ((size_t)offset + bytes > dynamic_smem_size) {
    fail("shared access past the end of dynamic shared memory");
    return dynamic_smem_bytes;
  }
  return dynamic_smem_bytes + offset;
}
inline void cp_async16(unsigned dst, const void* src, unsigned src_bytes) {
  if (dst % 16) fail("cp.async destination not 16-byte aligned");
  if (src_bytes && reinterpret_cast<uintptr_t>(src) % 16) fail("cp.async source not 16-byte aligned");
  Copy c{smem_at(dst, 16), src, 16, true, (int)src_bytes};
  if (deferred_copies) fibers[current].open.push_back(c);
  else run_copy(c);
}
inline void cp_async_commit() {
  Fiber& f = fibers[current];
  f.groups.push_back(f.open);
  f.open.clear();
}
inline void cp_async_wait(int pending) {
  Fiber& f = fibers[current];
  while ((int)f.groups.size() > pending) {
    for (auto& c : f.groups.front()) run_copy(c);
    f.groups.erase(f.groups.begin());
  }
}
inline void ldmatrix_x4(unsigned offset, bool trans, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  unsigned r[4];
  emu_ldmatrix(4, trans, r, smem_at(offset, 16));
  r0 = r[0]; r1 = r[1]; r2 = r[2]; r3 = r[3];
}
template <typename E>
inline void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  const unsigned a[4] = {a0, a1, a2, a3}, b[2] = {b0, b1};
  emu_mma(c, a, b, std::is_same<E, __nv_bfloat16>::value);
}
}  // namespace emu

#pragma GCC visibility pop
