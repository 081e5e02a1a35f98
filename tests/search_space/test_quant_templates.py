"""The int4 weight-only CPU templates (gemv_q4, gemm_q4) against the float64 reference:
every group size, with and without zero points, one X row and sixteen, K of one group."""
from __future__ import annotations

from itertools import product

import numpy as np
import pytest

from measure import MeasureInput
from measure.cpu_kernel import allocate_args, compile_and_load
from search_space import Task, get_template
from search_space.ops.matmul import dequantize_q4, quantize_q4


def every_knob_value(space, default) -> list:
    """The default plus configs that between them give each knob every value it has: each
    changes as many knobs from the default as the space accepts together, not one (that
    compiled the other knobs' default code again for every value), and a value the space
    rejects on the default comes in a sampled valid config. Every code path a knob selects
    gets compiled and run once, in about as many configs as the largest knob has values."""
    configs = [default]
    base = default.as_dict()
    pool = space.sample(np.random.default_rng(0), 300)
    wanted = [(knob.name, value) for knob in space.knobs for value in knob.values if value != base[knob.name]]
    alone = [(name, value) for name, value in wanted if not space.accepts(dict(base, **{name: value}))]
    for name, value in alone:
        configs += [c for c in pool if c[name] == value][:1]
    todo = [pair for pair in wanted if pair not in alone]
    while todo:  # the first pair left always fits the default: each round takes at least it
        values = dict(base)
        for name, value in todo:
            if values[name] == base[name] and space.accepts(dict(values, **{name: value})):
                values[name] = value
        configs.append(space.from_values(values))
        todo = [(name, value) for name, value in todo if values[name] != value]
    return configs


def sampled_inputs(template, task, host, rng, exhaustive: bool, n_sampled: int = 2) -> list:
    """MeasureInputs of ``task``: every knob value (``every_knob_value``), or the default and
    ``n_sampled`` sampled configs."""
    space, default = template.space(task, host), template.default(task, host)
    configs = every_knob_value(space, default) if exhaustive else [default] + space.sample(rng, n_sampled)
    return [MeasureInput(task, c, host) for c in configs]


def run_all(machinery, inputs):
    builder, runner = machinery
    results = runner.run(inputs, builder.build(inputs))
    failures = [(i.task.key, str(i.config), r.error.name, r.message) for i, r in zip(inputs, results) if not r.ok]
    assert not failures, failures
    return results


@pytest.mark.parametrize("op", ["gemv_q4", "gemm_q4"])
@pytest.mark.parametrize("zero_point", [False, True])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_q4_matches_reference(op, group, zero_point, host, machinery):
    template = get_template(op, "cpu")
    attrs = {"group_size": group, "zero_point": zero_point}
    rng = np.random.default_rng(group + zero_point)
    inputs = []
    # M = 1 and 16, K of a single group, N not a multiple of any row block
    for shape, exhaustive in (({"M": 1, "N": 19, "K": group}, True),
                              ({"M": 16, "N": 37, "K": group}, False),
                              ({"M": 16 if op == "gemv_q4" else 45, "N": 70, "K": 3 * group}, False)):
        inputs += sampled_inputs(template, Task.make(op, shape, attrs=attrs), host, rng, exhaustive)
    run_all(machinery, inputs)


def test_q4_knobs_reach_every_code_path(host, machinery):
    """On a shape with several groups and K blocks, every knob value of both templates."""
    inputs = []
    # gemm_q4's int16 path too (with and without zero points), where the host has AVX2
    for op, shape, zero_point in (("gemv_q4", {"M": 5, "N": 301, "K": 2048}, True),
                                  ("gemm_q4", {"M": 21, "N": 50, "K": 1280}, True),
                                  ("gemm_q4", {"M": 21, "N": 50, "K": 1280}, False)):
        template = get_template(op, "cpu")
        task = Task.make(op, shape, attrs={"group_size": 64, "zero_point": zero_point})
        space = template.space(task, host)
        inputs += [MeasureInput(task, c, host) for c in every_knob_value(space, template.default(task, host))]
    run_all(machinery, inputs)


