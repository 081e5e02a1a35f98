"""CUDA row-wise and attention templates without a GPU: launch geometry, constraints, knobs,
and nvcc builds at awkward and static shapes."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from measure import LocalBuilder, MeasureError, MeasureInput
from search_space import Target, Task, get_template
from search_space.codegen.cuda import evaluate, resolve_launch
from search_space.templates.cuda.attention_decode import workspace_bytes
from search_space.templates.cuda.flat import FlatPlan
from search_space.templates.cuda.rowplan import RowPlan

SM90 = Target.from_name("sm_90a")
ROW_OPS = ("softmax", "rmsnorm", "layernorm")
FLAT_OPS = ("add", "swiglu", "geglu", "gelu", "bias_add")
OPS = ROW_OPS + FLAT_OPS + ("gather_columns", "qk_norm", "rope", "attention_decode", "attention_prefill")
DTYPES = ("float32", "float16", "bfloat16")
SIZES = (1, 2, 7, 31, 33, 511, 4097)


def task_of(op: str, shape: dict, dtype: str = "float16", dynamic=None, attrs=None) -> Task:
    template = get_template(op, "cuda")
    return Task.make(op, shape, dtype, attrs=attrs, dynamic=template.dynamic_dims if dynamic is None else dynamic)


def valid_configs(op: str, task: Task, n: int = 40, seed: int = 0):
    template = get_template(op, "cuda")
    space = template.space(task, SM90)
    return [template.default(task, SM90)] + space.sample(np.random.default_rng(seed), n)


@pytest.mark.parametrize("op", ROW_OPS)
def test_row_grid_covers_every_row_once(op):
    """blockIdx.x * ROWS + slot enumerates each row once for any runtime M."""
    template = get_template(op, "cuda")
    task = task_of(op, {"M": 512, "N": 4096})
    for config in valid_configs(op, task):
        plan = RowPlan.of(task, config)
        launch = template.render(task, config, SM90).launch_dims
        assert launch["block"] == (plan.threads, 1, 1)
        for m in SIZES:
            (grid, _, _), _, _ = resolve_launch(launch, {"M": m})
            rows = sorted(b * plan.rows + s for b in range(grid) for s in range(plan.rows))
            assert [r for r in rows if r < m] == list(range(m))     # every row exactly once
            assert grid * plan.rows - m < plan.rows                  # no block without a row


@pytest.mark.parametrize("op", ROW_OPS)
def test_row_vectors_cover_the_row_once(op):
    """Thread tid of a row takes vectors i * TPR + tid (i < VPT) below NV: a partition of the row."""
    for n, dtype in ((1, "float16"), (7, "float32"), (1000, "bfloat16"), (4100, "float16"), (11008, "float32")):
        task = task_of(op, {"M": 4, "N": n}, dtype)
        for config in valid_configs(op, task, 30):
            p = RowPlan.of(task, config)
            assert n % p.vec == 0 and p.vec * p.itemsize <= 16
            seen = [i * p.tpr + t for t in range(p.tpr) for i in range(p.vpt) if i * p.tpr + t < p.nv]
            assert sorted(seen) == list(range(p.nv))


@pytest.mark.parametrize("op", FLAT_OPS)
def test_flat_chunks_cover_every_element_once(op):
    template = get_template(op, "cuda")
    task = task_of(op, {"M": 512, "N": 1001}, "bfloat16")
    for config in valid_configs(op, task):
        plan = FlatPlan.of(task, config)
        launch = template.render(task, config, SM90).launch_dims
        for m in SIZES:
            total = m * 1001
            (grid, _, _), (threads, _, _), smem = resolve_launch(launch, {"M": m})
            assert smem == 0 and threads == plan.threads
            chunks = -(-total // plan.chunk)
            if plan.grid_mode == "exact":
                assert grid == chunks
            else:
                assert grid == plan.resident_blocks(SM90)
            covered = [c for b in range(grid) for c in range(b, chunks, grid)]   # block b: chunks b, b + grid, ...
            assert sorted(covered) == list(range(chunks))
            assert chunks * plan.chunk >= total > (chunks - 1) * plan.chunk


def test_gather_blocks_cover_every_row_and_column_once():
    """Block (x, y) takes rows x * rows .. (below M) and chunk y of the row's vectors, thread t its
    vectors t, t + threads, ... of the chunk: every (row, vector) exactly once for any runtime M."""
    template = get_template("gather_columns", "cuda")
    for n, dtype in ((7, "float32"), (1000, "float16"), (14336, "bfloat16")):
        task = task_of("gather_columns", {"M": 16, "N": n}, dtype)
        for config in valid_configs("gather_columns", task, 30):
            c = config.as_dict()
            launch = template.render(task, config, SM90).launch_dims
            nv = n // c["vec"]
            chunk = -(-nv // c["split"])
            vectors = sorted(v for y in range(c["split"]) for t in range(c["threads"])
                             for v in range(y * chunk + t, min(y * chunk + chunk, nv), c["threads"]))
            assert vectors == list(range(nv))
            assert all(y * chunk < nv for y in range(c["split"]))        # no block without a column
            for m in (1, 2, 7, 33):
                (gx, gy, gz), block, smem = resolve_launch(launch, {"M": m})
                assert (gy, gz) == (c["split"], 1) and block == (c["threads"], 1, 1) and smem == 0
                rows = [x * c["rows"] + r for x in range(gx) for r in range(c["rows"])]
                assert [r for r in rows if r < m] == list(range(m)) and gx * c["rows"] - m < c["rows"]


def test_qk_norm_grid_covers_every_head_row_once():
    """The head rows of T tokens (H + 2 HKV each) are rows of the row kernels: blockIdx.x * ROWS +
    slot enumerates each once for any runtime T (or the T compiled in), blocks straddling two
    tokens where ROWS does not divide H + 2 HKV."""
    template = get_template("qk_norm", "cuda")
    for heads, dynamic in (({"H": 32, "HKV": 8}, None), ({"H": 5, "HKV": 1}, ())):
        task = task_of("qk_norm", {"T": 64, **heads, "D": 128}, dynamic=dynamic)
        rows_per_token = heads["H"] + 2 * heads["HKV"]
        for config in valid_configs("qk_norm", task):
            rows = 1 if config["mapping"] == "block" else config["threads"] // 32   # a warp per row
            launch = template.render(task, config, SM90).launch_dims
            assert launch["block"] == (config["threads"], 1, 1)
            for t in (SIZES if dynamic is None else (64,)):
                (grid, _, _), _, _ = resolve_launch(launch, {"T": t})
                m = t * rows_per_token
                covered = sorted(b * rows + s for b in range(grid) for s in range(rows))
                assert [r for r in covered if r < m] == list(range(m))
                assert grid * rows - m < rows


def test_qk_norm_by_projection_takes_a_block_per_token():
    """span projection: one block of ``threads`` per token (the grid is T, runtime or compiled in),
    no dynamic shared memory, GQ and GK as long as the q and k projections, launched
    programmatically on sm_90 as the head kernel is; every config launches on the target and
    every knob changes the code."""
    template = get_template("qk_norm", "cuda")
    shape = {"T": 64, "H": 32, "HKV": 8, "D": 128}
    for dtype in DTYPES:
        for dynamic in (None, ()):
            task = task_of("qk_norm", shape, dtype, dynamic=dynamic, attrs={"span": "projection"})
            space = template.space(task, SM90)
            assert [k.name for k in space.knobs] == ["threads", "vec"]
            for config in space:
                source = template.render(task, config, SM90)
                assert source.entry == "qk_norm_projection" and ("programmatic", True) in source.launch
                assert [a.resolve_shape(task.dims) for a in source.args if a.name in ("GQ", "GK")] == [(4096,), (1024,)]
                for t in (SIZES if dynamic is None else (64,)):
                    grid, block, smem = resolve_launch(source.launch_dims, {"T": t})
                    assert grid == (t, 1, 1) and block == (config["threads"], 1, 1) and smem == 0
            default = template.default(task, SM90).as_dict()
            for knob in space.knobs:   # each value alone, the others the default's: a code of its own
                variants = [dict(default, **{knob.name: v}) for v in knob.values]
                codes = {template.render(task, space.from_values(v), SM90).code for v in variants}
                assert len(codes) == len(knob) >= 2, knob.name
    sm80 = Target.from_name("sm_80")
    task = task_of("qk_norm", shape, attrs={"span": "projection"})
    assert "programmatic" not in template.render(task, template.default(task, sm80), sm80).launch_dims


def test_rope_grid_covers_every_token_once():
    template = get_template("rope", "cuda")
    task = task_of("rope", {"T": 512, "H": 32, "D": 128})
    for config in valid_configs("rope", task):
        launch = template.render(task, config, SM90).launch_dims
        tokens = config["tokens"]
        for t in SIZES:
            (grid, gy, gz), _, _ = resolve_launch(launch, {"T": t})
            assert (gy, gz) == (1, 1)
            assert grid * tokens >= t > (grid - 1) * tokens


@pytest.mark.parametrize("window", [0, 1, 100, 3000])
def test_decode_splits_partition_any_length(window):
    """The grid is (splits, HKV, B) whatever S and L are; split s takes [first + s * per, min(L, first
    + (s + 1) * per)) with first = max(0, L - window) (0 without a window) and per = ceil((L - first)
    / splits), as the kernel computes it: a partition of the window's rows [first, L) for any L."""
    template = get_template("attention_decode", "cuda")
    task = task_of("attention_decode", {"B": 3, "H": 8, "HKV": 2, "D": 128, "S": 4096, "L": 3000},
                   attrs={"window": window})
    for config in valid_configs("attention_decode", task):
        splits = config["splits"]
        source = template.render(task, config, SM90)
        assert f"constexpr long long WINDOW = {window};" in source.code
        for s_cap, length in ((4096, 0), (4096, 1), (4096, 3000), (4096, 4096), (9000, 8191), (37, 5)):
            grid, _, smem = resolve_launch(source.launch_dims, {"S": s_cap, "L": length})
            assert grid == (splits, 2, 3) and smem == 0
            first = max(0, length - window) if window else 0
            per = (length - first + splits - 1) // splits
            positions = [p for s in range(splits) for p in range(first + s * per, min(length, first + s * per + per))]
            assert positions == list(range(first, length))
        workspace = [a for a in source.args if a.role == "workspace"]
        assert len(workspace) == 1 and workspace[0].nbytes == workspace_bytes(task, splits)
        assert [a.name for a in source.args if a.role == "scalar"] == ["S", "L"]


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_grid_covers_every_query_tile(causal):
    template = get_template("attention_prefill", "cuda")
    task = task_of("attention_prefill", {"B": 2, "T": 512, "H": 8, "HKV": 2, "D": 128}, attrs={"causal": causal})
    for config in valid_configs("attention_prefill", task):
        bq = config["warps"] * config["warp_rows"]
        source = template.render(task, config, SM90)
        for t in SIZES:
            (gx, gy, gz), (threads, _, _), smem = resolve_launch(source.launch_dims, {"T": t})
            assert (gy, gz) == (8, 2) and threads == 32 * config["warps"]
            assert gx * bq >= t > (gx - 1) * bq
            assert 0 < smem <= SM90.max_shared_memory_per_block


