"""Operator definitions: signature, inputs, reference and baseline agree with each other."""
from __future__ import annotations

import numpy as np
import pytest

from search_space import Task, list_operators, op_definition
from search_space.ops.common import numpy_dtype, to_float64
from search_space.ops.matmul import dequantize_q4, quantize_q4

OPS = [o.op for o in list_operators() if type(o).__module__.startswith("search_space.ops")]
SMALL = {
    "gemm": {"M": 5, "N": 7, "K": 9}, "gemv": {"M": 2, "N": 7, "K": 9},
    "gemm_q4": {"M": 5, "N": 7, "K": 64}, "gemv_q4": {"M": 1, "N": 7, "K": 64},
    "attention_prefill": {"B": 2, "T": 5, "H": 4, "HKV": 2, "D": 8},
    "attention_decode": {"B": 2, "H": 4, "HKV": 2, "D": 8, "S": 9, "L": 6},
    "rope": {"T": 3, "H": 2, "D": 8},
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_signature_inputs_reference_and_baseline_agree(op, dtype):
    operator = op_definition(op)
    shape = SMALL.get(op, {"M": 3, "N": 10})
    attrs = {"group_size": 32} if op.endswith("_q4") else {}
    task = Task.make(op, shape, dtype, attrs)
    operator.check(task)
    sig = operator.signature(task)
    inputs = operator.make_inputs(task, np.random.default_rng(0))
    dims = task.dims
    assert [a.name for a in sig if a.role == "in"] == list(inputs)
    for arg in sig:
        if arg.role == "in":
            array = inputs[arg.name]
            assert array.shape == arg.resolve_shape(dims) and array.dtype == numpy_dtype(arg.dtype), arg
    reference = operator.reference(task, inputs)
    assert [a.name for a in sig if a.role == "out"] == list(reference)
    for arg in sig:
        if arg.role == "out":
            assert reference[arg.name].shape == arg.resolve_shape(dims)
            assert np.isfinite(reference[arg.name]).all()
    assert operator.flops(task) > 0 and operator.min_bytes(task) > 0
    _, baseline = operator.numpy_baseline(task, inputs)
    got = baseline()
    got = got if isinstance(got, (dict, tuple)) else {sig[-1].name: got}
    if isinstance(got, dict):
        first = next(iter(reference))
        np.testing.assert_allclose(np.asarray(got[first], dtype=np.float64), reference[first], rtol=2e-3, atol=2e-3)


def test_q4_roundtrip_and_packing_order():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((6, 64)).astype(np.float32)
    for zero_point in (False, True):
        q = quantize_q4(w, 32, zero_point)
        assert q["WQ"].shape == (6, 32) and q["WQ"].dtype == np.uint8
        back = dequantize_q4(q["WQ"], q["SCALES"], q.get("ZEROS"), 32)
        step = q["SCALES"].max()
        assert np.abs(back - w).max() <= step * 0.5 + 1e-6
    codes = np.arange(16, dtype=np.uint8).reshape(1, 16)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    out = dequantize_q4(packed, np.ones((1, 1)), np.zeros((1, 1)), 16)
    assert out.ravel().tolist() == list(range(16))  # low nibble first


def test_attention_matches_a_per_head_loop():
    op = op_definition("attention_prefill")
    task = Task.make("attention_prefill", {"B": 1, "T": 4, "H": 4, "HKV": 2, "D": 8})
    inputs = op.make_inputs(task, np.random.default_rng(2))
    out = op.reference(task, inputs)["O"]
    q, k, v = (to_float64(inputs[n], "float32") for n in "QKV")
    for h in range(4):
        kv = h // 2
        s = q[0, :, h] @ k[0, :, kv].T / np.sqrt(8)
        s[np.triu_indices(4, 1)] = -np.inf
        p = np.exp(s - s.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(out[0, :, h], p @ v[0, :, kv], rtol=1e-12)
    dec = op_definition("attention_decode")
    task = Task.make("attention_decode", {"B": 1, "H": 4, "HKV": 2, "D": 8, "S": 6, "L": 4})
    inputs = dec.make_inputs(task, np.random.default_rng(3))
    out = dec.reference(task, inputs)["O"]
    q, k, v = (to_float64(inputs[n], "float32") for n in "QKV")
    for h in range(4):
        s = k[0, h // 2, :4] @ q[0, h] / np.sqrt(8)
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, h], (p / p.sum()) @ v[0, h // 2, :4], rtol=1e-12)


def test_operator_checks_reject_bad_tasks():
    with pytest.raises(ValueError, match="multiple of HKV"):
        op_definition("attention_prefill").check(Task.make("attention_prefill", {"B": 1, "T": 2, "H": 3, "HKV": 2, "D": 4}))
    with pytest.raises(ValueError, match="exceeds"):
        op_definition("attention_decode").check(
            Task.make("attention_decode", {"B": 1, "H": 2, "HKV": 2, "D": 4, "S": 4, "L": 5}))
    with pytest.raises(ValueError, match="group_size"):
        op_definition("gemv_q4").check(Task.make("gemv_q4", {"M": 1, "N": 2, "K": 64}, attrs={"group_size": 48}))
    with pytest.raises(ValueError, match="no attributes"):
        op_definition("add").check(Task.make("add", {"M": 1, "N": 2}, attrs={"eps": 1.0}))
    with pytest.raises(ValueError, match="decode"):
        op_definition("gemv").check(Task.make("gemv", {"M": 17, "N": 2, "K": 2}))