def test_gemv_q4_streams_cover_every_row_once(host, machinery):
    """Runs walked side by side: row blocks that the streams do not divide, a partial last
    row block, one and two threads, one X row and several (each config verified against
    the float64 reference by the runner, NaN-poisoned Y included)."""
    template = get_template("gemv_q4", "cpu")
    inputs = []
    for i, shape in enumerate(({"M": 1, "N": 37, "K": 256}, {"M": 3, "N": 70, "K": 256})):
        task = Task.make("gemv_q4", shape, attrs={"group_size": 32, "zero_point": False})
        space = template.space(task, host)
        for j, (streams, rows) in enumerate(product((2, 4), (1, 2, 4))):
            threads = 1 + (i + j) % 2  # each (streams, rows, threads) once over the two shapes
            values = dict(template.default(task, host).as_dict(), streams=streams, rows=rows, threads=threads)
            if not space.accepts(values):  # 16 vector registers (AVX2) hold 4 rows of one X row only
                values["mtile"] = 1
            assert space.accepts(values), values
            inputs.append(MeasureInput(task, space.from_values(values), host))
    run_all(machinery, inputs)


@pytest.mark.parametrize("op", ["gemv_q4", "gemm_q4"])
def test_q4_knobs_change_the_generated_code(op, host):
    template = get_template(op, "cpu")
    task = Task.make(op, {"M": 4, "N": 512, "K": 4096}, attrs={"group_size": 64, "zero_point": True})
    space = template.space(task, host)
    default = template.default(task, host)
    base = template.render(task, default, host).code
    for neighbor in space.neighbors(default):
        assert template.render(task, neighbor, host).code != base, str(neighbor)


def test_q4_rejects_k_that_is_not_whole_groups(host):
    with pytest.raises(ValueError, match="multiple of group_size"):
        get_template("gemv_q4", "cpu").space(Task.make("gemv_q4", {"M": 1, "N": 8, "K": 96},
                                                       attrs={"group_size": 64}), host)