def test_knob_values_that_cannot_apply_are_left_out():
    odd = get_template("softmax", "cuda").space(task_of("softmax", {"M": 3, "N": 1001}), SM90)
    assert odd.knob("vec").values == (1,)
    wide = get_template("softmax", "cuda").space(task_of("softmax", {"M": 3, "N": 4096}, "float32"), SM90)
    assert wide.knob("vec").values == (1, 2, 4)        # 16 bytes at most
    prefill = get_template("attention_prefill", "cuda")
    shape = {"B": 1, "T": 64, "H": 2, "HKV": 1, "D": 128}
    assert prefill.space(task_of("attention_prefill", shape, "float32"), SM90).knob("impl").values == ("simt",)
    assert "mma" in prefill.space(task_of("attention_prefill", shape, "bfloat16"), SM90).knob("impl").values
    d72 = dict(shape, D=72)     # not a multiple of the mma k-step
    assert prefill.space(task_of("attention_prefill", d72, "float16"), SM90).knob("impl").values == ("simt",)
    rope = get_template("rope", "cuda").space(task_of("rope", {"T": 4, "H": 2, "D": 6}), SM90)
    assert rope.knob("vec").values == (1,)             # D/2 = 3


def test_constraints_reject_launches_the_target_cannot_run():
    prefill = get_template("attention_prefill", "cuda")
    task = task_of("attention_prefill", {"B": 1, "T": 512, "H": 8, "HKV": 8, "D": 256})
    space = prefill.space(task, SM90)
    big = dict(impl="mma", warps=8, warp_rows=16, block_k=128, stages=3, q_regs=0)
    assert "tiles fit in shared memory" in space.violations(big)
    small_target = Target(kind="cuda", arch="sm_90a", max_threads_per_block=1024, max_shared_memory_per_block=48 << 10,
                          max_registers_per_block=65536, sm_count=132)
    small = dict(impl="mma", warps=4, warp_rows=16, block_k=64, stages=2, q_regs=0)
    assert space.is_valid(small)
    assert "tiles fit in shared memory" in prefill.space(task, small_target).violations(small)

    decode = get_template("attention_decode", "cuda")
    wide_group = task_of("attention_decode", {"B": 1, "H": 64, "HKV": 1, "D": 256, "S": 64, "L": 64}, "float32")
    dspace = decode.space(wide_group, SM90)
    assert "registers fit the block" in dspace.violations(dict(warps=8, vec=4, lanes=4, unroll=8, splits=1))
    assert "block merge fits in static shared memory" in dspace.violations(
        dict(warps=1, vec=4, lanes=32, unroll=1, splits=1))

    rows = get_template("softmax", "cuda")
    rspace = rows.space(task_of("softmax", {"M": 8, "N": 11008}, "float32"), SM90)
    assert "cached row fits in registers" in rspace.violations(
        dict(mapping="warp", threads=256, vec=4, cache="regs", unroll=1, stream=0))
    assert "cached rows fit in shared memory" in rspace.violations(
        dict(mapping="warp", threads=1024, vec=4, cache="smem", unroll=1, stream=0))
    limited = Target(kind="cuda", arch="sm_90a", max_threads_per_block=256, max_shared_memory_per_block=48 << 10,
                     max_registers_per_block=65536, sm_count=132)
    assert max(rows.space(task_of("softmax", {"M": 8, "N": 4096}), limited).knob("threads").values) == 256


