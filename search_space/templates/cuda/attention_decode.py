"""``attention_decode`` on CUDA: split-KV (flash-decoding) in one kernel.

Grid (splits, HKV, B). A block owns positions [split * per, min(L, (split + 1) * per)) of
one KV head, per = ceil(L / splits), and reads each K/V row of that range once for all
G = H / HKV query heads of the group. Inside the block every ``lanes`` lanes form a row
group that reads one cache row (each lane ``D / lanes`` elements, as vectors of ``vec``),
so a warp instruction moves 32 / lanes contiguous rows; a row group steps through its
rows ``unroll`` at a time (all loads issued first), and keeps its own online-softmax state
(max, sum, accumulator) per head. States are merged across the row groups of a warp with
shuffles, across warps in shared memory, and across splits through the workspace: each
block writes its partial (max, sum, accumulator) per head, bumps a per-(b, KV head)
counter, and the block that arrives last combines the partials and writes O. The counter
wraps to 0 in that same atomic (atomicInc), so the workspace is ready for the next call;
it must be zero-filled once when allocated. Scores are in the log2 domain (q pre-scaled
by scale * log2(e)); arithmetic is float32. S (row stride of the cache) and L are
runtime arguments; any 0 <= L <= S works (L = 0 writes zeros). A sliding ``window`` (compiled
in) moves the split range to the rows the query at L - 1 sees, [max(0, L - window), L): the
splits cut that, so the work shrinks with the window. A ``softcap`` (compiled in; 0 adds nothing
to the source) pre-scales q by scale / softcap instead and makes each row's q . k the capped
score tanh(q . k) * softcap * log2(e) (tanhf, float32) before the softmax. With
``lengths=per_sequence`` each sequence's length is read from ``LENS[b]`` in device memory
instead, so a launch recorded in a CUDA graph stays right as the cache grows. With
``programmatic`` (the captured decode step's) it lets the next kernel launch and waits for the
one before it, first thing (``codegen.cuda_ptx.GRID_DEPENDENCY_HELPERS``): the output
projection after it can then stream its weights while attention runs.

``rope_append_attention`` (the captured decode step's attention) is the same kernel, started
from the Q/K/V projection's rows: every block rotates its q heads itself (``rope_append``'s
angles, rounded to E as that kernel stores them) and attends to the cached rows before the
sequence's position P[b] (read from memory), from max(0, P[b] - window + 1) on with a window.
A partial ``rotary_dim`` R turns pairs (i, i + R/2) for i < R/2 and leaves dims R .. D - 1 as
they are (each vector lies in one of those parts).
The block whose range holds P[b] starts from the new row: warp 0 rotates k and takes it and v
from the projection as it loads q (no extra round trip at the end), makes them the first row of
row group 0's online softmax and writes both to the caches at P[b]. The runtime passes one
cache as K and KC: the rows read (before P[b]) and the row written are disjoint, so the
restrict-qualified pointers never touch the same element.
"""
from __future__ import annotations

import math
import re

from ...codegen.cuda import PREAMBLE, VECTOR_HELPERS, c_type, dim_scalars, kernel_params, registers_ok, static_dims
from ...codegen.cuda_ptx import grid_dependency_code, programmatic_launch
from ...ops.attention import AttentionDecodeOp, _scale, window_start
from ...ops.common import ITEMSIZE
from ...ops.device_step import RopeAppendAttentionOp
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import ArgSpec, KernelSource, Template, register_template
from .limits import occupancy
from .rope import half_constants, rope_code, rotary_pairs

STATIC_SMEM = 48 << 10
LOG2E = 1.4426950408889634


def _group(task: Task) -> int:
    return task.dims["H"] // task.dims["HKV"]


