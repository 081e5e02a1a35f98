"""The CUDA matmul templates compute the right answer: their generated kernels run on the CPU
emulator (``tests/cudaemu.py``) against the float64 references, for shapes with tails in
every dim, the smallest legal shapes, the default config and sampled configs, with cp.async
copies landing at once and as late as allowed. Also: the emulator itself catches the bugs it
is meant to catch, every knob changes the code, and spaces keep to the target's limits.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cudaemu import Emulator
from search_space import KernelSource, Target, Task, get_template

SM90 = Target.from_name("sm_90a")

# (op, dtype, shape, attrs): odd sizes everywhere, K not a multiple of the wide tiles
CASES = [
    ("gemm", "float16", {"M": 37, "N": 45, "K": 200}, None),
    ("gemm", "bfloat16", {"M": 70, "N": 33, "K": 131}, None),  # odd K: no cp.async wider than 2 bytes
    ("gemm", "float32", {"M": 37, "N": 45, "K": 203}, None),
    ("gemm", "float32", {"M": 1, "N": 1, "K": 1}, None),
    ("gemm", "float16", {"M": 1, "N": 3, "K": 2}, None),
    ("gemv", "float16", {"M": 3, "N": 37, "K": 200}, None),
    ("gemv", "bfloat16", {"M": 16, "N": 9, "K": 1030}, None),
    ("gemv", "float32", {"M": 2, "N": 130, "K": 513}, None),
    ("gemv", "float16", {"M": 1, "N": 1, "K": 1}, None),
    ("gemv_q4", "float16", {"M": 3, "N": 40, "K": 320}, {"group_size": 64}),
    ("gemv_q4", "bfloat16", {"M": 13, "N": 23, "K": 224}, {"group_size": 32, "zero_point": True}),
    ("gemv_q4", "float32", {"M": 1, "N": 5, "K": 128}, {"group_size": 128}),
    ("gemv_q4", "float16", {"M": 1, "N": 1, "K": 32}, {"group_size": 32}),
    ("gemm_q4", "float16", {"M": 45, "N": 50, "K": 640}, {"group_size": 32, "zero_point": True}),
    ("gemm_q4", "bfloat16", {"M": 20, "N": 17, "K": 256}, {"group_size": 64}),
    ("gemm_q4", "float32", {"M": 20, "N": 17, "K": 288}, {"group_size": 32, "zero_point": True}),
]


@pytest.fixture(scope="module")
def emulator():
    emu = Emulator()
    yield emu
    emu.close()


def _configs(template, task, n_samples: int, seed: int):
    space = template.space(task, SM90)
    configs = [template.default(task, SM90)] + space.sample(np.random.default_rng(seed), n_samples)
    return list({c.index: c for c in configs}.values())


@pytest.mark.parametrize("op, dtype, shape, attrs", CASES,
                         ids=[f"{c[0]}-{c[1]}-" + "x".join(str(v) for v in c[2].values()) for c in CASES])
def test_generated_kernels_match_the_reference(emulator, op, dtype, shape, attrs):
    template = get_template(op, "cuda")
    task = Task.make(op, shape, dtype, attrs)
    seed = sum(shape.values())
    failures = []
    # the default eagerly, a sampled config with late-landing copies (16 cases sample 16 configs)
    for i, config in enumerate(_configs(template, task, 1, seed)):
        deferred = bool(i % 2)
        problem = emulator.check(task, config, SM90, seed=seed + i, deferred=deferred)
        if problem:
            failures.append((str(config), "deferred" if deferred else "eager", problem))
    assert not failures, failures


@pytest.mark.parametrize("config", [
    dict(instr="mma", bm=32, bn=32, bk=64, wm=16, wn=32, stages=2, vec=8, swizzle="xor", split_k=2, group_m=8),
    dict(instr="mma", bm=64, bn=32, bk=32, wm=32, wn=16, stages=5, vec=4, swizzle="pad", split_k=1, group_m=1),
    dict(instr="mma", bm=16, bn=64, bk=16, wm=16, wn=16, stages=3, vec=2, swizzle="none", split_k=4, group_m=1),
])
def test_gemm_tensor_core_pipeline_variants(emulator, config):
    """Swizzles, stage counts, split-K and copy widths, each with late-landing copies."""
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", {"M": 50, "N": 70, "K": 328}, "float16")
    space = template.space(task, SM90)
    cfg = space.from_values(config)
    assert space.is_valid(cfg), space.violations(cfg)
    assert emulator.check(task, cfg, SM90, deferred=True) is None


@pytest.mark.parametrize("dtype, shape, config", [
    ("float16", {"M": 70, "N": 80, "K": 200},
     dict(instr="wgmma", bm=64, bn=64, bk=64, wm=64, wn=16, stages=3, vec=8, swizzle="xor", split_k=1, group_m=1)),
    ("bfloat16", {"M": 150, "N": 90, "K": 136},
     dict(instr="wgmma", bm=256, bn=32, bk=64, wm=128, wn=16, stages=2, vec=4, swizzle="xor", split_k=2, group_m=1)),
    ("float16", {"M": 130, "N": 260, "K": 328},
     dict(instr="wgmma", bm=128, bn=256, bk=64, wm=64, wn=16, stages=4, vec=8, swizzle="xor", split_k=1, group_m=8)),
])
def test_gemm_warpgroup_mma_variants(emulator, dtype, shape, config):
    """Hopper wgmma: the tiles the loader writes are what the descriptors describe."""
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", shape, dtype)
    space = template.space(task, SM90)
    cfg = space.from_values(config)
    assert space.is_valid(cfg), space.violations(cfg)
    assert emulator.check(task, cfg, SM90, deferred=True) is None


@pytest.mark.parametrize("old, new", [
    ("^ (row & 7)", "^ ((row >> 1) & 7)"),                      # tiles not in the 128-byte swizzle
    ("((1024ull >> 4) << 32)", "((512ull >> 4) << 32)"),        # wrong 8-row group stride
    ("kk * 16)", "kk * 8)"),                                     # wrong K step inside the swizzle atom
    ("acc[i][4 * j + 2 * h], v1 = acc[i][4 * j + 2 * h + 1]",   # wrong accumulator layout
     "acc[i][4 * j + h], v1 = acc[i][4 * j + h + 2]"),
])
def test_emulator_catches_wgmma_layout_bugs(emulator, old, new):
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", {"M": 70, "N": 80, "K": 200}, "float16")
    config = template.space(task, SM90).from_values(
        dict(instr="wgmma", bm=64, bn=64, bk=64, wm=64, wn=16, stages=3, vec=8, swizzle="xor", split_k=1, group_m=1))
    source = _mutated(template.render(task, config, SM90), old, new)
    inputs = template.make_inputs(task, np.random.default_rng(0))
    out = emulator.run(source, task.dims, inputs)
    from measure.verify import check_output

    assert "error" in out or check_output("Y", out["outputs"]["Y"], template.reference(task, inputs)["Y"],
                                          template.tolerance(task), "float16") is not None


_TMA = dict(instr="wgmma", bk=64, wn=16, swizzle="xor", vec=8, split_k=1, pipeline="tma")


@pytest.mark.parametrize("dtype, shape, config", [
    ("float16", {"M": 70, "N": 80, "K": 200}, dict(_TMA, bm=64, bn=64, wm=64, stages=3, group_m=1, persistent=0)),
    # two consumer warpgroups of 128 rows, tiles walked by a persistent grid of 2 blocks
    ("bfloat16", {"M": 300, "N": 90, "K": 136}, dict(_TMA, bm=256, bn=32, wm=128, stages=2, group_m=8, persistent=1)),
    ("float16", {"M": 130, "N": 260, "K": 328}, dict(_TMA, bm=128, bn=128, wm=64, stages=4, group_m=8, persistent=1)),
    # the epilogue through shared memory and TMA stores, clipped at the M and N edges
    ("float16", {"M": 150, "N": 200, "K": 200},
     dict(_TMA, bm=128, bn=64, wm=64, stages=3, group_m=8, persistent=1, epilogue="smem")),
    ("bfloat16", {"M": 300, "N": 136, "K": 72},
     dict(_TMA, bm=256, bn=128, wm=128, stages=2, group_m=1, persistent=0, epilogue="smem")),
    # clusters of 2 blocks sharing W's tile by multicast (an odd number of row tiles: the last
    # pair's second block computes rows past M and stores none)
    ("float16", {"M": 330, "N": 200, "K": 200},
     dict(_TMA, bm=64, bn=64, wm=64, stages=3, group_m=8, persistent=1, epilogue="smem", cluster=2)),
    ("bfloat16", {"M": 150, "N": 80, "K": 328},
     dict(_TMA, bm=64, bn=32, wm=64, stages=4, group_m=1, persistent=0, cluster=2)),
])
def test_gemm_warp_specialised_tma_variants(emulator, dtype, shape, config):
    """TMA boxes (zeros past every edge), transaction barriers and the stage ring, with copies
    landing at once and only when a consumer waits for them."""
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", shape, dtype)
    small = dataclasses.replace(SM90, sm_count=2)  # a persistent grid of 2: each block walks several tiles
    space = template.space(task, small)
    cfg = space.from_values(config)
    assert space.is_valid(cfg), space.violations(cfg)
    for deferred in (False, True):
        assert emulator.check(task, cfg, small, deferred=deferred) is None


@pytest.mark.parametrize("old, new", [
    ("if (signals) tma_store_wait_read();  // the previous", "if (false) tma_store_wait_read();  // the previous"),
    ("((cc % 64) * 2) ^ ((r & 7) << 4)", "(cc % 64) * 2"),                      # boxes not in the swizzle TMA reads
    ("  if (signals) tma_store_wait_read();  // shared memory stays", "  //"),  # exits before the last store read
    ("named_barrier_sync(1 + cw, 128);\n    if (signals) {", "if (signals) {"),   # stores boxes still being written
], ids=["reuses a box before its store read it", "unswizzled boxes", "exits early", "stores too soon"])
def test_emulator_catches_tma_epilogue_bugs(emulator, old, new):
    _assert_caught(emulator, old, new, dict(_TMA, bm=128, bn=64, wm=64, stages=3, group_m=8, persistent=1,
                                            epilogue="smem"), sm_count=2)


@pytest.mark.parametrize("old, new", [
    (" mbar_arrive_cluster(&empty[previous], rank ^ 1u); }", " }"),  # the other block never gets its stage back
    ("&full[stage], 0x3)", "&full[stage], 0x1)"),                     # multicast to one block only
    ("+ rank * 2048, &map_w", ", &map_w"),                            # both halves of W's box on one
    ("for (int s = 0; s < 3; ++s) {\n        mbar_wait(&empty", "for (int s = 0; s < 0; ++s) {\n        mbar_wait(&empty"),
], ids=["no remote release", "one-block multicast", "halves overlap", "exits before the other block's arrivals"])
def test_emulator_catches_cluster_bugs(emulator, old, new):
    _assert_caught(emulator, old, new, dict(_TMA, bm=64, bn=64, wm=64, stages=3, group_m=8, persistent=1,
                                            cluster=2), sm_count=4)


@pytest.mark.parametrize("old, new", [
    ("mbar_wait(&empty[stage], phase ^ 1u)", "mbar_wait(&empty[stage], phase)"),  # waits for a phase never begun
    ("      mbar_wait(&full[stage], phase);\n", "\n"),                           # reads a stage before it lands
    ("if (previous >= 0 && signals) mbar_arrive(&empty[previous]);\n      previous",  # never gives a stage back
     "previous"),
    ("kt * 64, n0", "kt * 64, m0"),                                                 # W's box at X's rows
    ("mbar_init(&empty[s], 2)", "mbar_init(&empty[s], 1)"),                         # one consumer's arrival frees it
])
def test_emulator_catches_tma_pipeline_bugs(emulator, old, new):
    _assert_caught(emulator, old, new, dict(_TMA, bm=128, bn=64, wm=64, stages=2, group_m=1, persistent=0))


def _assert_caught(emulator, old, new, values, sm_count=132):
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", {"M": 150, "N": 200, "K": 200}, "float16")
    target = dataclasses.replace(SM90, sm_count=sm_count)
    config = template.space(task, target).from_values(values)
    source = _mutated(template.render(task, config, target), old, new)
    inputs = template.make_inputs(task, np.random.default_rng(0))
    from measure.verify import check_output

    for deferred in (False, True):
        out = emulator.run(source, task.dims, inputs, deferred=deferred)
        if "error" in out or check_output("Y", out["outputs"]["Y"], template.reference(task, inputs)["Y"],
                                          template.tolerance(task), "float16") is not None:
            return
    raise AssertionError(f"the emulator accepted the kernel with {new!r} for {old!r}")


@pytest.mark.parametrize("k, config", [
    (640, dict(core="mma", warps=4, rows=2, ksplit=2, unroll=2, mtile=2, kc=256, prefetch=1)),  # 3 K chunks, the last short
    (640, dict(core="mma", warps=2, rows=1, ksplit=1, unroll=1, mtile=4, kc=512, prefetch=0)),
    (2112, dict(core="simt", warps=4, rows=2, ksplit=2, unroll=2, mtile=1, kc=2176, prefetch=0)),
])
def test_gemm_q4_chunks_splits_and_tiles(emulator, k, config):
    template = get_template("gemm_q4", "cuda")
    task = Task.make("gemm_q4", {"M": 20, "N": 33, "K": k}, "float16", {"group_size": 32})
    space = template.space(task, SM90)
    cfg = space.from_values(config)
    assert space.is_valid(cfg), space.violations(cfg)
    assert emulator.check(task, cfg, SM90, deferred=True) is None


@pytest.mark.parametrize("shape, dtype, attrs, config", [
    # 33 steps of K over 8 warps x 4 steps: a second round of one step, loaded while the first computes
    ({"M": 1, "N": 40, "K": 4224}, "float16", {"group_size": 64},
     dict(core="mma", warps=8, rows=1, ksplit=8, unroll=4, mtile=1, kc=4224, prefetch=2)),
    # 9 steps, the last one short, in rounds of 2 x 2; zero points ride along with the weights
    ({"M": 3, "N": 23, "K": 1056}, "bfloat16", {"group_size": 32, "zero_point": True},
     dict(core="mma", warps=4, rows=2, ksplit=2, unroll=2, mtile=1, kc=1152, prefetch=2)),
])
def test_gemv_q4_with_pipelined_weights(emulator, shape, dtype, attrs, config):
    template = get_template("gemv_q4", "cuda")
    task = Task.make("gemv_q4", shape, dtype, attrs)
    space = template.space(task, SM90)
    cfg = space.from_values(config)
    assert space.is_valid(cfg), space.violations(cfg)
    assert emulator.check(task, cfg, SM90) is None


NORM = {"norm": "rmsnorm", "eps": 1e-6}


@pytest.mark.parametrize("op, shape, dtype, attrs, config", [
    # the norm's row sums meeting across a K split; the residual added after it
    ("gemv", {"M": 3, "N": 37, "K": 1040}, "float16", {**NORM, "residual": True},
     dict(warps=4, rows=2, ksplit=2, vec=16, unroll=2, x_smem=0)),
    ("gemv", {"M": 2, "N": 20, "K": 1030}, "bfloat16", NORM, dict(warps=4, rows=1, ksplit=1, vec=4, unroll=4, x_smem=1)),
    ("gemv", {"M": 1, "N": 9, "K": 260}, "float32", {"residual": True},
     dict(warps=2, rows=4, ksplit=2, vec=16, unroll=1, x_smem=0)),
    # SwiGLU of the gate and up halves (N = 2 x 37): a warp streams each column's two rows
    ("gemv", {"M": 2, "N": 74, "K": 1040}, "float16", {**NORM, "act": "swiglu"},
     dict(warps=4, rows=2, ksplit=2, vec=16, unroll=2, x_smem=0)),
    # mma: the rows' sums gathered in shared memory as X is staged, in chunks of K or in one
    ("gemv_q4", {"M": 9, "N": 40, "K": 640}, "float16", {**NORM, "group_size": 64},
     dict(core="mma", warps=4, rows=1, ksplit=2, unroll=2, mtile=2, kc=256, prefetch=1)),
    ("gemv_q4", {"M": 1, "N": 23, "K": 1056}, "bfloat16", {**NORM, "residual": True, "zero_point": True, "group_size": 32},
     dict(core="mma", warps=4, rows=2, ksplit=2, unroll=2, mtile=1, kc=1152, prefetch=2)),
    ("gemv_q4", {"M": 3, "N": 46, "K": 1024}, "float16", {**NORM, "act": "swiglu", "group_size": 64},
     dict(core="mma", warps=4, rows=1, ksplit=2, unroll=2, mtile=1, kc=1024, prefetch=2)),
    # simt: the sums of squares riding with the partial products through the K split
    ("gemv_q4", {"M": 3, "N": 34, "K": 2048}, "float32", {**NORM, "act": "swiglu", "residual": True, "group_size": 128},
     dict(core="simt", warps=4, rows=2, ksplit=2, unroll=2, mtile=1, kc=2048, prefetch=0)),
])
def test_decode_gemv_fusions(emulator, op, shape, dtype, attrs, config):
    """X normalised inside the GEMV (``norm=rmsnorm``), the residual added as Y is written
    (``residual``) and SwiGLU of the two halves (``act=swiglu``), against the float64 reference
    of RMSNorm, matmul, SwiGLU and add."""
    template = get_template(op, "cuda")
    task = Task.make(op, shape, dtype, attrs)
    space = template.space(task, SM90)
    cfg = space.from_values(config)
    assert space.is_valid(cfg), space.violations(cfg)
    assert emulator.check(task, cfg, SM90, seed=3) is None


@pytest.mark.parametrize("x_scale, g_scale", [(1e-4, 0.02), (300.0, 300.0)])
def test_the_int4_gemv_stages_x_normalised(emulator, x_scale, g_scale):
    """Rows far from unit RMS: x * g alone would be float16 subnormals (or overflow), so the mma
    schedule stages x / rms * g."""
    from measure.verify import check_output
    from search_space.ops.common import from_float, to_float64

    template = get_template("gemv_q4", "cuda")
    task = Task.make("gemv_q4", {"M": 2, "N": 64, "K": 1024}, "float16", {**NORM, "eps": 1e-12, "group_size": 64})
    cfg = template.space(task, SM90).from_values(
        dict(core="mma", warps=4, rows=1, ksplit=4, unroll=2, mtile=1, kc=1024, prefetch=2))
    inputs = template.make_inputs(task, np.random.default_rng(1))
    inputs["X"] = from_float(to_float64(inputs["X"], "float16") * x_scale, "float16")
    inputs["G"] = from_float(to_float64(inputs["G"], "float16") * g_scale, "float16")
    out = emulator.run(template.render(task, cfg, SM90), task.dims, inputs)
    assert check_output("Y", out["outputs"]["Y"], template.reference(task, inputs)["Y"], template.tolerance(task),
                        "float16") is None


@pytest.mark.parametrize("op, dtype, attrs, config", [
    ("gemv", "float16", NORM, dict(warps=4, rows=2, ksplit=2, vec=16, unroll=2, x_smem=1)),
    ("gemv", "bfloat16", {"residual": True}, dict(warps=4, rows=1, ksplit=1, vec=8, unroll=2, x_smem=0)),
    ("gemv_q4", "float16", {**NORM, "group_size": 64},
     dict(core="mma", warps=4, rows=1, ksplit=2, unroll=2, mtile=1, kc=4096, prefetch=0)),
    ("gemv_q4", "bfloat16", {"residual": True, "zero_point": True, "group_size": 128},
     dict(core="mma", warps=4, rows=2, ksplit=1, unroll=1, mtile=1, kc=4096, prefetch=2)),
    ("gemv_q4", "float32", {**NORM, "group_size": 128},
     dict(core="simt", warps=4, rows=2, ksplit=2, unroll=2, mtile=1, kc=4096, prefetch=0)),
])
def test_a_programmatic_gemv_sends_ahead_at_most_a_quarter_of_l2(emulator, op, dtype, attrs, config):
    """Before its wait a fused GEMV prefetches its weights towards L2: all of them while they fit in
    a quarter of the target's L2, else only the leading lines of each row that do (a larger
    prefetch would evict its own first lines before they are read); an int4 GEMV also the first
    line of its scales. Counted from the addresses the emulated kernel's prefetches name; nothing
    but the weights is prefetched, and the outputs still match."""
    from measure.verify import check_output
    from search_space.codegen.cuda_ptx import PREFETCH_L2_SHARE

    template = get_template(op, "cuda")
    N = 256
    task = Task.make(op, {"M": 1, "N": N, "K": 4096}, dtype, attrs)
    weights = ("WQ", "SCALES", "ZEROS") if op == "gemv_q4" else ("W",)
    inputs = template.make_inputs(task, np.random.default_rng(2))
    rows = inputs[weights[0]]  # W, or the int4 codes
    reference = template.reference(task, inputs)
    for l2 in (64 << 20, rows.nbytes):  # the whole matrix fits a quarter of it; a quarter of the matrix does
        target = dataclasses.replace(SM90, l2_bytes=l2)
        cfg = template.space(task, target).from_values(config)
        out = emulator.run(template.render(task, cfg, target), task.dims, inputs)
        assert check_output("Y", out["outputs"]["Y"], reference["Y"], template.tolerance(task), dtype) is None
        lines = out["prefetched"]
        assert set(lines) <= set(weights), lines
        if op == "gemv_q4":  # each row's first line of scales (rows share lines)
            assert lines["SCALES"] >= inputs["SCALES"].nbytes // 128 - 1, lines
        sent = 128 * lines[weights[0]]
        if l2 > PREFETCH_L2_SHARE * rows.nbytes:  # every line of every row
            assert sent >= rows.nbytes, (sent, rows.nbytes)
        else:  # the leading quarter: whole lines, one more per row where rows do not start on one
            budget = l2 / PREFETCH_L2_SHARE
            assert 0.9 * budget <= sent <= budget + 128 * N, (sent, budget)


def test_only_fusable_templates_take_the_decode_fusions():
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 128}, "float32", NORM)
    with pytest.raises(ValueError, match="takes no decode fusions"):
        get_template("gemv", "cpu").check(task)
    get_template("gemv", "cuda").check(task)
    with pytest.raises(ValueError, match="norm must be one of"):
        get_template("gemv", "cuda").check(Task.make("gemv", {"M": 1, "N": 64, "K": 128}, "float32", {"norm": "l2"}))
    with pytest.raises(ValueError, match="even N"):
        get_template("gemv_q4", "cuda").check(Task.make("gemv_q4", {"M": 1, "N": 63, "K": 128}, "float16",
                                                        {"act": "swiglu"}))
    with pytest.raises(ValueError, match="no attributes"):
        get_template("gemm", "cuda").check(Task.make("gemm", {"M": 64, "N": 64, "K": 128}, "float16", NORM))


def test_pipelined_int4_weights_only_where_x_is_one_chunk():
    """prefetch 2 stages all of X once: where 16 rows of K = 11008 do not fit in shared memory
    (the largest chunk is 4096), no config has it."""
    template = get_template("gemv_q4", "cuda")
    for shape, pipelined in (({"M": 16, "N": 256, "K": 11008}, False), ({"M": 1, "N": 256, "K": 11008}, True)):
        space = template.space(Task.make("gemv_q4", shape, "float16", {"group_size": 128}), SM90)
        valid = [space.get(i).as_dict() for i in space.valid_indices()]
        assert all(c["kc"] >= shape["K"] for c in valid if c["prefetch"] == 2)
        assert any(c["prefetch"] == 2 for c in valid) == pipelined


# ----------------------------------------------------------------------------- the emulator itself


def _mutated(source: KernelSource, old: str, new: str) -> KernelSource:
    assert old in source.code, old
    return dataclasses.replace(source, code=source.code.replace(old, new))


@pytest.fixture(scope="module")
def gemm_case():
    template = get_template("gemm", "cuda")
    task = Task.make("gemm", {"M": 37, "N": 45, "K": 200}, "float16")
    config = template.space(task, SM90).from_values(
        dict(instr="mma", bm=32, bn=32, bk=32, wm=16, wn=16, stages=3, vec=8, swizzle="xor", split_k=1, group_m=1))
    source = template.render(task, config, SM90)
    inputs = template.make_inputs(task, np.random.default_rng(0))
    return template, task, source, inputs, template.reference(task, inputs)


def _verdict(emulator, case, source, deferred):
    from measure.verify import check_output
    from measure.worker import WorkerCrash

    template, task, _, inputs, reference = case
    try:
        out = emulator.run(source, task.dims, inputs, deferred=deferred)
    except WorkerCrash as exc:
        return f"crash: {exc}"
    if "error" in out:
        return out["error"]
    return check_output("Y", out["outputs"]["Y"], reference["Y"], template.tolerance(task), task.dtype)


def test_emulator_passes_the_unchanged_kernel(emulator, gemm_case):
    for deferred in (False, True):
        assert _verdict(emulator, gemm_case, gemm_case[2], deferred) is None


@pytest.mark.parametrize("old, new, deferred, expect", [
    # fragments from the wrong registers: a wrong answer
    ("ldmatrix_x4(a[i][0], a[i][1], a[i][2], a[i][3]", "ldmatrix_x4(a[i][1], a[i][0], a[i][2], a[i][3]", False,
     "relative error"),
    # no wait for the copies: stale shared memory once copies land late
    ("cp_async_wait<1>();\n    __syncthreads();", "__syncthreads();", True, "NaN"),
    # no barrier: warps read tiles other warps have not finished copying
    ("cp_async_wait<1>();\n    __syncthreads();", "cp_async_wait<1>();", False, "NaN"),
    # a K bound past the end of the rows: reads beyond the array hit the guard page
    (" && k0 + col < 200;", " && k0 + col < 208;", False, "crash"),
    # a row bound past M: the store lands beyond Y
    ("if (row < 37 && col < 45)", "if (row < 38 && col < 45)", False, "crash"),
    # half a warp enters a shuffle while the rest of the block waits at a barrier: a hang on a GPU
    ("cp_async_wait<1>();\n    __syncthreads();",
     "cp_async_wait<1>();\n    if (threadIdx.x < 16) (void)__shfl_xor_sync(0xffffffffu, 1.0f, 1);\n    __syncthreads();",
     False, "deadlock"),
])
def test_emulator_catches_planted_bugs(emulator, gemm_case, old, new, deferred, expect):
    verdict = _verdict(emulator, gemm_case, _mutated(gemm_case[2], old, new), deferred)
    assert verdict is not None and expect in verdict, verdict


# ----------------------------------------------------------------------------- spaces


OPS = {"gemm": {"M": 256, "N": 256, "K": 256}, "gemv": {"M": 4, "N": 512, "K": 1024},
       "gemv_q4": {"M": 4, "N": 512, "K": 1024}, "gemm_q4": {"M": 64, "N": 512, "K": 1024}}


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_every_knob_changes_the_code(op, dtype):
    template = get_template(op, "cuda")
    task = Task.make(op, OPS[op], dtype)
    space = template.space(task, SM90)
    base = template.default(task, SM90)
    elsewhere = None  # sampled once, for every knob that needs it: the same seed gave each the same configs
    for knob in space.knobs:
        if len(knob) < 2:
            continue
        codes = set()
        for value in knob.values:
            values = dict(base.as_dict(), **{knob.name: value})
            if space.is_valid(values):
                codes.add(template.render(task, space.from_values(values), SM90).code)
        if len(codes) < 2:  # the default's neighbourhood may pin this knob: look elsewhere
            if elsewhere is None:
                elsewhere = space.sample(np.random.default_rng(1), 1000)
            for config in elsewhere:
                for value in knob.values:
                    values = dict(config.as_dict(), **{knob.name: value})
                    if value != config[knob.name] and space.is_valid(values):
                        codes = {template.render(task, config, SM90).code,
                                 template.render(task, space.from_values(values), SM90).code}
                        break
                if len(codes) == 2:
                    break
        if knob.name == "kc" and "simt" in str(base):
            continue  # pinned for the SIMT schedule
        assert len(codes) >= 2, f"{op}: knob {knob.name} does not change the code"


@pytest.mark.parametrize("op", sorted(OPS))
def test_spaces_keep_to_the_target_limits(op):
    """A small GPU rejects configs a large one takes, by named constraints, before compiling."""
    template = get_template(op, "cuda")
    task = Task.make(op, OPS[op], "float16")
    small = dataclasses.replace(SM90, max_threads_per_block=128, max_shared_memory_per_block=8 << 10,
                                max_registers_per_block=16384)
    big_space, small_space = template.space(task, SM90), template.space(task, small)
    from search_space.templates.cuda import limits

    rejected = [c for c in big_space.sample(np.random.default_rng(0), 300) if not small_space.is_valid(c)]
    assert rejected, "the small target should reject some configs"
    names = {name for c in rejected for name in small_space.violations(c)}
    assert names & {n for n, _ in limits.launch_constraints(small, lambda c: 0, lambda c: 0, lambda c: 0)}
    for config in small_space.sample(np.random.default_rng(1), 50):
        source = template.render(task, config, small)
        threads = np.prod(source.launch_dims["block"])
        assert threads <= 128
        assert source.launch_dims["smem"] <= 8 << 10
    small_default = template.default(task, small)
    assert small_space.is_valid(small_default)


def test_block_registers_rounding():
    from search_space.templates.cuda.limits import block_registers, blocks_per_sm

    assert block_registers(32, 256) == 32 * 256
    assert block_registers(33, 32) == 40 * 32  # 8 registers per thread granularity
    assert block_registers(255, 256) == 256 * 256
    assert blocks_per_sm(256, 0, 32, SM90) == 8
    assert blocks_per_sm(128, 100 << 10, 32, SM90) == 2