@pytest.mark.parametrize("op", OPS)
def test_every_valid_config_respects_the_target(op):
    shapes = {
        "softmax": {"M": 64, "N": 11008}, "rmsnorm": {"M": 64, "N": 11008}, "layernorm": {"M": 64, "N": 4096},
        "add": {"M": 64, "N": 4096}, "swiglu": {"M": 64, "N": 11008}, "gelu": {"M": 64, "N": 4096},
        "geglu": {"M": 64, "N": 11008}, "bias_add": {"M": 64, "N": 4096}, "gather_columns": {"M": 64, "N": 14336},
        "qk_norm": {"T": 64, "H": 64, "HKV": 4, "D": 128},
        "rope": {"T": 64, "H": 32, "D": 128},
        "attention_decode": {"B": 8, "H": 32, "HKV": 8, "D": 128, "S": 4096, "L": 4096},
        "attention_prefill": {"B": 1, "T": 2048, "H": 32, "HKV": 8, "D": 128},
    }
    template = get_template(op, "cuda")
    for dtype in DTYPES:
        task = task_of(op, shapes[op], dtype)
        space = template.space(task, SM90)
        configs = list(space) if len(space) <= 3000 else space.sample(np.random.default_rng(1), 300)
        assert configs
        for config in configs:
            source = template.render(task, config, SM90)
            grid, block, smem = resolve_launch(source.launch_dims, dict(task.dims))
            assert np.prod(block) <= SM90.max_threads_per_block and block[0] % 32 == 0
            assert smem <= SM90.max_shared_memory_per_block
            assert all(1 <= g < 2 ** 31 for g in grid) and grid[1] < 65536 and grid[2] < 65536


