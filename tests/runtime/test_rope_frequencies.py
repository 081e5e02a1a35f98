"""``runtime.rope_frequencies``' YaRN and longrope against transformers' own
``_compute_yarn_parameters`` and ``_compute_longrope_parameters`` (``ROPE_INIT_FUNCTIONS``,
float32 there, float64 here): the frequencies of every pair and the attention factor they
return, and the parameters refused."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from runtime.abi import canonical_attrs
from runtime.rope_frequencies import (PARAMETERS, SCALING_KEYS, frequencies_of_attrs, inverse_frequencies,
                                      longrope_attention_factor, rope_attrs, rope_problem, rotation_scale,
                                      rotation_scale_of, yarn_attention_factor)
from test_hf_configs import PHI35_LONG, PHI35_SHORT  # noqa: E402  (same directory)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

# name -> (head_dim, theta, rope_parameters as a config gives them, max_position_embeddings)
YARN_CASES = {
    # Qwen2.5 / Qwen3's long-context recipe: factor 4 over a pretrained 32768
    "qwen-128": (128, 1e6, {"factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    "qwen-64": (64, 1e6, {"factor": 4.0, "original_max_position_embeddings": 32768}, 131072),
    # OLMo 3's: every parameter given, the attention factor too
    "olmo3-128": (128, 5e5, {"factor": 8.0, "original_max_position_embeddings": 8192, "beta_fast": 32,
                             "beta_slow": 1, "attention_factor": 1.2079441541679836}, 65536),
    "olmo3-64": (64, 5e5, {"factor": 8.0, "original_max_position_embeddings": 8192, "beta_fast": 32,
                           "beta_slow": 1, "attention_factor": 1.2079441541679836}, 65536),
    # gpt-oss's: truncate false (the band's ends not rounded to whole pairs)
    "gpt-oss": (64, 150000.0, {"factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                               "beta_slow": 1.0, "truncate": False}, 131072),
    # DeepSeek's attention factor from mscale / mscale_all_dim, other betas
    "mscale": (64, 10000.0, {"factor": 40.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
                             "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0}, 163840),
    # mscale without mscale_all_dim: the attention factor from factor alone
    "mscale-alone": (32, 10000.0, {"factor": 2.0, "original_max_position_embeddings": 256, "mscale": 0.707},
                     512),
    # a short context: the blended band in the middle of a small head
    "short": (24, 10000.0, {"factor": 8.0, "original_max_position_embeddings": 2048}, 16384),
    # beta_fast = beta_slow untruncated: the band's ends equal, transformers' 0.001 apart
    "sharp": (16, 10000.0, {"factor": 2.0, "original_max_position_embeddings": 64, "beta_fast": 3.0,
                            "beta_slow": 3.0, "truncate": False}, 128),
    # a context so long that the band begins past the last pair (clamped: every pair interpolated)
    "clamped": (16, 10000.0, {"factor": 2.0, "original_max_position_embeddings": 10 ** 12}, 2 * 10 ** 12),
    # factor 1: the pretrained frequencies and attention factor 1
    "factor-1": (64, 10000.0, {"factor": 1.0, "original_max_position_embeddings": 4096}, 4096),
}


def _transformers_yarn(head_dim: int, theta: float, rope: dict, max_positions: int):
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4,
                                      head_dim=head_dim, max_position_embeddings=max_positions,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": theta, **rope})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    return inv_freq.double().numpy(), attention_factor


def _kernel_params(rope: dict, max_positions: int) -> dict:
    """The kernel parameters with transformers' defaults filled in, as the config parser does."""
    factor = rope.get("factor")
    return {"factor": float(factor if factor is not None
                            else max_positions / rope["original_max_position_embeddings"]),
            "original_max_position_embeddings": rope["original_max_position_embeddings"],
            "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1),
            "truncate": rope.get("truncate", True),
            "attention_factor": yarn_attention_factor(float(factor if factor is not None else
                                                            max_positions / rope["original_max_position_embeddings"]),
                                                      rope.get("attention_factor"), rope.get("mscale"),
                                                      rope.get("mscale_all_dim"))}


