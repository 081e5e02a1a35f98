"""Weight-only bfloat16 and float16 gemm and gemv on the CPU (``weight=bfloat16`` or
``weight=float16`` on a float32 task: X and Y float32, W raw bfloat16 words or IEEE halves):
awkward shapes and every knob value against the float64 reference of the widened weights, and
exact results where float32 arithmetic is exact."""
from __future__ import annotations

from itertools import product

import numpy as np
import pytest

from measure.cpu_kernel import allocate_args, compile_and_load
from search_space import Task, get_template
from search_space.ops.common import bfloat16_to_float32, float32_to_bfloat16, from_float

from test_quant_templates import run_all, sampled_inputs  # noqa: E402  (same directory)

WEIGHTS = ("bfloat16", "float16")  # the weight-only storages of both templates


SHAPES = {
    "gemm": [{"M": 1, "N": 1, "K": 1}, {"M": 7, "N": 13, "K": 33}, {"M": 29, "N": 50, "K": 1100},
             {"M": 130, "N": 97, "K": 515}],
    "gemv": [{"M": 1, "N": 1, "K": 1}, {"M": 1, "N": 67, "K": 1027}, {"M": 5, "N": 13, "K": 1100},
             {"M": 16, "N": 70, "K": 300}],
}


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("op", ["gemm", "gemv"])
def test_weight_only_matches_reference_on_awkward_shapes(op, weight, host, machinery):
    """Verified by the runner: fresh inputs, NaN-poisoned outputs, the float32 tolerance."""
    template = get_template(op, "cpu")
    rng = np.random.default_rng(5)
    inputs = []
    for i, shape in enumerate(SHAPES[op]):
        inputs += sampled_inputs(template, Task.make(op, shape, "float32", {"weight": weight}), host, rng, i == 2)
    run_all(machinery, inputs)


def exact_inputs(shape: dict[str, int], rng: np.random.Generator,
                 weight: str = "bfloat16") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """X integers up to 400 (most not representable in bfloat16: a kernel that rounded X would
    be off) and W sixteenths (exact in bfloat16 and float16), stored as ``weight``: with K <= 600
    every product and partial sum is a multiple of 1/16 below 2^20, exact in float32, so any
    order of summation gives X @ W^T."""
    assert shape["K"] <= 600
    x = rng.integers(-400, 401, size=(shape["M"], shape["K"])).astype(np.float32)
    w = rng.integers(-64, 65, size=(shape["N"], shape["K"])).astype(np.float32) / 16
    return {"X": x, "W": from_float(w, weight)}, (x.astype(np.float64) @ w.astype(np.float64).T)


def path_configs(op: str, task: Task, host) -> list:
    """The default, and each way W reaches the arithmetic: for gemm packed (widened copy) or
    read in place, by the dot or the outer-product kernel, one K block or several; for gemv one
    K block or several, W prefetched ahead or not."""
    template = get_template(op, "cpu")
    space = template.space(task, host)
    base = template.default(task, host).as_dict()
    if op == "gemv":
        changes = [{}, {"kblock": 256, "vec": 8, "unroll": 1, "prefetch": 0}, {"mtile": 2, "rows": 2, "vec": 4},
                   {"prefetch": 2048, "unroll": 1}]
    else:
        changes = [{"kernel": kernel, "pack": pack, "kc": kc}
                   for kernel, pack in (("dot", 0), ("dot", 1), ("outer", 1)) for kc in (0, 256)]
    configs = []
    for change in changes:
        values = dict(base, **change)
        assert space.accepts(values), values
        configs.append(space.from_values(values))
    return configs


def run_paths(op: str, task: Task, inputs: dict[str, np.ndarray], host) -> list[tuple[object, np.ndarray]]:
    """(config, Y) of each of ``path_configs``, W an argument of the task's weight dtype."""
    template = get_template(op, "cpu")
    results = []
    for config in path_configs(op, task, host):
        source = template.render(task, config, host)
        assert [(a.name, a.dtype) for a in source.args if a.role != "workspace"] == \
            [("X", "float32"), ("W", task.attr["weight"]), ("Y", "float32")]
        kernel = compile_and_load(source, host)
        buffers = allocate_args(source, task.dims, inputs)
        kernel(buffers, task.dims)
        assert buffers["Y"].dtype == np.float32
        results.append((config, buffers["Y"]))
    return results


