"""Run generated CUDA C kernels on the CPU, for tests on machines without a GPU.

The kernel source is compiled by g++ as ordinary C++ against a shim that gives CUDA's
names a CPU meaning: every CUDA thread of a block is a fiber (ucontext) of one OS thread,
blocks run one after another; __syncthreads, __syncwarp and the warp collectives (shuffles,
and for sources that route them through ``emu::`` under AUTOTUNE_EMULATE: ldmatrix,
mma.sync.m16n8k16, cp.async) are barriers at which fibers switch, with the data exchange
the PTX ISA specifies. A barrier nobody can pass is reported as a deadlock. __half and
__nv_bfloat16 convert with round-to-nearest-even. Dynamic shared memory is filled with NaN
bytes before every block; cp.async copies land lazily, at the cp.async.wait_group that
lets them (or, with ``eager``, at once), so a read that is not ordered after its wait
sees NaN or stale data.

This checks indexing, tails, barriers, fragment layouts and numerics of the generated
code; it says nothing about speed, and it does not replace running on a GPU.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np

from search_space import KernelSource
from search_space.codegen.cuda import c_type, resolve_launch

SHIM = r"""
#include <cstdint>
#include <cstring>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <functional>
#include <ucontext.h>
#include <sys/mman.h>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict

struct dim3e { unsigned x = 0, y = 0, z = 0; };
dim3e threadIdx, blockIdx, blockDim, gridDim;

struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(8) uint2 { unsigned x, y; };

struct __half { uint16_t x; };
struct __half2 { __half x, y; };
struct __nv_bfloat16 { uint16_t x; };
struct __nv_bfloat162 { __nv_bfloat16 x, y; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return (float)f; }
inline __half __float2half_rn(float v) { _Float16 f = (_Float16)v; __half h; std::memcpy(&h.x, &f, 2); return h; }
inline float __bfloat162float(__nv_bfloat16 b) { uint32_t u = (uint32_t)b.x << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float v) {
  uint32_t u; std::memcpy(&u, &v, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(uint16_t)(u >> 16)};
}
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half_rn(a), __float2half_rn(b)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
// one OS thread runs every fiber and switches only at barriers: read-modify-write is atomic
inline float atomicAdd(float* p, float v) { float o = *p; *p = o + v; return o; }
inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p = o + v; return o; }
inline unsigned atomicInc(unsigned* p, unsigned limit) { unsigned o = *p; *p = o >= limit ? 0u : o + 1u; return o; }
inline void __threadfence() {}