@pytest.mark.parametrize("name", list(YARN_CASES))
def test_yarn_frequencies_and_attention_factor_are_those_of_transformers(name):
    head_dim, theta, rope, max_positions = YARN_CASES[name]
    theirs, their_factor = _transformers_yarn(head_dim, theta, rope, max_positions)
    params = _kernel_params(rope, max_positions)
    ours = inverse_frequencies(head_dim, theta, "yarn", **params)
    assert ours.dtype == np.float64 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    # the kernel attributes name the same rotation
    attrs = rope_attrs(theta, "yarn", **params)
    np.testing.assert_array_equal(frequencies_of_attrs(head_dim, attrs), ours)
    ours_factor = yarn_attention_factor(params["factor"], rope.get("attention_factor"), rope.get("mscale"),
                                        rope.get("mscale_all_dim"))
    assert isinstance(ours_factor, float) and ours_factor == pytest.approx(their_factor, rel=1e-12)
    # the kernels scale cos and sin by it
    assert rotation_scale(attrs) == ours_factor == rotation_scale_of("yarn", params)


def test_yarn_bands_keep_the_fast_pairs_and_slow_the_slow_ones():
    """The short case's band (pairs 3 .. 8 of 12): pairs below it kept, above it divided by the
    factor, in it strictly between; the band's ends rounded out (truncate) or not."""
    params = _kernel_params(YARN_CASES["short"][2], 0)
    plain = inverse_frequencies(24, 10000.0)
    ratio = plain / inverse_frequencies(24, 10000.0, "yarn", **params)
    np.testing.assert_array_equal(ratio[:4], 1.0)
    np.testing.assert_allclose(ratio[8:], 8.0, rtol=1e-15)
    assert ((ratio[4:8] > 1.0) & (ratio[4:8] < 8.0)).all()
    untruncated = plain / inverse_frequencies(24, 10000.0, "yarn", **{**params, "truncate": False})
    assert not np.allclose(untruncated, ratio)


def test_yarn_attrs_are_flat_typed_values():
    attrs = rope_attrs(1e6, "yarn", factor=4, original_max_position_embeddings=32768, beta_fast=32, beta_slow=1,
                       truncate=True, attention_factor=1)
    assert attrs == {"theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": 1.0}
    assert [type(attrs[k]) for k in PARAMETERS["yarn"]] == [float, int, float, float, bool, float]
    assert set(PARAMETERS["yarn"]) <= set(SCALING_KEYS)
    assert all(set(keys) <= set(SCALING_KEYS) for keys in PARAMETERS.values())


YARN = {"factor": 4.0, "original_max_position_embeddings": 32768, "beta_fast": 32.0, "beta_slow": 1.0,
        "truncate": True, "attention_factor": 1.2079441541679836}


@pytest.mark.parametrize("params, message", [
    ({k: v for k, v in YARN.items() if k != "beta_fast"},
     "beta_fast is missing: rope type 'yarn' needs factor, original_max_position_embeddings, beta_fast, beta_slow, "
     "truncate, attention_factor"),
    ({k: v for k, v in YARN.items() if k != "truncate"}, "truncate is missing: rope type 'yarn' needs"),
    ({**YARN, "factor": 0.0}, "factor = 0.0 is not a positive number"),
    ({**YARN, "beta_fast": -32.0}, "beta_fast = -32.0 is not a positive number"),
    ({**YARN, "beta_slow": float("nan")}, "beta_slow = nan is not a positive number"),
    ({**YARN, "beta_slow": True}, "beta_slow = True is not a positive number"),
    ({**YARN, "original_max_position_embeddings": 4096.0}, "original_max_position_embeddings = 4096.0 is not a "
                                                           "positive integer"),
    ({**YARN, "truncate": 1}, "truncate = 1 is not a bool"),
    ({**YARN, "truncate": "false"}, "truncate = 'false' is not a bool"),
    ({**YARN, "beta_fast": 1.0, "beta_slow": 32.0}, "beta_fast = 1.0 is below beta_slow = 32.0"),
    ({k: v for k, v in YARN.items() if k != "attention_factor"}, "attention_factor is missing: rope type 'yarn'"),
    ({**YARN, "attention_factor": 0.0}, "attention_factor = 0.0 is not a positive number"),
    ({**YARN, "attention_factor": float("inf")}, "attention_factor = inf is not a positive number"),
    ({**YARN, "attention_factor": None}, "attention_factor is missing: rope type 'yarn'"),
    ({**YARN, "mscale": 1.0}, "mscale = 1.0 does not apply to rope type 'yarn'"),
    ({**YARN, "low_freq_factor": 1.0}, "low_freq_factor = 1.0 does not apply to rope type 'yarn'"),
])
def test_bad_yarn_parameters_are_refused(params, message):
    assert rope_problem("yarn", params).startswith(message), rope_problem("yarn", params)
    with pytest.raises(ValueError, match=f"^rope: {message[:20]}"):
        inverse_frequencies(64, 10000.0, "yarn", **params)
    with pytest.raises(ValueError, match=f"^rope: {message[:20]}"):
        rope_attrs(10000.0, "yarn", **params)