@pytest.mark.parametrize("op", OPS)
def test_every_knob_changes_the_code(op):
    shapes = {
        "qk_norm": {"T": 64, "H": 32, "HKV": 8, "D": 128},
        "rope": {"T": 64, "H": 8, "D": 128},
        "attention_decode": {"B": 2, "H": 8, "HKV": 2, "D": 128, "S": 512, "L": 512},
        "attention_prefill": {"B": 1, "T": 256, "H": 4, "HKV": 2, "D": 64},
    }
    template = get_template(op, "cuda")
    task = task_of(op, shapes.get(op, {"M": 64, "N": 4096}), "float16")
    space = template.space(task, SM90)
    for knob in space.knobs:
        if len(knob) < 2:
            continue
        changed = False
        for config in [template.default(task, SM90)] + space.sample(np.random.default_rng(2), 30):
            base = config.as_dict()
            for value in knob.values:
                other = dict(base, **{knob.name: value})
                if value == base[knob.name] or not space.is_valid(other):
                    continue
                a = template.render(task, config, SM90)
                b = template.render(task, space.from_values(other), SM90)
                assert (a.code, a.launch) != (b.code, b.launch), (knob.name, base, value)
                changed = True
        # prefill's impl moves together with warp_rows and stages (their ranges differ per impl)
        assert changed or knob.name == "impl", f"{op}: no pair of valid configs differs in {knob.name} alone"


