"""A bfloat16 or float16 model on CPU kernels: weight-only (16-bit linear weights, float32
arithmetic).

Its reference is the float32 numpy model on the same rounded weights (``ModelWeights.rounded``),
so the two differ only by float32 arithmetic: logits within ``TOLERANCE`` of the largest
logit, and the same greedy tokens (over 32 steps for the tiny preset)."""
from __future__ import annotations

import dataclasses
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from autotune.model_tasks import weight_bytes
from runtime.llama import LlamaModel
from runtime.model_config import PRESETS, load_model_config
from runtime.plan import decode_calls, precisions, prefill_calls
from runtime.precision import Bfloat16Words, float32_to_bfloat16, widened
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights, device_linear_names
from test_llama import relative_error  # noqa: E402  (same directory)

TINY = PRESETS["tiny"]
LLAMA_100M = str(Path(__file__).resolve().parents[2] / "benchmarks/models/llama-100m/config.json")
TOLERANCE = 1e-5  # |logit difference| / max |logit|: float32 arithmetic only (seen: below 1e-6)
LINEAR_OPS = ("gemv", "gemm")
WEIGHT_ONLY = ("bfloat16", "float16")
STORED = {"bfloat16": np.uint16, "float16": np.float16}  # how the kernels' W arrays hold the words


def generate_both(config, weights, kernels, prompts, steps: int = 32, dtype: str = "bfloat16"):
    model = LlamaModel(config, weights, kernels, dtype=dtype)
    ours = model.generate(prompts, steps)
    reference = ReferenceModel(config, weights.rounded(dtype)).generate(prompts, steps)
    return model, ours, reference


def assert_weight_only(model: LlamaModel, dtype: str = "bfloat16") -> None:
    """Linear layers are float32 kernels reading ``dtype`` W; every other kernel is float32."""
    specs = [k.spec for k in model.used.values()]
    assert {s.dtype for s in specs} == {"float32"}
    assert {s.attr.get("weight") for s in specs if s.op in LINEAR_OPS} == {dtype}
    assert all("weight" not in s.attr for s in specs if s.op not in LINEAR_OPS)
    for name in device_linear_names(model.config):
        assert model._weight(name, linear=True).dtype == STORED[dtype], name


@pytest.mark.parametrize("dtype", WEIGHT_ONLY)
def test_tiny_in_16_bits_matches_the_reference_on_rounded_weights(dtype, default_kernels):
    weights = ModelWeights.random(TINY, seed=3)
    prompts = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 9))
    model, ours, reference = generate_both(TINY, weights, default_kernels, prompts, dtype=dtype)
    assert_weight_only(model, dtype)
    assert ours.logits.dtype == np.float32 and ours.logits.shape == (2, 32, TINY.vocab_size)
    assert relative_error(ours.logits, reference.logits) < TOLERANCE
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    # the rounding really happened: against the unrounded float32 model the logits move 100x more
    # (30x for float16, whose 11-bit significands round 8x finer than bfloat16's 8)
    unrounded = ReferenceModel(TINY, weights).generate(prompts, 32)
    assert relative_error(ours.logits, unrounded.logits) > (100 if dtype == "bfloat16" else 30) * TOLERANCE


def test_a_tiny_gemma3_in_bfloat16_matches_the_reference_on_rounded_weights(default_kernels):
    """Gemma 3 weight-only: its norm gains (1 + weight) and embedding scale stay float32 here, so
    the reference's tolerance holds as for Llama; the embedding table widened as it is gathered."""
    gemma3 = dataclasses.replace(TINY, name="tiny-gemma3", qk_norm=True, post_norms=True, offset_norms=True,
                                 activation="gelu_tanh", embedding_multiplier=TINY.hidden_size ** 0.5,
                                 attention_multiplier=0.125, rope_theta=1e6, local_layers=(0,), local_rope_theta=1e4,
                                 tie_word_embeddings=True)
    weights = ModelWeights.random(gemma3, seed=3)
    prompts = np.random.default_rng(1).integers(0, gemma3.vocab_size, (2, 9))
    model, ours, reference = generate_both(gemma3, weights, default_kernels, prompts)
    assert_weight_only(model)
    assert "geglu" in {k.spec.op for k in model.used.values()}
    assert relative_error(ours.logits, reference.logits) < TOLERANCE
    np.testing.assert_array_equal(ours.tokens, reference.tokens)


@pytest.mark.parametrize("dtype", WEIGHT_ONLY)
def test_llama_100m_in_16_bits_matches_the_reference_on_rounded_weights(dtype, default_kernels):
    """llama-100m's dims (its kernels, its tied 32000-token head) at 2 of its 12 layers, over 8
    steps: more layers and steps run the same kernels again, on 2.7x the weights to make and
    round, which the numpy reference reads at every step."""
    config = dataclasses.replace(load_model_config(LLAMA_100M), num_hidden_layers=2)
    weights = ModelWeights.random(config, seed=11)
    prompts = np.random.default_rng(4).integers(0, config.vocab_size, (1, 8))
    model, ours, reference = generate_both(config, weights, default_kernels, prompts, steps=8, dtype=dtype)
    assert_weight_only(model, dtype)
    assert relative_error(ours.logits, reference.logits) < TOLERANCE
    np.testing.assert_array_equal(ours.tokens, reference.tokens)


def save_bfloat16_checkpoint(weights: ModelWeights, folder) -> None:
    """``model.safetensors`` with every tensor as BF16 (numpy cannot write it), and config.json."""
    header, blobs, offset = {}, [], 0
    for name, tensor in weights.tensors.items():
        words = float32_to_bfloat16(widened(tensor))
        header[name] = {"dtype": "BF16", "shape": list(words.shape), "data_offsets": [offset, offset + words.nbytes]}
        blobs.append(words.tobytes())
        offset += words.nbytes
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # as safetensors pads it: the data begins 8-byte aligned
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    weights.config.save(folder / "config.json")


