"""``qk_norm`` on CUDA: Qwen3's per-head RMSNorm of q and k (``span`` head) or OLMo 2's of
the whole q and k projections (``span`` projection), value heads copied.

Span head: X[T, H + 2 HKV, D] is read as T * (H + 2 HKV) head rows of D elements, each one
row of the row kernels (``rowplan``: a warp or a block per row, the same knobs as rmsnorm).
Row r is head j = r % (H + 2 HKV): j < H is a query head, normalised and scaled by GQ;
j < H + HKV a key head, by GK; the rest are value heads, copied. The choice is the same for
every thread of a row, so the reductions (warp shuffles, block barriers) never diverge.

Span projection: a token's rows are of two lengths (H D of q, HKV D of k), so it has a kernel
of its own: one block per token (``threads`` of 128 to 512, ``vec``-element vectors) sums the
squares of the q run and of the k run, reduces both in one round of barriers, then writes
the scaled q and k runs (re-read from X, hot in L1) and copies the value heads.

In a captured decode step it sits between the Q/K/V GEMV and attention, both launched
programmatically, so it takes a programmatic launch too (sm_90 on): it lets attention launch
first thing and waits for the GEMV's rows before it reads them.

T (tokens) may be a runtime argument. In the kernel it is named TOKENS: the row kernels'
code calls the element type T.
"""
from __future__ import annotations

import math

from ...codegen.cuda import PREAMBLE, VECTOR_HELPERS, c_type, dim_scalars, kernel_params
from ...codegen.cuda_ptx import grid_dependency_code, programmatic_launch
from ...ops.common import ITEMSIZE
from ...ops.elementwise import QKNormOp
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .limits import occupancy
from .rowplan import BASE_REGISTERS, RowPlan, c_float, row_default, row_features, row_space

PROJECTION_THREADS = (128, 256, 512)


def head_rows(task: Task) -> Task:
    """The task as the row kernels see it: M = T (H + 2 HKV) rows of N = D, M dynamic where T
    is. It only sizes the schedule (space, default, features); it is no task of any operator."""
    d = task.dims
    return Task.make(task.op, {"M": d["T"] * QKNormOp.heads(task), "N": d["D"]}, task.dtype,
                     dynamic=("M",) if "T" in task.dynamic else ())