def _registers(task: Task, c: dict) -> int:
    """q and accumulators (G x D / lanes floats each), K/V rows in flight, scores, state."""
    g, per_lane = _group(task), task.dims["D"] // c["lanes"]
    kv = 2 * c["unroll"] * max(per_lane * ITEMSIZE[task.dtype] // 4, 1)
    return 32 + 2 * g * per_lane + kv + c["unroll"] * g + 2 * g


def _static_smem(task: Task, c: dict) -> int:
    g = _group(task)
    return 4 * (g * task.dims["D"] + 2 * c["warps"] * g + 2 * g) + 16


def workspace_bytes(task: Task, splits: int) -> int:
    """Partials [B*HKV][splits][G][D], (max, sum) [B*HKV][splits][G][2], counters [B*HKV]."""
    d = task.dims
    heads = d["B"] * d["HKV"]
    return 4 * (heads * splits * _group(task) * (d["D"] + 2) + heads)


class SplitKvDecode:
    """The split-KV schedule's space, default, features and kernel, shared by ``attention_decode``
    and ``rope_append_attention`` (mixed in before their operator)."""

    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")
    schedule_family = ("attention_decode", "rope_append_attention")  # each's best configs seed the other's search

    def vector_span(self, task: Task) -> int:
        """The dims every vector width must divide: D (rope_append_attention's: within one part of
        a rotated row)."""
        return task.dims["D"]

    def window_rows(self, task: Task) -> int:
        """The positions a sequence at the task's L attends to (the range the splits cut): L, or its window's."""
        return task.dims["L"] - window_start(task.dims["L"], self.attrs(task)["window"])

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        d, itemsize, rows = task.dims, ITEMSIZE[task.dtype], self.window_rows(task)
        vecs = tuple(v for v in (1, 2, 4, 8) if v * itemsize <= 16 and self.vector_span(task) % v == 0)
        lanes = tuple(n for n in (1, 2, 4, 8, 16, 32) if any((d["D"] // v) % n == 0 for v in vecs))
        splits = tuple(s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s == 1 or s <= -(-rows // 16))
        max_warps = (target.max_threads_per_block or 1024) // 32
        knobs = [
            Knob("warps", tuple(w for w in (1, 2, 4, 8) if w <= max_warps)),
            Knob("vec", vecs),
            Knob("lanes", lanes),
            Knob("unroll", (1, 2, 4, 8)),
            Knob("splits", splits),
        ]
        constraints = [
            ("lanes per row divide the vectors of a row", lambda c: (d["D"] // c["vec"]) % c["lanes"] == 0),
            ("registers fit the block", lambda c: registers_ok(_registers(task, c), 32 * c["warps"], target)),
            ("block merge fits in static shared memory", lambda c: _static_smem(task, c) <= STATIC_SMEM),
            ("a step of rows is not longer than a split",
             lambda c: c["unroll"] * c["warps"] * 32 // c["lanes"] <= max(-(-rows // c["splits"]), 1)
             or c["unroll"] == 1),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        """16-byte vectors, 4 warps, rows of D/vec lanes (at most 32), unroll 2, and enough
        splits for about four blocks per SM."""
        space = self.space(task, target)
        d = task.dims
        vec = max(space.knob("vec").values)
        lanes = max(n for n in space.knob("lanes").values if (d["D"] // vec) % n == 0)
        blocks = d["B"] * d["HKV"]
        want = max(1, 4 * max(target.sm_count, 1) // blocks)
        splits = [s for s in space.knob("splits").values if s <= want] or [1]
        for split in sorted(splits, reverse=True):
            for warps, unroll in ((4, 2), (4, 1), (2, 1), (1, 1)):
                for ln in sorted((n for n in space.knob("lanes").values if n <= lanes), reverse=True):
                    values = dict(warps=warps, vec=vec, lanes=ln, unroll=unroll, splits=split)
                    if space.accepts(values):
                        return space.from_values(values)
        return next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        d = task.dims
        g, rows = _group(task), self.window_rows(task)
        blocks = d["B"] * d["HKV"] * c["splits"]
        per_lane = d["D"] // c["lanes"]
        partial = 4 * blocks * g * (d["D"] + 2) * 2 if c["splits"] > 1 else 0
        moved = self.min_bytes(task) + partial
        per_sm = max(1, 2048 // (32 * c["warps"]))
        return {
            "threads": c["warps"],
            "vector_lanes": c["vec"],
            "unroll": c["unroll"],
            "accumulators": g * per_lane,
            "parallel_chunks": blocks,
            "chunks_per_thread": rows / c["splits"] / (c["warps"] * 32 // c["lanes"]),
            "waves": blocks / (max(target.sm_count, 1) * per_sm),
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": math.log2(c["lanes"]) / per_lane + (c["splits"] - 1) / max(rows, 1),
            "registers": _registers(task, c),
            "occupancy": occupancy(32 * c["warps"], _static_smem(task, c), _registers(task, c), target),
            "shared_bytes": _static_smem(task, c),
            "tile_bytes_l1": 2 * c["unroll"] * c["warps"] * 32 // c["lanes"] * d["D"] * ITEMSIZE[task.dtype],
        }

    def _source(self, task: Task, config: Config, target: Target, programmatic: bool, kernel: str,
                constants: str, length: str, entry: str) -> KernelSource:
        """The launch of ``kernel`` (placeholders filled) with the schedule's constants, then
        ``constants``; ``length``: the C expression of this block's sequence's length; ``entry``:
        its name (what profiles show)."""
        c = config.as_dict()
        d = task.dims
        args = (self.signature(task) + (ArgSpec("WS", "workspace", "float32", (), nbytes=workspace_bytes(task, c["splits"])),)
                + dim_scalars(task))
        cap = float(self.attrs(task)["softcap"])
        if cap:  # q . k is s / softcap: soft_cap takes it to the capped score in the log2 domain
            scaling = (f"constexpr float QSCALE = {_scale(self, task) / cap!r}f;   // q . k = s / SOFTCAP\n"
                       f"constexpr float SOFTCAP = {cap!r}f;   // soft-capping: a scaled score s becomes "
                       "SOFTCAP * tanh(s / SOFTCAP)\n"
                       f"constexpr float SOFTCAP_LOG2 = {cap * LOG2E!r}f;\n"
                       "__device__ __forceinline__ float soft_cap(float x) { return tanhf(x) * SOFTCAP_LOG2; }\n")
        else:
            scaling = f"constexpr float QSCALE = {_scale(self, task) * LOG2E!r}f;\n"
        # each row's score (the dot product, summed over its lanes) capped, or left as it is
        kernel = re.sub(r"@CAP_PART@( *)", r"\1part = soft_cap(part);\n\1" if cap else r"\1", kernel)
        # a step of a captured graph: the next kernel may launch at once, this one waits for Q and the cache
        helpers, start, wait = grid_dependency_code(programmatic)
        kernel = kernel.replace("(@PARAMS@) {\n", "(@PARAMS@) {" + (start + wait or "\n"))
        kernel = kernel.replace("@PARAMS@", kernel_params(args)).replace("@ENTRY@", entry)
        code = (
            PREAMBLE + VECTOR_HELPERS + helpers
            + f"typedef {c_type(task.dtype)} E;\n"
            f"constexpr int B = {d['B']};\nconstexpr int H = {d['H']};\nconstexpr int HKV = {d['HKV']};\n"
            f"constexpr int G = H / HKV;\nconstexpr int D = {d['D']};\n"
            f"constexpr int VEC = {c['vec']};\nconstexpr int LPR = {c['lanes']};\n"
            "constexpr int CH = D / (VEC * LPR);   // vectors per lane per row\n"
            "constexpr int RPW = 32 / LPR;         // rows per warp instruction\n"
            f"constexpr int WARPS = {c['warps']};\nconstexpr int THREADS = WARPS * 32;\n"
            "constexpr int STREAMS = WARPS * RPW;  // row groups of the block\n"
            f"constexpr int UNROLL = {c['unroll']};\nconstexpr int SPLITS = {c['splits']};\n"
            + scaling
            + f"constexpr long long WINDOW = {self.attrs(task)['window']};   // 0: no sliding window\n"
            + static_dims(task, ("S", "L")) + constants
            + f"#define KV_LEN {length}\n"
            + kernel)
        launch = (("block", (32 * c["warps"], 1, 1)), ("grid", (c["splits"], d["HKV"], d["B"])), ("smem", 0))
        launch += programmatic_launch(target) if programmatic else ()
        return KernelSource("cuda", code, entry, tuple(args), launch)


@register_template
class AttentionDecodeCuda(SplitKvDecode, AttentionDecodeOp, Template):
    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        kernel = (_KERNEL.replace("@POSITION@\n", "").replace("@END@", _CACHE_END).replace("@Q_VECTOR@", _Q_VECTOR)
                  .replace("@NEW_ROW@", ""))
        # the positions this block's sequence attends to: the scalar L, or its own from memory
        length = "((long long)LENS[blockIdx.z])" if self.per_sequence(task) else "L"
        return self._source(task, config, target, self.attrs(task)["programmatic"], kernel, "", length,
                            "attention_decode_splitkv")


@register_template
class RopeAppendAttentionCuda(SplitKvDecode, RopeAppendAttentionOp, Template):

    def vector_span(self, task: Task) -> int:
        """A vector lies within one rotate-half half (R/2 dims of a rotary dim R) or within the
        pass-through dims R .. D - 1."""
        return math.gcd(rotary_pairs(task), task.dims["D"])

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        kernel = (_KERNEL.replace("@POSITION@\n", _POSITION).replace("@END@", _CACHED_END)
                  .replace("@Q_VECTOR@", _ROTATED_Q_VECTOR).replace("@NEW_ROW@", _NEW_ROW))
        rotated_vector = _ROTATED_VECTOR
        if 2 * rotary_pairs(task) < task.dims["D"]:  # partial rotary: the dims past ROTARY as they are
            rotated_vector = rotated_vector.replace("  const bool low", _PASSED_VECTOR + "  const bool low")
        constants = half_constants(task) + rope_code(task, self.attrs(task)) + rotated_vector
        # always a step of the captured graph: it waits for the projection's rows
        return self._source(task, config, target, True, kernel, constants, "(cached + 1)",
                            "rope_append_attention_splitkv")


_Q_VECTOR = r"""      const Pack<E, VEC> p = load_pack<VEC>(Q + (head * G + g) * D + (c * LPR + li) * VEC);
#pragma unroll
      for (int e = 0; e < VEC; ++e) { q[g][c][e] = to_f32(p.e[e]) * QSCALE; acc[g][c][e] = 0.0f; }
"""
_CACHE_END = """  const long long end = begin + per < KV_LEN ? begin + per : KV_LEN;   // empty when end <= begin
"""

# rope_append_attention's parts of the kernel
_ROTATED_VECTOR = r"""
// Dims i0 .. i0 + VEC - 1 of a q or k row rotated at ``position`` (rotate-half: dim i turns with
// dim i +- D/2; a vector lies in one half), rounded to E as rope_append stores them.
__device__ __forceinline__ void rotated_vector(const E* row, int i0, int position, float* out) {
  const bool low = i0 < HALF;
  const Pack<E, VEC> x = load_pack<VEC>(row + i0);
  const Pack<E, VEC> other = load_pack<VEC>(row + (low ? i0 + HALF : i0 - HALF));
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    float cs, sn;
    rope_angle(position, INV_FREQ[(low ? i0 : i0 - HALF) + e], cs, sn);
    const float turned = to_f32(other.e[e]) * (low ? -sn : sn);
    out[e] = to_f32(from_f32<E>(fmaf(to_f32(x.e[e]), cs, turned)));
  }
}
"""
_PASSED_VECTOR = r"""  if (i0 >= ROTARY) {
    const Pack<E, VEC> x = load_pack<VEC>(row + i0);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = to_f32(x.e[e]);
    return;
  }
"""
_POSITION = """  // this sequence's position: the cached rows before it (at most S), then its own new row
  const int position = P[b];
  const long long cached = position < 0 ? 0 : (position < S ? position : S);
"""
_CACHED_END = """  const long long end = begin + per < cached ? begin + per : cached;   // rows read from the cache
"""
_ROTATED_Q_VECTOR = r"""      float r[VEC];
      rotated_vector(QKV + ((long long)b * (H + 2 * HKV) + kvh * G + g) * D, (c * LPR + li) * VEC, position, r);
#pragma unroll
      for (int e = 0; e < VEC; ++e) { q[g][c][e] = r[e] * QSCALE; acc[g][c][e] = 0.0f; }
"""
_NEW_ROW = r"""  // The block whose range holds the new row starts from it, in row group 0 of warp 0 (the
  // others start empty): k rotated and v from the projection, whose loads meet q's in flight;
  // both go to the caches, where no block reads that row.
  if (warp == 0 && begin <= cached && cached < begin + per) {
    const E* row = QKV + (long long)b * (H + 2 * HKV) * D;
    const bool writes = rg == 0 && position == cached && cached < S;   // outside the cache: nothing
    float kn[CH][VEC];
    Pack<E, VEC> vn[CH];
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int i0 = (c * LPR + li) * VEC;
      rotated_vector(row + (long long)(H + kvh) * D, i0, position, kn[c]);
      vn[c] = load_pack<VEC>(row + (long long)(H + HKV + kvh) * D + i0);
      if (writes) {
        Pack<E, VEC> pk;
#pragma unroll
        for (int e = 0; e < VEC; ++e) pk.e[e] = from_f32<E>(kn[c][e]);
        store_pack<VEC>(KC + (head * S + cached) * D + i0, pk);
        store_pack<VEC>(VC + (head * S + cached) * D + i0, vn[c]);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float part = 0.0f;
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) part = fmaf(q[g][c][e], kn[c][e], part);
#pragma unroll
      for (int off = LPR / 2; off > 0; off >>= 1) part += __shfl_xor_sync(FULL, part, off);
@CAP_PART@      if (rg == 0) {   // the state's first row: weight exp2(s - s) = 1
        m[g] = part;
        l[g] = 1.0f;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][c][e] = to_f32(vn[c].e[e]);
      }
    }
  }

"""

_KERNEL = r"""
#define FULL 0xffffffffu

extern "C" __global__ void __launch_bounds__(THREADS) @ENTRY@(@PARAMS@) {
  __shared__ __align__(16) float sm_acc[G * D];
  __shared__ float sm_m[WARPS][G], sm_l[WARPS][G];
  __shared__ float sm_bm[G], sm_bl[G];
  __shared__ unsigned int sm_last;
  const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int li = lane % LPR;          // lane within its row group
  const int rg = lane / LPR;          // row group within the warp
  for (int k = threadIdx.x; k < G * D; k += THREADS) sm_acc[k] = 0.0f;
@POSITION@

  const long long head = (long long)b * HKV + kvh;
  // the splits cut the positions the query sees: [first, KV_LEN), the window's (or all)
  const long long first = WINDOW > 0 && KV_LEN > WINDOW ? KV_LEN - WINDOW : 0;
  const long long per = (KV_LEN - first + SPLITS - 1) / SPLITS;
  const long long begin = first + (long long)split * per;
@END@
  float q[G][CH][VEC], acc[G][CH][VEC], m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.0f;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
@Q_VECTOR@    }
  }

@NEW_ROW@  const E* Kh = K + head * S * D;
  const E* Vh = V + head * S * D;
  // The loop bound depends on the warp only, so every lane reaches every shuffle.
  for (long long w0 = begin + warp * RPW; w0 < end; w0 += (long long)STREAMS * UNROLL) {
    Pack<E, VEC> kr[UNROLL][CH], vr[UNROLL][CH];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const long long pos = w0 + rg + (long long)u * STREAMS;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        // rows past the end stay zero: their weight is 0 and 0 * 0 keeps the sums finite
        kr[u][c] = Pack<E, VEC>{};
        vr[u][c] = Pack<E, VEC>{};
        if (pos < end) {
          kr[u][c] = load_pack<VEC, 1>(Kh + pos * D + (c * LPR + li) * VEC);
          vr[u][c] = load_pack<VEC, 1>(Vh + pos * D + (c * LPR + li) * VEC);
        }
      }
    }
    float s[UNROLL][G];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const bool valid = w0 + rg + (long long)u * STREAMS < end;
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float part = 0.0f;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int e = 0; e < VEC; ++e) part = fmaf(q[g][c][e], to_f32(kr[u][c].e[e]), part);
#pragma unroll
        for (int off = LPR / 2; off > 0; off >>= 1) part += __shfl_xor_sync(FULL, part, off);
@CAP_PART@        s[u][g] = valid ? part : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      float mt = s[0][g];
#pragma unroll
      for (int u = 1; u < UNROLL; ++u) mt = fmaxf(mt, s[u][g]);
      const float mn = fmaxf(m[g], mt);
      const float base = mn == -INFINITY ? 0.0f : mn;   // nothing seen yet: keep zeros, no NaN
      const float corr = exp2f(m[g] - base);
      l[g] *= corr;
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][c][e] *= corr;
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const float p = exp2f(s[u][g] - base);
        l[g] += p;
#pragma unroll
        for (int c = 0; c < CH; ++c)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][c][e] = fmaf(p, to_f32(vr[u][c].e[e]), acc[g][c][e]);
      }
      m[g] = mn;
    }
  }

  // Merge the row groups of this warp: partners differ in rg only, so they hold the same dims.
#pragma unroll
  for (int off = LPR; off < 32; off <<= 1) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float mo = __shfl_xor_sync(FULL, m[g], off);
      const float lo = __shfl_xor_sync(FULL, l[g], off);
      const float mn = fmaxf(m[g], mo);
      const float base = mn == -INFINITY ? 0.0f : mn;
      const float fa = exp2f(m[g] - base), fb = exp2f(mo - base);
      l[g] = l[g] * fa + lo * fb;
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) {
          const float ao = __shfl_xor_sync(FULL, acc[g][c][e], off);
          acc[g][c][e] = acc[g][c][e] * fa + ao * fb;
        }
      m[g] = mn;
    }
  }

  // Merge the warps: block max and sum per head, then each warp adds its rescaled accumulator.
  if (lane == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) { sm_m[warp][g] = m[g]; sm_l[warp][g] = l[g]; }
  }
  __syncthreads();   // also orders the zeroing of sm_acc before the adds
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float bm = -INFINITY;
#pragma unroll
    for (int w = 0; w < WARPS; ++w) bm = fmaxf(bm, sm_m[w][g]);
    const float base = bm == -INFINITY ? 0.0f : bm;
    if (threadIdx.x == 0) {
      float bl = 0.0f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) bl = fmaf(sm_l[w][g], exp2f(sm_m[w][g] - base), bl);
      sm_bm[g] = bm;
      sm_bl[g] = bl;
    }
    const float f = exp2f(m[g] - base);
    if (lane < LPR) {
#pragma unroll
      for (int c = 0; c < CH; ++c)
#pragma unroll
        for (int e = 0; e < VEC; ++e) atomicAdd(&sm_acc[g * D + (c * LPR + li) * VEC + e], acc[g][c][e] * f);
    }
  }
  __syncthreads();

  E* out = O + head * G * D;   // heads kvh * G .. kvh * G + G - 1 of batch b
  if constexpr (SPLITS == 1) {
    for (int k = threadIdx.x; k < G * D; k += THREADS) {
      const float tot = sm_bl[k / D];
      out[k] = from_f32<E>(tot > 0.0f ? sm_acc[k] / tot : 0.0f);
    }
  } else {
    float* part_acc = WS;                                              // [B*HKV][SPLITS][G][D]
    float* part_ml = WS + (long long)B * HKV * SPLITS * G * D;         // [B*HKV][SPLITS][G][2]
    unsigned int* counter = reinterpret_cast<unsigned int*>(part_ml + (long long)B * HKV * SPLITS * G * 2);
    const long long slot = head * SPLITS + split;
    for (int k = threadIdx.x; k < G * D; k += THREADS) part_acc[slot * G * D + k] = sm_acc[k];
    if (threadIdx.x < G) {
      part_ml[(slot * G + threadIdx.x) * 2] = sm_bm[threadIdx.x];
      part_ml[(slot * G + threadIdx.x) * 2 + 1] = sm_bl[threadIdx.x];
    }
    __threadfence();   // this block's partials are visible device-wide before it is counted
    __syncthreads();
    if (threadIdx.x == 0) {
      // wraps to 0 when the last split arrives: the counter is reset for the next call
      sm_last = atomicInc(&counter[head], SPLITS - 1) == SPLITS - 1;
    }
    __syncthreads();
    if (!sm_last) return;
    __threadfence();
    for (int k = threadIdx.x; k < G * D; k += THREADS) {
      const int g = k / D;
      const float* ml = part_ml + (head * SPLITS * G + g) * 2;
      float bm = -INFINITY;
      for (int s = 0; s < SPLITS; ++s) bm = fmaxf(bm, __ldcg(ml + s * G * 2));
      const float base = bm == -INFINITY ? 0.0f : bm;
      float tot = 0.0f, o = 0.0f;
      for (int s = 0; s < SPLITS; ++s) {
        const float w = exp2f(__ldcg(ml + s * G * 2) - base);
        tot = fmaf(__ldcg(ml + s * G * 2 + 1), w, tot);
        o = fmaf(__ldcg(part_acc + (head * SPLITS + s) * G * D + k), w, o);
      }
      out[k] = from_f32<E>(tot > 0.0f ? o / tot : 0.0f);
    }
  }
}
"""
