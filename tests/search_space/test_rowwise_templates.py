"""The row-wise and element-wise CPU templates beyond the generic template test: the fused
residual rmsnorm, dynamic row counts, rope at large positions, softmax on extreme inputs,
the smallest shapes, every operator-specific knob value, long rows.

Kernels are compiled by the builder's worker processes, then loaded here so that one
compiled kernel can be called on inputs chosen by the test (and at several row counts).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from measure import LocalBuilder, LocalRunner, MeasureError, MeasureInput
from measure.cpu_kernel import allocate_args, load_object
from measure.verify import check_output
from search_space import Task, get_template

ROW_OPS = ["softmax", "rmsnorm", "layernorm", "swiglu", "geglu", "gelu", "add", "bias_add"]
OP_KNOBS = {"softmax": "passes", "rmsnorm": "reuse", "layernorm": "stats", "gelu": "form", "geglu": "form",
            "rope": "table", "qk_norm": "reuse"}
# shapes of the operators that are not M rows of N
SHAPES = {"rope": {"T": 5, "H": 3, "D": 38}, "qk_norm": {"T": 5, "H": 3, "HKV": 1, "D": 38}}
SMALLEST = {"rope": {"T": 1, "H": 1, "D": 2}, "qk_norm": {"T": 1, "H": 1, "HKV": 1, "D": 2}}


@pytest.fixture(scope="module")
def builder():
    with LocalBuilder(n_parallel=2) as b:
        yield b


def load_kernels(builder, host, pairs):
    """Build (task, config) pairs in worker processes and load each kernel here."""
    inputs = [MeasureInput(task, config, host) for task, config in pairs]
    builds = builder.build(inputs)
    problems = [(i.task.key, str(i.config), b.message) for i, b in zip(inputs, builds)
                if b.error != MeasureError.NO_ERROR]
    assert not problems, problems
    return [load_object(Path(b.artifact).read_bytes(), b.source, host) for b in builds]


def run(kernel, template, task, inputs):
    """Outputs of ``kernel`` on ``inputs`` at the task's dims (outputs poisoned with NaN first)."""
    buffers = allocate_args(kernel.source, task.dims, inputs)
    kernel(buffers, task.dims)
    return {a.name: buffers[a.name] for a in kernel.source.args if a.role == "out"}


def assert_matches(template, task, inputs, outputs, tol=None):
    reference = template.reference(task, inputs)
    for name, got in outputs.items():
        problem = check_output(name, got, reference[name], tol or template.tolerance(task))
        assert problem is None, (task.key, problem)


def config_with(space, base, **values):
    """``base`` with some knobs changed, or None when the space rejects that."""
    candidate = dict(base.as_dict(), **values)
    return space.from_values(candidate) if space.accepts(candidate) else None


def one_config_per_value(template, task, host, knob):
    """For each value of ``knob``: the default with that value, else any valid config with it."""
    space = template.space(task, host)
    default = template.default(task, host)
    configs = []
    for value in space.knob(knob).values:
        config = config_with(space, default, **{knob: value})
        if config is None:
            config = next(c for c in space if c[knob] == value)
        configs.append(config)
    return configs


# ----------------------------------------------------------------------------- dynamic row counts

DYNAMIC_CASES = [(op, {"M": 16, "N": 100}, {}) for op in ROW_OPS] + [
    ("rmsnorm", {"M": 16, "N": 100}, {"residual": True}),
    ("rope", {"T": 16, "H": 3, "D": 24}, {}),
    ("qk_norm", {"T": 16, "H": 4, "HKV": 2, "D": 40}, {"eps": 1e-5}),
    ("qk_norm", {"T": 16, "H": 4, "HKV": 2, "D": 38}, {"span": "projection"}),
]


@pytest.mark.parametrize("op, shape, attrs", DYNAMIC_CASES, ids=lambda v: str(v))
def test_one_dynamic_kernel_runs_at_many_row_counts(op, shape, attrs, host, builder):
    template = get_template(op, "cpu")
    rows_dim = template.dims[0]
    task = Task.make(op, shape, attrs=attrs, dynamic=[rows_dim])
    space = template.space(task, host)
    default = template.default(task, host)
    pairs = [(task, default)]
    threaded = config_with(space, default, threads=max(space.knob("threads").values),
                           **({"rows": max(space.knob("rows").values)} if "rows" in space.names else {}))
    if threaded is not None:
        pairs.append((task, threaded))
    for kernel, (_, config) in zip(load_kernels(builder, host, pairs), pairs):
        scalars = [a for a in kernel.source.args if a.role == "scalar"]
        assert [(a.name, a.dtype) for a in scalars] == [(rows_dim, "int64")]
        for count in (1, 2, 3, 15, 16, 17, 37, 100):
            sized = task.with_dims(**{rows_dim: count})
            inputs = template.make_inputs(sized, np.random.default_rng(count))
            assert_matches(template, sized, inputs, run(kernel, template, sized, inputs))
        # the tuned size is not compiled in: another bucket renders the very same code
        other = task.with_dims(**{rows_dim: 40})
        assert template.render(other, config, host).code == kernel.source.code