@register_template
class QKNormCuda(QKNormOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        if self.by_projection(task):
            return projection_space(task, target)
        return row_space(head_rows(task), target)

    def default(self, task: Task, target: Target) -> Config:
        if self.by_projection(task):
            return projection_default(self.space(task, target))
        return row_default(self.space(task, target), head_rows(task))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        if self.by_projection(task):
            return projection_features(task, config, target, self.min_bytes(task), self.flops(task))
        # re-reads are counted for the copied value rows too: a slight over-estimate
        return row_features(head_rows(task), config, target, self.min_bytes(task), self.flops(task), passes=2)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        if self.by_projection(task):
            return self.render_projection(task, config, target)
        d = task.dims
        heads = self.heads(task)
        p = RowPlan.of(head_rows(task), config)
        args = self.signature(task) + dim_scalars(task)
        # the C parameters in the order of ``args``; the dynamic T is renamed TOKENS (see above)
        params = kernel_params(self.signature(task)) + (", long long TOKENS" if "T" in task.dynamic else "")
        tokens = "" if "T" in task.dynamic else f"constexpr long long TOKENS = {d['T']};\n"
        programmatic = programmatic_launch(target)
        helpers, trigger, wait = grid_dependency_code(bool(programmatic))
        code = (PREAMBLE + VECTOR_HELPERS + helpers + p.constants() + tokens
                + f"constexpr int H = {d['H']};\nconstexpr int HKV = {d['HKV']};\nconstexpr int HEADS = {heads};\n"
                + p.reducers()
                + f'\nextern "C" __global__ void __launch_bounds__({p.threads}) qk_norm_rows({params}) {{'
                + (trigger + wait or "\n") + p.smem_decl() + "  const long long M = TOKENS * HEADS;  // head rows\n" + p.row_start()
                + _body(p, float(self.attrs(task)["eps"])) + "}\n")
        if "T" in task.dynamic:
            grid = f"(T * {heads} + {p.rows - 1}) // {p.rows}" if p.rows > 1 else f"T * {heads}"
        else:
            grid = -(-d["T"] * heads // p.rows)
        launch = (("block", (p.threads, 1, 1)), ("grid", (grid, 1, 1)), ("smem", p.smem_bytes())) + programmatic
        return KernelSource("cuda", code, "qk_norm_rows", tuple(args), launch)

    def render_projection(self, task: Task, config: Config, target: Target) -> KernelSource:
        """One block per token: both sums of squares, one reduction, then the writes (see above)."""
        c = config.as_dict()
        d = task.dims
        args = self.signature(task) + dim_scalars(task)
        # a block per token: the grid counts them, the kernel needs no T (a dynamic one is TOKENS)
        params = kernel_params(self.signature(task)) + (", long long TOKENS" if "T" in task.dynamic else "")
        eps = c_float(float(self.attrs(task)["eps"]))
        programmatic = programmatic_launch(target)
        helpers, trigger, wait = grid_dependency_code(bool(programmatic))
        code = (PREAMBLE + VECTOR_HELPERS + helpers
                + f"typedef {c_type(task.dtype)} T;\n"
                f"constexpr int H = {d['H']};\nconstexpr int HKV = {d['HKV']};\nconstexpr int D = {d['D']};\n"
                f"constexpr int VEC = {c['vec']};\nconstexpr int THREADS = {c['threads']};\n"
                "constexpr int QN = H * D;    // elements of the q run (one RMS row)\n"
                "constexpr int KN = HKV * D;  // of the k run, and of the value heads\n"
                "constexpr long long ROW = QN + 2 * KN;  // elements of a token\n"
                + PROJECTION_HELPERS
                + f'\nextern "C" __global__ void __launch_bounds__(THREADS) qk_norm_projection({params}) {{'
                + (trigger + wait or "\n")
                + "  __shared__ float scratch[64];\n"
                "  const T* x = X + (long long)blockIdx.x * ROW;\n"
                "  T* y = Y + (long long)blockIdx.x * ROW;\n"
                "  float ssq = sum_squares<QN / VEC>(x), ssk = sum_squares<KN / VEC>(x + QN);\n"
                "  block_sum2(ssq, ssk, scratch);\n"
                f"  scale_run<QN / VEC>(x, y, GQ, rsqrtf(ssq * (1.0f / QN) + {eps}));\n"
                f"  scale_run<KN / VEC>(x + QN, y + QN, GK, rsqrtf(ssk * (1.0f / KN) + {eps}));\n"
                "  const T* xv = x + QN + KN;  // the value heads, copied\n"
                "  T* yv = y + QN + KN;\n"
                "  for (int v = threadIdx.x; v < KN / VEC; v += THREADS)\n"
                "    store_pack<VEC>(yv + (long long)v * VEC, load_pack<VEC>(xv + (long long)v * VEC));\n"
                "}\n")
        grid = "T" if "T" in task.dynamic else d["T"]
        launch = (("block", (c["threads"], 1, 1)), ("grid", (grid, 1, 1)), ("smem", 0)) + programmatic
        return KernelSource("cuda", code, "qk_norm_projection", tuple(args), launch)


# Device code of the projection kernel, after its constants (T, VEC, THREADS, the run lengths).
PROJECTION_HELPERS = r"""
// The sum of squares of this thread's vectors v = tid, tid + THREADS, ... of a run of NV vectors.
template <int NV>
__device__ __forceinline__ float sum_squares(const T* __restrict__ x) {
  float ss = 0.0f;
  for (int v = threadIdx.x; v < NV; v += THREADS) {
    const Pack<T, VEC> a = load_pack<VEC>(x + (long long)v * VEC);
#pragma unroll
    for (int e = 0; e < VEC; ++e) { const float f = to_f32(a.e[e]); ss = fmaf(f, f, ss); }
  }
  return ss;
}

// Both sums over the block in one round of barriers (each block reduces once: no barrier
// before the scratch is written); every thread gets both.
__device__ __forceinline__ void block_sum2(float& a, float& b, float* scratch) {
  a = warp_sum(a);
  b = warp_sum(b);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) { scratch[warp] = a; scratch[32 + warp] = b; }
  __syncthreads();
  a = warp_sum(lane < THREADS / 32 ? scratch[lane] : 0.0f);
  b = warp_sum(lane < THREADS / 32 ? scratch[32 + lane] : 0.0f);
}

// y = x * inv * gain over a run of NV vectors, the gain indexed within the run.
template <int NV>
__device__ __forceinline__ void scale_run(const T* __restrict__ x, T* __restrict__ y, const T* __restrict__ gain,
                                          float inv) {
  for (int v = threadIdx.x; v < NV; v += THREADS) {
    const Pack<T, VEC> a = load_pack<VEC>(x + (long long)v * VEC);
    const Pack<T, VEC> g = load_pack<VEC, 2>(gain + (long long)v * VEC);
    Pack<T, VEC> o;
#pragma unroll
    for (int e = 0; e < VEC; ++e) o.e[e] = from_f32<T>(to_f32(a.e[e]) * inv * to_f32(g.e[e]));
    store_pack<VEC>(y + (long long)v * VEC, o);
  }
}
"""


def projection_space(task: Task, target: Target) -> ConfigSpace:
    """Threads of the token's block and the vector width (16 bytes at most, D a multiple of it,
    so that every run of every token stays aligned)."""
    itemsize, q_run = ITEMSIZE[task.dtype], task.dims["H"] * task.dims["D"]
    max_threads = target.max_threads_per_block or 1024
    knobs = [Knob("threads", tuple(t for t in PROJECTION_THREADS if t <= max_threads)),
             Knob("vec", tuple(v for v in (1, 2, 4, 8) if v * itemsize <= 16 and task.dims["D"] % v == 0))]
    constraints = [
        ("every warp has a vector of the q run",
         lambda c: c["threads"] == PROJECTION_THREADS[0] or c["threads"] <= 32 * -(-q_run // c["vec"] // 32)),
    ]
    return ConfigSpace(knobs, constraints)


def projection_default(space: ConfigSpace) -> Config:
    """Widest vectors, 256 threads (128 where the q run has too few vectors for 8 warps)."""
    vec = max(space.knob("vec").values)
    for threads in (256, 128):
        if space.accepts(dict(threads=threads, vec=vec)):
            return space.from_values(dict(threads=threads, vec=vec))
    return next(iter(space))


def projection_features(task: Task, config: Config, target: Target, min_bytes: float,
                        flops: float) -> dict[str, float]:
    """Features of the projection kernel, named as the row kernels' (``rowplan.row_features``)."""
    c = config.as_dict()
    d, itemsize = task.dims, ITEMSIZE[task.dtype]
    threads, vec = c["threads"], c["vec"]
    q_run, k_run = d["H"] * d["D"], d["HKV"] * d["D"]
    q_vectors = q_run // vec
    per_thread = -(-q_vectors // threads)
    blocks = d["T"]
    per_sm = max(1, min(2048 // threads, 32))
    registers = BASE_REGISTERS + 2 * max(vec * itemsize // 4, 1)  # a vector of x and one of the gain
    smem = 64 * 4
    moved = min_bytes + itemsize * blocks * (q_run + k_run)  # the write pass re-reads the q and k runs
    return {
        "threads": threads / 32,
        "vector_lanes": vec,
        "unroll": 1,
        "accumulators": per_thread,
        "parallel_chunks": blocks,
        "chunks_per_thread": blocks / max(target.sm_count, 1),
        "waves": blocks / (max(target.sm_count, 1) * per_sm),
        "tile_bytes_l1": (q_run + 2 * k_run) * itemsize,
        "bytes_moved": moved,
        "arith_intensity": flops / moved,
        "n_tail_fraction": (per_thread * threads - q_vectors) / (per_thread * threads),
        "m_tail_fraction": 0.0,
        "shared_bytes": smem,
        "registers": registers,
        "occupancy": occupancy(threads, smem, registers, target),
        "reduction_share": math.log2(threads) / max(per_thread * vec, 1),
    }


def _body(p: RowPlan, eps: float) -> str:
    """rmsnorm's two passes (sum of squares while caching the row, then the scaled write) with
    the gain of the row's head; a value row is copied in one pass instead."""
    copy = (p.loop(True)
            + f"    store_pack<VEC, {p.store_hint}>(y + (long long)v * VEC, "
            f"load_pack<VEC, {1 if p.stream else 0}>(x + (long long)v * VEC));\n  }}\n")
    return ("  const T* x = X + row * N;\n  T* y = Y + row * N;\n"
            "  const int head = (int)(row % HEADS);\n"
            "  if (head >= H + HKV) {  // a value head: the whole row (warp or block) leaves together\n"
            + copy + "    return;\n  }\n"
            "  const T* gain = head < H ? GQ : GK;\n"
            + p.declare_cache("x") + "  float ss = 0.0f;\n"
            + p.first_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) "
                           "{ const float f = to_f32(a.e[e]); ss = fmaf(f, f, ss); }\n")
            + f"  const float inv = rsqrtf(row_sum(ss, scratch) * (1.0f / N) + {c_float(eps)});\n"
            + p.write_pass("x", "to_f32(a.e[e]) * inv * to_f32(g.e[e])", columns=p.column("g", "gain")))