def test_yarn_takes_equal_betas_and_refuses_theta_one():
    assert rope_problem("yarn", {**YARN, "beta_fast": 2.0, "beta_slow": 2.0}) is None
    assert rope_problem("linear", {"factor": 2.0, "truncate": True}).startswith("truncate = True does not apply")
    with pytest.raises(ValueError, match="theta = 1.0 leaves yarn's correction range undefined"):
        inverse_frequencies(64, 1.0, "yarn", **YARN)


def test_yarn_attention_factor():
    assert yarn_attention_factor(4.0) == 0.1 * math.log(4.0) + 1.0
    assert yarn_attention_factor(1.0) == 1.0 and yarn_attention_factor(0.5) == 1.0  # no scaling below 1
    assert yarn_attention_factor(8.0, attention_factor=1.2079441541679836) == 1.2079441541679836
    assert yarn_attention_factor(8, attention_factor=1) == 1.0
    # both mscales set: their ratio; either missing or zero: factor alone
    assert yarn_attention_factor(40.0, mscale=1.0, mscale_all_dim=1.0) == 1.0
    assert yarn_attention_factor(40.0, mscale=0.707, mscale_all_dim=0) == yarn_attention_factor(40.0)
    assert yarn_attention_factor(40.0, mscale=0.707) == yarn_attention_factor(40.0)
    for call, message in [(lambda: yarn_attention_factor(0.0), "factor = 0.0 is not a positive number"),
                          (lambda: yarn_attention_factor(4.0, attention_factor=-1.0),
                           "attention_factor = -1.0 is not a positive number"),
                          (lambda: yarn_attention_factor(4.0, mscale="1", mscale_all_dim=1.0),
                           "mscale = '1' is not a number")]:
        with pytest.raises(ValueError, match=f"^rope: {message}"):
            call()


def test_the_rope_operator_takes_yarn_attributes():
    from search_space import Task, op_definition

    rope = op_definition("rope")
    attrs = rope_attrs(1e6, "yarn", **YARN)
    task = Task.make("rope", {"T": 2, "H": 1, "D": 64}, attrs=attrs)
    rope.check(task)
    assert task.key.endswith("truncate=true")
    for bad, message in [({**attrs, "truncate": 1}, "truncate = 1 is not a bool"),
                         ({**attrs, "beta_slow": 64.0}, "beta_fast = 32.0 is below beta_slow = 64.0"),
                         ({k: v for k, v in attrs.items() if k != "beta_slow"}, "beta_slow is missing")]:
        with pytest.raises(ValueError, match=message):
            rope.check(Task.make("rope", {"T": 2, "H": 1, "D": 64}, attrs=bad))