def test_static_rows_are_compiled_in(host):
    template = get_template("rmsnorm", "cpu")
    a, b = Task.make("rmsnorm", {"M": 16, "N": 100}), Task.make("rmsnorm", {"M": 40, "N": 100})
    config = template.default(a, host)
    source = template.render(a, config, host)
    assert not any(arg.role == "scalar" for arg in source.args)
    assert source.code != template.render(b, config, host).code


# ----------------------------------------------------------------------------- fused residual rmsnorm


@pytest.mark.parametrize("shape", [{"M": 1, "N": 1}, {"M": 3, "N": 37}, {"M": 5, "N": 200}, {"M": 2, "N": 11008}])
def test_fused_residual_rmsnorm_writes_sum_and_norm(shape, host, builder):
    template = get_template("rmsnorm", "cpu")
    task = Task.make("rmsnorm", shape, attrs={"residual": True, "eps": 1e-6})
    assert [a.name for a in template.signature(task)] == ["X", "R", "G", "Y", "S"]
    configs = one_config_per_value(template, task, host, "reuse")
    assert {c["reuse"] for c in configs} >= {"reload", "recompute"}
    inputs = template.make_inputs(task, np.random.default_rng(3))
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        outputs = run(kernel, template, task, inputs)
        assert np.array_equal(outputs["S"], inputs["X"] + inputs["R"])  # one float32 add, exactly
        assert_matches(template, task, inputs, outputs)


# ----------------------------------------------------------------------------- rope


@pytest.mark.parametrize("shape", [{"T": 8, "H": 3, "D": 128}, {"T": 8, "H": 5, "D": 10}])
@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_is_accurate_at_large_positions(shape, theta, host, builder):
    template = get_template("rope", "cpu")
    task = Task.make("rope", shape, attrs={"theta": theta})
    configs = one_config_per_value(template, task, host, "table")
    inputs = template.make_inputs(task, np.random.default_rng(5))
    inputs["P"] = np.array([0, 1, 4095, 65535, 100_000, 500_000, 1 << 20, (1 << 24) - 1], dtype=np.int32)
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        outputs = run(kernel, template, task, inputs)
        # far tighter than the float32 tolerance: a float32 angle at 2^24 would be off by ~1
        assert_matches(template, task, inputs, outputs, tol=2e-6)


SCALED_ROPES = [  # llama3 with a short original context, so that D = 24 has pairs in all three bands
    {"theta": 10000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"theta": 500000.0, "rope_type": "linear", "factor": 4.0},
    # yarn with a short original context: D = 24 has pairs 0-3 kept, 4-7 blended, 8-11 divided by the factor;
    # cos and sin scaled by OLMo 3's attention factor
    {"theta": 10000.0, "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": 1.2079441541679836},
]


@pytest.mark.parametrize("attrs", SCALED_ROPES, ids=lambda a: a["rope_type"])
def test_scaled_rope_bakes_in_the_scaled_frequencies(attrs, host, builder):
    template = get_template("rope", "cpu")
    task = Task.make("rope", {"T": 6, "H": 3, "D": 24}, attrs=attrs, dynamic=("T",))
    plain = Task.make("rope", {"T": 6, "H": 3, "D": 24}, attrs={"theta": attrs["theta"]}, dynamic=("T",))
    configs = one_config_per_value(template, task, host, "table")
    inputs = template.make_inputs(task, np.random.default_rng(6))
    inputs["P"] = np.array([0, 3, 100, 4095, 65535, 500_000], dtype=np.int32)
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        outputs = run(kernel, template, task, inputs)
        assert_matches(template, task, inputs, outputs, tol=2e-6)
        # and not the unscaled rotation: the scaling reached the kernel
        assert np.abs(outputs["Y"] - template.reference(plain, inputs)["Y"]).max() > 1e-2


