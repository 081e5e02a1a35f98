"""The Llama decoder on real kernels against the numpy reference; weights and configs."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from runtime.abi import canonical_attrs
from runtime.llama import LlamaModel
from runtime.model_config import PRESETS, ModelConfig, load_model_config
from runtime.plan import decode_calls, prefill_calls
from runtime.precision import Bfloat16Words, precision_of, widened
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights, read_safetensors

TINY = PRESETS["tiny"]


def relative_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("quantize", ["none", "q4"])
def test_prefill_and_every_decode_step_match_the_numpy_reference(default_kernels, quantize):
    weights = ModelWeights.random(TINY, seed=3)
    if quantize == "q4":
        weights = weights.quantize_q4(128)
    prompts = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 9))
    ours = LlamaModel(TINY, weights, default_kernels).generate(prompts, 5)
    reference = ReferenceModel(TINY, weights).generate(prompts, 5)
    assert ours.logits.shape == (2, 5, TINY.vocab_size)
    for step in range(5):  # step 0 is the prefill's last position, then each decode step
        assert relative_error(ours.logits[:, step], reference.logits[:, step]) < 1e-4, step
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    assert ours.decode_tokens == 2 * 4 and ours.prefill_tokens == 2 * 9


class WithoutFusedRope:
    """A provider as a library exported before q and k were rotated in one call: it has no
    rope kernel over H + HKV heads."""

    def __init__(self, kernels):
        self.kernels = kernels

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        if op == "rope" and shape["H"] == TINY.num_attention_heads + TINY.num_key_value_heads:
            raise LookupError("no rope over q and k together in this library")
        return self.kernels.get(op, shape, dtype, attrs, dynamic)

    def specs(self):
        return self.kernels.specs()

    def close(self):
        pass


def test_a_library_without_the_fused_rope_decodes_with_its_rope_kernels(default_kernels):
    weights = ModelWeights.random(TINY, seed=5)
    prompts = np.random.default_rng(2).integers(0, TINY.vocab_size, (1, 7))
    model = LlamaModel(TINY, weights, WithoutFusedRope(default_kernels))
    ours = model.generate(prompts, 4)
    assert not any(spec.split("/")[0] == "rope" and "H=6," in spec for spec in model.used)
    np.testing.assert_array_equal(ours.tokens, ReferenceModel(TINY, weights).generate(prompts, 4).tokens)


def test_a_padded_prefill_computes_the_same_logits(default_kernels):
    weights = ModelWeights.random(TINY, seed=4)
    prompts = np.random.default_rng(2).integers(0, TINY.vocab_size, (1, 6))
    exact = LlamaModel(TINY, weights, default_kernels).generate(prompts, 3)
    padded_model = LlamaModel(TINY, weights, default_kernels, prefill_sizes=[16])
    assert padded_model.padded_tokens(1, 6) == 16
    padded = padded_model.generate(prompts, 3)
    assert relative_error(padded.logits, exact.logits) < 1e-5
    np.testing.assert_array_equal(padded.tokens, exact.tokens)


class TunedFor:
    """A provider whose kernels are the template defaults and whose tuned tasks (what it says it
    was tuned for) are the 32-token prefill's and the decode step's: with the prefill's GEMMs
    reading M at run time, or (``dynamic_rows=False``) compiling it in, as a library tuned before."""

    def __init__(self, kernels, dynamic_rows: bool):
        self.kernels, self.dynamic_rows = kernels, dynamic_rows

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        return self.kernels.get(op, shape, dtype, attrs, dynamic)

    def specs(self):
        calls = prefill_calls(TINY, 32, dynamic_rows=self.dynamic_rows) + decode_calls(TINY, 1, 64)
        return [call.spec for call in calls]

    def close(self):
        pass


def test_a_prefill_runs_at_the_prompts_length_or_padded_where_the_gemms_compile_m_in(default_kernels):
    weights = ModelWeights.random(TINY, seed=6)
    prompts = np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 6))
    model = LlamaModel(TINY, weights, default_kernels)
    assert model.dynamic_rows and model.padded_tokens(1, 6) == 6
    exact = model.generate(prompts, 3)
    gemms = [key for key in model.used if key.startswith("gemm/")]
    assert gemms and all("M~=" in key for key in gemms)  # M read at run time (from any size compiled so far)
    old = LlamaModel(TINY, weights, TunedFor(default_kernels, dynamic_rows=False))
    assert not old.dynamic_rows and old.padded_tokens(1, 6) == 32
    # two sequences, where attention was tuned for one: no length runs every kernel tuned.
    # GEMMs that compile M in still run best at their 32 rows; ones that read M gain nothing
    assert old.padded_tokens(2, 7) == 16
    assert LlamaModel(TINY, weights, TunedFor(default_kernels, dynamic_rows=True)).padded_tokens(2, 7) == 7
    # bfloat16 weights: the float32 GEMMs' sizes are no reason to pad (their kernels are not run)
    assert LlamaModel(TINY, weights, TunedFor(default_kernels, dynamic_rows=False),
                      dtype="bfloat16").padded_tokens(1, 6) == 6
    padded = old.generate(prompts, 3)
    assert all("M=32," in key for key in old.used if key.startswith("gemm/"))
    assert relative_error(padded.logits, exact.logits) < 1e-5
    np.testing.assert_array_equal(padded.tokens, exact.tokens)


def test_a_one_token_prompt_runs_on_the_decode_steps_gemvs(default_kernels):
    """A GEMM tuned for many rows streams W slower at one row than the decode step's GEMV, tuned
    at exactly one: a prefill that short takes the tuned GEMVs, a longer one the GEMMs."""
    weights = ModelWeights.random(TINY, seed=7)
    model = LlamaModel(TINY, weights, TunedFor(default_kernels, dynamic_rows=True))
    assert model.dynamic_rows and model.padded_tokens(1, 1) == 1
    ops = {call.spec.op for call in model._prefill(1, 1)}
    assert "gemv" in ops and "gemm" not in ops
    assert {call.spec.op for call in model._prefill(2, 1)} >= {"gemm"}  # no GEMV tuned at two rows
    prompt = np.array([[5]])
    np.testing.assert_array_equal(model.generate(prompt, 3).tokens, ReferenceModel(TINY, weights).generate(prompt, 3).tokens)
    # template defaults claim no tuned GEMV: even one row takes the GEMM that reads M at run time
    assert "gemm" in {call.spec.op for call in LlamaModel(TINY, weights, default_kernels)._prefill(1, 1)}


def test_the_reference_is_causal_and_agrees_with_a_full_recompute():
    """Decoding with the cache equals recomputing the whole sequence without one."""
    weights = ModelWeights.random(TINY, seed=5)
    model = ReferenceModel(TINY, weights)
    prompts = np.random.default_rng(3).integers(0, TINY.vocab_size, (1, 7))
    out = model.generate(prompts, 4)
    sequence = np.concatenate([prompts, out.tokens[:, :3]], axis=1)
    shape = (1, TINY.num_key_value_heads, 10, TINY.head_dim)
    caches = [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(TINY.num_hidden_layers)]
    full = model.forward(sequence, 0, caches)
    assert relative_error(out.logits[:, 3], full) < 1e-5


def test_weights_round_trip_through_safetensors_and_config_json(tmp_path):
    weights = ModelWeights.random(TINY, seed=6)
    weights.save(tmp_path)
    config = load_model_config(tmp_path)
    assert config.hidden_size == TINY.hidden_size and config.num_key_value_heads == TINY.num_key_value_heads
    loaded = ModelWeights.load(config, tmp_path)
    for name, tensor in weights.tensors.items():
        np.testing.assert_array_equal(loaded[name], tensor)


def test_bfloat16_safetensors_are_widened(tmp_path):
    values = np.array([[1.0, -2.5], [0.15625, 3e38]], dtype=np.float32)
    words = (values.view(np.uint32) >> 16).astype(np.uint16)  # exact in bf16 except the last
    header = json.dumps({"w": {"dtype": "BF16", "shape": [2, 2], "data_offsets": [0, 8]}}).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + words.tobytes())
    out = read_safetensors(path)["w"]
    assert isinstance(out, Bfloat16Words) and out.nbytes == 8  # kept as the file stores it
    wide = widened(out)
    np.testing.assert_array_equal(wide[0], values[0])
    assert wide[1, 0] == np.float32(0.15625)


def test_a_half_precision_checkpoint_stays_half_and_computes_as_widened(tmp_path, default_kernels):
    """float16 and bfloat16 checkpoints load without a float32 copy of the model; the model
    computes with the same numbers as from the widened weights."""
    from safetensors.numpy import save_file

    weights = ModelWeights.random(TINY, seed=2)
    half = {n: t.astype(np.float16) for n, t in weights.tensors.items()}
    save_file(half, str(tmp_path / "model.safetensors"))
    TINY.save(tmp_path / "config.json")
    loaded = ModelWeights.load(TINY, tmp_path)
    assert all(t.dtype == np.float16 for t in loaded.tensors.values())
    assert sum(t.nbytes for t in loaded.tensors.values()) == sum(t.nbytes for t in half.values())
    wide = ModelWeights(TINY, {n: t.astype(np.float32) for n, t in half.items()})
    prompts = np.array([[1, 2, 3]])
    np.testing.assert_array_equal(ReferenceModel(TINY, loaded).generate(prompts, 3).logits,
                                  ReferenceModel(TINY, wide).generate(prompts, 3).logits)
    # the float32 CPU model widens each tensor as it takes it
    ours = LlamaModel(TINY, loaded, default_kernels).generate(prompts, 3)
    np.testing.assert_allclose(ours.logits, ReferenceModel(TINY, wide).generate(prompts, 3).logits, atol=1e-4)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        precision_of(np.zeros(3, np.int32))


def test_bad_weights_and_configs_are_named():
    weights = ModelWeights.random(TINY, seed=0).tensors
    weights.pop("model.norm.weight")
    weights["lm_head.weight"] = weights["lm_head.weight"][:5]
    with pytest.raises(ValueError, match="model.norm.weight is missing.*lm_head.weight has shape"):
        ModelWeights(TINY, weights)
    with pytest.raises(ValueError, match="not a preset"):
        load_model_config("no-such-model")
    with pytest.raises(ValueError, match="multiple of num_key_value_heads"):
        ModelConfig.from_hf_dict({"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                  "num_key_value_heads": 3, "num_hidden_layers": 1, "vocab_size": 10})


def test_presets_have_their_published_sizes():
    assert abs(PRESETS["llama-2-7b"].parameters / 1e9 - 6.74) < 0.01
    assert abs(PRESETS["llama-3-8b"].parameters / 1e9 - 8.03) < 0.01
    assert abs(PRESETS["mistral-7b"].parameters / 1e9 - 7.24) < 0.01


def test_the_plan_counts_each_kernel_per_pass():
    calls = {c.role: c for c in prefill_calls(TINY, 128)}
    layers = TINY.num_hidden_layers
    # Q, K and V as one projection (TINY: 4 query heads and 2 KV heads of 32)
    assert calls["qkv_proj"].spec.op == "gemm" and calls["qkv_proj"].spec.dims == {"M": 128, "N": 256, "K": 128}
    assert calls["qkv_proj"].count == layers and calls["residual_norm"].count == 2 * layers
    assert calls["gate_up_proj"].spec.dims["N"] == 2 * TINY.intermediate_size
    assert calls["lm_head"].spec.op == "gemv" and calls["lm_head"].spec.dims["M"] == 1
    assert calls["attention"].spec.dynamic == ("T",)
    decode = {c.role: c for c in decode_calls(TINY, 8, 512, "q4")}
    assert decode["gate_up_proj"].spec.op == "gemv_q4"
    assert decode["gate_up_proj"].spec.attr == {}  # group_size 128, symmetric: the defaults, left out of its key
    assert decode["attention"].spec.dynamic == ("S", "L")
    assert {c.spec.op for c in decode_calls(TINY, 32, 512)} >= {"gemm"}  # batches above 16 use gemm
    odd = ModelConfig.from_hf_dict({"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4,
                                    "num_hidden_layers": 1, "vocab_size": 50})
    with pytest.raises(ValueError, match="hidden_size = 96 .* not a multiple of the group size 128"):
        prefill_calls(odd, 16, "q4")


def test_the_overlapped_resident_step_is_five_kernels_a_layer_and_unfuses_for_older_libraries():
    from runtime.plan import unfused

    layers = TINY.num_hidden_layers
    step = decode_calls(TINY, 1, 512, dtype="float16", resident=True)
    per_layer = sum(call.count for call in step if call.role not in ("lm_head", "argmax")) // layers
    assert per_layer == 5 and all(call.count in (1, layers) for call in step)
    (attention,) = [call for call in step if call.role == "attention"]
    assert attention.spec.op == "rope_append_attention" and attention.spec.dynamic == ("S", "L")
    rope = canonical_attrs("rope", TINY.rope_attrs)  # theta 10000.0 is the default: left out
    assert attention.spec.attr == rope and not {"rope_append", "kv_append"} & {c.role for c in step}
    # a library from before it: rope_append and the programmatic attention, and before those their parts
    append, plain = unfused(TINY, attention)
    assert (append.role, append.spec.op, append.spec.attr) == ("rope_append", "rope_append", rope)
    assert (plain.role, plain.spec.op, plain.spec.dims) == ("attention", "attention_decode", attention.spec.dims)
    assert plain.spec.attr == {"lengths": "per_sequence", "programmatic": True}
    assert [c.spec.attr for c in unfused(TINY, plain)] == [{"lengths": "per_sequence"}]
    assert {c.role for c in unfused(TINY, append)} == {"rope_q", "rope_k", "kv_append"}
    # without the fused norms (more rows than a GEMV takes) the step keeps rope_append and plain attention
    wide = {c.role: c.spec for c in decode_calls(TINY, 32, 512, dtype="float16", resident=True)}
    assert wide["rope_append"].op == "rope_append" and wide["attention"].attr == {"lengths": "per_sequence"}


class _Specs:
    """A provider that only lists the kernels it was tuned for."""

    def __init__(self, specs):
        self._specs = specs

    def specs(self):
        return self._specs


def test_the_resident_step_fuses_the_norms_unless_the_tuned_gemvs_are_all_unfused():
    from runtime.abi import KernelSpec

    weights = ModelWeights.random(TINY, seed=1)
    plain = KernelSpec.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16")
    fused = KernelSpec.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16", {"residual": True})
    prefill = KernelSpec.make("gemv", {"M": 8, "N": 64, "K": 64}, "float16")
    for specs, fuses in (([], True), ([prefill], True), ([plain, prefill], False), ([plain, fused], True)):
        assert LlamaModel(TINY, weights, _Specs(specs))._fuses_norms(1) is fuses, specs
    assert not LlamaModel(TINY, weights, _Specs([]))._fuses_norms(17)  # more rows than a GEMV takes


def test_a_log_tuned_before_rope_append_attention_keeps_its_tuned_pair():
    """A tuning log with rope_append and the programmatic attention of a batch but no
    rope_append_attention: the resident step runs that tuned pair, not an untuned fused kernel;
    with only one of them tuned, the one untuned fused kernel."""
    from runtime.abi import KernelSpec

    weights = ModelWeights.random(TINY, seed=1)
    dims = {"B": 1, "H": 4, "HKV": 2, "D": 32, "S": 64, "L": 64}
    append = KernelSpec.make("rope_append", {k: v for k, v in dims.items() if k != "L"}, "float16", dynamic=("S",))
    overlapped = KernelSpec.make("attention_decode", dims, "float16", {"lengths": "per_sequence", "programmatic": True},
                                 ("S", "L"))
    ragged = KernelSpec.make("attention_decode", dims, "float16", {"lengths": "per_sequence"}, ("S", "L"))
    fused = KernelSpec.make("rope_append_attention", dims, "float16", dynamic=("S", "L"))
    for specs, before in (([], False), ([append], False), ([append, ragged], False), ([append, overlapped], True),
                          ([append, overlapped, fused], False)):
        assert LlamaModel(TINY, weights, _Specs(specs))._tuned_before_rope_attention(1) is before, specs
    assert not LlamaModel(TINY, weights, _Specs([append, overlapped]))._tuned_before_rope_attention(2)


# Granite's scalars on the tiny preset (granite-3.1-2b's values), tied or not
GRANITE_SCALARS = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
                       logits_scaling=8.0)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("precision, tolerance", [("float32", 1e-5), ("q4", 1e-4), ("bfloat16", 2e-4)])
def test_granites_scalars_folded_into_the_weights_keep_the_references_tokens(default_kernels, tied, precision,
                                                                             tolerance):
    """The runtime folds the embedding, residual and logit scalars into the weights it uploads (the
    int4 scales, the bfloat16 words of a weight-only model, a tied table used as the LM head);
    the reference applies them to the activations."""
    import dataclasses

    config = dataclasses.replace(PRESETS["tiny"], name="tiny-granite", tie_word_embeddings=tied, **GRANITE_SCALARS)
    weights = ModelWeights.random(config, seed=1)
    prompts = np.array([[5, 9, 2, 33, 7]])
    if precision == "q4":
        weights = weights.quantize_q4(128)
    dtype = "bfloat16" if precision == "bfloat16" else "float32"
    out = LlamaModel(config, weights, default_kernels, dtype=dtype).generate(prompts, 12)
    reference = ReferenceModel(config, weights.rounded(dtype) if dtype != "float32" else weights).generate(prompts, 12)
    error = np.abs(out.logits - reference.logits).max() / np.abs(reference.logits).max()
    assert error < tolerance, error
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    plain = ReferenceModel(dataclasses.replace(config, embedding_multiplier=1.0, residual_multiplier=1.0,
                                               logits_scaling=1.0), weights).generate(prompts, 12)
    assert np.abs(plain.logits - reference.logits).max() / np.abs(reference.logits).max() > 100 * tolerance