@pytest.mark.parametrize("name", ["olmo3-128", "qwen-64", "mscale", "factor-1"])
def test_the_yarn_rope_operator_rotates_as_transformers(name):
    """The whole rotation, attention factor included: the numpy rope operator (and the fused
    decode step's) with a yarn rope's kernel attributes against transformers' apply_rotary_pos_emb
    with the cos and sin its yarn rotary embedding returns (scaled by its attention_scaling)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    head_dim, theta, rope, max_positions = YARN_CASES[name]
    config = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4,
                                      head_dim=head_dim, max_position_embeddings=max_positions,
                                      rope_parameters={"rope_type": "yarn", "rope_theta": theta, **rope})
    attrs = rope_attrs(theta, "yarn", **_kernel_params(rope, max_positions))
    _check_rotation(LlamaRotaryEmbedding(config), apply_rotary_pos_emb, attrs, head_dim)


def _check_rotation(embedding, apply_rotary_pos_emb, attrs: dict, head_dim: int) -> None:
    """The numpy rope operator and rope_append with ``attrs`` rotate as transformers' rotary
    ``embedding`` and ``apply_rotary_pos_emb`` do, and without the attention factor they would not."""
    from search_space import Task, op_definition

    assert rotation_scale(attrs) == pytest.approx(embedding.attention_scaling, rel=1e-12)
    # small positions: transformers forms the angles in float32 (off by an ulp of the angle)
    positions = np.array([0, 1, 2, 5, 17, 40, 63], dtype=np.int32)
    heads = 3
    x = np.random.default_rng(7).standard_normal((len(positions), heads, head_dim)).astype(np.float32)
    q = torch.from_numpy(x).transpose(0, 1)[None]  # 1, heads, T, D
    cos, sin = embedding(q, torch.from_numpy(positions.astype(np.int64))[None])
    theirs, _ = apply_rotary_pos_emb(q, q, cos, sin)
    theirs = theirs[0].transpose(0, 1).double().numpy()  # T, heads, D
    task = Task.make("rope", {"T": len(positions), "H": heads, "D": head_dim}, attrs=attrs)
    ours = op_definition("rope").reference(task, {"X": x, "P": positions})["Y"]
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    if rotation_scale(attrs) != 1.0:  # and the factor is what made them agree
        unscaled = op_definition("rope").reference(
            Task.make("rope", task.dims, attrs={**attrs, "attention_factor": 1.0}), {"X": x, "P": positions})["Y"]
        assert np.abs(unscaled - theirs).max() > 1e-2
    # the fused decode step rotates its q and k rows alike (each token a sequence of one row)
    step = Task.make("rope_append", {"B": len(positions), "H": 2, "HKV": 1, "D": head_dim, "S": 64}, attrs=attrs)
    qkv = np.concatenate([x[:, :2], x[:, 2:], x[:, 2:]], axis=1)
    out = op_definition("rope_append").reference(step, {"QKV": qkv, "P": positions})
    np.testing.assert_allclose(out["Q"], theirs[:, :2], rtol=1e-5, atol=1e-5)
    for b, position in enumerate(positions):
        np.testing.assert_allclose(out["KC"][b, 0, position], theirs[b, 2], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- longrope

_SMALL_SHORT = [1.0, 1.25, 1.5, 2.0, 3.0, 4.5, 7.0, 11.0]
_SMALL_LONG = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]
# name -> (head_dim, theta, rope_parameters, max_position_embeddings, original_max_position_embeddings)
LONGROPE_CASES = {
    # Phi-3.5-mini's: the attention factor from 131072 / 4096 (transformers' default for Phi-3)
    "phi-3.5-mini": (96, 10000.0, {"short_factor": PHI35_SHORT, "long_factor": PHI35_LONG}, 131072, 4096),
    # the factor given, or the attention factor itself
    "factor": (96, 10000.0, {"short_factor": PHI35_SHORT, "long_factor": PHI35_LONG, "factor": 8.0}, 131072, 4096),
    "attention-factor": (96, 10000.0, {"short_factor": PHI35_SHORT, "long_factor": PHI35_LONG,
                                       "attention_factor": 1.3}, 131072, 4096),
    # no longer context than the original: attention factor 1
    "unscaled": (96, 10000.0, {"short_factor": PHI35_SHORT, "long_factor": PHI35_LONG}, 4096, 4096),
    "small": (16, 500000.0, {"short_factor": _SMALL_SHORT, "long_factor": _SMALL_LONG}, 256, 64),
}


def _phi3_config(name: str):
    head_dim, theta, rope, max_positions, original = LONGROPE_CASES[name]
    return transformers.Phi3Config(hidden_size=4 * head_dim, num_attention_heads=4, num_key_value_heads=4,
                                   max_position_embeddings=max_positions, original_max_position_embeddings=original,
                                   rope_parameters={"rope_type": "longrope", "rope_theta": theta,
                                                    **json.loads(json.dumps(rope))})  # a copy: it edits it


def _longrope_attrs(name: str) -> dict:
    """The kernel attributes of a case, the attention factor resolved as the config parser does."""
    head_dim, theta, rope, max_positions, original = LONGROPE_CASES[name]
    factor = rope.get("factor", max_positions / original)
    return rope_attrs(theta, "longrope", short_factor=rope["short_factor"],
                      attention_factor=longrope_attention_factor(factor, original, rope.get("attention_factor")))


@pytest.mark.parametrize("name", list(LONGROPE_CASES))
def test_longrope_frequencies_and_attention_factor_are_those_of_transformers(name):
    head_dim, theta, rope, max_positions, original = LONGROPE_CASES[name]
    config = _phi3_config(name)
    theirs, their_factor = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")  # no sequence yet: the short factors
    attrs = _longrope_attrs(name)
    ours = inverse_frequencies(head_dim, theta, "longrope", **{k: attrs[k] for k in PARAMETERS["longrope"]})
    assert ours.dtype == np.float64 and ours.shape == (head_dim // 2,)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)
    np.testing.assert_array_equal(frequencies_of_attrs(head_dim, attrs), ours)
    assert rotation_scale(attrs) == pytest.approx(their_factor, rel=1e-12)
    assert (rotation_scale(attrs) == 1.0) == (name == "unscaled")
    # past the original context transformers divides by the long factors instead: the frequencies
    # no kernel here computes (such sequences are refused)
    past, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu", seq_len=original + 1)
    np.testing.assert_allclose(ours * np.array(rope["short_factor"]) / np.array(rope["long_factor"]),
                               past.double().numpy(), rtol=1e-6)


@pytest.mark.parametrize("name", ["phi-3.5-mini", "small"])
def test_the_longrope_rope_operator_rotates_as_transformers(name):
    """As the yarn test above, with Phi-3's rotary embedding at positions within the original context."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    _check_rotation(Phi3RotaryEmbedding(_phi3_config(name)), apply_rotary_pos_emb, _longrope_attrs(name),
                    LONGROPE_CASES[name][0])