@pytest.mark.parametrize("attrs", [
    {"theta": 10000.0, "rotary_dim": 24},   # Phi-4-mini's 0.75 of a 32-dim head
    # longrope over the rotary dims: rotary_dim / 2 factors; 6 of 38 dims, a tail in both parts
    {"theta": 10000.0, "rotary_dim": 6, "rope_type": "longrope", "short_factor": (1.0, 1.5, 2.0),
     "attention_factor": 1.19},
], ids=["default", "longrope"])
def test_partial_rotary_rope_turns_the_first_rotary_dims_and_copies_the_rest(attrs, host, builder):
    template = get_template("rope", "cpu")
    dims = {"T": 5, "H": 3, "D": 32 if attrs["rotary_dim"] == 24 else 38}
    task = Task.make("rope", dims, attrs=attrs, dynamic=("T",))
    configs = one_config_per_value(template, task, host, "table")
    inputs = template.make_inputs(task, np.random.default_rng(7))
    rotary = attrs["rotary_dim"]
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        outputs = run(kernel, template, task, inputs)
        assert_matches(template, task, inputs, outputs, tol=2e-6)
        assert np.array_equal(outputs["Y"][..., rotary:], inputs["X"][..., rotary:])


def test_rope_smallest_head_dim_and_one_token(host, builder):
    template = get_template("rope", "cpu")
    task = Task.make("rope", {"T": 1, "H": 1, "D": 2})
    configs = one_config_per_value(template, task, host, "table")
    inputs = {"X": np.array([[[1.0, 2.0]]], dtype=np.float32), "P": np.array([3], dtype=np.int32)}
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        y = run(kernel, template, task, inputs)["Y"].reshape(2)
        want = [np.cos(3) - 2 * np.sin(3), 2 * np.cos(3) + np.sin(3)]
        np.testing.assert_allclose(y, want, rtol=1e-6)


# ----------------------------------------------------------------------------- qk_norm


@pytest.mark.parametrize("shape, dynamic", [
    ({"T": 5, "H": 3, "HKV": 1, "D": 38}, ("T",)),   # GQA, D no whole number of vectors
    ({"T": 4, "H": 2, "HKV": 1, "D": 30}, ()),       # a q projection of 60: it fits in registers
    ({"T": 3, "H": 4, "HKV": 4, "D": 40}, ("T",)),   # as many key heads as query heads
], ids=str)
def test_qk_norm_by_projection_normalises_the_whole_q_and_k(shape, dynamic, host, builder):
    """OLMo 2's q/k norm: each token's H D query elements one RMS row scaled by GQ[H D], its HKV D
    key elements one by GK[HKV D], the value heads copied; every reuse value, runtime T."""
    template = get_template("qk_norm", "cpu")
    task = Task.make("qk_norm", shape, attrs={"span": "projection"}, dynamic=dynamic)
    assert [a.resolve_shape(task.dims) for a in template.signature(task)][1:3] == [
        (shape["H"] * shape["D"],), (shape["HKV"] * shape["D"],)]
    configs = one_config_per_value(template, task, host, "reuse")
    space = template.space(task, host)
    configs += [c for c in [config_with(space, configs[0], unroll=max(space.knob("unroll").values), vec=4)] if c]
    head = Task.make("qk_norm", shape, dynamic=dynamic)
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        for count in ((1, 2, 7) if dynamic else (shape["T"],)):
            sized = task.with_dims(T=count)
            inputs = template.make_inputs(sized, np.random.default_rng(count))
            outputs = run(kernel, template, sized, inputs)
            assert_matches(template, sized, inputs, outputs)
            y, x = outputs["Y"], inputs["X"]
            assert np.array_equal(y[:, shape["H"] + shape["HKV"]:], x[:, shape["H"] + shape["HKV"]:])  # v copied
            # and not a norm per head: the projection's RMS is not each head's
            per_head = template.reference(head.with_dims(T=count), {"X": x, "GQ": inputs["GQ"][:shape["D"]],
                                                                     "GK": inputs["GK"][:shape["D"]]})["Y"]
            assert np.abs(y[:, :shape["H"]] - per_head[:, :shape["H"]]).max() > 1e-3