namespace emu {
constexpr size_t STACK = 256 << 10;
constexpr int MAX_THREADS = 1024;
struct Barrier { int expected = 0, count = 0; long gen = 0; };
struct Copy { unsigned dst; const void* src; unsigned bytes; };
struct Fiber { ucontext_t ctx; bool done = false; dim3e tid; std::vector<Copy> building; std::vector<std::vector<Copy>> pending; };
struct Warp { Barrier bar; uint64_t slot[32][12]; };

static Fiber fibers[MAX_THREADS];
static Warp warps[MAX_THREADS / 32];
static Barrier block_bar;
static ucontext_t scheduler;
static int current = 0;
static long progress = 0;
static char* stacks = nullptr;
static std::vector<unsigned char> dyn;
static const char* error = nullptr;
static bool eager = false;
static std::function<void()>* body = nullptr;

inline void fail(const char* what) { if (!error) error = what; }
inline void yield() { swapcontext(&fibers[current].ctx, &scheduler); }
inline void wait(Barrier& b) {
  const long gen = b.gen;
  ++progress;
  if (++b.count == b.expected) { b.count = 0; ++b.gen; return; }
  while (b.gen == gen && !error) yield();
}
inline void leave(Barrier& b) {
  --b.expected;
  ++progress;
  if (b.count > 0 && b.count >= b.expected) { b.count = 0; ++b.gen; }
}
inline Warp& my_warp() { return warps[threadIdx.x / 32]; }
inline int my_lane() { return threadIdx.x % 32; }
inline unsigned char* dynamic_smem() { return dyn.data(); }

inline unsigned smem_offset(const void* p) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  if (c < dyn.data() || c > dyn.data() + dyn.size()) { fail("shared address outside dynamic shared memory"); return 0; }
  return (unsigned)(c - dyn.data());
}
inline unsigned char* smem_at(unsigned off, unsigned bytes) {
  if ((size_t)off + bytes > dyn.size()) { fail("shared access past the end of dynamic shared memory"); return dyn.data(); }
  return dyn.data() + off;
}
inline void do_copy(const Copy& c) {
  unsigned char* d = smem_at(c.dst, 16);
  if (c.dst % 16) fail("cp.async destination not 16-byte aligned");
  if ((uintptr_t)c.src % 16) fail("cp.async source not 16-byte aligned");
  std::memset(d, 0, 16);
  std::memcpy(d, c.src, c.bytes > 16 ? 16 : c.bytes);
}
inline void cp_async16(unsigned dst, const void* src, unsigned bytes) {
  Copy c{dst, src, bytes};
  if (eager) do_copy(c); else fibers[current].building.push_back(c);
}
inline void cp_async_commit() {
  Fiber& f = fibers[current];
  f.pending.push_back(f.building);
  f.building.clear();
}
inline void cp_async_wait(int n) {
  Fiber& f = fibers[current];
  while ((int)f.pending.size() > n) {
    for (const Copy& c : f.pending.front()) do_copy(c);
    f.pending.erase(f.pending.begin());
  }
}

template <class T> inline T exchange(T v, int src) {
  Warp& w = my_warp();
  const int lane = my_lane();
  static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
  std::memcpy(&w.slot[lane][0], &v, sizeof(T));
  wait(w.bar);
  T r;
  std::memcpy(&r, &w.slot[src & 31][0], sizeof(T));
  wait(w.bar);
  return r;
}

inline uint16_t smem_u16(unsigned off) { uint16_t v; std::memcpy(&v, smem_at(off, 2), 2); return v; }

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: lanes 8i..8i+7 address the rows of matrix i.
inline void ldmatrix_x4(unsigned addr, bool trans, unsigned& r0, unsigned& r1, unsigned& r2, unsigned& r3) {
  Warp& w = my_warp();
  const int lane = my_lane();
  if (addr % 16) fail("ldmatrix row address not 16-byte aligned");
  w.slot[lane][0] = addr;
  wait(w.bar);
  unsigned out[4];
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      const unsigned row = (unsigned)w.slot[i * 8 + lane / 4][0];
      out[i] = smem_u16(row + 4 * (lane % 4)) | ((unsigned)smem_u16(row + 4 * (lane % 4) + 2) << 16);
    } else {
      const unsigned row0 = (unsigned)w.slot[i * 8 + 2 * (lane % 4)][0];
      const unsigned row1 = (unsigned)w.slot[i * 8 + 2 * (lane % 4) + 1][0];
      out[i] = smem_u16(row0 + 2 * (lane / 4)) | ((unsigned)smem_u16(row1 + 2 * (lane / 4)) << 16);
    }
  }
  wait(w.bar);
  r0 = out[0]; r1 = out[1]; r2 = out[2]; r3 = out[3];
}