def test_quantize_round_trip_is_within_half_a_step():
    """The packing contract the kernels read: low nibble = even k, codes centred at 8."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    for zero_point in (False, True):
        q = quantize_q4(w, 32, zero_point)
        back = dequantize_q4(q["WQ"], q["SCALES"], q.get("ZEROS"), 32)
        step = np.repeat(q["SCALES"], 32, axis=1)
        assert np.all(np.abs(back - w) <= 0.5 * step + 1e-6)
    q = quantize_q4(np.array([[0.0, 7.0] * 16], dtype=np.float32), 32, False)
    assert q["WQ"][0, 0] == 8 | (15 << 4)  # k=0 -> code 8 (low nibble), k=1 -> code 15 (high)


@pytest.mark.parametrize("op, group, zero_point", [("gemv_q4", 128, False), ("gemv_q4", 128, True),
                                                   ("gemv_q4", 32, False), ("gemv_q4", 32, True),
                                                   ("gemm_q4", 128, False), ("gemm_q4", 32, False),
                                                   ("gemm_q4", 128, True), ("gemm_q4", 32, True)])
def test_q4_int16_activations_stay_within_float32_tolerance_with_outliers(op, group, zero_point, host):
    """The VNNI paths round X to int16 per (row, group); LLM activations have a few channels
    far larger than the rest, which coarsens the rounding of their whole group. Even so the
    result stays within the float32 tolerance of the reference."""
    template = get_template(op, "cpu")
    # group 32: two groups share each 64-k block of gemv_q4's 16-lane int16 path
    shape = {"M": 4, "N": 256, "K": 2048} if op == "gemv_q4" else {"M": 21, "N": 96, "K": 2048}
    task = Task.make(op, shape, attrs={"group_size": group, "zero_point": zero_point})
    space = template.space(task, host)
    if "compute" not in space.names:
        pytest.skip(f"{op} offers no int16 path on this host")  # (both need AVX2)
    rng = np.random.default_rng(5)
    inputs = template.make_inputs(task, rng)
    inputs["X"][:, rng.choice(2048, 12, replace=False)] *= 50.0
    want = template.reference(task, inputs)["Y"]
    errors = {}
    for compute in ("f32", "i16"):
        values = dict(template.default(task, host).as_dict(), compute=compute, vec=space.knob("vec").values[-1])
        assert space.accepts(values)
        source = template.render(task, space.from_values(values), host)
        buffers = allocate_args(source, task.dims, inputs)
        compile_and_load(source, host)(buffers, task.dims)
        errors[compute] = np.linalg.norm(buffers["Y"] - want) / np.linalg.norm(want)
    assert errors["f32"] < 1e-5
    assert errors["i16"] < template.tolerance(task), errors


@pytest.mark.parametrize("op", ["gemv_q4", "gemm_q4"])
def test_q4_zero_points_at_the_ends_of_their_range(op, host):
    """Zero points 0 and 16 (a GPTQ checkpoint's zero 0, stored minus one, reads back as 16):
    code - z spans -16..15, which every path, the int16 ones included, computes exactly."""
    template = get_template(op, "cpu")
    shape = {"M": 3, "N": 40, "K": 512} if op == "gemv_q4" else {"M": 21, "N": 40, "K": 512}
    task = Task.make(op, shape, attrs={"group_size": 32, "zero_point": True})
    rng = np.random.default_rng(9)
    inputs = template.make_inputs(task, rng)
    inputs["ZEROS"] = rng.choice(np.array([0.0, 16.0, 8.0], np.float32), inputs["ZEROS"].shape)
    want = template.reference(task, inputs)["Y"]
    space = template.space(task, host)
    for compute in space.knob("compute").values if "compute" in space.names else ("f32",):
        values = dict(template.default(task, host).as_dict(), **({"compute": compute} if "compute" in space.names
                                                                 else {}))
        source = template.render(task, space.from_values(values), host)
        buffers = allocate_args(source, task.dims, inputs)
        compile_and_load(source, host)(buffers, task.dims)
        error = np.linalg.norm(buffers["Y"] - want) / np.linalg.norm(want)
        assert error < template.tolerance(task), (compute, error)


# int16 dot products on other CPUs than the host: (LLVM CPU, features, the instruction's intrinsic)
INT16_TARGETS = {
    "avx2": ("haswell", "", "pmadd.wd"),
    "avxvnni": ("alderlake", ",+avxvnni", "vpdpwssd.256"),
    "avx512vnni": ("icelake-server", ",+avx512f,+avx512bw,+avx512vl,+avx512vnni", "vpdpwssd.512"),
}


@pytest.mark.parametrize("kind", list(INT16_TARGETS))
def test_q4_int16_kernels_build_for_each_kind_of_x86(kind, host):
    """Whichever machine runs the suite, the int16 paths (gemm_q4, gemv_q4) are built for the
    three kinds of x86 that have them, each with its instruction; the AVX2 build (vpmaddwd and
    an add, which any x86 CPU this project runs on has) also runs here against the float64
    reference."""
    from search_space import Target

    arch, extra, intrinsic = INT16_TARGETS[kind]
    features = "+64bit,+sse4.2,+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+lzcnt,+movbe" + extra
    target = Target.from_dict(dict(host.to_dict(), arch=arch, features=features,
                                   vector_bits=512 if "avx512f" in extra else 256))
    template = get_template("gemm_q4", "cpu")
    task = Task.make("gemm_q4", {"M": 45, "N": 70, "K": 1280}, attrs={"group_size": 32, "zero_point": False},
                     dynamic=["M"])
    space = template.space(task, target)
    default = template.default(task, target)
    assert default["compute"] == "i16"
    lanes = 16 if "avx512f" in extra else 8
    for values in ({}, {"order": "nkm", "mr": 3, "nr": 2, "kc": 256, "unroll": 4, "vec": 8}):
        config = space.from_values(dict(default.as_dict(), **values))
        assert space.is_valid(config), space.violations(config)
        source = template.render(task, config, target)
        want = intrinsic if config["vec"] == lanes or kind == "avx2" else "vpdpwssd.256"
        assert want in source.code
        build_and_check(template, task, source, target, run=kind == "avx2")  # the host has AVX2
    zero_point = Task.make("gemm_q4", {"M": 45, "N": 70, "K": 1280}, attrs={"group_size": 32, "zero_point": True},
                           dynamic=["M"])
    config = template.default(zero_point, target)
    assert config["compute"] == "i16"  # codes minus each group's zero point, as int16
    build_and_check(template, zero_point, template.render(zero_point, config, target), target, run=kind == "avx2")
    # the decode GEMV's int16 path, on the same instruction
    gemv = get_template("gemv_q4", "cpu")
    task = Task.make("gemv_q4", {"M": 3, "N": 70, "K": 1280}, attrs={"group_size": 32, "zero_point": False})
    config = gemv.default(task, target)
    assert config["compute"] == "i16" and config["vec"] == lanes
    source = gemv.render(task, config, target)
    assert intrinsic in source.code
    build_and_check(gemv, task, source, target, run=kind == "avx2")


def build_and_check(template, task, source, target, run: bool) -> None:
    """Compile ``source`` for ``target``; with ``run``, also run it here against the float64
    reference."""
    from measure.compile_llvm import compile_to_object

    if not run:
        assert len(compile_to_object(source.code, target)) > 0
        return
    inputs = template.make_inputs(task, np.random.default_rng(1))
    buffers = allocate_args(source, task.dims, inputs)
    compile_and_load(source, target)(buffers, task.dims)
    want = template.reference(task, inputs)["Y"]
    assert np.linalg.norm(buffers["Y"] - want) / np.linalg.norm(want) < template.tolerance(task)
