"""``rope`` on CUDA: rotate-half rotary embedding of X[T,H,D] at positions P[T].

A block takes ``tokens`` tokens. Its work items are pair-vectors: ``vec`` consecutive
dims i of the low half of one head's row and the matching dims i + D/2 of the high half,
numbered so that consecutive threads move consecutive 16-byte vectors of each half.
Items per thread are a compile-time count (H, D static), unrolled.

Angles: a = P[t] * f_i with f_i = theta^(-2i/D) (or its linear / llama3 / yarn / longrope scaling) from a
float64 table compiled in (``runtime.rope_frequencies``: the numbers the reference uses),
multiplied in float64 and reduced to [-pi, pi] in float64, so that __sincosf (absolute
error 2^-21.4 there) stays accurate at positions of many thousands where a float32 product
alone would be off by 1e-4. A yarn or longrope rope's cos and sin are then multiplied by its
attention factor (``rotation_scale``, as transformers' rotary embedding does); every other rope's source
has no such multiply (``rope_code``: the same source, the same compiled-kernel cache key).
``trig = shared``: the block computes cos/sin once per (token, i) into shared memory and
every head reuses them; ``trig = registers``: each thread computes its own.
With ``rotary_dim`` R < D (partial rotary) the pairs are (i, i + R/2) for i < R/2 (``HALF`` is R/2)
and each block copies its tokens' dims R .. D - 1.
"""
from __future__ import annotations

from runtime.rope_frequencies import frequencies_of_attrs, rotary_dim_of, rotation_scale

from ...codegen.cuda import PREAMBLE, VECTOR_HELPERS, c_type, dim_scalars, kernel_params, registers_ok, static_dims
from ...ops.common import ITEMSIZE
from ...ops.elementwise import RopeOp
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .limits import occupancy

THREADS = (32, 64, 128, 256, 512)
MAX_ITEMS_PER_THREAD = 16
STATIC_SMEM = 48 << 10
# cos and sin of a position's angle, shared with ``rope_append`` (templates/cuda/device_step.py)
ROPE_ANGLE = (
    "\n// cos and sin of pos * inv_freq: float64 product and reduction to [-pi, pi], then the\n"
    "// fast float32 sincos, accurate on that interval.\n"
    "__device__ __forceinline__ void rope_angle(int pos, double inv_freq, float& c, float& s) {\n"
    "  const double a = (double)pos * inv_freq;\n"
    "  const double k = rint(a * 0.15915494309189535);\n"
    "  __sincosf((float)fma(-k, 6.283185307179586, a), &s, &c);\n"
    "}\n\n")


# partial rotary: the block's tokens' dims ROTARY .. D - 1 copied as they are
_PASS_THROUGH = (
    "  for (int k = threadIdx.x; k < TOKENS * H * (D - ROTARY); k += THREADS) {\n"
    "    const long long t = t0 + k / (H * (D - ROTARY));\n"
    "    const long long at = (t * H + (k / (D - ROTARY)) % H) * D + ROTARY + k % (D - ROTARY);\n"
    "    if (t < T) Y[at] = X[at];\n"
    "  }\n")


def frequency_table(task: Task, attrs) -> str:
    """The float64 frequencies of pairs 0 .. HALF - 1 (D/2, or ROTARY/2) as a device array ``INV_FREQ[HALF]``, the
    numbers the reference turns by (``runtime.rope_frequencies``)."""
    table = ", ".join(repr(float(f)) for f in frequencies_of_attrs(task.dims["D"], attrs))
    return f"__device__ const double INV_FREQ[HALF] = {{{table}}};\n"


def rope_code(task: Task, attrs) -> str:
    """``frequency_table`` and the ``rope_angle`` device function of a rope's attributes (after
    ``HALF``): ``ROPE_ANGLE`` as it is where the rotation scale is 1 (every rope type but yarn and
    longrope), else with cos and sin multiplied by ``ROPE_SCALE``, their attention factor
    (``rotation_scale``). Every rope kernel takes its angles from here."""
    scale = rotation_scale(attrs)
    if scale == 1.0:
        return frequency_table(task, attrs) + ROPE_ANGLE
    scaled = ROPE_ANGLE.replace(
        "&s, &c);\n}", "&s, &c);\n  c *= ROPE_SCALE;\n  s *= ROPE_SCALE;\n}")
    assert scaled != ROPE_ANGLE
    return (frequency_table(task, attrs)
            + f"// {attrs['rope_type']}'s attention factor: cos and sin times it (transformers' attention_scaling)\n"
            f"constexpr float ROPE_SCALE = {float(scale)!r}f;\n" + scaled)