template <class E> inline float half_bits(unsigned bits16) {
  if constexpr (std::is_same<E, __half>::value) return __half2float(__half{(uint16_t)bits16});
  else return __bfloat162float(__nv_bfloat16{(uint16_t)bits16});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: fragments as in the PTX ISA.
template <class E>
inline void mma16816(float (&c)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
  Warp& w = my_warp();
  const int lane = my_lane();
  const unsigned frag[6] = {a0, a1, a2, a3, b0, b1};
  for (int i = 0; i < 6; ++i) w.slot[lane][i] = frag[i];
  wait(w.bar);
  const int gid = lane / 4, tig = lane % 4;
  float d[4];
  for (int i = 0; i < 4; ++i) {
    const int row = gid + 8 * (i >> 1), col = 2 * tig + (i & 1);
    double sum = c[i];
    for (int k = 0; k < 16; ++k) {
      const unsigned areg = (unsigned)w.slot[(row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
      const unsigned breg = (unsigned)w.slot[col * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
      sum += (double)half_bits<E>((areg >> (16 * (k % 2))) & 0xffffu) * (double)half_bits<E>((breg >> (16 * (k % 2))) & 0xffffu);
    }
    d[i] = (float)sum;
  }
  wait(w.bar);
  for (int i = 0; i < 4; ++i) c[i] = d[i];
}

static void fiber_main(int t) {
  Fiber& f = fibers[t];
  (*body)();
  f.done = true;
  for (const auto& g : f.pending) if (!g.empty()) fail("cp.async group never waited for");
  if (!f.building.empty()) fail("cp.async copies never committed");
  leave(block_bar);
  leave(warps[t / 32].bar);
}

inline int launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, size_t smem, bool eager_copies,
                  std::function<void()> kernel) {
  if (bx == 0 || bx > MAX_THREADS || bx % 32) { std::fprintf(stderr, "emu: bad block size %u\n", bx); return 2; }
  if (!stacks) {
    stacks = (char*)mmap(nullptr, STACK * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (stacks == MAP_FAILED) { stacks = nullptr; return 3; }
  }
  error = nullptr;
  eager = eager_copies;
  body = &kernel;
  gridDim = dim3e{gx, gy, gz};
  blockDim = dim3e{bx, 1, 1};
  dyn.assign(smem + 16, 0xff);
  for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
      for (unsigned x = 0; x < gx; ++x) {
        blockIdx = dim3e{x, y, z};
        std::fill(dyn.begin(), dyn.end(), 0xff);
        block_bar = Barrier{(int)bx, 0, 0};
        for (unsigned wi = 0; wi < bx / 32; ++wi) warps[wi].bar = Barrier{32, 0, 0};
        for (unsigned t = 0; t < bx; ++t) {
          Fiber& f = fibers[t];
          f.done = false;
          f.tid = dim3e{t, 0, 0};
          f.building.clear();
          f.pending.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = stacks + STACK * t;
          f.ctx.uc_stack.ss_size = STACK;
          f.ctx.uc_link = &scheduler;
          makecontext(&f.ctx, (void (*)())fiber_main, 1, (int)t);
        }
        unsigned alive = bx;
        while (alive) {
          const long before = progress;
          for (unsigned t = 0; t < bx; ++t) {
            if (fibers[t].done) continue;
            current = (int)t;
            threadIdx = fibers[t].tid;
            swapcontext(&scheduler, &fibers[t].ctx);
            if (fibers[t].done) --alive;
          }
          if (error) break;
          if (alive && progress == before) { fail("deadlock: every live thread waits at a barrier that cannot complete"); break; }
        }
        if (error) {
          std::fprintf(stderr, "emu: block (%u,%u,%u): %s\n", x, y, z, error);
          return 1;
        }
      }
  return 0;
}
}  // namespace emu

inline void __syncthreads() { emu::wait(emu::block_bar); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::wait(emu::my_warp().bar); }
template <class T> inline T __shfl_sync(unsigned, T v, int src, int = 32) { return emu::exchange(v, src); }
template <class T> inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) { return emu::exchange(v, emu::my_lane() ^ mask); }
"""

_EXTERN_SHARED = re.compile(r"extern __shared__ __align__\((\d+)\) ([A-Za-z_][\w ]*?) (\w+)\[\];")


def emulated_source(source: KernelSource) -> str:
    """The kernel as host C++: CUDA headers dropped, dynamic shared memory from the emulator,
    and a C entry ``emu_launch`` that runs the grid."""
    code = "\n".join(line for line in source.code.splitlines() if not line.startswith("#include <cuda"))
    code = _EXTERN_SHARED.sub(lambda m: f"{m.group(2)}* {m.group(3)} = reinterpret_cast<{m.group(2)}*>(emu::dynamic_smem());",
                              code)
    call = []
    pointers = scalars = 0
    for arg in source.args:
        if arg.role == "scalar":
            call.append(f"scalars[{scalars}]")
            scalars += 1
        else:
            ctype = "float" if arg.role == "workspace" else c_type(arg.dtype)
            const = "const " if arg.role == "in" else ""
            call.append(f"({const}{ctype}*)ptrs[{pointers}]")
            pointers += 1
    launcher = (
        '\nextern "C" int emu_launch(void** ptrs, long long* scalars, unsigned gx, unsigned gy, unsigned gz, '
        "unsigned bx, unsigned long long smem, int eager) {\n"
        f"  return emu::launch(gx, gy, gz, bx, smem, eager != 0, [&]() {{ {source.entry}({', '.join(call)}); }});\n}}\n")
    return f'#include "{SHIM_NAME}"\n' + code + launcher


SHIM_NAME = "cuda_emulator_shim.h"
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-w"]


def build(source: KernelSource) -> ctypes.CDLL:
    """Compile the emulated kernel into a shared library (cached by content), the shim
    precompiled once (shared with tests/cudaemu.py's helper)."""
    from cudaemu import cache_dir, precompiled_header

    shim = precompiled_header(SHIM_NAME, "#define AUTOTUNE_EMULATE 1\n" + SHIM, FLAGS)
    text = emulated_source(source)
    digest = hashlib.sha256((text + shim.name).encode()).hexdigest()[:24]
    lib = cache_dir() / f"emulator-{digest}.so"
    if not lib.exists():
        compiler = shutil.which("g++")
        if compiler is None:
            raise RuntimeError("the CUDA emulator needs g++")
        with tempfile.TemporaryDirectory() as tmp:
            cpp = Path(tmp) / "kernel.cpp"
            cpp.write_text(text)
            out = Path(tmp) / "kernel.so"
            proc = subprocess.run([compiler, *FLAGS, "-shared", f"-I{shim}", "-o", str(out), str(cpp)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError("emulated kernel does not compile:\n" + proc.stderr[-4000:])
            shutil.copy(out, lib.with_suffix(".tmp"))
            os.replace(lib.with_suffix(".tmp"), lib)
    return ctypes.CDLL(str(lib))


def run(source: KernelSource, dims: Mapping[str, int], arrays: Mapping[str, np.ndarray],
        workspaces: Mapping[str, np.ndarray] | None = None, eager: bool = False) -> None:
    """Launch ``source`` over ``arrays`` (by argument name; outputs are written in place)
    at the runtime ``dims``; raises RuntimeError when the emulator reports a fault."""
    library = build(source)
    grid, block, smem = resolve_launch(source.launch_dims, dims)
    pointers, scalars = [], []
    for arg in source.args:
        if arg.role == "scalar":
            scalars.append(int(dims[arg.name]))
        elif arg.role == "workspace":
            pointers.append((workspaces or {})[arg.name].ctypes.data)
        else:
            array = arrays[arg.name]
            assert array.flags.c_contiguous
            pointers.append(array.ctypes.data)
    ptrs = (ctypes.c_void_p * max(len(pointers), 1))(*pointers)
    vals = (ctypes.c_longlong * max(len(scalars), 1))(*scalars)
    fn = library.emu_launch
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint, ctypes.c_uint,
                   ctypes.c_ulonglong, ctypes.c_int]
    status = fn(ptrs, vals, grid[0], grid[1], grid[2], block[0], smem, int(eager))
    if status != 0:
        raise RuntimeError(f"emulated {source.entry} failed (status {status}); see stderr")