def test_an_infinity_in_a_bfloat16_checkpoint_is_found_when_asked(tmp_path):
    weights = ModelWeights.random(TINY, seed=8)
    weights.tensors["model.norm.weight"][-1] = -np.inf  # bfloat16 word 0xff80: the exponent all ones
    save_bfloat16_checkpoint(weights, tmp_path)
    loaded = ModelWeights.load(TINY, tmp_path)
    assert isinstance(loaded.tensors["model.norm.weight"], Bfloat16Words)
    with pytest.raises(ValueError, match=r"^weights of tiny: model\.norm\.weight hold NaN or infinite values$"):
        loaded.check_finite()
    with pytest.raises(ValueError, match="model.norm.weight hold NaN"):
        ModelWeights.load(TINY, tmp_path, check_finite=True)
    weights.tensors["model.norm.weight"][-1] = 1.0
    save_bfloat16_checkpoint(weights, tmp_path)
    ModelWeights.load(TINY, tmp_path, check_finite=True)  # finite words pass


def test_a_bfloat16_checkpoint_runs_without_a_float32_copy_of_its_linear_weights(tmp_path, default_kernels):
    save_bfloat16_checkpoint(ModelWeights.random(TINY, seed=8), tmp_path)
    loaded = ModelWeights.load(TINY, tmp_path)
    assert all(isinstance(t, Bfloat16Words) for t in loaded.tensors.values())
    prompts = np.array([[4, 8, 15, 16, 23, 42]])
    model, ours, reference = generate_both(TINY, loaded, default_kernels, prompts, steps=8)
    assert_weight_only(model)
    # unfused layers and the (tied) LM head are the checkpoint's own words; fused ones are stacked words
    for part in ("self_attn.o_proj", "mlp.down_proj"):
        name = f"model.layers.0.{part}.weight"
        assert np.shares_memory(model._weight(name, linear=True), loaded.tensors[name])
    head = model._weight(model.lm_head_name, linear=True)
    assert np.shares_memory(head, loaded.tensors[model.lm_head_name])
    assert relative_error(ours.logits, reference.logits) < TOLERANCE
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    # the same numbers from float32 weights: bit for bit the same model
    again = LlamaModel(TINY, loaded.widened(), default_kernels, dtype="bfloat16").generate(prompts, 8)
    np.testing.assert_array_equal(again.logits, ours.logits)


def test_a_float16_checkpoint_runs_on_its_own_weights_without_a_float32_copy(tmp_path, default_kernels):
    """float16 words widen to float32 exactly: a float16 checkpoint in float16 computes with the
    very weights the float32 reference reads, at half the bytes per linear layer."""
    from safetensors.numpy import save_file

    weights = ModelWeights.random(TINY, seed=8)
    save_file({name: widened(t).astype(np.float16) for name, t in weights.tensors.items()},
              str(tmp_path / "model.safetensors"))
    loaded = ModelWeights.load(TINY, tmp_path)
    prompts = np.array([[4, 8, 15, 16, 23, 42]])
    model, ours, reference = generate_both(TINY, loaded, default_kernels, prompts, steps=16, dtype="float16")
    assert_weight_only(model, "float16")
    name = "model.layers.0.mlp.down_proj.weight"
    assert np.shares_memory(model._weight(name, linear=True), loaded.tensors[name])
    plain = ReferenceModel(TINY, loaded.widened()).generate(prompts, 16)  # no rounding: the same numbers
    np.testing.assert_array_equal(plain.logits, reference.logits)
    assert relative_error(ours.logits, reference.logits) < TOLERANCE
    np.testing.assert_array_equal(ours.tokens, reference.tokens)


def test_the_cpu_runs_16_bit_weights_weight_only_but_not_under_q4(default_kernels):
    assert precisions("bfloat16", "cpu") == ("float32", "bfloat16")
    assert precisions("float16", "cpu") == ("float32", "float16")
    assert precisions("bfloat16", "cuda") == ("bfloat16", "bfloat16")
    assert precisions("float32", "cpu", "q4") == ("float32", "float32")
    # an int4 checkpoint's LM head is float: it alone reads 16-bit words
    assert precisions("float16", "cpu", "q4", float_head=True) == ("float32", "float16")
    weights = ModelWeights.random(TINY, seed=0)
    for dtype in WEIGHT_ONLY:
        with pytest.raises(ValueError, match=f"q4 on the CPU runs in float32 .* drop the {dtype}"):
            LlamaModel(TINY, weights.quantize_q4(128), default_kernels, dtype=dtype)


def test_the_plan_makes_linear_layers_weight_only_and_counts_half_their_bytes():
    calls = decode_calls(TINY, 1, 64, weights="bfloat16") + prefill_calls(TINY, 32, weights="bfloat16")
    linear = [c.spec for c in calls if c.spec.op in LINEAR_OPS]
    assert {c.role for c in calls if c.spec.op in LINEAR_OPS} == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj",
                                                                  "lm_head"}
    assert all(s.attr == {"weight": "bfloat16"} and s.dtype == "float32" for s in linear)
    assert decode_calls(TINY, 1, 64, weights="float32") == decode_calls(TINY, 1, 64)
    with pytest.raises(ValueError, match="weight-only is bfloat16 or float16 weights on float32"):
        decode_calls(TINY, 1, 64, dtype="bfloat16", weights="float32")
    config = load_model_config(LLAMA_100M)
    full, half = weight_bytes(config), weight_bytes(config, weights="bfloat16")
    assert 0.5 < half / full < 0.51  # the norm gains stay float32