def rotary_pairs(task: Task) -> int:
    """The pairs of a head that turn: half its rotary dims (``rotary_dim_of``)."""
    return rotary_dim_of(task.dims["D"], task.attr) // 2


def half_constants(task: Task) -> str:
    """``HALF`` (the pairs that turn), and for a partial rotary ``ROTARY``, the dims that do: the
    same source as before partial rotary where every dim turns."""
    rotary = rotary_dim_of(task.dims["D"], task.attr)
    if rotary == task.dims["D"]:
        return "constexpr int HALF = D / 2;\n"
    return f"constexpr int ROTARY = {rotary};\nconstexpr int HALF = ROTARY / 2;\n"


def _items(task: Task, c: dict) -> int:
    return c["tokens"] * task.dims["H"] * rotary_pairs(task) // c["vec"]


def _per_thread(task: Task, c: dict) -> int:
    return -(-_items(task, c) // c["threads"])


def _registers(task: Task, c: dict) -> int:
    """Unrolled items may all have their two loads in flight."""
    return 32 + _per_thread(task, c) * 2 * max(c["vec"] * ITEMSIZE[task.dtype] // 4, 1)


def _smem(task: Task, c: dict) -> int:
    return 8 * c["tokens"] * rotary_pairs(task) if c["trig"] == "shared" else 0


@register_template
class RopeCuda(RopeOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        itemsize = ITEMSIZE[task.dtype]
        half = rotary_pairs(task)
        max_threads = target.max_threads_per_block or 1024
        knobs = [
            Knob("tokens", (1, 2, 4, 8)),
            Knob("threads", tuple(t for t in THREADS if t <= max_threads)),
            Knob("vec", tuple(v for v in (1, 2, 4, 8) if v * itemsize <= 16 and half % v == 0)),
            Knob("trig", ("shared", "registers")),
        ]
        constraints = [
            ("every warp has an item", lambda c: c["threads"] <= max(32, 32 * -(-_items(task, c) // 32))),
            ("items per thread stay unrollable", lambda c: _per_thread(task, c) <= MAX_ITEMS_PER_THREAD),
            ("registers fit the block",
             lambda c: registers_ok(_registers(task, c), c["threads"], target)),
            # a static __shared__ array: the 48 KiB static limit applies, not the opt-in one
            ("cos/sin table fits in static shared memory", lambda c: _smem(task, c) <= STATIC_SMEM),
        ]
        return ConfigSpace(knobs, constraints)

    def default(self, task: Task, target: Target) -> Config:
        """Widest vectors, shared cos/sin, 256 threads and the fewest tokens per block that
        give every thread at least two items (loads in flight)."""
        space = self.space(task, target)
        vec = max(space.knob("vec").values)
        candidates = [dict(tokens=tokens, threads=threads, vec=vec, trig="shared")
                      for threads in (256, 128, 64, 512) for tokens in (1, 2, 4, 8)]
        valid = [v for v in candidates if space.accepts(v)]
        for values in valid:
            if _per_thread(task, values) >= 2:
                return space.from_values(values)
        return space.from_values(valid[-1]) if valid else next(iter(space))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        c = config.as_dict()
        d = task.dims
        blocks = -(-d["T"] // c["tokens"])
        items = _items(task, c)
        per_sm = max(1, 2048 // c["threads"])
        moved = self.min_bytes(task)
        return {
            "threads": c["threads"] / 32,
            "vector_lanes": c["vec"],
            "unroll": _per_thread(task, c),
            "parallel_chunks": blocks,
            "chunks_per_thread": items / c["threads"],
            "waves": blocks / (max(target.sm_count, 1) * per_sm),
            "tile_bytes_l1": c["tokens"] * d["H"] * d["D"] * ITEMSIZE[task.dtype],
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "m_tail_fraction": (blocks * c["tokens"] - d["T"]) / (blocks * c["tokens"]),
            "n_tail_fraction": (_per_thread(task, c) * c["threads"] - items) / (_per_thread(task, c) * c["threads"]),
            "shared_bytes": _smem(task, c),
            "registers": _registers(task, c),
            "occupancy": occupancy(c["threads"], _smem(task, c), _registers(task, c), target),
        }

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        d = task.dims
        args = self.signature(task) + dim_scalars(task)
        shared = c["trig"] == "shared"
        trig_setup = (
            "  __shared__ float cos_t[TOKENS * HALF], sin_t[TOKENS * HALF];\n"
            "  for (int k = threadIdx.x; k < TOKENS * HALF; k += THREADS) {\n"
            "    const long long t = t0 + k / HALF;\n"
            "    if (t < T) rope_angle(P[t], INV_FREQ[k % HALF], cos_t[k], sin_t[k]);\n"
            "  }\n  __syncthreads();\n") if shared else ""
        if shared:
            cs = ("      const float cs = cos_t[tt * HALF + f + e], sn = sin_t[tt * HALF + f + e];\n")
        else:
            cs = "      float cs, sn;\n      rope_angle(pos, INV_FREQ[f + e], cs, sn);\n"
        code = (
            PREAMBLE + VECTOR_HELPERS
            + f"typedef {c_type(task.dtype)} T_;\n"
            f"constexpr int H = {d['H']};\nconstexpr int D = {d['D']};\n" + half_constants(task) +
            f"constexpr int VEC = {c['vec']};\nconstexpr int NPV = HALF / VEC;\n"
            f"constexpr int TOKENS = {c['tokens']};\nconstexpr int THREADS = {c['threads']};\n"
            "constexpr int ITEMS = TOKENS * H * NPV;\n"
            "constexpr int PER_THREAD = (ITEMS + THREADS - 1) / THREADS;\n"
            + static_dims(task, ("T",))
            + rope_code(task, self.attrs(task))
            + f'extern "C" __global__ void __launch_bounds__(THREADS) rope_rows({kernel_params(args)}) {{\n'
            "  typedef T_ E;\n"
            "  const long long t0 = (long long)blockIdx.x * TOKENS;\n"
            + trig_setup
            + "#pragma unroll\n  for (int it = 0; it < PER_THREAD; ++it) {\n"
            "    const int item = it * THREADS + threadIdx.x;\n"
            "    if (ITEMS % THREADS != 0 && item >= ITEMS) break;\n"
            "    const int tt = item / (H * NPV);\n"
            "    const int h = (item / NPV) % H;\n"
            "    const int f = (item % NPV) * VEC;\n"
            "    const long long t = t0 + tt;\n"
            "    if (t >= T) break;\n"
            + ("" if shared else "    const int pos = P[t];\n")
            + "    const long long base = (t * H + h) * D + f;\n"
            "    const Pack<E, VEC> lo = load_pack<VEC>(X + base);\n"
            "    const Pack<E, VEC> hi = load_pack<VEC>(X + base + HALF);\n"
            "    Pack<E, VEC> ylo, yhi;\n"
            "#pragma unroll\n    for (int e = 0; e < VEC; ++e) {\n"
            + cs
            + "      const float a = to_f32(lo.e[e]), b = to_f32(hi.e[e]);\n"
            "      ylo.e[e] = from_f32<E>(a * cs - b * sn);\n"
            "      yhi.e[e] = from_f32<E>(b * cs + a * sn);\n"
            "    }\n"
            "    store_pack<VEC>(Y + base, ylo);\n"
            "    store_pack<VEC>(Y + base + HALF, yhi);\n"
            "  }\n" + (_PASS_THROUGH if 2 * rotary_pairs(task) < d["D"] else "") + "}\n")
        grid = f"(T + {c['tokens'] - 1}) // {c['tokens']}" if "T" in task.dynamic else -(-d["T"] // c["tokens"])
        launch = (("block", (c["threads"], 1, 1)), ("grid", (grid, 1, 1)), ("smem", 0))
        return KernelSource("cuda", code, "rope_rows", tuple(args), launch)