def test_static_dims_are_compiled_in_and_dynamic_ones_are_arguments():
    softmax = get_template("softmax", "cuda")
    static = task_of("softmax", {"M": 5, "N": 64}, dynamic=())
    source = softmax.render(static, softmax.default(static, SM90), SM90)
    assert "constexpr long long M = 5;" in source.code and not [a for a in source.args if a.role == "scalar"]
    assert isinstance(source.launch_dims["grid"][0], int)
    dynamic = task_of("softmax", {"M": 5, "N": 64})
    source = softmax.render(dynamic, softmax.default(dynamic, SM90), SM90)
    assert "constexpr long long M" not in source.code and "long long M" in source.code
    assert evaluate(source.launch_dims["grid"][0], {"M": 1000}) > evaluate(source.launch_dims["grid"][0], {"M": 5})


AWKWARD = [
    ("softmax", {"M": 3, "N": 1}, "float16", {}, ()),
    ("softmax", {"M": 3, "N": 1001}, "float32", {}, ("M",)),
    ("rmsnorm", {"M": 2, "N": 4100}, "bfloat16", {"residual": True}, ("M",)),
    ("layernorm", {"M": 9, "N": 24}, "float16", {}, ()),
    ("gelu", {"M": 1, "N": 3}, "bfloat16", {}, ()),
    ("gather_columns", {"M": 3, "N": 14336}, "bfloat16", {}, ("M",)),
    ("qk_norm", {"T": 1, "H": 1, "HKV": 1, "D": 2}, "float16", {}, ()),
    ("qk_norm", {"T": 7, "H": 40, "HKV": 8, "D": 256}, "float32", {"eps": 1e-5}, ("T",)),
    ("qk_norm", {"T": 1, "H": 1, "HKV": 1, "D": 2}, "float16", {"span": "projection"}, ()),
    ("qk_norm", {"T": 5, "H": 3, "HKV": 1, "D": 38}, "bfloat16", {"span": "projection"}, ("T",)),
    ("qk_norm", {"T": 7, "H": 40, "HKV": 8, "D": 128}, "float32", {"span": "projection", "eps": 1e-5}, ("T",)),
    ("rope", {"T": 3, "H": 3, "D": 2}, "float16", {}, ()),
    ("rope", {"T": 33, "H": 5, "D": 80}, "float32", {"theta": 500000.0}, ("T",)),
    ("rope", {"T": 9, "H": 4, "D": 64}, "bfloat16", {"theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
                                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                    "original_max_position_embeddings": 8192}, ("T",)),
    # yarn (OLMo 3's): cos and sin scaled by the attention factor, in rope and in the fused decode step
    ("rope", {"T": 9, "H": 4, "D": 128}, "bfloat16", {"theta": 500000.0, "rope_type": "yarn", "factor": 8.0,
                                                     "original_max_position_embeddings": 8192, "beta_fast": 32.0,
                                                     "beta_slow": 1.0, "truncate": True,
                                                     "attention_factor": 1.2079441541679836}, ("T",)),
    ("rope_append_attention", {"B": 2, "H": 8, "HKV": 2, "D": 128, "S": 128, "L": 128}, "bfloat16",
     {"theta": 500000.0, "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": 1.2079441541679836}, ("S", "L")),
    ("attention_decode", {"B": 3, "H": 6, "HKV": 1, "D": 80, "S": 65, "L": 1}, "float16", {}, ("S", "L")),
    ("attention_decode", {"B": 1, "H": 2, "HKV": 2, "D": 8, "S": 9, "L": 9}, "float32", {"scale": 0.5}, ()),
    ("attention_prefill", {"B": 2, "T": 1, "H": 3, "HKV": 1, "D": 32}, "bfloat16", {"causal": False}, ()),
    ("attention_prefill", {"B": 1, "T": 77, "H": 2, "HKV": 1, "D": 80}, "float16", {}, ("T",)),
    ("attention_prefill", {"B": 1, "T": 100, "H": 4, "HKV": 2, "D": 256}, "float16", {}, ("T",)),
    # sliding windows (compiled in): simt, mma, split decode of ragged lengths, the fused decode step's
    ("attention_prefill", {"B": 1, "T": 77, "H": 2, "HKV": 1, "D": 80}, "float32", {"window": 33}, ("T",)),
    ("attention_prefill", {"B": 2, "T": 300, "H": 4, "HKV": 2, "D": 128}, "bfloat16", {"window": 100}, ()),
    ("attention_decode", {"B": 3, "H": 6, "HKV": 1, "D": 80, "S": 65, "L": 64}, "float16",
     {"window": 33, "lengths": "per_sequence"}, ("S", "L")),
    ("rope_append_attention", {"B": 2, "H": 8, "HKV": 2, "D": 64, "S": 128, "L": 128}, "bfloat16", {"window": 1},
     ("S", "L")),
    # soft-capped (Gemma 2's, compiled in), also with windows: simt, mma at D = 256 (Gemma 2 9B's
    # heads), split decode of ragged lengths, the fused decode step's
    ("attention_prefill", {"B": 1, "T": 77, "H": 2, "HKV": 1, "D": 80}, "float32", {"window": 33, "softcap": 50.0},
     ("T",)),
    ("attention_prefill", {"B": 1, "T": 300, "H": 16, "HKV": 8, "D": 256}, "bfloat16", {"softcap": 50.0}, ("T",)),
    ("attention_decode", {"B": 3, "H": 6, "HKV": 1, "D": 80, "S": 65, "L": 64}, "float16",
     {"window": 33, "lengths": "per_sequence", "softcap": 30.0}, ("S", "L")),
    ("rope_append_attention", {"B": 2, "H": 16, "HKV": 8, "D": 256, "S": 128, "L": 128}, "bfloat16",
     {"window": 64, "softcap": 50.0}, ("S", "L")),
]