def test_qk_norm_keeps_a_run_in_registers_only_where_it_fits(host):
    template = get_template("qk_norm", "cpu")
    shape = {"T": 4, "H": 32, "HKV": 8, "D": 128}
    heads, projections = (template.space(Task.make("qk_norm", shape, attrs={"span": span}), host)
                          for span in ("head", "projection"))
    assert "registers" in heads.knob("reuse").values      # a head of 128
    assert projections.knob("reuse").values == ("reload",)  # 4096 elements of q
    if host.vector_lanes_f32 >= 8:  # a q projection of 60: 8 vectors of 8 lanes, 4 of 16
        short = Task.make("qk_norm", {"T": 4, "H": 2, "HKV": 1, "D": 30}, attrs={"span": "projection"})
        assert "registers" in template.space(short, host).knob("reuse").values
    # a spec that leaves span out is the head kernel, under the same key
    assert Task.make("qk_norm", shape, attrs={"span": "head"}).key == Task.make("qk_norm", shape).key


# ----------------------------------------------------------------------------- softmax


def extreme_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    rows = [
        rng.standard_normal(n) * 1e3,                      # nearly one-hot
        rng.standard_normal(n) * 1e30,                     # huge magnitudes
        np.full(n, 3e38) * np.sign(rng.standard_normal(n)),  # +-3e38: differences overflow float32
        rng.standard_normal(n),
        rng.standard_normal(n) - 1e4,                      # every exp(x) alone would underflow
    ]
    masked = rng.standard_normal(n)
    masked[rng.random(n) < 0.4] = -np.inf                # attention-style masks
    masked[rng.integers(n)] = 0.5                        # but never the whole row
    rows.append(masked)
    lonely = np.full(n, -np.inf)
    lonely[n - 1] = 2.0                                  # the only finite entry is in the tail
    rows.append(lonely)
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("n", [1, 37, 1000])
def test_softmax_of_extreme_and_masked_rows(n, host, builder):
    template = get_template("softmax", "cpu")
    x = extreme_rows(n, np.random.default_rng(n))
    task = Task.make("softmax", {"M": x.shape[0], "N": n})
    configs = []
    for config in one_config_per_value(template, task, host, "passes"):
        configs.append(config)
        space = template.space(task, host)
        blocked = config_with(space, config, rows=max(space.knob("rows").values),
                              unroll=max(space.knob("unroll").values))
        if blocked is not None:
            configs.append(blocked)
    with np.errstate(invalid="ignore", over="ignore"):
        want = template.reference(task, {"X": x})["Y"]
    assert np.isfinite(want).all()
    for kernel in load_kernels(builder, host, [(task, c) for c in configs]):
        y = run(kernel, template, task, {"X": x})["Y"]
        assert np.isfinite(y).all(), kernel.source.entry
        assert check_output("Y", y, want, template.tolerance(task)) is None
        np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-5)
        assert (y[np.isneginf(x)] == 0).all()


@pytest.fixture(scope="module")
def cache_sized_host(host):
    """This CPU with a last-level cache of at most 32 MiB: some virtual machines report
    hundreds of MiB, which no test-sized working set outgrows."""
    return dataclasses.replace(host, l3_bytes=min(host.l3_bytes or 32 << 20, 32 << 20))


def test_softmax_store_exp_keeps_its_stores_cached(cache_sized_host):
    """store_exp reads Y back after writing it: streaming stores would only evict it."""
    template = get_template("softmax", "cpu")
    space = template.space(Task.make("softmax", {"M": 16384, "N": 512}), cache_sized_host)
    assert space.knob("stores").values == ("cached", "streaming")
    passes_streaming = {c["passes"] for c in space if c["stores"] == "streaming"}
    assert passes_streaming == {"online", "recompute"}


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("stats", ["two_pass", "float64"])
def test_layernorm_rows_whose_mean_dwarfs_their_spread(stats, host, builder):
    template = get_template("layernorm", "cpu")
    task = Task.make("layernorm", {"M": 6, "N": 4096})
    rng = np.random.default_rng(9)
    inputs = template.make_inputs(task, rng)
    inputs["X"] = (inputs["X"] + np.array([[3000.0], [-500.0], [0.0], [1e4], [0.0], [0.0]])).astype(np.float32)
    inputs["X"][4, 0] = 2e4   # an outlier channel, first in its row
    inputs["X"][5, ::97] = -3e3  # a few outlier channels
    space = template.space(task, host)
    config = config_with(space, template.default(task, host), stats=stats)
    (kernel,) = load_kernels(builder, host, [(task, config)])
    assert_matches(template, task, inputs, run(kernel, template, task, inputs), tol=2e-5)