EXACT_SHAPES = [("gemm", {"M": 9, "N": 21, "K": 300}), ("gemv", {"M": 3, "N": 61, "K": 300})]


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("op, shape", EXACT_SHAPES)
def test_weight_only_computes_with_the_widened_weights_exactly(op, shape, weight, host):
    template = get_template(op, "cpu")
    task = Task.make(op, shape, "float32", {"weight": weight})
    inputs, exact = exact_inputs(shape, np.random.default_rng(2), weight)
    np.testing.assert_array_equal(template.reference(task, inputs)["Y"], exact)
    for config, y in run_paths(op, task, inputs, host):
        np.testing.assert_array_equal(y, exact.astype(np.float32), err_msg=str(config))


@pytest.mark.parametrize("op, shape", EXACT_SHAPES)
def test_weight_only_float16_computes_with_the_halves(op, shape, host):
    """W multiples of 1/1024 in (-2, 2): exact in float16, most not in bfloat16 (8 significant
    bits), and X integers up to 8: every product and partial sum is a multiple of 2^-10 below
    2^13, exact in float32. Every path gives X @ W^T exactly, far from X @ bfloat16(W)^T."""
    template = get_template(op, "cpu")
    task = Task.make(op, shape, "float32", {"weight": "float16"})
    rng = np.random.default_rng(3)
    x = rng.integers(-8, 9, size=(shape["M"], shape["K"])).astype(np.float32)
    w = rng.integers(-2047, 2048, size=(shape["N"], shape["K"])).astype(np.float32) / 1024
    halves = w.astype(np.float16)
    assert (halves.astype(np.float32) == w).all()
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    rounded = x.astype(np.float64) @ bfloat16_to_float32(float32_to_bfloat16(w)).astype(np.float64).T
    assert np.abs(rounded - exact).max() > 0.1
    np.testing.assert_array_equal(template.reference(task, {"X": x, "W": halves})["Y"], exact)
    for config, y in run_paths(op, task, {"X": x, "W": halves}, host):
        np.testing.assert_array_equal(y, exact.astype(np.float32), err_msg=str(config))


@pytest.mark.parametrize("weight", WEIGHTS)
@pytest.mark.parametrize("op", ["gemm", "gemv"])
def test_weight_only_has_the_float32_knobs_and_half_the_weight_bytes(op, weight, host):
    """The float32 knobs (gemv: and how far ahead W is prefetched)."""
    template = get_template(op, "cpu")
    shape = {"M": 1 if op == "gemv" else 64, "N": 4096, "K": 4096}
    full, half = Task.make(op, shape), Task.make(op, shape, "float32", {"weight": weight})
    extra = ["prefetch"] if op == "gemv" else []
    assert template.space(half, host).names == template.space(full, host).names + extra
    assert half.key.endswith(f'/weight="{weight}"') and half.key != full.key
    assert full.min_bytes - half.min_bytes == 2 * 4096 * 4096
    config = template.default(full, host)
    assert template.features(half, config, host)["bytes_moved"] < template.features(full, config, host)["bytes_moved"]
    space = template.space(half, host)
    default = template.default(half, host)
    code = template.render(half, default, host).code
    assert code != template.render(full, default, host).code
    for neighbor in space.neighbors(default):
        assert template.render(half, neighbor, host).code != code, str(neighbor)
    other = Task.make(op, shape, "float32", {"weight": next(w for w in WEIGHTS if w != weight)})
    assert template.render(other, default, host).code != code  # each storage is widened its own way


def test_weight_only_is_refused_where_it_means_nothing():
    gemv = get_template("gemv", "cpu")
    with pytest.raises(ValueError, match="on a float32 task"):
        gemv.check(Task.make("gemv", {"M": 1, "N": 8, "K": 8}, "bfloat16", {"weight": "bfloat16"}))
    with pytest.raises(ValueError, match="on a float32 task"):
        gemv.check(Task.make("gemv", {"M": 1, "N": 8, "K": 8}, "bfloat16", {"weight": "float16"}))
    with pytest.raises(ValueError, match="weight='uint8'"):
        gemv.check(Task.make("gemv", {"M": 1, "N": 8, "K": 8}, "float32", {"weight": "uint8"}))
    for op, weight in product(("gemv", "gemm"), WEIGHTS):  # the CUDA templates store W in the task's dtype only
        with pytest.raises(ValueError, match=f"cuda template takes no weight={weight}"):
            get_template(op, "cuda").check(Task.make(op, {"M": 1, "N": 8, "K": 8}, "float32", {"weight": weight}))
