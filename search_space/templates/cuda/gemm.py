"""``gemm`` on CUDA: Y[M,N] = X[M,K] @ W[N,K]^T (a linear layer, HF weight layout), any M, N, K.

Both operands are contiguous along K, the layout tensor cores want for A (row-major) and
B ("col": stored N x K). Two schedules, chosen by dtype:

- float16 / bfloat16 on tensor cores: a block computes a ``bm x bn`` tile of Y with
  ``(bm/wm) x (bn/wn)`` warps, each owning a ``wm x wn`` warp tile of m16n8k16
  ``mma.sync`` accumulators (float32). K advances in ``bk`` steps through a ``stages``-deep
  ring of shared-memory tiles filled by ``cp.async`` (``vec`` elements per copy, zero-filled
  past the matrix edges); one barrier per step. Fragments come from shared memory with
  ``ldmatrix``; rows are laid out plainly, padded by 16 bytes, or XOR-swizzled by 16-byte
  chunk (``swizzle``) so those loads avoid bank conflicts. ``instr`` = ``wgmma`` uses
  Hopper's warpgroup MMA instead (sm_90a): ``bm/wm`` warpgroups of 128 threads, each
  issuing m64n{bn}k16 on ``wm``/64 row blocks straight from the shared tiles (K steps of 64,
  the 128-byte swizzle the hardware expects, tiles 1024-byte aligned, a proxy fence after
  the copies land). ``pipeline`` = ``tma`` (wgmma only) is Hopper's warp-specialised form:
  one producer warpgroup, of which one thread copies the stages with TMA (descriptors of X
  and W passed by value, ``runtime.tensor_map``; zeros past the edges), and ``bm/wm``
  consumer warpgroups that wait on each stage's transaction barrier, keep one step of
  MMAs in flight and give a stage back (its ``empty`` barrier) once the MMAs reading it
  are done; registers move from the producer to the consumers (``setmaxnreg``). With
  ``persistent`` the grid is one block per SM, each walking the tiles, its pipeline running
  on across tile boundaries. ``epilogue`` = ``smem`` writes each consumer's tile to shared
  memory (in the 128-byte swizzle, so the stores do not conflict) and back with TMA stores,
  while the producer already loads the next tile's stages. ``cluster`` = 2 runs blocks in
  pairs on row tiles above each other (a thread block cluster): each loads half of their
  common W tile and TMA multicasts it into both, halving W's traffic from L2; a stage goes
  back to a producer once the consumers of both blocks are done with it.
- float32 on CUDA cores (SIMT): a block tile ``bm x bn``, each thread a ``tm x tn`` register
  tile split in 4-wide column groups, K in ``bk`` steps; tiles are stored transposed in
  shared memory (K outermost) so the inner loop reads 16-byte vectors; two shared buffers,
  the next tile's global loads (``vec``-wide) in registers while the current one is used.

Both: ``group_m`` rasterises blocks in groups of row tiles for L2 reuse; ``split_k`` > 1
gives each of that many blocks a share of K; they write float32 partial tiles to a
workspace and the last block to finish a tile (an atomic counter per tile, reset by that
block for the next launch) sums them in a fixed order and writes Y.
"""
from __future__ import annotations

import math

from ...codegen.cuda import PREAMBLE, c_type
from ...codegen.cuda_ptx import PTX_HELPERS, TMA_HELPERS, WGMMA_HELPERS, WGMMA_SIZES
from ...ops.common import ITEMSIZE
from ...ops.matmul import GemmOp
from ...space import Config, ConfigSpace, Knob
from ...target import Target
from ...task import Task
from ...template import ArgSpec, KernelSource, Template, register_template
from .limits import blocks_per_sm, launch_constraints, occupancy, setmaxnreg_calls, warp_specialised_registers


def tensor_core(task: Task) -> bool:
    return task.dtype in ("float16", "bfloat16")