@pytest.mark.tools("nvcc")
def test_awkward_and_static_shapes_compile():
    """Smallest legal sizes, odd N and D, static dims, non-default attributes: default configs
    and one sampled config each go through nvcc, the defaults without spills."""
    inputs, defaults = [], []
    for op, shape, dtype, attrs, dynamic in AWKWARD:
        template = get_template(op, "cuda")
        task = Task.make(op, shape, dtype, attrs=attrs, dynamic=dynamic)
        template.check(task)
        configs = [template.default(task, SM90)] + template.space(task, SM90).sample(np.random.default_rng(3), 1)
        defaults.append(len(inputs))
        inputs += [MeasureInput(task, c, SM90) for c in configs]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    failures = [(i.task.key, str(i.config), b.message) for i, b in zip(inputs, builds) if b.error != MeasureError.NO_ERROR]
    assert not failures, failures
    assert all(b.stats["registers"] > 0 for b in builds)
    spilled = [inputs[i].task.key for i in defaults if builds[i].stats["spill_stores"]]
    assert not spilled, spilled


def test_prefill_mma_issues_the_tensor_core_instruction():
    template = get_template("attention_prefill", "cuda")
    for dtype, kind in (("float16", "f16"), ("bfloat16", "bf16")):
        task = task_of("attention_prefill", {"B": 1, "T": 128, "H": 2, "HKV": 1, "D": 64}, dtype)
        config = template.default(task, SM90)
        assert config["impl"] == "mma"
        code = template.render(task, config, SM90).code
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32" in code
        assert "ldmatrix.sync.aligned.m8n8.x4.trans" in code and "cp.async.cg.shared.global" in code


