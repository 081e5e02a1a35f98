"""bfloat16 gemm and gemv on the CPU: awkward shapes against the float64 reference, and Y
rounded to bfloat16 exactly as ``float32_to_bfloat16`` does (nearest, ties to even)."""
from __future__ import annotations

import numpy as np
import pytest

from measure.cpu_kernel import allocate_args, compile_and_load
from search_space import Task, get_template
from search_space.ops.common import bfloat16_to_float32, float32_to_bfloat16

from test_quant_templates import run_all, sampled_inputs  # noqa: E402  (same directory)


SHAPES = {
    "gemm": [{"M": 1, "N": 1, "K": 1}, {"M": 7, "N": 13, "K": 33}, {"M": 29, "N": 50, "K": 1100},
             {"M": 130, "N": 97, "K": 515}],
    "gemv": [{"M": 1, "N": 1, "K": 1}, {"M": 1, "N": 67, "K": 1027}, {"M": 5, "N": 13, "K": 31},
             {"M": 16, "N": 70, "K": 300}],
}


@pytest.mark.parametrize("op", ["gemm", "gemv"])
def test_bf16_matches_reference_on_awkward_shapes(op, host, machinery):
    template = get_template(op, "cpu")
    rng = np.random.default_rng(3)
    inputs = []
    for i, shape in enumerate(SHAPES[op]):
        inputs += sampled_inputs(template, Task.make(op, shape, "bfloat16"), host, rng, i == 2, n_sampled=3)
    run_all(machinery, inputs)


def exact_inputs(shape: dict[str, int], rng: np.random.Generator) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Small integers (X) and sixteenths (W): every product and partial sum is exact in
    float32, so the float32 result is known exactly and only its rounding to bfloat16 is
    left to check."""
    x = rng.integers(-64, 65, size=(shape["M"], shape["K"])).astype(np.float32)
    w = rng.integers(-64, 65, size=(shape["N"], shape["K"])).astype(np.float32) / 16
    y = (x.astype(np.float64) @ w.astype(np.float64).T).astype(np.float32)
    return {"X": float32_to_bfloat16(x), "W": float32_to_bfloat16(w)}, y


def rounding_configs(op: str, task: Task, host) -> list:
    """Configs covering each dot mode and, for gemm, Y rounded directly (one K block) and
    from the float32 copy (several K blocks)."""
    template = get_template(op, "cpu")
    space = template.space(task, host)
    base = template.default(task, host).as_dict()
    configs = []
    for dot in space.knob("dot").values:
        for kc in ((0, 256) if op == "gemm" else (None,)):
            values = dict(base, dot=dot) if kc is None else dict(base, dot=dot, kc=kc)
            assert space.accepts(values), values
            configs.append(space.from_values(values))
    return configs


@pytest.mark.parametrize("op, shape", [("gemm", {"M": 9, "N": 21, "K": 300}), ("gemv", {"M": 4, "N": 61, "K": 300})])
def test_bf16_output_is_rounded_to_nearest_even(op, shape, host):
    template = get_template(op, "cpu")
    task = Task.make(op, shape, "bfloat16")
    inputs, exact = exact_inputs(shape, np.random.default_rng(1))
    want = float32_to_bfloat16(exact)
    truncated = (exact.view(np.uint32) >> 16).astype(np.uint16)
    bits = exact.view(np.uint32)
    ties = (bits & 0xFFFF) == 0x8000
    # the data tells the rounding modes apart: truncation fails on many outputs, and ties
    # round down (even below) and up (odd below), so ties away from zero or up would fail
    assert (want != truncated).sum() > 20
    assert (ties & (truncated % 2 == 0)).any() and (ties & (truncated % 2 == 1)).any()
    for config in rounding_configs(op, task, host):
        source = template.render(task, config, host)
        kernel = compile_and_load(source, host)
        buffers = allocate_args(source, task.dims, inputs)
        kernel(buffers, task.dims)
        got = buffers["Y"]
        assert got.dtype == np.uint16
        mismatch = np.flatnonzero(got.reshape(-1) != want.reshape(-1))
        assert mismatch.size == 0, (str(config), mismatch[:5], bfloat16_to_float32(got.reshape(-1)[mismatch[:5]]),
                                    exact.reshape(-1)[mismatch[:5]])


@pytest.mark.parametrize("op", ["gemm", "gemv"])
def test_bf16_knobs_change_the_generated_code(op, host):
    template = get_template(op, "cpu")
    task = Task.make(op, template.example_shape, "bfloat16")
    space = template.space(task, host)
    default = template.default(task, host)
    base = template.render(task, default, host).code
    for neighbor in space.neighbors(default):
        assert template.render(task, neighbor, host).code != base, str(neighbor)


def test_bf16_dot_product_is_offered_only_with_avx512bf16(host):
    space = get_template("gemv", "cpu").space(Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "bfloat16"), host)
    assert ("bf16" in space.knob("dot").values) == host.has_feature("avx512bf16")
