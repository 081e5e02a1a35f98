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
    "rope": {"T": 3, "H": 2, "D": 8}, "qk_norm": {"T": 3, "H": 4, "HKV": 2, "D": 8},
    "kv_append": {"B": 3, "HKV": 2, "D": 8, "S": 5},
    "rope_append": {"B": 3, "H": 4, "HKV": 2, "D": 8, "S": 5},
    "rope_append_attention": {"B": 3, "H": 4, "HKV": 2, "D": 8, "S": 9, "L": 6},
}
PARTIAL_OUTPUTS = ("kv_append", "rope_append", "rope_append_attention")  # their reference marks NaN what the kernel must leave untouched


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
            if op not in PARTIAL_OUTPUTS:
                assert np.isfinite(reference[arg.name]).all()
    assert operator.flops(task) >= 0 and operator.min_bytes(task) > 0
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
    with pytest.raises(ValueError, match="qk_norm: span = 'tensor'; use one of head, projection"):
        op_definition("qk_norm").check(Task.make("qk_norm", SMALL["qk_norm"], attrs={"span": "tensor"}))
    with pytest.raises(ValueError, match="span = 1 is not a str"):
        op_definition("qk_norm").check(Task.make("qk_norm", SMALL["qk_norm"], attrs={"span": 1}))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_qk_norm_by_projection_is_one_rms_row_per_projection(dtype):
    """span projection (OLMo 2): GQ of H D and GK of HKV D; each token's q projection normalised
    as one row, its k projection as another, v copied; the baseline agrees. span head is the
    default: the same key as a spec that leaves it out."""
    operator = op_definition("qk_norm")
    shape = {"T": 3, "H": 4, "HKV": 2, "D": 6}
    task = Task.make("qk_norm", shape, dtype, {"span": "projection"})
    operator.check(task)
    assert Task.make("qk_norm", shape, dtype, {"span": "head"}).key == Task.make("qk_norm", shape, dtype).key
    assert [a.resolve_shape(task.dims) for a in operator.signature(task)] == [(3, 8, 6), (24,), (12,), (3, 8, 6)]
    inputs = operator.make_inputs(task, np.random.default_rng(1))
    assert [inputs[n].shape for n in ("GQ", "GK")] == [(24,), (12,)]
    y = operator.reference(task, inputs)["Y"]
    x, gq, gk = (to_float64(inputs[n], dtype) for n in ("X", "GQ", "GK"))
    for t in range(3):
        q, k = x[t, :4].ravel(), x[t, 4:6].ravel()
        np.testing.assert_allclose(y[t, :4].ravel(), q / np.sqrt(np.mean(q * q) + 1e-6) * gq, rtol=1e-12)
        np.testing.assert_allclose(y[t, 4:6].ravel(), k / np.sqrt(np.mean(k * k) + 1e-6) * gk, rtol=1e-12)
    np.testing.assert_array_equal(y[:, 6:], x[:, 6:])
    _, baseline = operator.numpy_baseline(task, inputs)
    np.testing.assert_allclose(baseline()["Y"], y, rtol=2e-3, atol=2e-3)
    assert operator.min_bytes(task) == operator.min_bytes(Task.make("qk_norm", shape, dtype)) + (24 + 12 - 2 * 6) * (
        4 if dtype == "float32" else 2)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
YARN = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": True, "attention_factor": 1.2079441541679836}