def test_window_bounds_the_split_counts_and_the_prefill_tiles():
    """Knobs and features follow the work a window leaves: decode splits of at least 16 of the
    window's rows, prefill key tiles from each query tile's window on."""
    decode = get_template("attention_decode", "cuda")
    shape = {"B": 1, "H": 8, "HKV": 2, "D": 128, "S": 4096, "L": 4096}
    splits = {w: decode.space(task_of("attention_decode", shape, attrs={"window": w}), SM90).knob("splits").values
              for w in (0, 40, 4096)}
    assert splits[40] == (1, 2) and splits[0] == splits[4096] and max(splits[0]) == 128
    rope = get_template("rope_append_attention", "cuda")
    windowed = task_of("rope_append_attention", shape, attrs={"window": 40})
    assert rope.space(windowed, SM90).knob("splits").values == (1, 2)
    prefill = get_template("attention_prefill", "cuda")
    shape = {"B": 1, "T": 2048, "H": 8, "HKV": 2, "D": 128}
    tasks = {w: task_of("attention_prefill", shape, attrs={"window": w}) for w in (0, 256, 2048)}
    config = prefill.default(tasks[0], SM90)
    moved = {w: prefill.features(task, config, SM90)["bytes_moved"] for w, task in tasks.items()}
    assert moved[256] < moved[0] / 2 and moved[2048] == moved[0]
    with pytest.raises(ValueError, match="causal"):
        prefill.space(task_of("attention_prefill", shape, attrs={"window": 256, "causal": False}), SM90)


@pytest.mark.parametrize("op", ["attention_prefill", "attention_decode", "rope_append_attention"])
def test_soft_capping_is_compiled_in_and_absent_without_a_cap(op):
    """softcap = 0 leaves no trace in the source (the kernels are those of before the attribute);
    a cap compiles in as a constant, and every placeholder of the capped kernels is filled."""
    template = get_template(op, "cuda")
    shape = ({"B": 1, "T": 256, "H": 4, "HKV": 2, "D": 128} if op == "attention_prefill"
             else {"B": 2, "H": 8, "HKV": 2, "D": 64, "S": 512, "L": 512})
    for dtype in DTYPES:
        plain, capped = (task_of(op, shape, dtype, dynamic=(), attrs={"softcap": cap}) for cap in (0.0, 30.0))
        assert template.space(plain, SM90).knobs == template.space(capped, SM90).knobs
        for config in valid_configs(op, plain, n=20):
            a, b = template.render(plain, config, SM90), template.render(capped, config, SM90)
            assert "SOFTCAP" not in a.code and "CAP_IN" not in a.code and "tanhf" not in a.code
            assert "constexpr float SOFTCAP = 30.0f;" in b.code and "tanhf(" in b.code and "@" not in b.code
            assert a.args == b.args and a.launch_dims == b.launch_dims


def test_defaults_are_valid_at_many_shapes():
    shapes = {
        "softmax": [{"M": m, "N": n} for m, n in itertools.product((1, 4096), (1, 8, 100, 4096, 11008, 32000))],
        "gather_columns": [{"M": m, "N": n} for m, n in itertools.product((1, 7, 4096), (1, 3, 4096, 11008, 14336))],
        "rope": [{"T": 1, "H": 1, "D": 2}, {"T": 4096, "H": 32, "D": 128}, {"T": 5, "H": 64, "D": 256}],
        "qk_norm": [{"T": 1, "H": 1, "HKV": 1, "D": 2}, {"T": 4096, "H": 32, "HKV": 8, "D": 128},
                    {"T": 1, "H": 64, "HKV": 4, "D": 128}, {"T": 5, "H": 16, "HKV": 2, "D": 512}],
        "attention_decode": [{"B": 1, "H": 1, "HKV": 1, "D": 8, "S": 1, "L": 1},
                             {"B": 8, "H": 32, "HKV": 32, "D": 128, "S": 4096, "L": 4096},
                             {"B": 1, "H": 64, "HKV": 8, "D": 128, "S": 32768, "L": 30000}],
        "attention_prefill": [{"B": 1, "T": 1, "H": 1, "HKV": 1, "D": 8},
                              {"B": 1, "T": 2048, "H": 32, "HKV": 32, "D": 128},
                              {"B": 2, "T": 300, "H": 16, "HKV": 4, "D": 256}],
    }
    for op, items in shapes.items():
        template = get_template(op, "cuda")
        for shape in items:
            for dtype in DTYPES:
                for attrs in ({}, {"span": "projection"}) if op == "qk_norm" else ({},):
                    task = task_of(op, shape, dtype, attrs=attrs)
                    assert template.space(task, SM90).is_valid(template.default(task, SM90)), (op, shape, dtype, attrs)