def test_longrope_attention_factor():
    assert longrope_attention_factor(32.0, 4096) == math.sqrt(1 + math.log(32) / math.log(4096))
    assert longrope_attention_factor(1.0, 4096) == 1.0 == longrope_attention_factor(0.5, 4096)  # none below 1
    assert longrope_attention_factor(32.0, 4096, attention_factor=1) == 1.0
    for call, message in [(lambda: longrope_attention_factor(0.0, 4096), "factor = 0.0 is not a positive number"),
                          (lambda: longrope_attention_factor(2.0, 4096, -1.0), "attention_factor = -1.0 is not"),
                          (lambda: longrope_attention_factor(2.0, 1), "original_max_position_embeddings = 1 leaves")]:
        with pytest.raises(ValueError, match=f"^rope: {message}"):
            call()


def test_longrope_attrs_hold_the_short_factors_as_a_tuple_that_round_trips_through_json():
    """A list-valued kernel attribute: a tuple of floats wherever it is hashed, a JSON list in
    records and manifests, equal (and of the same key) once read back."""
    from search_space import Task, op_definition

    attrs = rope_attrs(10000.0, "longrope", short_factor=[1, 2, 4, 8], attention_factor=1)
    assert attrs == {"theta": 10000.0, "rope_type": "longrope", "short_factor": (1.0, 2.0, 4.0, 8.0),
                     "attention_factor": 1.0}
    assert all(type(f) is float for f in attrs["short_factor"]) and set(PARAMETERS["longrope"]) <= set(SCALING_KEYS)
    task = Task.make("rope", {"T": 8, "H": 2, "D": 8}, attrs=attrs, dynamic=("T",))
    op_definition("rope").check(task)
    assert task.key == ("rope/float32/T~=8,H=2,D=8/attention_factor=1.0,rope_type=\"longrope\","
                        "short_factor=[1.0, 2.0, 4.0, 8.0]")
    again = Task.from_dict(json.loads(json.dumps(task.to_dict())))
    assert again == task and again.key == task.key and hash(again) == hash(task)
    # a list, a numpy array or numpy floats name the same kernel
    for factors in ([1.0, 2.0, 4.0, 8.0], np.array([1.0, 2.0, 4.0, 8.0]), tuple(np.float64(f) for f in (1, 2, 4, 8))):
        assert Task.make("rope", task.dims, attrs={**attrs, "short_factor": factors}, dynamic=("T",)) == task
    assert canonical_attrs("rope", {"short_factor": [np.float32(1.5)]}) == {"short_factor": (1.5,)}