@pytest.mark.parametrize("attrs, message", [
    ({"rope_type": "dynamic", "factor": 2.0},
     "rope_type = 'dynamic' is not implemented; supported: default, linear, llama3, yarn"),
    ({"factor": 2.0}, "factor = 2.0 does not apply to rope type 'default'"),
    ({"rope_type": "linear"}, "factor is missing: rope type 'linear' needs factor"),
    ({"rope_type": "linear", "factor": -1.0}, "factor = -1.0 is not a positive number"),
    ({"rope_type": "linear", "factor": 2.0, "low_freq_factor": 1.0}, "low_freq_factor = 1.0 does not apply"),
    ({**LLAMA3, "high_freq_factor": 0.5}, "low_freq_factor = 1.0 is not below high_freq_factor = 0.5"),
    ({**LLAMA3, "original_max_position_embeddings": 0}, "original_max_position_embeddings = 0 is not a positive"),
    ({"theta": 0.0}, "theta = 0.0 is not a positive number"),
    ({**YARN, "beta_fast": 0.5}, "beta_fast = 0.5 is below beta_slow = 1.0"),
    ({**YARN, "truncate": False, "beta_slow": -1.0}, "beta_slow = -1.0 is not a positive number"),
    ({k: v for k, v in YARN.items() if k != "truncate"}, "truncate is missing: rope type 'yarn' needs factor"),
    ({k: v for k, v in YARN.items() if k != "attention_factor"}, "attention_factor is missing: rope type 'yarn'"),
    ({**YARN, "attention_factor": -1.0}, "attention_factor = -1.0 is not a positive number"),
    ({"rotary_dim": 5}, "rotary_dim = 5 is not an even integer in 2 .. 8 (the head dim)"),
    ({"rotary_dim": 10}, "rotary_dim = 10 is not an even integer in 2 .. 8"),
    ({"rotary_dim": 4, "rope_type": "longrope", "short_factor": (1.0,) * 4, "attention_factor": 1.0},
     "short_factor has length 4; 4 rotary dims make 2 rotary pairs"),
])
def test_rope_attributes_outside_the_implemented_scalings_are_refused(attrs, message):
    with pytest.raises(ValueError) as caught:
        op_definition("rope").check(Task.make("rope", {"T": 2, "H": 1, "D": 8}, attrs=attrs))
    assert str(caught.value).startswith(f"rope: {message}"), caught.value


def test_scaled_rope_reference_turns_by_the_scaled_frequencies():
    """linear scaling is position interpolation: position p with factor s turns as p / s does;
    llama3 leaves the fastest pair alone and slows the slowest by the whole factor."""
    rope = op_definition("rope")
    x = np.random.default_rng(4).standard_normal((1, 1, 32))
    plain = Task.make("rope", {"T": 1, "H": 1, "D": 32}, "float32", {"theta": 10000.0})
    linear = Task.make("rope", {"T": 1, "H": 1, "D": 32}, "float32", {"theta": 10000.0, "rope_type": "linear",
                                                                      "factor": 4.0})
    np.testing.assert_allclose(rope.reference(linear, {"X": x, "P": np.array([40], np.int32)})["Y"],
                               rope.reference(plain, {"X": x, "P": np.array([10], np.int32)})["Y"], rtol=1e-12)
    llama3 = Task.make("rope", {"T": 1, "H": 1, "D": 32}, "float32", {"theta": 10000.0, **LLAMA3})
    position = np.array([1000], np.int32)
    plain_y = rope.reference(plain, {"X": x, "P": position})["Y"]
    scaled_y = rope.reference(llama3, {"X": x, "P": position})["Y"]
    np.testing.assert_array_equal(scaled_y[..., [0, 16]], plain_y[..., [0, 16]])  # pair 0: f = 1, kept
    slowest = rope.reference(plain, {"X": x, "P": position / 8.0})["Y"]  # pair 15 at the full factor
    np.testing.assert_allclose(scaled_y[..., [15, 31]], slowest[..., [15, 31]], rtol=1e-9)
    assert not np.allclose(scaled_y, plain_y)