@pytest.mark.parametrize("op", ["rmsnorm", "layernorm", "softmax"])
def test_long_rows_with_the_fewest_partial_sums(op, host, builder):
    """N = 11008 summed by one 4-lane accumulator per row: the least forgiving order."""
    template = get_template(op, "cpu")
    task = Task.make(op, {"M": 3, "N": 11008})
    space = template.space(task, host)
    narrow = [c for c in space if c["vec"] == 4 and c["unroll"] == 1 and c["threads"] == 1][:3]
    assert narrow
    inputs = template.make_inputs(task, np.random.default_rng(11))
    inputs["X"] = (inputs["X"] + 2.0).astype(np.float32)  # all same sign: errors add up
    for kernel in load_kernels(builder, host, [(task, c) for c in narrow]):
        assert_matches(template, task, inputs, run(kernel, template, task, inputs), tol=2e-5)


# ----------------------------------------------------------------------------- every knob value, smallest shapes


@pytest.fixture(scope="module")
def runner(fast_policy):
    with LocalRunner(policy=fast_policy, timeout_s=60) as r:
        yield r


@pytest.mark.parametrize("op", sorted(OP_KNOBS))
def test_every_operator_knob_value_verifies(op, host, builder, runner):
    template = get_template(op, "cpu")
    # N=60: not a whole number of vectors, and short enough to keep in AVX2's registers too
    shape = SHAPES.get(op, {"M": 5, "N": 60})
    task = Task.make(op, shape)
    configs = one_config_per_value(template, task, host, OP_KNOBS[op])
    assert len({c[OP_KNOBS[op]] for c in configs}) >= 2
    inputs = [MeasureInput(task, c, host) for c in configs]
    results = runner.run(inputs, builder.build(inputs))
    assert all(r.ok for r in results), [(str(i.config), r.message) for i, r in zip(inputs, results) if not r.ok]


@pytest.mark.parametrize("op, attrs", [(op, {}) for op in ROW_OPS + ["rope", "qk_norm"]]
                         + [("rmsnorm", {"residual": True}), ("qk_norm", {"span": "projection"})])
def test_every_config_of_the_smallest_shape_verifies(op, attrs, host, builder, runner):
    template = get_template(op, "cpu")
    shape = SMALLEST.get(op, {"M": 1, "N": 1})
    for dynamic in ((), (template.dims[0],)):
        task = Task.make(op, shape, attrs=attrs, dynamic=dynamic)
        configs = list(template.space(task, host))
        assert configs
        inputs = [MeasureInput(task, c, host) for c in configs]
        results = runner.run(inputs, builder.build(inputs))
        assert all(r.ok for r in results), [(str(i.config), r.message) for i, r in zip(inputs, results) if not r.ok]


STREAMING_CASES = [
    ("add", {"M": 2100, "N": 1001}, {}), ("swiglu", {"M": 2100, "N": 1001}, {}), ("gelu", {"M": 4200, "N": 1001}, {}),
    ("geglu", {"M": 2100, "N": 1001}, {}), ("bias_add", {"M": 2100, "N": 1001}, {}),
    ("softmax", {"M": 2100, "N": 1001}, {}), ("rmsnorm", {"M": 2100, "N": 1001}, {}),
    ("rmsnorm", {"M": 1100, "N": 1001}, {"residual": True}), ("layernorm", {"M": 2100, "N": 1001}, {}),
    ("rope", {"T": 520, "H": 32, "D": 130}, {}),
]


@pytest.mark.parametrize("op, shape, attrs", STREAMING_CASES, ids=lambda v: str(v))
def test_streaming_stores_verify_where_data_outgrows_the_caches(op, shape, attrs, cache_sized_host, builder, runner):
    host = cache_sized_host
    template = get_template(op, "cpu")
    task = Task.make(op, shape, attrs=attrs)
    assert task.min_bytes > host.l3_bytes / 2
    space = template.space(task, host)
    assert space.knob("stores").values == ("cached", "streaming")
    small = Task.make(op, {d: 8 for d in template.dims}, attrs=attrs)
    assert template.space(small, host).knob("stores").values == ("cached",)
    default = template.default(task, host)
    streaming = config_with(space, default, stores="streaming") or next(c for c in space if c["stores"] == "streaming")
    configs = [streaming, config_with(space, streaming, threads=max(space.knob("threads").values))]
    configs += [c for c in space.neighbors(configs[0]) if c["stores"] == "streaming"][:2]
    configs = [c for c in configs if c is not None]
    inputs = [MeasureInput(task, c, host) for c in configs]
    results = runner.run(inputs, builder.build(inputs))
    assert all(r.ok for r in results), [(str(i.config), r.message) for i, r in zip(inputs, results) if not r.ok]
    assert "nontemporal" in template.render(task, configs[0], host).code
