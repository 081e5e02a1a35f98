"""A mixture of experts' MLP (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on CPU kernels: the routing,
the kernels a pass calls, and the tiny-moe preset against the numpy reference in float32, int4
and bfloat16 weights, with prompts long enough that each expert takes its rows at once (a gemm
reading M at run time) and decode steps that run each row through its experts (GEMVs of one row).
The families themselves are checked against transformers in test_transformers_parity."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from autotune.model_tasks import weight_bytes
from runtime.experts import route, rows_by_expert
from runtime.llama import LlamaModel
from runtime.model_config import PRESETS
from runtime.plan import decode_calls, prefill_calls
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights, device_linear_names, linear_names
from test_llama import relative_error  # noqa: E402  (same directory)

TINY_MOE = PRESETS["tiny-moe"]
# |logit difference| / max |logit|: float32 arithmetic only (int4: the kernels scale the codes as they
# go, the reference multiplies by weights dequantised first), as test_llama's
TOLERANCES = {"float32": 1e-5, "q4": 1e-4, "bfloat16": 1e-5}


def test_route_weights_the_most_probable_experts():
    logits = np.array([[0.0, 2.0, 1.0, -1.0], [3.0, 3.0, 0.0, 0.0]], np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    experts, weights = route(logits, 2, normalise=False)
    np.testing.assert_array_equal(experts, [[1, 2], [0, 1]])  # a tie goes to the lower expert first
    np.testing.assert_allclose(weights, np.take_along_axis(probabilities, experts, axis=1), rtol=1e-6)
    _, normalised = route(logits, 2, normalise=True)
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(normalised[0], weights[0] / weights[0].sum(), rtol=1e-6)
    with pytest.raises(ValueError, match="cannot pick 5 experts"):
        route(logits, 5, normalise=True)


def test_route_by_sigmoid_scores_in_groups_scaled():
    """GLM-4.5's (DeepSeek-V3's) routing: each expert's sigmoid plus its bias picks, only from the best
    group (by the sum of its two best biased scores), and the sigmoids alone, renormalised and
    scaled, weight the picks."""
    logits = np.array([[2.0, 1.9, -3.0, -3.0, 2.5, -1.0, -1.0, -1.0]], np.float32)
    bias = np.zeros(8, np.float32)
    experts, weights = route(logits, 2, True, bias, "sigmoid", groups=2, groups_per_token=1, scale=2.5)
    # group 0's two best (2.0, 1.9) outsum group 1's (2.5, -1.0): expert 4, the best alone, is not picked
    np.testing.assert_array_equal(experts, [[0, 1]])
    sig = 1 / (1 + np.exp(-logits[0, :2]))
    np.testing.assert_allclose(weights[0], 2.5 * sig / sig.sum(), rtol=1e-6)
    bias[4] = 1.0  # a bias that makes group 1 the better one, and picks expert 4 first
    experts, _ = route(logits, 2, True, bias, "sigmoid", groups=2, groups_per_token=1)
    assert experts[0, 0] == 4 and experts[0, 1] in (5, 6, 7)
    assert set(route(logits, 2, True, None, "sigmoid")[0][0]) == {0, 4}  # ungrouped: the two best overall


def test_rows_by_expert_groups_each_experts_rows_in_order():
    experts = np.array([[2, 0], [0, 3], [2, 3]])
    weights = np.array([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]], np.float32)
    groups = rows_by_expert(experts, weights)
    assert list(groups) == [0, 2, 3]
    np.testing.assert_array_equal(groups[0][0], [0, 1])
    np.testing.assert_allclose(groups[0][1], [0.4, 0.7])
    np.testing.assert_array_equal(groups[3][0], [1, 2])


def test_a_pass_calls_the_router_and_each_picked_expert():
    c = TINY_MOE
    layers, k = c.num_hidden_layers, c.experts_per_token
    decode = {call.role: call for call in decode_calls(c, 2, 64)}
    assert decode["router"].spec.dims == {"M": 2, "N": c.num_experts, "K": c.hidden_size}
    # an expert's gate and up: one task, its two projections apart
    assert decode["expert_gate"].spec == decode["expert_up"].spec
    assert decode["expert_gate"].spec.dims == {"M": 1, "N": c.intermediate_size, "K": c.hidden_size}
    assert decode["expert_gate"].count == decode["expert_down"].count == layers * 2 * k  # each row alone
    assert decode["expert_swiglu"].count == layers * 2 * k and "gate_up_proj" not in decode
    prefill = {call.role: call for call in prefill_calls(c, 40, dynamic_rows=True)}
    gate = prefill["expert_gate"]
    assert gate.spec.op == "gemm" and gate.spec.dynamic == ("M",)
    assert gate.spec.dims["M"] == 40 * k // c.num_experts and gate.count == layers * c.num_experts
    # a decode step reads the experts one token runs, not all of them
    dense = dataclasses.replace(c, num_experts=0, experts_per_token=0, norm_topk_prob=False)
    extra = weight_bytes(c) - weight_bytes(dense)
    assert extra == 4 * layers * c.hidden_size * (3 * c.intermediate_size * (k - 1) + c.num_experts)


def _generate_both(weights: ModelWeights, kernels, prompts, dtype: str = "float32", steps: int = 16):
    model = LlamaModel(TINY_MOE, weights, kernels, dtype=dtype)
    ours = model.generate(prompts, steps)
    reference = ReferenceModel(TINY_MOE, weights.rounded(dtype)).generate(prompts, steps)
    return model, ours, reference


@pytest.mark.parametrize("kind", ["float32", "q4", "bfloat16"])
def test_tiny_moe_generates_the_references_tokens(kind, default_kernels):
    """24-token prompts of two sequences (48 rows: each expert's rows at once) and 16 steps of
    two rows (each through its two experts): the reference's logits and greedy tokens."""
    weights = ModelWeights.random(TINY_MOE, seed=5)
    if kind == "q4":
        weights = weights.quantize_q4(128)
        assert set(weights.quantized) == set(linear_names(TINY_MOE))  # the routers and experts too
    prompts = np.random.default_rng(2).integers(0, TINY_MOE.vocab_size, (2, 24))
    model, ours, reference = _generate_both(weights, default_kernels, prompts, "bfloat16" if kind == "bfloat16"
                                            else "float32")
    assert relative_error(ours.logits, reference.logits) < TOLERANCES[kind]
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    used = {(spec.op, spec.dims["M"], spec.dynamic) for spec in (k.spec for k in model.used.values())
            if spec.dims.get("K") == TINY_MOE.intermediate_size}  # the experts' down projections
    gemm, gemv = ("gemm_q4", "gemv_q4") if kind == "q4" else ("gemm", "gemv")
    assert {(op, dynamic) for op, _, dynamic in used} == {(gemm, ("M",)), (gemv, ())}
    assert (gemv, 1, ()) in used  # a decode step's rows one by one
    # every expert ran: the routing spreads the rows (a router that always picked the same two would not)
    part = "wq" if kind == "q4" else ""
    assert all(f"model.layers.{layer}.mlp.experts.{expert}.{projection}.weight#{part}" in model._device
               for layer in range(2) for expert in range(8) for projection in ("gate_proj", "up_proj", "down_proj"))
    if kind == "float32":  # read where they lie: no copy of an expert's weights
        name = "model.layers.1.mlp.experts.5.up_proj.weight"
        assert np.shares_memory(model._device[f"{name}#"], weights.tensors[name])


def test_a_mixture_of_experts_is_refused_on_cuda_kernels():
    class CudaKernels:
        kind = "cuda"

    with pytest.raises(ValueError, match="tiny-moe is a mixture of experts, which runs on CPU kernels only"):
        LlamaModel(TINY_MOE, ModelWeights.random(TINY_MOE), CudaKernels())


def test_the_decoders_linear_layers_keep_each_experts_projections_apart():
    with_shared = dataclasses.replace(TINY_MOE, shared_expert_intermediate_size=64, norm_topk_prob=False)
    names = device_linear_names(with_shared)
    assert names[:3] == ["model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                         "model.layers.0.mlp.router.weight"]
    assert "model.layers.1.mlp.experts.7.up_proj.weight" in names  # an expert's gate and up apart
    assert "model.layers.1.mlp.shared_expert.gate_up_proj.weight" in names  # the shared expert's stacked
    assert len(names) == 2 * (2 + 1 + 3 * 8 + 2) + 1


def _is_mapped(array: np.ndarray) -> bool:
    """Whether ``array`` is a view of a file mapped into memory (numpy may point a view's base
    straight at the mapping)."""
    import mmap

    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap) or isinstance(array.base, mmap.mmap):
            return True
        array = array.base
    return False


def test_a_mapped_bfloat16_checkpoint_runs_its_experts_from_the_files_pages(tmp_path, default_kernels):
    """``ModelWeights.load(..., mapped=True)``: every tensor a read-only view of the mapped file,
    equal to the one read; a bfloat16 model's kernels read the experts' words there (no copy), and
    generate the very logits of the model on the read weights."""
    from test_llama_weight_only import save_bfloat16_checkpoint

    from runtime.precision import Bfloat16Words

    save_bfloat16_checkpoint(ModelWeights.random(TINY_MOE, seed=6), tmp_path)
    read = ModelWeights.load(TINY_MOE, tmp_path)
    mapped = ModelWeights.load(TINY_MOE, tmp_path, mapped=True)
    assert set(read.tensors) == set(mapped.tensors)
    for name, tensor in mapped.tensors.items():
        assert isinstance(tensor, Bfloat16Words) and _is_mapped(tensor) and not tensor.flags.writeable, name
        np.testing.assert_array_equal(tensor, read.tensors[name])
    assert not any(_is_mapped(tensor) for tensor in read.tensors.values())
    prompts = np.random.default_rng(4).integers(0, TINY_MOE.vocab_size, (1, 20))
    model = LlamaModel(TINY_MOE, mapped, default_kernels, dtype="bfloat16")
    ours = model.generate(prompts, 8)
    want = LlamaModel(TINY_MOE, read, default_kernels, dtype="bfloat16").generate(prompts, 8)
    np.testing.assert_array_equal(ours.logits, want.logits)
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    assert np.shares_memory(model._device[f"{name}#"], mapped.tensors[name])


def test_a_mapped_tensor_the_kernels_could_not_take_is_copied(tmp_path):
    """A float32 tensor stored at an offset that is no multiple of 4 (after three float16 values):
    copied out aligned, as the kernels take arrays; the others stay views of the file."""
    import json
    import struct

    from runtime.weights import mapped_safetensors

    half, single = np.array([1.5, -2.0, 3.25], np.float16), np.arange(4, dtype=np.float32)
    header = {"h": {"dtype": "F16", "shape": [3], "data_offsets": [0, 6]},
              "s": {"dtype": "F32", "shape": [2, 2], "data_offsets": [6, 22]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + half.tobytes() + single.tobytes())
    tensors = mapped_safetensors(tmp_path / "x.safetensors")
    np.testing.assert_array_equal(tensors["h"], half)
    np.testing.assert_array_equal(tensors["s"], single.reshape(2, 2))
    assert _is_mapped(tensors["h"]) and not _is_mapped(tensors["s"]) and tensors["s"].flags.aligned


def test_dense_layers_among_the_experts_call_a_dense_mlp():
    """Qwen MoE's mlp_only_layers: those layers call gate/up and down of the dense size, the others
    the router and experts; a decode step reads each kind's bytes."""
    c = dataclasses.replace(TINY_MOE, dense_layers=(0,), dense_intermediate_size=256)
    calls = {call.role: call for call in decode_calls(c, 1, 64)}
    assert calls["gate_up_proj"].spec.dims == {"M": 1, "N": 512, "K": c.hidden_size} and calls["gate_up_proj"].count == 1
    assert calls["router"].count == 1 and calls["expert_gate"].count == c.experts_per_token
    assert calls["swiglu"].spec.dims["N"] == 256 and calls["swiglu"].count == 1
    h, k = c.hidden_size, c.experts_per_token
    assert weight_bytes(c) - weight_bytes(TINY_MOE) == 4 * (3 * h * 256 - (3 * h * c.intermediate_size * k + h * 8))
    assert [name for name in linear_names(c) if ".mlp." in name][:3] == [
        "model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]


ERNIE_MOE = {"architectures": ["Ernie4_5_MoeForCausalLM"], "model_type": "ernie4_5_moe", "hidden_size": 128,
             "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3,
             "vocab_size": 512, "moe_num_experts": 8, "moe_k": 2, "moe_intermediate_size": 64,
             "moe_num_shared_experts": 2, "moe_layer_start_index": 1, "moe_layer_end_index": -1,
             "moe_layer_interval": 1, "moe_norm_min": 1e-12, "num_nextn_predict_layers": 1, "use_bias": False,
             "tie_word_embeddings": True}


def test_ernie_moe_reads_its_layers_and_leaves_its_multi_token_prediction_layers_unread(tmp_path):
    """ERNIE 4.5 MoE: the layers before moe_layer_start_index dense, the shared expert ungated and
    two experts wide, the experts picked with a bias; a checkpoint's multi-token-prediction tensors
    (which transformers does not load either) are not read; settings it cannot run are refused."""
    import json

    from safetensors.numpy import load_file, save_file

    from runtime.model_config import ModelConfig
    from runtime.weights import read_header

    config = ModelConfig.from_hf_dict(ERNIE_MOE, "ernie-moe")
    assert (config.dense_layers, config.dense_intermediate_size, config.intermediate_size) == ((0,), 256, 64)
    assert (config.shared_expert_intermediate_size, config.shared_expert_gated) == (128, False)
    assert config.expert_selection_bias and config.norm_topk_prob and config.rope_interleaved
    assert ModelConfig.from_hf_dict(config.to_hf_dict(), "ernie-moe") == config
    weights = ModelWeights.random(config, seed=2)
    weights.save(tmp_path)
    names = set(read_header(tmp_path / "model.safetensors")[0])
    assert "model.layers.2.mlp.shared_experts.up_proj.weight" in names
    assert "model.layers.2.mlp.moe_statics.e_score_correction_bias" in names
    stored = load_file(str(tmp_path / "model.safetensors"))
    save_file({**stored, "model.mtp_linear_proj.0.weight": np.zeros((4, 4), np.float32)},
              str(tmp_path / "model.safetensors"))
    loaded = ModelWeights.load(config, tmp_path)
    assert set(loaded.tensors) == set(weights.tensors)  # the shared experts under their name here, no mtp
    for name, tensor in weights.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[name], tensor)
    for change, message in ((dict(moe_norm_min=1e-6), "moe_norm_min = 1e-06 is not implemented"),
                            (dict(moe_layer_start_index=3), "leave no layer with the experts"),
                            (dict(moe_k=9), "moe_k = 9 is more than the 8 experts"),
                            (dict(num_experts=8), "num_experts = 8 is not read by transformers for model_type "
                                                  "'ernie4_5_moe'")):
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_hf_dict({**ERNIE_MOE, **change}, "ernie-moe")
    assert json.loads((tmp_path / "config.json").read_text())["moe_num_shared_experts"] == 2