def test_kv_append_writes_only_each_sequences_row():
    task = Task.make("kv_append", {"B": 3, "HKV": 2, "D": 4, "S": 6}, "float32")
    operator = op_definition("kv_append")
    inputs = operator.make_inputs(task, np.random.default_rng(0))
    inputs["P"] = np.array([0, 5, 6], dtype=np.int32)  # the last is past the cache: nothing written
    out = operator.reference(task, inputs)
    written = ~np.isnan(out["KC"])
    assert written[0, :, 0].all() and written[1, :, 5].all() and written.sum() == 2 * 2 * 4
    np.testing.assert_array_equal(out["VC"][1, :, 5], inputs["V"][1])


def test_rope_append_is_rope_of_q_and_k_then_kv_append():
    attrs = {"theta": 500000.0}
    fused = Task.make("rope_append", {"B": 2, "H": 4, "HKV": 2, "D": 8, "S": 6}, "float32", attrs)
    inputs = op_definition("rope_append").make_inputs(fused, np.random.default_rng(0))
    inputs["P"] = np.array([5, 6], dtype=np.int32)  # the second is past the cache: no row written
    out = op_definition("rope_append").reference(fused, inputs)
    qkv, positions = inputs["QKV"], inputs["P"]
    rope = op_definition("rope")
    rotated = rope.reference(Task.make("rope", {"T": 2, "H": 6, "D": 8}, "float32", attrs),
                             {"X": qkv[:, :6], "P": positions})["Y"]
    np.testing.assert_array_equal(out["Q"], rotated[:, :4])
    append = op_definition("kv_append").reference(Task.make("kv_append", {"B": 2, "HKV": 2, "D": 8, "S": 6}),
                                                  {"K": rotated[:, 4:], "V": qkv[:, 6:], "P": positions})
    np.testing.assert_array_equal(out["KC"], append["KC"])
    np.testing.assert_array_equal(out["VC"], append["VC"])


def test_rope_append_attention_is_rope_append_then_attention_over_the_written_cache():
    attrs = {"theta": 500000.0, "scale": 0.3}
    shape = {"B": 3, "H": 4, "HKV": 2, "D": 8, "S": 6, "L": 5}
    fused = op_definition("rope_append_attention")
    task = Task.make("rope_append_attention", shape, "float32", attrs)
    inputs = fused.make_inputs(task, np.random.default_rng(0))
    assert inputs["P"].tolist() == [4, 3, 6]  # ragged, the last past the cache
    out = fused.reference(task, inputs)
    rope_attrs = {"theta": 500000.0}
    append = op_definition("rope_append").reference(
        Task.make("rope_append", {"B": 3, "H": 4, "HKV": 2, "D": 8, "S": 6}, "float32", rope_attrs),
        {"QKV": inputs["QKV"], "P": inputs["P"]})
    np.testing.assert_array_equal(out["KC"], append["KC"])
    np.testing.assert_array_equal(out["VC"], append["VC"])
    # the caches after the append: the rows before each position, then the new one
    k, v = inputs["K"].astype(np.float64), inputs["V"].astype(np.float64)
    written = ~np.isnan(append["KC"])
    k[written], v[written] = append["KC"][written], append["VC"][written]
    lens = np.minimum(inputs["P"] + 1, 6).astype(np.int32)
    attend = op_definition("attention_decode").reference(
        Task.make("attention_decode", {"B": 3, "H": 4, "HKV": 2, "D": 8, "S": 6, "L": 6}, "float32",
                  {"scale": 0.3, "lengths": "per_sequence"}), {"Q": append["Q"], "K": k, "V": v, "LENS": lens})
    np.testing.assert_allclose(out["O"][:2], attend["O"][:2], rtol=1e-12)
    assert np.isfinite(out["O"]).all()  # the last: all 6 cached rows and its own, none written


def test_argmax_takes_the_first_of_equal_maxima():
    task = Task.make("argmax", {"M": 2, "N": 6}, "float16")
    x = np.array([[0, 3, 1, 3, 2, 3], [-np.inf] * 6], dtype=np.float16)
    assert op_definition("argmax").reference(task, {"X": x})["Y"].tolist() == [1, 0]