def test_existing_rope_keys_are_unchanged():
    """Records tuned before longrope name their kernels as they did (no attribute renders otherwise)."""
    from search_space import Task

    yarn = rope_attrs(1e6, "yarn", **YARN)
    assert Task.make("rope", {"T": 8, "H": 4, "D": 64}, attrs=yarn, dynamic=("T",)).key == (
        "rope/float32/T~=8,H=4,D=64/attention_factor=1.2079441541679836,beta_fast=32.0,beta_slow=1.0,factor=4.0,"
        "original_max_position_embeddings=32768,rope_type=\"yarn\",theta=1000000.0,truncate=true")
    assert Task.make("rope", {"T": 8, "H": 4, "D": 64}, attrs={"theta": 10000.0}).key == "rope/float32/T=8,H=4,D=64"


LONGROPE = {"short_factor": (1.0, 2.0, 4.0, 8.0), "attention_factor": 1.2}


@pytest.mark.parametrize("params, message, op_message", [
    ({**LONGROPE, "short_factor": (1.0, 2.0)}, "short_factor has length 2; 8 rotary dims make 4 rotary pairs", None),
    ({**LONGROPE, "short_factor": ()}, "short_factor = () is not a list of positive numbers", None),
    ({**LONGROPE, "short_factor": (1.0, -2.0, 4.0, 8.0)}, "short_factor = (1.0, -2.0, 4.0, 8.0) is not a list", None),
    ({**LONGROPE, "short_factor": (1.0, True, 4.0, 8.0)}, "short_factor = (1.0, True, 4.0, 8.0) is not a list", None),
    ({**LONGROPE, "short_factor": 2.0}, "short_factor = 2.0 is not a list of positive numbers",
     "short_factor = 2.0 is not a list like []"),
    ({"attention_factor": 1.2}, "short_factor is missing: rope type 'longrope' needs short_factor, attention_factor",
     None),
    ({**LONGROPE, "attention_factor": 0.0}, "attention_factor = 0.0 is not a positive number", None),
    ({**LONGROPE, "long_factor": (1.0,) * 4}, "long_factor = (1.0, 1.0, 1.0, 1.0) does not apply to rope type",
     "has no attributes ['long_factor']"),
])
def test_bad_longrope_parameters_are_refused(params, message, op_message):
    from search_space import Task, op_definition

    assert rope_problem("longrope", params, 8).startswith(message), rope_problem("longrope", params, 8)
    with pytest.raises(ValueError, match=f"^rope: {re.escape(message)}"):
        inverse_frequencies(8, 10000.0, "longrope", **params)
    with pytest.raises(ValueError, match=re.escape(op_message or f"rope: {message}")):
        op_definition("rope").check(Task.make("rope", {"T": 2, "H": 1, "D": 8},
                                              attrs={"rope_type": "longrope", **params}))



def test_a_partial_rotary_rotates_as_phi4_mini_in_transformers():
    """Phi-4-mini's rope: partial_rotary_factor 0.75 of a head of 128 (96 dims turn, as 48 pairs
    (i, i + 48)), longrope with 48 short factors: the frequencies over the rotary dims and the
    rotation of the numpy operators (the last 32 dims passed through) are transformers' Phi-3's."""
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding, apply_rotary_pos_emb

    short = [1.0 + i / 16 for i in range(48)]
    config = transformers.Phi3Config(
        hidden_size=4 * 128, num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=131072,
        original_max_position_embeddings=4096, partial_rotary_factor=0.75,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                         "long_factor": [2.0 * f for f in short]})
    attrs = {**rope_attrs(10000.0, "longrope", short_factor=short,
                          attention_factor=longrope_attention_factor(131072 / 4096, 4096)), "rotary_dim": 96}
    theirs, _ = ROPE_INIT_FUNCTIONS["longrope"](config, "cpu")
    ours = frequencies_of_attrs(128, attrs)
    assert ours.shape == (48,)
    np.testing.assert_allclose(ours, theirs.double().numpy(), rtol=1e-6)
    _check_rotation(Phi3RotaryEmbedding(config), apply_rotary_pos_emb, attrs, 128)