def _split_values(task: Task, bk_min: int) -> tuple[int, ...]:
    k_tiles = math.ceil(task.dims["K"] / bk_min)
    return tuple(s for s in (1, 2, 4, 8) if s == 1 or s <= k_tiles // 2)


# Schedules known to suit Hopper, tried first by a tuner with priors: warpgroup MMA with large
# tiles and deep pipelines, the best mma.sync tilings, and SIMT tiles for float32 (hand-picked
# on the H200, benchmarks/RESULTS.md).
_WGMMA = dict(instr="wgmma", bk=64, wn=16, swizzle="xor", vec=8, split_k=1, group_m=8)
_MMA = dict(instr="mma", vec=8, swizzle="xor", split_k=1, group_m=8)
_TMA = dict(_WGMMA, pipeline="tma")
TENSOR_CORE_SEEDS = (
    dict(_TMA, bm=128, bn=256, wm=64, stages=4, persistent=1), dict(_TMA, bm=128, bn=256, wm=64, stages=3, persistent=0),
    dict(_TMA, bm=128, bn=256, wm=64, stages=3, persistent=1, epilogue="smem"),
    dict(_TMA, bm=128, bn=256, wm=64, stages=4, persistent=1, cluster=2),
    dict(_TMA, bm=128, bn=256, wm=64, stages=3, persistent=1, epilogue="smem", cluster=2),
    dict(_TMA, bm=256, bn=128, wm=128, stages=4, persistent=1), dict(_TMA, bm=128, bn=128, wm=64, stages=5, persistent=1),
    dict(_TMA, bm=128, bn=128, wm=64, stages=4, persistent=1, epilogue="smem"),
    dict(_WGMMA, bm=128, bn=256, wm=64, stages=3), dict(_WGMMA, bm=128, bn=256, wm=64, stages=4),
    dict(_WGMMA, bm=256, bn=128, wm=128, stages=3), dict(_WGMMA, bm=256, bn=128, wm=128, stages=4),
    dict(_WGMMA, bm=128, bn=128, wm=64, stages=5), dict(_WGMMA, bm=128, bn=128, wm=128, stages=5),
    dict(_MMA, bm=128, bn=256, bk=32, wm=64, wn=64, stages=3), dict(_MMA, bm=128, bn=256, bk=32, wm=64, wn=64, stages=4),
    dict(_MMA, bm=256, bn=128, bk=32, wm=64, wn=64, stages=3), dict(_MMA, bm=128, bn=128, bk=32, wm=64, wn=32, stages=4),
    dict(_MMA, bm=128, bn=128, bk=64, wm=64, wn=64, stages=3),
)
SIMT_SEEDS = tuple(dict(bm=bm, bn=bn, bk=bk, tm=8, tn=8, vec=4, split_k=1, group_m=8)
                   for bm, bn in ((128, 128), (128, 64), (64, 128)) for bk in (8, 16))


@register_template
class GemmCuda(GemmOp, Template):
    target_kind = "cuda"
    dynamic_dims = ()  # M is compiled in (the CPU template takes it at run time)
    dtypes = ("float16", "bfloat16", "float32")

    def seed_configs(self, task: Task, target: Target) -> list[dict]:
        return [dict(s) for s in (TENSOR_CORE_SEEDS if tensor_core(task) else SIMT_SEEDS)]

    # ------------------------------------------------------------------ space

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return _mma_space(task, target) if tensor_core(task) else _simt_space(task, target)

    def default(self, task: Task, target: Target) -> Config:
        space = self.space(task, target)
        M, N = task.dims["M"], task.dims["N"]
        sms = target.sm_count or 132
        if tensor_core(task):
            vec = space.knob("vec").values[0]
            tiles = [(128, 256, 64, 64), (128, 128, 64, 64), (128, 128, 64, 32), (64, 128, 32, 64),
                     (64, 64, 32, 32), (32, 64, 32, 32), (32, 32, 16, 32), (16, 32, 16, 16), (16, 16, 16, 16)]
            base = {"instr": "mma", "bk": 32, "stages": 4, "vec": vec, "swizzle": "xor", "group_m": 8}
            fallbacks = ({}, {"swizzle": "pad"}, {"bk": 16, "swizzle": "pad"}, {"stages": 2, "bk": 16, "swizzle": "pad"})
            keys = ("bm", "bn", "wm", "wn")
        else:
            vec = space.knob("vec").values[0]
            tiles = [(128, 128, 8, 8), (64, 128, 8, 8), (64, 64, 8, 8), (64, 64, 4, 8), (32, 64, 4, 4),
                     (32, 32, 4, 4), (16, 32, 4, 4)]
            base = {"bk": 16, "vec": vec, "group_m": 8}
            fallbacks = ({}, {"bk": 8})
            keys = ("bm", "bn", "tm", "tn")
        candidates = []
        for tile in tiles:
            values = dict(base, **dict(zip(keys, tile)))
            blocks = math.ceil(M / tile[0]) * math.ceil(N / tile[1])
            split = 1
            while blocks * split < sms // 2 and split < 8:
                split *= 2
            for extra in fallbacks:
                for s in (split, split // 2 or 1, 1):
                    candidates.append((blocks >= sms // 2 or tile == tiles[-1], dict(values, **extra, split_k=s)))
        for good in (True, False):
            for flag, values in candidates:
                if (flag or not good) and space.accepts(values):
                    return space.from_values(values)
        return next(iter(space))

    # ------------------------------------------------------------------ features

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        M, N, K = (task.dims[d] for d in ("M", "N", "K"))
        c = config.as_dict()
        size = ITEMSIZE[task.dtype]
        threads = _threads(task, c)
        smem = _smem_bytes(task, c)
        regs = _registers(task, c)
        tiles_m, tiles_n = math.ceil(M / c["bm"]), math.ceil(N / c["bn"])
        blocks = tiles_m * tiles_n * c["split_k"]
        resident = max(blocks_per_sm(threads, smem, regs, target), 1)
        sms = target.sm_count or 132
        moved = size * (M * K * tiles_n + N * K * tiles_m + M * N) + (8.0 * M * N * c["split_k"]
                                                                      if c["split_k"] > 1 else 0.0)
        per_thread = c["bm"] * c["bn"] / threads
        if tensor_core(task) and _wgmma(c):
            loads = (c["wm"] + c["bn"]) / (c["wm"] * c["bn"])
        elif tensor_core(task):
            loads = (c["wm"] + c["wn"]) / (c["wm"] * c["wn"])
        else:
            loads = (c["tm"] + c["tn"]) / (c["tm"] * c["tn"])
        return {
            "threads": threads,
            "vector_lanes": c["vec"],
            "unroll": c.get("stages", 2),
            "accumulators": per_thread,
            "loads_per_fma": loads,
            "parallel_chunks": blocks,
            "chunks_per_thread": blocks / (sms * resident),
            "waves": blocks / (sms * resident),
            "tile_bytes_l1": float((c["bm"] + c["bn"]) * c["bk"] * size),
            "tile_bytes_l2": float((c["bm"] + c["bn"]) * K * size),
            "shared_bytes": smem,
            "registers": regs,
            "occupancy": occupancy(threads, smem, regs, target),
            "bytes_moved": moved,
            "arith_intensity": self.flops(task) / moved,
            "reduction_share": (c["split_k"] - 1) / c["split_k"],
            "m_tail_fraction": (tiles_m * c["bm"] - M) / M,
            "n_tail_fraction": (tiles_n * c["bn"] - N) / N,
            "k_tail_fraction": (-K % c["bk"]) / K,
        }

    # ------------------------------------------------------------------ render

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        c = config.as_dict()
        M, N = task.dims["M"], task.dims["N"]
        tiles = math.ceil(M / c["bm"]) * math.ceil(N / c["bn"])
        args = self.signature(task)
        if c["split_k"] > 1:
            args += (ArgSpec("WS", "workspace", "float32", nbytes=_workspace_bytes(task, c)),)
        grid = (tiles, c["split_k"], 1)
        if _tma(c):  # descriptors first (see runtime.abi); a persistent grid is one block per SM
            maps = (ArgSpec("X_map", "tensor_map", task.dtype, (c["bm"], c["bk"]), of="X", swizzle=128),
                    ArgSpec("W_map", "tensor_map", task.dtype, (c["bn"] // c["cluster"], c["bk"]), of="W",
                            swizzle=128))  # with a cluster, each block multicasts its share of W's box
            if c["epilogue"] == "smem":
                maps += (ArgSpec("Y_map", "tensor_map", task.dtype, (c["wm"], 64), of="Y", swizzle=128),)
            args = maps + args
            grid = (_tma_grid(task, c, target), 1, 1)
        code = _mma_code(task, c, target) if tensor_core(task) else _simt_code(task, c)
        launch = (("block", (_threads(task, c), 1, 1)), ("grid", grid), ("smem", _dynamic_smem(task, c)))
        return KernelSource("cuda", code, "gemm", args, launch)


# ----------------------------------------------------------------------------- shared sizing


def _wgmma(c: dict) -> bool:
    return c.get("instr") == "wgmma"


def _tma(c: dict) -> bool:
    return c.get("pipeline") == "tma"


def _threads(task: Task, c: dict) -> int:
    if tensor_core(task) and _tma(c):
        return 128 * (1 + c["bm"] // c["wm"])  # a producer warpgroup and the consumers
    if tensor_core(task) and _wgmma(c):
        return 128 * (c["bm"] // c["wm"])
    if tensor_core(task):
        return 32 * (c["bm"] // c["wm"]) * (c["bn"] // c["wn"])
    return (c["bm"] // c["tm"]) * (c["bn"] // c["tn"])


def _row_stride(c: dict) -> int:
    """Shared-memory row length (elements) of a tensor-core tile."""
    return c["bk"] + 8 if c["swizzle"] == "pad" else c["bk"]


def _dynamic_smem(task: Task, c: dict) -> int:
    if tensor_core(task):
        align = 1024 if _wgmma(c) else 0  # room to align the tiles to 1024 bytes
        barriers = 16 * c["stages"] if _tma(c) else 0  # a full and an empty mbarrier per stage
        epilogue = c["bm"] * c["bn"] * ITEMSIZE[task.dtype] if c.get("epilogue") == "smem" else 0
        return (c["stages"] * (c["bm"] + c["bn"]) * _row_stride(c) * ITEMSIZE[task.dtype] + epilogue + align
                + barriers)
    return 2 * c["bk"] * ((c["bm"] + 4) + (c["bn"] + 4)) * 4


def _smem_bytes(task: Task, c: dict) -> int:
    return _dynamic_smem(task, c) + (16 if c["split_k"] > 1 else 0)


def _registers(task: Task, c: dict) -> int:
    if tensor_core(task) and _tma(c):
        return warp_specialised_registers(c["bm"] // c["wm"], (c["wm"] // 64) * c["bn"] // 2 + 48)
    if tensor_core(task) and _wgmma(c):
        return (c["wm"] // 64) * c["bn"] // 2 + 48
    threads = _threads(task, c)
    # each global load of a tile keeps its own address (2 registers) live in the unrolled loader
    loads = max(1, (c["bm"] + c["bn"]) * c["bk"] // (c["vec"] * threads))
    if tensor_core(task):
        mi, ni = c["wm"] // 16, c["wn"] // 8
        return 4 * mi * ni + 4 * mi + 2 * ni + 2 * loads + 40
    floats = loads * c["vec"]  # the next tile, staged in registers
    return c["tm"] * c["tn"] + c["tm"] + c["tn"] + floats + 2 * loads + 30


def _workspace_bytes(task: Task, c: dict) -> int:
    M, N = task.dims["M"], task.dims["N"]
    tiles = math.ceil(M / c["bm"]) * math.ceil(N / c["bn"])
    return 4 * c["split_k"] * M * N + 4 * tiles


def _common_constraints(task: Task, target: Target) -> list:
    K = task.dims["K"]
    return [
        ("every K split gets a K tile",
         lambda c: c["split_k"] == 1 or (c["split_k"] - 1) * math.ceil(math.ceil(K / c["bk"]) / c["split_k"])
         < math.ceil(K / c["bk"])),
        ("vec divides the K tile", lambda c: c["bk"] % c["vec"] == 0),
    ] + launch_constraints(target, lambda c: _threads(task, c), lambda c: _smem_bytes(task, c),
                           lambda c: _registers(task, c))


def _mma_space(task: Task, target: Target) -> ConfigSpace:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    size = ITEMSIZE[task.dtype]
    vecs = tuple(v for v in (8, 4, 2) if K % v == 0) or (1,)  # elements; a copy never straddles a row end
    sms = target.sm_count or 132
    knobs = [
        Knob("instr", ("mma", "wgmma")),
        Knob("bm", tuple(v for v in (16, 32, 64, 128, 256) if v == 16 or v // 2 < M)),
        Knob("bn", tuple(v for v in (16, 32, 64, 128, 256) if v == 16 or v // 2 < N)),
        Knob("bk", (16, 32, 64)),
        Knob("wm", (16, 32, 64, 128)),
        Knob("wn", (16, 32, 64)),
        Knob("stages", (2, 3, 4, 5)),
        Knob("vec", vecs),
        Knob("swizzle", ("none", "pad", "xor")),
        Knob("split_k", _split_values(task, 16)),
        Knob("group_m", (1, 8)),
        Knob("pipeline", ("cp_async", "tma"), legacy="cp_async"),
        # a persistent grid only differs from one block per tile when there are more tiles than SMs
        Knob("persistent", (0, 1) if math.ceil(M / 64) * math.ceil(N / 16) > sms else (0,), legacy=0),
        Knob("epilogue", ("direct", "smem"), legacy="direct"),
        Knob("cluster", (1, 2), legacy=1),
    ]
    hopper = target.has_hopper_instructions
    constraints = [
        ("wgmma, TMA and clusters need sm_90a",
         lambda c: hopper or (not _wgmma(c) and not _tma(c) and c["cluster"] == 1)),
        ("tma: a wgmma pipeline, rows of 16-byte multiples, no K split",
         lambda c: not _tma(c) or (_wgmma(c) and (K * size) % 16 == 0 and c["split_k"] == 1)),
        ("persistent: only with the tma pipeline, and more tiles than SMs",
         lambda c: c["persistent"] == 0 or (_tma(c) and math.ceil(M / c["bm"]) * math.ceil(N / c["bn"]) > sms)),
        ("epilogue through shared memory: the tma pipeline, boxes of 64 columns, rows of 16-byte multiples",
         lambda c: c["epilogue"] == "direct" or (_tma(c) and c["bn"] % 64 == 0 and (N * size) % 16 == 0)),
        ("clusters of 2: the tma pipeline, two row tiles that share W's tile",
         lambda c: c["cluster"] == 1 or (_tma(c) and M > c["bm"])),
        ("warp tile divides the block tile", lambda c: c["bm"] % c["wm"] == 0 and c["bn"] % c["wn"] == 0),
        ("mma warp tiles are at most 64 rows", lambda c: _wgmma(c) or c["wm"] <= 64),
        ("1 to 16 warps", lambda c: 1 <= _threads(task, c) // 32 <= 16),
        ("wgmma: K steps of 64 in 128-byte swizzled rows",
         lambda c: not _wgmma(c) or (c["bk"] == 64 and c["swizzle"] == "xor")),
        ("wgmma: 64 or 128 rows per warpgroup, 1 or 2 warpgroups, wn unused",
         lambda c: not _wgmma(c) or (c["wm"] in (64, 128) and c["bm"] // c["wm"] in (1, 2) and c["wn"] == 16)),
        ("wgmma: an N the instruction has, at most 128 accumulators per thread",
         lambda c: not _wgmma(c) or (c["bn"] in WGMMA_SIZES and (c["wm"] // 64) * c["bn"] // 2 <= 128)),
        ("xor swizzle needs 64- or 128-byte rows", lambda c: c["swizzle"] != "xor" or c["bk"] * size in (64, 128)),
        ("stages do not outnumber K tiles", lambda c: c["stages"] == 2 or c["stages"] <= math.ceil(K / c["bk"])),
        ("group_m only with several row tiles", lambda c: c["group_m"] == 1 or M > c["bm"]),
    ] + _common_constraints(task, target)
    return ConfigSpace(knobs, constraints)


def _simt_space(task: Task, target: Target) -> ConfigSpace:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    knobs = [
        Knob("bm", tuple(v for v in (16, 32, 64, 128) if v == 16 or v // 2 < M)),
        Knob("bn", tuple(v for v in (32, 64, 128) if v == 32 or v // 2 < N)),
        Knob("bk", (8, 16, 32)),
        Knob("tm", (4, 8)),
        Knob("tn", (4, 8)),
        Knob("vec", (4, 1) if K % 4 == 0 else (1,)),
        Knob("split_k", _split_values(task, 8)),
        Knob("group_m", (1, 8)),
    ]
    constraints = [
        ("thread tile divides the block tile", lambda c: c["bm"] % c["tm"] == 0 and c["bn"] % c["tn"] == 0),
        ("32 to 512 threads", lambda c: 32 <= _threads(task, c) <= 512),
        ("whole loads per thread", lambda c: (c["bm"] * c["bk"]) % (c["vec"] * _threads(task, c)) == 0
         and (c["bn"] * c["bk"]) % (c["vec"] * _threads(task, c)) == 0),
        ("group_m only with several row tiles", lambda c: c["group_m"] == 1 or M > c["bm"]),
    ] + _common_constraints(task, target)
    return ConfigSpace(knobs, constraints)


# ----------------------------------------------------------------------------- code pieces


def _tile_origin(c: dict, M: int, N: int, tile: str = "blockIdx.x") -> str:
    """C++ that maps ``tile`` (the block's index) to the tile (tm, tn), grouped ``group_m`` row tiles at a time."""
    tiles_m, tiles_n = math.ceil(M / c["bm"]), math.ceil(N / c["bn"])
    group = c["group_m"]
    return f"""
  const int pid = {tile};
  const int group_id = pid / ({group} * {tiles_n});
  const int first_m = group_id * {group};
  const int group_rows = min({tiles_m} - first_m, {group});
  const int tile_m = first_m + (pid % group_rows);
  const int tile_n = (pid % ({group} * {tiles_n})) / group_rows;
  const int m0 = tile_m * {c["bm"]};
  const int n0 = tile_n * {c["bn"]};"""


def _k_range(c: dict, K: int) -> str:
    k_tiles = math.ceil(K / c["bk"])
    per = math.ceil(k_tiles / c["split_k"])
    return f"""
  const int kt_begin = blockIdx.y * {per};
  const int kt_end = min(kt_begin + {per}, {k_tiles});
  const int k_tiles = kt_end - kt_begin;"""


def _splitk_finish(c: dict, M: int, N: int, threads: int) -> str:
    """C++ run after partial sums are stored: the last block of a tile reduces and writes Y."""
    tiles = math.ceil(M / c["bm"]) * math.ceil(N / c["bn"])
    split = c["split_k"]
    return f"""
  __threadfence();
  __syncthreads();
  __shared__ unsigned last_block;
  unsigned* counters = reinterpret_cast<unsigned*>(WS + {split * M * N}LL);
  if (threadIdx.x == 0) last_block = atomicAdd(&counters[blockIdx.x], 1u) == {split - 1}u;
  __syncthreads();
  if (last_block) {{
    __threadfence();
    for (int i = threadIdx.x; i < {c["bm"] * c["bn"]}; i += {threads}) {{
      const int row = m0 + i / {c["bn"]};
      const int col = n0 + i % {c["bn"]};
      if (row < {M} && col < {N}) {{
        float s = 0.0f;
        #pragma unroll
        for (int z = 0; z < {split}; ++z) s += __ldcg(WS + (long long)z * {M * N} + (long long)row * {N} + col);
        Y[(long long)row * {N} + col] = from_f32<T_>(s);
      }}
    }}
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;  // ready for the next launch
  }}"""
    del tiles


def _params(c: dict, T: str) -> str:
    ws = ", float* __restrict__ WS" if c["split_k"] > 1 else ""
    return f"const {T}* __restrict__ X, const {T}* __restrict__ W, {T}* __restrict__ Y{ws}"


# ----------------------------------------------------------------------------- tensor cores


def _tma_units(task: Task, c: dict) -> int:
    """Work units of the TMA schedule: tiles, or with clusters of 2 pairs of tiles above each other."""
    return math.ceil(task.dims["M"] / (c["bm"] * c["cluster"])) * math.ceil(task.dims["N"] / c["bn"])


def _wgmma_store(c: dict, warpgroup: str, store: str, indent: str) -> str:
    """C++ storing the wgmma accumulators of warpgroup ``warpgroup`` (its ``wm`` rows of the
    tile) through ``store`` (which writes row, col from v0, v1), its lines indented by ``indent``."""
    MI, BN, WM = c["wm"] // 64, c["bn"], c["wm"]
    lines = ["#pragma unroll",
             f"for (int i = 0; i < {MI}; ++i)",
             "  #pragma unroll",
             f"  for (int j = 0; j < {BN // 8}; ++j)",
             "    #pragma unroll",
             "    for (int h = 0; h < 2; ++h) {",
             f"      const int row = m0 + {warpgroup} * {WM} + i * 64 + warp * 16 + (lane >> 2) + h * 8;",
             "      const int col = n0 + j * 8 + (lane & 3) * 2;",
             "      const float v0 = acc[i][4 * j + 2 * h], v1 = acc[i][4 * j + 2 * h + 1];" + store,
             "    }"]
    return "\n".join(indent + line if not line.startswith("\n") else line for line in lines)


def _tma_grid(task: Task, c: dict, target: Target) -> int:
    """Blocks of the TMA schedule: a cluster per unit, or (persistent) a block per SM, each
    cluster walking units."""
    units, cluster = _tma_units(task, c), c["cluster"]
    return cluster * (min(units, (target.sm_count or 132) // cluster) if c["persistent"] else units)


def _mma_code(task: Task, c: dict, target: Target) -> str:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    T = c_type(task.dtype)
    BM, BN, BK, WM, WN, S, V = c["bm"], c["bn"], c["bk"], c["wm"], c["wn"], c["stages"], c["vec"]
    threads = _threads(task, c)
    warps_n = BN // WN
    MI, NI = WM // 16, WN // 8
    LD = _row_stride(c)
    chunks_row = BK // V
    a_chunks, b_chunks = BM * chunks_row, BN * chunks_row
    copy_bytes = V * 2
    if c["swizzle"] == "xor":
        group = "(row & 7)" if BK == 64 else "((row >> 1) & 3)"
        swz = f"row * {LD} + ((((col >> 3) ^ {group})) << 3) + (col & 7)"
    else:
        swz = f"row * {LD} + col"
    if copy_bytes >= 4:
        copy = f"cp_async<{copy_bytes}>(dst, valid ? src : base, valid);"
    else:  # odd K: 2-byte elements cannot go through cp.async
        copy = "*dst = valid ? *src : T_(0.0f);"

    def loader(name: str, chunks: int, rows_limit: int, origin: str, base: str) -> str:
        iters = math.ceil(chunks / threads)
        guard = f"if (c < {chunks}) " if chunks % threads else ""
        return f"""
__device__ __forceinline__ void load_{name}(T_* __restrict__ tile, const T_* __restrict__ base, int {origin}, int k0) {{
  #pragma unroll
  for (int it = 0; it < {iters}; ++it) {{
    const int c = it * {threads} + threadIdx.x;
    {guard}{{
      const int row = c / {chunks_row};
      const int col = (c % {chunks_row}) * {V};
      const bool valid = {origin} + row < {rows_limit} && k0 + col < {K};
      const T_* src = base + (long long)({origin} + row) * {K} + k0 + col;
      T_* dst = tile + swz(row, col);
      {copy}
    }}
  }}
}}"""

    if N % 2 == 0:
        store = f"""
        if (row < {M} && col < {N}) {{
          if constexpr (sizeof(T_) == 2) {{
            T_ pair[2] = {{from_f32<T_>(v0), from_f32<T_>(v1)}};
            *reinterpret_cast<unsigned*>(Y + (long long)row * {N} + col) = *reinterpret_cast<unsigned*>(pair);
          }}
        }}"""
    else:
        store = f"""
        if (row < {M} && col < {N}) Y[(long long)row * {N} + col] = from_f32<T_>(v0);
        if (row < {M} && col + 1 < {N}) Y[(long long)row * {N} + col + 1] = from_f32<T_>(v1);"""
    if c["split_k"] > 1:
        store = f"""
        float* part = WS + (long long)blockIdx.y * {M * N};
        if (row < {M} && col < {N}) part[(long long)row * {N} + col] = v0;
        if (row < {M} && col + 1 < {N}) part[(long long)row * {N} + col + 1] = v1;"""
    finish = _splitk_finish(c, M, N, threads) if c["split_k"] > 1 else ""
    head = PREAMBLE + PTX_HELPERS + (WGMMA_HELPERS if _wgmma(c) else "") + (TMA_HELPERS if _tma(c) else "") + f"""
typedef {T} T_;

__device__ __forceinline__ int swz(int row, int col) {{ return {swz}; }}
{loader("a", a_chunks, M, "m0", "X")}
{loader("b", b_chunks, N, "n0", "W")}
"""
    if _tma(c):
        return head + _tma_kernel(task, c, store, _tma_grid(task, c, target))
    if _wgmma(c):
        return head + _wgmma_kernel(task, c, store, finish)

    return head + f"""
extern "C" __global__ void __launch_bounds__({threads}) gemm({_params(c, T)}) {{
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T_* const sa = reinterpret_cast<T_*>(smem_raw);
  T_* const sb = sa + {S * BM * LD};
  const int warp = threadIdx.x >> 5;
  const int lane = threadIdx.x & 31;
  const int wm0 = (warp / {warps_n}) * {WM};
  const int wn0 = (warp % {warps_n}) * {WN};{_tile_origin(c, M, N)}{_k_range(c, K)}

  float acc[{MI}][{NI}][4];
  #pragma unroll
  for (int i = 0; i < {MI}; ++i)
    #pragma unroll
    for (int j = 0; j < {NI}; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  #pragma unroll
  for (int s = 0; s < {S - 1}; ++s) {{
    if (s < k_tiles) {{
      load_a(sa + s * {BM * LD}, X, m0, (kt_begin + s) * {BK});
      load_b(sb + s * {BN * LD}, W, n0, (kt_begin + s) * {BK});
    }}
    cp_async_commit();
  }}

  for (int kt = 0; kt < k_tiles; ++kt) {{
    cp_async_wait<{S - 2}>();
    __syncthreads();
    {{
      const int next = kt + {S - 1};
      if (next < k_tiles) {{
        const int slot = next % {S};
        load_a(sa + slot * {BM * LD}, X, m0, (kt_begin + next) * {BK});
        load_b(sb + slot * {BN * LD}, W, n0, (kt_begin + next) * {BK});
      }}
      cp_async_commit();
    }}
    const T_* ta = sa + (kt % {S}) * {BM * LD};
    const T_* tb = sb + (kt % {S}) * {BN * LD};
    #pragma unroll
    for (int kk = 0; kk < {BK // 16}; ++kk) {{
      unsigned a[{MI}][4];
      unsigned b[{NI}][2];
      #pragma unroll
      for (int i = 0; i < {MI}; ++i)
        ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3],
                    ta + swz(wm0 + i * 16 + (lane & 15), kk * 16 + (lane >> 4) * 8));
      #pragma unroll
      for (int j = 0; j < {NI // 2}; ++j)
        ldmatrix_x4(b[2 * j][0], b[2 * j][1], b[2 * j + 1][0], b[2 * j + 1][1],
                    tb + swz(wn0 + j * 16 + (lane & 7) + (lane >> 4) * 8, kk * 16 + ((lane >> 3) & 1) * 8));
      #pragma unroll
      for (int i = 0; i < {MI}; ++i)
        #pragma unroll
        for (int j = 0; j < {NI}; ++j) mma_16816<T_>(acc[i][j], a[i], b[j]);
    }}
  }}
  cp_async_wait<0>();

  #pragma unroll
  for (int i = 0; i < {MI}; ++i)
    #pragma unroll
    for (int j = 0; j < {NI}; ++j)
      #pragma unroll
      for (int h = 0; h < 2; ++h) {{
        const int row = m0 + wm0 + i * 16 + (lane >> 2) + h * 8;
        const int col = n0 + wn0 + j * 8 + (lane & 3) * 2;
        const float v0 = acc[i][j][2 * h], v1 = acc[i][j][2 * h + 1];{store}
      }}{finish}
}}
"""


def _wgmma_kernel(task: Task, c: dict, store: str, finish: str) -> str:
    """The kernel body of the warpgroup-MMA schedule (tiles as ``load_a``/``load_b`` lay them out)."""
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    T = c_type(task.dtype)
    BM, BN, BK, WM, S = c["bm"], c["bn"], c["bk"], c["wm"], c["stages"]
    MI = WM // 64
    threads = _threads(task, c)
    return f"""
extern "C" __global__ void __launch_bounds__({threads}) gemm({_params(c, T)}) {{
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // descriptors need 1024-byte aligned tiles: align by hand (1 KB extra is allocated)
  T_* const sa = reinterpret_cast<T_*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  T_* const sb = sa + {S * BM * BK};
  const int wg = threadIdx.x >> 7;
  const int warp = (threadIdx.x >> 5) & 3;
  const int lane = threadIdx.x & 31;{_tile_origin(c, M, N)}{_k_range(c, K)}

  float acc[{MI}][{BN // 2}];
  #pragma unroll
  for (int i = 0; i < {MI}; ++i)
    #pragma unroll
    for (int j = 0; j < {BN // 2}; ++j) acc[i][j] = 0.0f;

  #pragma unroll
  for (int s = 0; s < {S - 1}; ++s) {{
    if (s < k_tiles) {{
      load_a(sa + s * {BM * BK}, X, m0, (kt_begin + s) * {BK});
      load_b(sb + s * {BN * BK}, W, n0, (kt_begin + s) * {BK});
    }}
    cp_async_commit();
  }}

  for (int kt = 0; kt < k_tiles; ++kt) {{
    cp_async_wait<{S - 2}>();
    fence_proxy_async();  // the copies are read next by the tensor cores' async proxy
    __syncthreads();
    {{
      const int next = kt + {S - 1};
      if (next < k_tiles) {{
        const int slot = next % {S};
        load_a(sa + slot * {BM * BK}, X, m0, (kt_begin + next) * {BK});
        load_b(sb + slot * {BN * BK}, W, n0, (kt_begin + next) * {BK});
      }}
      cp_async_commit();
    }}
    const T_* ta = sa + (kt % {S}) * {BM * BK} + wg * {WM * BK};
    const T_* tb = sb + (kt % {S}) * {BN * BK};
    wgmma_fence();
    #pragma unroll
    for (int kk = 0; kk < {BK // 16}; ++kk)
      #pragma unroll
      for (int i = 0; i < {MI}; ++i)
        wgmma_m64k16<{BN}, T_>(acc[i], gmma_desc_sw128(ta + i * {64 * BK} + kk * 16), gmma_desc_sw128(tb + kk * 16));
    wgmma_commit();
    wgmma_wait<0>();
  }}
  cp_async_wait<0>();

{_wgmma_store(c, "wg", store, "  ")}{finish}
}}
"""


def _tma_kernel(task: Task, c: dict, store: str, grid: int) -> str:
    """The warp-specialised TMA + wgmma schedule (see the module docstring)."""
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    T = c_type(task.dtype)
    BM, BN, BK, WM, S = c["bm"], c["bn"], c["bk"], c["wm"], c["stages"]
    MI = WM // 64
    consumers = BM // WM
    threads = _threads(task, c)
    k_tiles = math.ceil(K / BK)
    stage_bytes = (BM + BN) * BK * ITEMSIZE[task.dtype]
    dec, inc = setmaxnreg_calls(consumers)
    C = c["cluster"]
    units = _tma_units(task, c)
    # a cluster's blocks take row tiles rank 0 and 1 of a unit 2 * bm rows high, and share W's tile
    tile_origin = _tile_origin(dict(c, bm=BM * C), M, N, "tile").replace("\n  ", "\n      ")
    if C > 1:
        tile_origin = tile_origin.replace("const int m0 = ", f"const int m0 = rank * {BM} + ")
    loop = f"for (int tile = blockIdx.x{f' / {C}' if C > 1 else ''}; tile < {units}; tile += {grid // C})"
    if C > 1:
        attributes = f"__cluster_dims__({C}, 1, 1) __launch_bounds__({threads}, 1)"
        start = """
  const unsigned rank = cluster_ctarank();
  cluster_sync();  // both blocks' barriers exist before any multicast or remote arrival"""
        load_w = (f"tma_load_2d_multicast(sb + stage * {BN * BK} + rank * {BN // C * BK}, &map_w, kt * {BK}, "
                  f"n0 + rank * {BN // C}, &full[stage], 0x3);  // its half of W's box, into both blocks")
        release = "{ mbar_arrive(&empty[previous]); mbar_arrive_cluster(&empty[previous], rank ^ 1u); }"
        tail = f"""
      // the other block's consumers arrive on this block's empty barriers until they are done
      // with the last stages: wait for those arrivals before the block may exit
      for (int s = 0; s < {S}; ++s) {{
        mbar_wait(&empty[stage], phase ^ 1u);
        if (++stage == {S}) {{ stage = 0; phase ^= 1u; }}
      }}"""
    else:
        attributes = f"__launch_bounds__({threads}, 1)"  # one block an SM: ptxas keeps setmaxnreg
        start = "\n  __syncthreads();"
        load_w = f"tma_load_2d(sb + stage * {BN * BK}, &map_w, kt * {BK}, n0, &full[stage]);"
        release = "mbar_arrive(&empty[previous]);"
        tail = ""
    via_smem = c.get("epilogue") == "smem"
    map_y = ", const __grid_constant__ TensorMap map_y" if via_smem else ""
    c_tile = consumers * WM * BN if via_smem else 0  # the epilogue's boxes, after the stages
    if via_smem:
        epilogue = f"""
    // through shared memory: this warpgroup's {WM} x {BN} tile as boxes of 64 columns in the
    // 128-byte swizzle (conflict-free stores), written back by TMA (clipped at the edges)
    T_* const boxes = sc + cw * {WM * BN};
    if (signals) tma_store_wait_read();  // the previous tile's boxes have been read out
    named_barrier_sync(1 + cw, 128);
    #pragma unroll
    for (int i = 0; i < {MI}; ++i)
      #pragma unroll
      for (int j = 0; j < {BN // 8}; ++j)
        #pragma unroll
        for (int h = 0; h < 2; ++h) {{
          const int r = i * 64 + warp * 16 + (lane >> 2) + h * 8;
          const int cc = j * 8 + (lane & 3) * 2;
          const int byte = r * 128 + (((cc % 64) * 2) ^ ((r & 7) << 4));
          T_ pair[2] = {{from_f32<T_>(acc[i][4 * j + 2 * h]), from_f32<T_>(acc[i][4 * j + 2 * h + 1])}};
          *reinterpret_cast<unsigned*>(reinterpret_cast<unsigned char*>(boxes + (cc / 64) * {WM * 64}) + byte) =
              *reinterpret_cast<unsigned*>(pair);
        }}
    fence_proxy_async();  // the stores are read next by TMA's async proxy
    named_barrier_sync(1 + cw, 128);
    if (signals) {{
      for (int b = 0; b < {BN // 64}; ++b) tma_store_2d(&map_y, n0 + b * 64, m0 + cw * {WM}, boxes + b * {WM * 64});
      tma_store_commit();
    }}"""
        finish = """
  if (signals) tma_store_wait_read();  // shared memory stays until TMA has read the last boxes"""
    else:
        epilogue = _wgmma_store(c, "cw", store, "    ")
        finish = ""
    return f"""
extern "C" __global__ void {attributes} gemm(const __grid_constant__ TensorMap map_x,
    const __grid_constant__ TensorMap map_w{map_y}, {_params(c, T)}) {{
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  // TMA's 128-byte swizzle and the wgmma descriptors need 1024-byte aligned tiles
  T_* const sa = reinterpret_cast<T_*>(smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023));
  T_* const sb = sa + {S * BM * BK};
  T_* const sc = sb + {S * BN * BK};
  unsigned long long* const full = reinterpret_cast<unsigned long long*>(sc + {c_tile});
  unsigned long long* const empty = full + {S};
  const int wg = threadIdx.x >> 7;
  if (threadIdx.x == 0) {{
    for (int s = 0; s < {S}; ++s) {{
      mbar_init(&full[s], 1);              // the producer's arrival, plus the bytes its copies bring
      mbar_init(&empty[s], {consumers * C});   // one arrival per consumer warpgroup (of each block)
    }}
    fence_mbarrier_init();
  }}{start}

  if (wg == 0) {{  // producer
    {dec}
    if (threadIdx.x == 0) {{
      int stage = 0;
      unsigned phase = 0;
      {loop} {{{tile_origin}
        for (int kt = 0; kt < {k_tiles}; ++kt) {{
          mbar_wait(&empty[stage], phase ^ 1u);
          mbar_arrive_expect_tx(&full[stage], {stage_bytes});
          tma_load_2d(sa + stage * {BM * BK}, &map_x, kt * {BK}, m0, &full[stage]);
          {load_w}
          if (++stage == {S}) {{ stage = 0; phase ^= 1u; }}
        }}
      }}{tail}
    }}
    return;
  }}

  // consumers
  {inc}
  const int cw = wg - 1;
  const int warp = (threadIdx.x >> 5) & 3;
  const int lane = threadIdx.x & 31;
  const bool signals = (threadIdx.x & 127) == 0;  // one arrival per warpgroup on the empty barriers
  int stage = 0;
  unsigned phase = 0;
  {loop} {{{tile_origin}
    float acc[{MI}][{BN // 2}];
    #pragma unroll
    for (int i = 0; i < {MI}; ++i)
      #pragma unroll
      for (int j = 0; j < {BN // 2}; ++j) acc[i][j] = 0.0f;
    int previous = -1;
    for (int kt = 0; kt < {k_tiles}; ++kt) {{
      mbar_wait(&full[stage], phase);
      const T_* ta = sa + stage * {BM * BK} + cw * {WM * BK};
      const T_* tb = sb + stage * {BN * BK};
      #pragma unroll
      for (int i = 0; i < {MI}; ++i) fence_operands<{BN // 2}>(acc[i]);
      wgmma_fence();
      #pragma unroll
      for (int kk = 0; kk < {BK // 16}; ++kk)
        #pragma unroll
        for (int i = 0; i < {MI}; ++i)
          wgmma_m64k16<{BN}, T_>(acc[i], gmma_desc_sw128(ta + i * {64 * BK} + kk * 16), gmma_desc_sw128(tb + kk * 16));
      wgmma_commit();
      wgmma_wait<1>();  // the previous step's MMAs are done: its stage goes back to the producer
      #pragma unroll
      for (int i = 0; i < {MI}; ++i) fence_operands<{BN // 2}>(acc[i]);
      if (previous >= 0 && signals) {release}
      previous = stage;
      if (++stage == {S}) {{ stage = 0; phase ^= 1u; }}
    }}
    wgmma_wait<0>();
    #pragma unroll
    for (int i = 0; i < {MI}; ++i) fence_operands<{BN // 2}>(acc[i]);
    if (previous >= 0 && signals) {release}
{epilogue}
  }}{finish}
}}
"""


# ----------------------------------------------------------------------------- SIMT float32


def _simt_code(task: Task, c: dict) -> str:
    M, N, K = (task.dims[d] for d in ("M", "N", "K"))
    BM, BN, BK, TM, TN, V = c["bm"], c["bn"], c["bk"], c["tm"], c["tn"], c["vec"]
    threads = _threads(task, c)
    TX = BN // TN  # threads along N
    LA, LB = BM + 4, BN + 4  # padded rows of the transposed tiles
    GM, GN = TM // 4, TN // 4  # 4-wide groups per thread, spread over the tile
    a_loads = BM * BK // (V * threads)
    b_loads = BN * BK // (V * threads)
    chunks_row = BK // V
    vtype = "float4" if V == 4 else "float"

    def fetch(name: str, loads: int, origin: str, limit: int) -> str:
        if V == 4:
            load = (f"valid ? __ldg(reinterpret_cast<const float4*>(base + (long long)({origin} + row) * {K} + k0 + col))"
                    " : make_float4(0.f, 0.f, 0.f, 0.f)")
        else:
            load = f"valid ? __ldg(base + (long long)({origin} + row) * {K} + k0 + col) : 0.0f"
        return f"""
__device__ __forceinline__ void fetch_{name}({vtype} (&r)[{loads}], const float* __restrict__ base, int {origin}, int k0) {{
  #pragma unroll
  for (int it = 0; it < {loads}; ++it) {{
    const int c = it * {threads} + threadIdx.x;
    const int row = c / {chunks_row};
    const int col = (c % {chunks_row}) * {V};
    const bool valid = {origin} + row < {limit} && k0 + col < {K};
    r[it] = {load};
  }}
}}"""

    def stash(name: str, loads: int, ld: int) -> str:
        if V == 4:
            put = ("s[(col + 0) * LD + row] = r[it].x; s[(col + 1) * LD + row] = r[it].y; "
                   "s[(col + 2) * LD + row] = r[it].z; s[(col + 3) * LD + row] = r[it].w;").replace("LD", str(ld))
        else:
            put = f"s[col * {ld} + row] = r[it];"
        return f"""
__device__ __forceinline__ void stash_{name}(float* __restrict__ s, const {vtype} (&r)[{loads}]) {{
  #pragma unroll
  for (int it = 0; it < {loads}; ++it) {{
    const int c = it * {threads} + threadIdx.x;
    const int row = c / {chunks_row};
    const int col = (c % {chunks_row}) * {V};
    {put}
  }}
}}"""

    if c["split_k"] > 1:
        out = f"""
      float* part = WS + (long long)blockIdx.y * {M * N};
      #pragma unroll
      for (int e = 0; e < 4; ++e)
        if (row < {M} && col + e < {N}) part[(long long)row * {N} + col + e] = acc[i][j][e];"""
        finish = _splitk_finish(c, M, N, threads)
    elif N % 4 == 0:
        out = f"""
      if (row < {M} && col < {N})
        *reinterpret_cast<float4*>(Y + (long long)row * {N} + col) = make_float4(acc[i][j][0], acc[i][j][1], acc[i][j][2], acc[i][j][3]);"""
        finish = ""
    else:
        out = f"""
      #pragma unroll
      for (int e = 0; e < 4; ++e)
        if (row < {M} && col + e < {N}) Y[(long long)row * {N} + col + e] = acc[i][j][e];"""
        finish = ""

    return PREAMBLE + PTX_HELPERS + f"""
typedef float T_;
{fetch("a", a_loads, "m0", M)}
{fetch("b", b_loads, "n0", N)}
{stash("a", a_loads, LA)}
{stash("b", b_loads, LB)}

extern "C" __global__ void __launch_bounds__({threads}) gemm({_params(c, "float")}) {{
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float (*sa)[{BK * LA}] = reinterpret_cast<float (*)[{BK * LA}]>(smem_raw);
  float (*sb)[{BK * LB}] = reinterpret_cast<float (*)[{BK * LB}]>(smem_raw + {2 * BK * LA * 4});
  const int tx = threadIdx.x % {TX};
  const int ty = threadIdx.x / {TX};{_tile_origin(c, M, N)}{_k_range(c, K)}

  // acc[i][j][e]: row group i (rows i * {BM // GM} + ty * 4 + r), column group j, the 4 x 4 block flattened by r
  float acc[{GM * 4}][{GN}][4];
  #pragma unroll
  for (int i = 0; i < {GM * 4}; ++i)
    #pragma unroll
    for (int j = 0; j < {GN}; ++j)
      #pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.0f;

  {vtype} ra[{a_loads}], rb[{b_loads}];
  if (k_tiles > 0) {{
    fetch_a(ra, X, m0, kt_begin * {BK});
    fetch_b(rb, W, n0, kt_begin * {BK});
    stash_a(sa[0], ra);
    stash_b(sb[0], rb);
  }}
  __syncthreads();
  for (int kt = 0; kt < k_tiles; ++kt) {{
    const int buf = kt & 1;
    const bool more = kt + 1 < k_tiles;
    if (more) {{
      fetch_a(ra, X, m0, (kt_begin + kt + 1) * {BK});
      fetch_b(rb, W, n0, (kt_begin + kt + 1) * {BK});
    }}
    #pragma unroll
    for (int k = 0; k < {BK}; ++k) {{
      float a[{GM}][4], b[{GN}][4];
      #pragma unroll
      for (int g = 0; g < {GM}; ++g) {{
        const float4 v = *reinterpret_cast<const float4*>(&sa[buf][k * {LA} + g * {BM // GM} + ty * 4]);
        a[g][0] = v.x; a[g][1] = v.y; a[g][2] = v.z; a[g][3] = v.w;
      }}
      #pragma unroll
      for (int g = 0; g < {GN}; ++g) {{
        const float4 v = *reinterpret_cast<const float4*>(&sb[buf][k * {LB} + g * {BN // GN} + tx * 4]);
        b[g][0] = v.x; b[g][1] = v.y; b[g][2] = v.z; b[g][3] = v.w;
      }}
      #pragma unroll
      for (int gi = 0; gi < {GM}; ++gi)
        #pragma unroll
        for (int r = 0; r < 4; ++r)
          #pragma unroll
          for (int gj = 0; gj < {GN}; ++gj)
            #pragma unroll
            for (int e = 0; e < 4; ++e) acc[gi * 4 + r][gj][e] = fmaf(a[gi][r], b[gj][e], acc[gi * 4 + r][gj][e]);
    }}
    if (more) {{
      stash_a(sa[buf ^ 1], ra);
      stash_b(sb[buf ^ 1], rb);
    }}
    __syncthreads();
  }}

  #pragma unroll
  for (int i = 0; i < {GM * 4}; ++i)
    #pragma unroll
    for (int j = 0; j < {GN}; ++j) {{
      const int row = m0 + (i / 4) * {BM // GM} + ty * 4 + (i % 4);
      const int col = n0 + j * {BN // GN} + tx * 4;{out}
    }}{finish}
}}
"""
