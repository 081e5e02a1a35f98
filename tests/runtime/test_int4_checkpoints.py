"""int4 checkpoints: GPTQ's layers packed as AutoGPTQ packs them (qweight, qzeros, scales, g_idx),
symmetric or with zero points, and AWQ's as AutoAWQ's WQLinear_GEMM packs them (qweight and
qzeros packed along N in its nibble order, scales; zero points), loaded into the q4 format without
a float copy, run against the reference decoder computing with the weights the codes stand for;
what the q4 kernels cannot compute is refused by name."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from runtime.llama import LlamaModel
from runtime.model_config import PRESETS, ModelConfig, load_model_config
from runtime.plan import check_quantize, decode_calls, head_quantize, prefill_calls
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights, device_shapes, expected_shapes, q4_linear_names

GROUP = 64
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
        "damp_percent": 0.01, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
FLOAT_CONFIG = dataclasses.replace(PRESETS["tiny"], name="tiny-int4")
CONFIG = dataclasses.replace(FLOAT_CONFIG, int4_format="gptq", int4_group_size=GROUP)
ASYMMETRIC = dataclasses.replace(CONFIG, int4_zero_points=True)
ACT_ORDER = dataclasses.replace(CONFIG, int4_act_order=True)
AWQ_GROUP = 32
# as AutoAWQ writes it (TheBloke's checkpoints spell the version in capitals)
AWQ = {"quant_method": "awq", "bits": 4, "group_size": AWQ_GROUP, "zero_point": True, "version": "GEMM",
       "modules_to_not_convert": None}
AWQ_CONFIG = dataclasses.replace(FLOAT_CONFIG, int4_format="awq", int4_group_size=AWQ_GROUP, int4_zero_points=True)
ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ's: nibble i of a word holds column order_map[i] of its eight
COMPRESSED_CONFIG = dataclasses.replace(FLOAT_CONFIG, int4_format="compressed", int4_group_size=GROUP)
# one scale per output row, loaded as groups of 128 (the tiny model's K: 128 and 384)
CHANNELWISE = dataclasses.replace(ASYMMETRIC, int4_group_size=128, int4_channelwise=True)
COMPRESSED_CHANNELWISE = dataclasses.replace(COMPRESSED_CONFIG, int4_group_size=128, int4_channelwise=True)
# mixtures of experts: every expert's projections int4, the routers (and Qwen2-MoE's shared gate) floats
MOE = dataclasses.replace(PRESETS["tiny-moe"], name="tiny-moe-int4", int4_format="gptq", int4_group_size=GROUP)
MOE_SHARED_AWQ = dataclasses.replace(PRESETS["tiny-moe"], name="qwen2-moe-awq", shared_expert_intermediate_size=128,
                                     qkv_bias=True, norm_topk_prob=False, int4_format="awq",
                                     int4_group_size=AWQ_GROUP, int4_zero_points=True)


def compressed_spec(group: int | None, symmetric: bool = True, act_order: bool = False) -> dict:
    """A quantization_config as llm-compressor writes a W4A16 checkpoint's (``group`` None: one
    scale per output row, strategy "channel")."""
    weights = {"actorder": "group" if act_order else None, "block_structure": None, "dynamic": False,
               "group_size": group, "num_bits": 4, "observer": "minmax", "observer_kwargs": {},
               "strategy": "group" if group else "channel", "symmetric": symmetric, "type": "int"}
    return {"config_groups": {"group_0": {"input_activations": None, "output_activations": None,
                                          "targets": ["Linear"], "weights": weights}},
            "format": "pack-quantized", "global_compression_ratio": 1.9, "ignore": ["lm_head"],
            "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
            "sparsity_config": {}, "version": "0.10.2"}


def pack_gptq(w: np.ndarray, group: int, sym: bool = True, v2: bool = False, g_idx: np.ndarray | None = None
              ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AutoGPTQ's packing of W[N, K], written out the way its QuantLinear.pack loops: codes
    round(w / scale) + zero, symmetric (zero 8) or asymmetric (zero round(-min / scale)), each row
    of qweight eight consecutive k's codes of one n, the first in the low bits; qzeros eight
    consecutive n's zeros, stored minus one (``v2``: as they are). ``g_idx``: each k's group, as
    act-order leaves them (each group's scale and zero from its own rows; in order where None).
    Also the weights they stand for."""
    n, k = w.shape
    g_idx = (np.arange(k) // group).astype(np.int32) if g_idx is None else g_idx
    by_group = np.argsort(g_idx, kind="stable")                                       # k of each sorted row
    groups = w[:, by_group].reshape(n, k // group, group)
    if sym:
        scales = (np.abs(groups).max(axis=2) / 7).astype(np.float16)                # [N, G]
        zeros = np.full(scales.shape, 8, np.uint32)
    else:
        lo, hi = groups.min(axis=2), groups.max(axis=2)
        scales = ((hi - lo) / 15).astype(np.float16)
        zeros = np.clip(np.round(-lo / scales.astype(np.float32)), 1, 15).astype(np.uint32)
    codes = np.clip(np.round(w / scales[:, g_idx].astype(np.float32)) + zeros[:, g_idx], 0, 15).astype(np.uint32)
    intweight = codes.T                                                               # [K, N]
    qweight = np.zeros((k // 8, n), np.uint32)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= intweight[8 * row + j] << np.uint32(4 * j)
    stored = zeros.T - (0 if v2 else 1)                                               # [G, N]
    qzeros = np.zeros((k // group, n // 8), np.uint32)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= stored[:, 8 * col + j] << np.uint32(4 * j)
    stands_for = (codes.astype(np.float32) - zeros[:, g_idx]) * scales[:, g_idx].astype(np.float32)
    return ({"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales.T.copy(),
             "g_idx": g_idx.astype(np.int32)}, stands_for)


def pack_compressed(w: np.ndarray, group: int, sym: bool = True, g_idx: np.ndarray | None = None
                    ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """compressed-tensors' pack-quantized layout of W[N, K], written out the way its pack_to_int32
    loops: signed codes q (symmetric: round(w / scale) with zero point 0; else q = round(w / scale) +
    zp, zp in -8..7) stored plus 8, eight consecutive k's of one n a word of weight_packed [N, K/8],
    the first in the low bits; the zero points plus 8, eight consecutive n's a word of
    weight_zero_point [N/8, K/G] (asymmetric only); weight_scale [N, K/G]; weight_shape (N, K);
    weight_g_idx each k's group (act-order "group" only). Also the weights they stand for."""
    n, k = w.shape
    order_given = g_idx is not None
    g_idx = (np.arange(k) // group).astype(np.int32) if g_idx is None else g_idx
    groups = w[:, np.argsort(g_idx, kind="stable")].reshape(n, k // group, group)
    if sym:
        scales = (np.abs(groups).max(axis=2) / 7).astype(np.float16)
        zp = np.zeros(scales.shape, np.int32)
    else:
        lo, hi = groups.min(axis=2), groups.max(axis=2)
        scales = ((hi - lo) / 15).astype(np.float16)
        zp = np.clip(np.round(-lo / scales.astype(np.float32)) - 8, -8, 7).astype(np.int32)
    q = np.clip(np.round(w / scales[:, g_idx].astype(np.float32)) + zp[:, g_idx], -8, 7).astype(np.int32)
    stored = (q + 8).astype(np.uint32)
    packed = np.zeros((n, k // 8), np.uint32)
    for i in range(8):
        packed |= stored[:, i::8] << np.uint32(4 * i)
    parts = {"weight_packed": packed.view(np.int32), "weight_scale": scales.copy(),
             "weight_shape": np.array([n, k], np.int64)}
    if not sym:
        zeros = np.zeros((n // 8, k // group), np.uint32)
        for i in range(8):
            zeros |= (zp[i::8] + 8).astype(np.uint32) << np.uint32(4 * i)
        parts["weight_zero_point"] = zeros.view(np.int32)
    if order_given:
        parts["weight_g_idx"] = g_idx.astype(np.int32)
    stands_for = (q - zp[:, g_idx]).astype(np.float32) * scales[:, g_idx].astype(np.float32)
    return parts, stands_for


def act_order_g_idx(k: int, group: int, rng: np.random.Generator) -> np.ndarray:
    """A g_idx as GPTQ's act-order leaves it: the rows in a shuffled order (GPTQ's: by the size of
    the input's second moments), each group ``group`` consecutive rows of that order."""
    g_idx = np.empty(k, np.int32)
    g_idx[rng.permutation(k)] = np.arange(k) // group
    return g_idx


def pack_awq(w: np.ndarray, group: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AutoAWQ's quantisation and packing of W[N, K], written out the way its pseudo-quantiser and
    WQLinear_GEMM.from_linear loop: per group scale (max - min) / 15 and zero -round(min / scale)
    in 0..15, codes round(w / scale) + zero; intweight [K, N], each qweight word eight columns'
    codes in ORDER_MAP's order, the qzeros words the same. Also the weights the codes stand for."""
    n, k = w.shape
    groups = w.reshape(n, k // group, group)
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    scales = (np.maximum(hi - lo, 1e-5) / 15).astype(np.float16)                     # [N, G]
    zeros = np.clip(-np.round(lo / scales.astype(np.float32)), 0, 15).astype(np.uint32)
    codes = np.clip(np.round(groups / scales[..., None].astype(np.float32)) + zeros[..., None], 0, 15)
    codes = codes.astype(np.uint32).reshape(n, k)
    intweight = codes.T                                                               # [K, N]
    qweight = np.zeros((k, n // 8), np.uint32)
    for col in range(n // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + ORDER_MAP[i]] << np.uint32(4 * i)
    zeros_kn = zeros.T                                                                # [K/G, N]
    qzeros = np.zeros((k // group, n // 8), np.uint32)
    for col in range(n // 8):
        for i in range(8):
            qzeros[:, col] |= zeros_kn[:, col * 8 + ORDER_MAP[i]] << np.uint32(4 * i)
    stands_for = ((codes.astype(np.float32).reshape(n, k // group, group) - zeros[..., None])
                  * scales.astype(np.float32)[..., None]).reshape(n, k)
    return {"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales.T.copy()}, stands_for


def save_int4(folder, config: ModelConfig = CONFIG, seed: int = 3, edit=None):
    """An int4 checkpoint of random weights in ``folder`` (``config``'s format, group size and zero
    points): (its config as read back, the float weights the codes stand for by linear name);
    ``edit(tensors)`` changes the tensors before they are written."""
    from safetensors.numpy import save_file

    weights = ModelWeights.random(config, seed=seed)
    tensors, stands_for, orders = {}, {}, {}
    rng = np.random.default_rng(seed)
    for name in expected_shapes(config):
        if name in q4_linear_names(config):
            group = weights[name].shape[1] if config.int4_channelwise else config.int4_group_size
            # act-order: one order per layer input (q, k and v share theirs, gate and up theirs)
            shared = name.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
            if config.int4_act_order and shared not in orders:
                orders[shared] = act_order_g_idx(weights[name].shape[1], group, rng)
            if config.int4_format == "awq":
                parts, stands_for[name] = pack_awq(weights[name], group)
            elif config.int4_format == "compressed":
                parts, stands_for[name] = pack_compressed(weights[name], group, not config.int4_zero_points,
                                                          orders.get(shared))
            else:
                parts, stands_for[name] = pack_gptq(weights[name], group, not config.int4_zero_points,
                                                    config.int4_format == "gptq_v2", orders.get(shared))
            tensors.update({name[: -len("weight")] + part: t for part, t in parts.items()})
        else:
            tensors[name] = weights[name].astype(np.float16)
    if edit is not None:
        edit(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    group = -1 if config.int4_channelwise else config.int4_group_size
    spec = {**AWQ, "group_size": group} if config.int4_format == "awq" else {
        **GPTQ, "group_size": group, "sym": not config.int4_zero_points, "checkpoint_format": config.int4_format,
        "desc_act": config.int4_act_order}
    if config.int4_format == "compressed":
        spec = compressed_spec(None if config.int4_channelwise else config.int4_group_size,
                               not config.int4_zero_points, config.int4_act_order)
    hf = {**dataclasses.replace(config, int4_format=None, int4_group_size=None, int4_zero_points=False,
                                int4_act_order=False, int4_channelwise=False).to_hf_dict(),
          "quantization_config": spec}
    (folder / "config.json").write_text(json.dumps(hf))
    return load_model_config(folder), stands_for


def test_a_gptq_config_is_read_written_back_and_leaves_the_lm_head_unquantised():
    config = ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(),
                                       "quantization_config": GPTQ}, CONFIG.name)
    assert config == CONFIG and ModelConfig.from_hf_dict(config.to_hf_dict(), CONFIG.name) == config
    for calls in (decode_calls(config, 1, 64, "q4", GROUP), prefill_calls(config, 16, "q4", GROUP)):
        ops = {call.role: call.spec.op for call in calls}
        assert ops["lm_head"] in ("gemv", "gemm") and ops["qkv_proj"] in ("gemv_q4", "gemm_q4")
    with pytest.raises(ValueError, match="GPTQ checkpoint .int4, group size 64.: it runs with --quantize q4 "
                                         "--group-size 64, not --quantize none"):
        check_quantize(config, "none")
    with pytest.raises(ValueError, match="not --quantize q4 --group-size 128"):
        check_quantize(config, "q4", 128)


def test_act_order_is_read_from_desc_act_and_gathers_the_inputs_of_all_but_down_proj():
    """desc_act without static_groups (which keeps g_idx in order) is act-order: the plan gathers
    the inputs of the Q/K/V, output and gate/up projections, and fuses no norms into GEMVs."""
    act_order = {**FLOAT_CONFIG.to_hf_dict(), "quantization_config": {**GPTQ, "desc_act": True}}
    config = ModelConfig.from_hf_dict(act_order, CONFIG.name)
    assert config == ACT_ORDER and ModelConfig.from_hf_dict(config.to_hf_dict(), CONFIG.name) == config
    static = {**act_order, "quantization_config": {**GPTQ, "desc_act": True, "static_groups": True}}
    assert not ModelConfig.from_hf_dict(static, CONFIG.name).int4_act_order
    layers = config.num_hidden_layers
    for calls in (decode_calls(config, 1, 64, "q4", GROUP, resident=True), prefill_calls(config, 16, "q4", GROUP)):
        gathers = {(c.role, c.spec.dims["N"], c.count) for c in calls if c.spec.op == "gather_columns"}
        assert gathers == {("gather_hidden", config.hidden_size, 2 * layers), ("gather_attn", config.q_size, layers)}
        assert not any(call.spec.attr.get("norm") for call in calls)
    with pytest.raises(ValueError, match="int4_act_order is true only for a GPTQ or compressed-tensors checkpoint"):
        dataclasses.replace(AWQ_CONFIG, int4_act_order=True)


def test_float_weights_quantised_for_an_act_order_config_group_each_input_in_an_order_of_its_own(default_kernels):
    """What `run` does without --weights: random weights quantised as the config's checkpoints are,
    Q/K/V (and gate/up) sharing an order; the int4 layers stand for the float weights as closely
    as in-order groups do, and the model generates the reference's tokens."""
    floats = ModelWeights.random(ACT_ORDER, seed=4)
    weights = floats.quantize_q4(GROUP)
    q = {name.split(".")[-2]: layer for name, layer in weights.quantized.items() if ".0." in name}
    assert np.array_equal(q["q_proj"].order, q["v_proj"].order) and np.array_equal(q["gate_proj"].order,
                                                                                   q["up_proj"].order)
    assert not np.array_equal(q["q_proj"].order, np.arange(ACT_ORDER.hidden_size))
    in_order = ModelWeights.random(CONFIG, seed=4).quantize_q4(GROUP)
    for name, layer in weights.quantized.items():
        error = np.abs(layer.dequantized - floats[name]).max()
        assert error < 1.5 * np.abs(in_order.quantized[name].dequantized - floats[name]).max()
    prompts = np.random.default_rng(6).integers(0, ACT_ORDER.vocab_size, (1, 6))
    ours = LlamaModel(ACT_ORDER, weights, default_kernels).generate(prompts, 6)
    np.testing.assert_array_equal(ours.tokens, ReferenceModel(ACT_ORDER, weights).generate(prompts, 6).tokens)


def _unequal_groups(tensors):
    name = next(n for n in tensors if n.endswith("g_idx"))
    tensors[name] = tensors[name].copy()
    tensors[name][tensors[name] == 0] = 1  # group 1 twice the rows, group 0 none


def _q_and_k_differ(tensors):
    name = "model.layers.0.self_attn.k_proj.g_idx"
    tensors[name] = tensors[name][::-1].copy()


@pytest.mark.parametrize("edit, message", [
    (_unequal_groups, r"g_idx does not give each of the 2 groups 64 rows"),
    (_q_and_k_differ, r"the act-order \(g_idx\) of model.layers.0.self_attn.q_proj.weight, .* differs, and they run "
                      r"as one projection"),
])
def test_an_act_order_checkpoint_the_kernels_cannot_compute_is_refused(edit, message, tmp_path):
    config, _ = save_int4(tmp_path, ACT_ORDER, edit=edit)
    with pytest.raises(ValueError, match=message):
        ModelWeights.load(config, tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "bitsandbytes"}, "quant_method = 'bitsandbytes' is not implemented; supported: gptq"),
    ({"bits": 8}, "quantization_config.bits = 8 is not implemented; supported: 4"),
    ({"sym": "no"}, "quantization_config.sym = 'no' is not implemented; supported: true, false"),
    ({"desc_act": 1}, "quantization_config.desc_act = 1 is not implemented; supported: false, true"),
    ({"group_size": -2}, "quantization_config.group_size = -2 is not implemented; supported: 32, 64, 128"),
    ({"group_size": 256}, "quantization_config.group_size = 256 is not implemented; supported: 32, 64, 128"),
    ({"group_size": 128.0}, "quantization_config.group_size = 128.0 is not implemented; supported: 32, 64, 128"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format = 'marlin' is not implemented; supported: 'gptq', 'gptq_v2'"),
    ({"lm_head": True}, "quantization_config.lm_head = true is not implemented"),
    ({"something_new": 1}, "quantization_config.something_new = 1 is not implemented"),
])
def test_a_quantization_the_kernels_do_not_compute_is_refused(change, message):
    data = {**FLOAT_CONFIG.to_hf_dict(), "quantization_config": {**GPTQ, **change}}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf_dict(data, "m", source="config.json")


# zero points (their binding is the same for GPTQ's and AWQ's) and act-order's gathers, in float16
@pytest.mark.parametrize("config, dtype", [(dataclasses.replace(ASYMMETRIC, int4_act_order=True), "float16")],
                         ids=["gptq-asym-act-order-float16"])
def test_an_int4_checkpoint_runs_on_the_cuda_path(config, dtype, tmp_path, fake_gpu):
    from fakes import FAKE_GPU_TARGET

    from export import TunedKernels

    config, _ = save_int4(tmp_path, config)
    weights = ModelWeights.load(config, tmp_path)
    prompts = np.array([[5, 9, 2, 33, 7]])
    reference = ReferenceModel(config, weights.rounded(dtype)).generate(prompts, 12)
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        model = LlamaModel(config, weights, kernels, dtype=dtype)
        out = model.generate(prompts, 12)
        if config.int4_act_order:
            _act_order_device_weights_run_as_uploaded(model, weights, kernels, prompts, out)
    assert model.decode_mode == "graph"
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    tolerance = 1e-3 if dtype == "float32" else 2e-2
    assert np.abs(out.logits - reference.logits).max() < tolerance * np.abs(reference.logits).max()


def _act_order_device_weights_run_as_uploaded(host, weights, kernels, prompts, want):
    """DeviceWeights of an act-order checkpoint: each gathered layer's NAME#order beside its codes
    and scales, gate/up's rows in down_proj's order (taken here from what ``host`` uploaded for the
    host weights) run as those did; without the orders they are refused by name."""
    from runtime.weights import DeviceWeights, device_linear_names

    config = host.config
    linears = set(q4_linear_names(config, device=True))
    on_device = {}
    for name in device_shapes(config):
        if name not in linears:
            on_device[name] = host._weight(name, linear=name in device_linear_names(config))
            continue
        zeros = ("zeros",) if config.int4_zero_points else ()
        for part in ("wq", "scales", *zeros, *(() if name.endswith("down_proj.weight") else ("order",))):
            on_device[f"{name}#{part}"] = host._weight(name, part)
    table = host.embed  # in the model's precision, as device weights take it
    got = LlamaModel(config, DeviceWeights(config, on_device, table, linears, GROUP), kernels,
                     dtype=host.dtype).generate(prompts, 12)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    np.testing.assert_array_equal(got.logits, want.logits)
    orderless = {k: v for k, v in on_device.items() if not k.endswith("#order")}
    with pytest.raises(ValueError, match=r"device weights do not fit .*: model\.layers\.\d\.\S+_proj\.weight#order "
                                         r"is missing"):
        DeviceWeights(config, orderless, table, linears, GROUP)


def _asymmetric(tensors):
    name = next(n for n in tensors if n.endswith("qzeros"))
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.int32(0x77777776)  # one zero point of 7 (stored 6)


def _act_order(tensors):
    name = next(n for n in tensors if n.endswith("g_idx"))
    tensors[name] = tensors[name][::-1].copy()


@pytest.mark.parametrize("edit, message", [
    (_asymmetric, "zero points other than 8 where the config says the codes are symmetric"),
    (_act_order, "g_idx puts rows out of group order .act-order., but quantization_config says none .GPTQ's "
                 "desc_act true"),
    (lambda t: t.pop("model.layers.1.mlp.down_proj.qzeros"), "model.layers.1.mlp.down_proj.qzeros is missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"].astype(
        np.float32)}), r"qweight is float32 \(16, 384\), expected int32 \(16, 384\)"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"].astype(
        np.int64)}), r"qweight is int64 \(16, 384\), expected int32 \(16, 384\)"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((384, 128), np.float16)}),
     "does not use: model.layers.0.mlp.up_proj.weight"),
])
def test_a_gptq_checkpoint_the_kernels_cannot_compute_is_refused(edit, message, tmp_path):
    config, _ = save_int4(tmp_path, edit=edit)
    with pytest.raises(ValueError, match=message):
        ModelWeights.load(config, tmp_path)


def _stacked(tensors):
    """Each layer's Q/K/V and gate/up as one int4 layer each, as Phi-3's checkpoints (qkv_proj,
    gate_up_proj) hold them: the parts' qweight, qzeros and scales side by side, one g_idx (and
    compressed-tensors': weight_packed, weight_scale, weight_zero_point one above the other,
    weight_shape the stack's)."""
    fused = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
             "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
    for layer in range(CONFIG.num_hidden_layers):
        for name, parts in fused.items():
            for kind in ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale", "weight_zero_point",
                         "weight_g_idx", "weight_shape"):
                pieces = [tensors.pop(f"model.layers.{layer}.{part}.{kind}", None) for part in parts]
                if pieces[0] is None:  # AWQ has no g_idx, each format its own parts
                    continue
                if kind in ("g_idx", "weight_g_idx"):
                    stacked = pieces[0]
                elif kind == "weight_shape":
                    stacked = np.array([sum(int(p[0]) for p in pieces), int(pieces[0][1])], np.int64)
                else:
                    stacked = np.concatenate(pieces, axis=0 if kind.startswith("weight_") else 1)
                tensors[f"model.layers.{layer}.{name}.{kind}"] = stacked


@pytest.mark.parametrize("config", [CONFIG, AWQ_CONFIG, ACT_ORDER,
                                    dataclasses.replace(COMPRESSED_CONFIG, int4_zero_points=True, int4_act_order=True)],
                         ids=["gptq", "awq", "gptq-act-order", "compressed-asym-act-order"])
def test_stacked_int4_projections_load_as_their_parts(config, tmp_path):
    """Phi-3's int4 checkpoints quantise qkv_proj and gate_up_proj as one layer each: they load as
    the same int4 layers as the parts stored apart; one of another width is refused by name."""
    apart, _ = save_int4(tmp_path / "apart", config)
    stacked, _ = save_int4(tmp_path / "stacked", config, edit=_stacked)
    want, got = ModelWeights.load(apart, tmp_path / "apart"), ModelWeights.load(stacked, tmp_path / "stacked")
    assert want.quantized.keys() == got.quantized.keys()
    for name, layer in want.quantized.items():
        for part in ("wq", "scales", "zeros", "order"):
            np.testing.assert_array_equal(getattr(got.quantized[name], part), getattr(layer, part))

    compressed = config.int4_format == "compressed"

    def narrow(tensors):
        _stacked(tensors)
        name = f"model.layers.1.mlp.gate_up_proj.{'weight_scale' if compressed else 'scales'}"
        tensors[name] = (tensors[name][8:] if compressed else tensors[name][:, 8:]).copy()

    save_int4(tmp_path / "narrow", config, edit=narrow)
    message = (r"gate_up_proj.weight_scale has shape \(760, \d+\), expected \(768, \d+\) \(its parts stacked\)"
               if compressed else
               r"gate_up_proj.scales has shape \(\d+, 760\), expected \(\d+, 768\) \(its parts side by side\)")
    with pytest.raises(ValueError, match=message):
        ModelWeights.load(stacked, tmp_path / "narrow")
    if compressed:
        def misshapen(tensors):
            _stacked(tensors)
            tensors["model.layers.0.self_attn.qkv_proj.weight_shape"] = np.array([255, 128], np.int64)

        save_int4(tmp_path / "misshapen", config, edit=misshapen)
        with pytest.raises(ValueError, match=r"qkv_proj.weight_shape is \[255, 128\], expected \[256, 128\] "
                                             r"\(its parts stacked\)"):
            ModelWeights.load(stacked, tmp_path / "misshapen")


def test_g_idx_may_be_left_out(tmp_path):
    def drop(tensors):
        for name in [n for n in tensors if n.endswith("g_idx")]:
            del tensors[name]

    config, stands_for = save_int4(tmp_path, edit=drop)
    weights = ModelWeights.load(config, tmp_path)
    name = next(iter(stands_for))
    np.testing.assert_array_equal(weights.linear(name), stands_for[name])


def test_tune_model_and_run_take_the_quantisation_from_a_gptq_checkpoint(tmp_path):
    """No --quantize needed: tune-model tunes int4 layers and a float LM head, run runs the
    checkpoint on them; asking for unquantised layers is one line and exit 2."""
    import os
    import subprocess
    import sys

    save_int4(tmp_path)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cli = [sys.executable, "-m", "autotune.cli"]
    tuned = subprocess.run(cli + ["tune-model", "--model", ".", "--trials-total", "12", "--prefill-tokens", "8",
                                  "--kv-len", "16", "--log", "t.jsonl", "--no-mlflow", "--quiet", "--json"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    ops = {json.loads(line)["task"]["op"] for line in (tmp_path / "t.jsonl").read_text().splitlines()}
    assert {"gemv_q4", "gemv"} <= ops  # the layers int4, the LM head float
    ran = subprocess.run(cli + ["run", "--log", "t.jsonl", "--model", ".", "--weights", ".", "--prompt-tokens", "6",
                                "--new-tokens", "4", "--compare", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["quantize"] == "q4" and report["reference"]["logits"]["same_tokens"]
    refused = subprocess.run(cli + ["tune-model", "--model", ".", "--quantize", "none", "--log", "u.jsonl",
                                    "--no-mlflow", "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=600)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("autotune: error: ") and lines[0].endswith(
        "is a GPTQ checkpoint (int4, group size 64): it runs with --quantize q4 --group-size 64, not --quantize none")


def test_weights_held_as_int4_codes_only_are_not_saved_as_a_float_checkpoint(tmp_path):
    config, _ = save_int4(tmp_path / "gptq")
    with pytest.raises(ValueError, match="is held as int4 codes only; save writes float checkpoints"):
        ModelWeights.load(config, tmp_path / "gptq").save(tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("config", [CONFIG, ASYMMETRIC, dataclasses.replace(ASYMMETRIC, int4_format="gptq_v2"),
                                    dataclasses.replace(CONFIG, int4_format="gptq_v2"), AWQ_CONFIG, ACT_ORDER,
                                    COMPRESSED_CONFIG,
                                    dataclasses.replace(COMPRESSED_CONFIG, int4_zero_points=True, int4_act_order=True),
                                    CHANNELWISE, COMPRESSED_CHANNELWISE, MOE, MOE_SHARED_AWQ],
                         ids=["gptq", "gptq-asym", "gptq-asym-v2", "gptq-v2", "awq", "gptq-act-order", "compressed",
                              "compressed-asym-act-order", "gptq-asym-channelwise", "compressed-channelwise",
                              "gptq-moe", "awq-moe-shared"])
def test_an_int4_checkpoint_loads_as_int4_codes_and_generates_the_references_tokens(config, tmp_path,
                                                                                   default_kernels):
    """The layers compute the weights the codes stand for (GPTQ's v2 stores zero points without
    the minus one, AWQ's nibble order is undone); where the codes have zero points (GPTQ without
    sym, AWQ) each group's own reaches the ``zero_point`` q4 kernels; the model generates the
    reference's tokens."""
    loaded, stands_for = save_int4(tmp_path, config)
    assert dataclasses.replace(loaded, name=config.name) == config
    assert ModelConfig.from_hf_dict(config.to_hf_dict(), config.name) == config
    weights = ModelWeights.load(loaded, tmp_path)
    # no float copy of an int4 layer; the LM head (not quantised by GPTQ or AWQ) is a float tensor
    assert set(weights.quantized) == set(stands_for) and not set(stands_for) & set(weights.tensors)
    assert "lm_head.weight" in weights.tensors and weights.group_size == config.int4_group_size
    assert weights.quantize_q4(config.int4_group_size) is weights
    for name, want in stands_for.items():
        np.testing.assert_array_equal(weights.linear(name), want)
    zero_points = {name: q.zeros is not None for name, q in weights.quantized.items()}
    assert set(zero_points.values()) == {config.int4_zero_points}
    if config.int4_zero_points:  # really asymmetric: zero points other than 8
        assert len(np.unique(next(iter(weights.quantized.values())).zeros)) > 1
    prompts = np.random.default_rng(5).integers(0, config.vocab_size, (2, 7))
    model = LlamaModel(loaded, weights, default_kernels)
    ours = model.generate(prompts, 16)
    reference = ReferenceModel(loaded, weights).generate(prompts, 16)
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    assert np.abs(ours.logits - reference.logits).max() < 1e-4 * np.abs(reference.logits).max()
    ops = {kernel.spec.op for kernel in model.used.values()}
    assert {"gemv_q4", "gemv"} <= ops  # the layers on int4 codes, the LM head on floats
    assert ("gather_columns" in ops) == config.int4_act_order  # the inputs of act-order layers in their order
    attrs = {kernel.spec.attr.get("zero_point", False) for kernel in model.used.values()
             if kernel.spec.op in ("gemv_q4", "gemm_q4")}
    assert attrs == {config.int4_zero_points}
    if config.moe:  # its routers on float kernels, every expert on int4 ones
        assert "model.layers.1.mlp.gate.weight" in weights.tensors and "model.layers.1.mlp.experts.7.down_proj.weight" \
            in weights.quantized
        routers = {kernel.spec.op for kernel in model.used.values() if kernel.spec.dims.get("N") in (8, 9)}
        assert routers and not any(op.endswith("_q4") for op in routers)


# ----------------------------------------------------------------------------- AWQ


def test_an_awq_config_is_read_written_back_and_runs_zero_point_kernels_with_a_float_lm_head():
    config = ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": AWQ}, AWQ_CONFIG.name)
    assert config == AWQ_CONFIG and ModelConfig.from_hf_dict(config.to_hf_dict(), AWQ_CONFIG.name) == config
    for calls in (decode_calls(config, 1, 64, "q4", AWQ_GROUP), prefill_calls(config, 16, "q4", AWQ_GROUP),
                  decode_calls(config, 1, 64, "q4", AWQ_GROUP, dtype="float16", resident=True)):
        specs = {call.role: call.spec for call in calls}
        assert specs["lm_head"].op in ("gemv", "gemm")
        for role in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
            assert specs[role].op in ("gemv_q4", "gemm_q4") and specs[role].attr["zero_point"] is True
    with pytest.raises(ValueError, match="is an AWQ checkpoint .int4, group size 32.: it runs with --quantize q4 "
                                         "--group-size 32, not --quantize none"):
        check_quantize(config, "none")


@pytest.mark.parametrize("change, message", [
    ({"version": "gemv"}, "quantization_config.version = 'gemv' is not implemented; supported: 'gemm'"),
    ({"zero_point": False}, "quantization_config.zero_point = false is not implemented; supported: true"),
    ({"bits": 3}, "quantization_config.bits = 3 is not implemented; supported: 4"),
    ({"group_size": 256}, "quantization_config.group_size = 256 is not implemented; supported: 32, 64, 128"),
    ({"modules_to_not_convert": ["model.layers.0.mlp.down_proj"]},
     r'modules_to_not_convert = \["model.layers.0.mlp.down_proj"\] is not implemented'),
    ({"modules_to_not_convert": ["vision_tower", "model.norm"]},
     r'modules_to_not_convert = \["vision_tower", "model.norm"\] is not implemented; supported: null, or modules '
     r'outside the decoder'),
    ({"calibration": "pile"}, "quantization_config.calibration = 'pile' is not implemented"),
])
def test_an_awq_quantization_the_kernels_do_not_compute_is_refused(change, message):
    data = {**FLOAT_CONFIG.to_hf_dict(), "quantization_config": {**AWQ, **change}}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict(data, "m", source="config.json")


def _under_language_model(tensors):
    """Mistral 3's (and Gemma 3's) layout: the language model's tensors under language_model."""
    for name in list(tensors):
        plain = tensors.pop(name)
        tensors["language_model." + name if name.startswith(("model.", "lm_head.")) else name] = plain
    tensors["vision_tower.patch_conv.weight"] = np.ones((4, 4), np.float16)


def _beside_visual(tensors):
    """Qwen2.5-VL's: the language model's tensors as a Qwen2's, the visual tower beside them."""
    tensors["visual.patch_embed.proj.weight"] = np.ones((4, 4), np.float16)


def _flat(data):
    """Qwen2.5-VL's releases: the text_config's fields at the top level."""
    return {**{k: v for k, v in data.items() if k != "text_config"}, **data["text_config"]}


@pytest.mark.parametrize("wrapper, changes, edit, layout, not_converted", [
    ("mistral3", {}, _under_language_model, dict, ["vision_tower", "multi_modal_projector", "lm_head"]),
    ("qwen2_5_vl", {"qkv_bias": True}, _beside_visual, _flat, ["visual"]),
], ids=["mistral3", "qwen2.5-vl"])
def test_an_int4_image_and_text_checkpoint_runs_its_language_model(wrapper, changes, edit, layout, not_converted,
                                                                   tmp_path, default_kernels):
    """AWQ of an image-and-text model (Mistral 3, Gemma 3 alike, and Qwen2.5-VL as its official AWQ
    releases are): quantization_config beside the text config, modules_to_not_convert naming the
    image side (and the LM head); the language model loads as int4 and generates the reference's
    tokens."""
    config = dataclasses.replace(AWQ_CONFIG, name="tiny-mm-awq", multimodal=wrapper, **changes)
    save_int4(tmp_path, config, edit=edit)
    data = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" in data and "quantization_config" not in data["text_config"]
    data["quantization_config"]["modules_to_not_convert"] = not_converted
    (tmp_path / "config.json").write_text(json.dumps(layout(data)))
    loaded = load_model_config(tmp_path)
    assert dataclasses.replace(loaded, name=config.name) == config
    assert ModelConfig.from_hf_dict(config.to_hf_dict(), config.name) == config
    weights = ModelWeights.load(loaded, tmp_path)
    assert set(weights.quantized) == set(q4_linear_names(config))
    prompts = np.random.default_rng(5).integers(0, config.vocab_size, (1, 6))
    ours = LlamaModel(loaded, weights, default_kernels).generate(prompts, 6)
    np.testing.assert_array_equal(ours.tokens, ReferenceModel(loaded, weights).generate(prompts, 6).tokens)
    data["text_config"]["quantization_config"] = data["quantization_config"]
    with pytest.raises(ValueError, match="quantization_config is given twice, beside text_config and inside it"):
        ModelConfig.from_hf_dict(data, "m", source="config.json")


def test_a_compressed_tensors_config_is_read_and_written_back():
    config = ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": compressed_spec(GROUP)},
                                      COMPRESSED_CONFIG.name)
    assert config == COMPRESSED_CONFIG and ModelConfig.from_hf_dict(config.to_hf_dict(), config.name) == config
    assert config.int4_name == "compressed-tensors" and head_quantize(config, "q4") == "none"
    asymmetric = ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": compressed_spec(
        GROUP, symmetric=False, act_order=True)}, "m")
    assert (asymmetric.int4_zero_points, asymmetric.int4_act_order) == (True, True)
    # llm-compressor's "weight" act-order keeps each group's columns together: no g_idx
    spec = compressed_spec(GROUP)
    spec["config_groups"]["group_0"]["weights"]["actorder"] = "weight"
    assert not ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": spec}, "m").int4_act_order


def _weights_change(**change):
    def edit(spec):
        spec["config_groups"]["group_0"]["weights"].update(change)
    return edit


@pytest.mark.parametrize("edit, message", [
    (_weights_change(num_bits=8), r"weights.num_bits = 8 is not implemented; supported: 4"),
    (_weights_change(strategy="tensor", group_size=None), r"weights.strategy = 'tensor' is not implemented"),
    (_weights_change(strategy="channel", group_size=None, actorder="group"),
     r"weights \(strategy 'channel'\).actorder = 'group' is not implemented; supported: null, 'weight', 'static'"),
    (_weights_change(strategy="channel", group_size=128),
     r"weights \(strategy 'channel'\).group_size = 128 is not implemented; supported: null"),
    (_weights_change(type="float"), r"weights.type = 'float' is not implemented"),
    (_weights_change(group_size=256), r"weights.group_size = 256 is not implemented; supported: 32, 64, 128"),
    (lambda spec: spec["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
     r"input_activations = \{\"num_bits\": 8\} is not implemented \(weight-only checkpoints: W4A16\)"),
    (lambda spec: spec.update(format="float-quantized"), r"format = 'float-quantized' is not implemented"),
    (lambda spec: spec.update(kv_cache_scheme={"num_bits": 8}), r"kv_cache_scheme = \{\"num_bits\": 8\} is not"),
    (lambda spec: spec.update(ignore=["lm_head", "re:.*down_proj"]), r"ignore = \[\"lm_head\", \"re:\.\*down_proj\"\] "
                                                                      r"is not implemented"),
    (lambda spec: spec["config_groups"].update(group_1=spec["config_groups"]["group_0"]),
     r"config_groups = .* is not implemented; supported: one group"),
])
def test_a_compressed_tensors_quantization_the_kernels_do_not_compute_is_refused(edit, message):
    spec = compressed_spec(GROUP)
    edit(spec)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": spec}, "m",
                                 source="config.json")


def test_one_scale_per_output_row_is_read_as_groups_the_kernels_take():
    """GPTQ's group_size -1 and compressed-tensors' strategy "channel": loaded as the largest group
    of 32, 64, 128 that divides every layer's K (act-order then orders nothing); written back as
    they came; refused where no group divides K."""
    gptq = {**GPTQ, "group_size": -1, "sym": False, "desc_act": True}
    config = ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": gptq}, CHANNELWISE.name)
    assert config == CHANNELWISE and ModelConfig.from_hf_dict(config.to_hf_dict(), config.name) == config
    assert config.to_hf_dict()["quantization_config"]["group_size"] == -1
    compressed = ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "quantization_config": compressed_spec(None)},
                                          COMPRESSED_CHANNELWISE.name)
    assert compressed == COMPRESSED_CHANNELWISE
    assert ModelConfig.from_hf_dict(compressed.to_hf_dict(), compressed.name) == compressed
    for intermediate, group in ((320, 64), (352, 32)):
        data = {**FLOAT_CONFIG.to_hf_dict(), "intermediate_size": intermediate, "quantization_config": gptq}
        assert ModelConfig.from_hf_dict(data, "m").int4_group_size == group
        check_quantize(ModelConfig.from_hf_dict(data, "m"), "q4", group)
    with pytest.raises(ValueError, match=r"one scale per output row \(group_size -1\) of layers whose K \(128, 340, "
                                         r"128\) is not a multiple of 32 is not implemented"):
        ModelConfig.from_hf_dict({**FLOAT_CONFIG.to_hf_dict(), "intermediate_size": 340, "quantization_config": gptq},
                                 "m")
    with pytest.raises(ValueError, match="int4_channelwise is true only for a GPTQ or compressed-tensors checkpoint "
                                         "without act-order"):
        dataclasses.replace(CHANNELWISE, int4_act_order=True)


def test_a_channelwise_g_idx_names_group_0_only(tmp_path):
    def edit(tensors):
        name = "model.layers.0.self_attn.q_proj.g_idx"
        tensors[name] = tensors[name].copy()
        tensors[name][5] = 1

    config, _ = save_int4(tmp_path, CHANNELWISE, edit=edit)
    with pytest.raises(ValueError, match="q_proj.weight: g_idx names groups other than 0 where quantization_config "
                                         r"says one per output row \(group_size -1\)"):
        ModelWeights.load(config, tmp_path)


def test_int4_fields_are_checked_together():
    with pytest.raises(ValueError, match="set int4_format and int4_group_size, or neither"):
        dataclasses.replace(FLOAT_CONFIG, int4_group_size=64)
    with pytest.raises(ValueError, match="an AWQ checkpoint has zero points"):
        dataclasses.replace(AWQ_CONFIG, int4_zero_points=False)
    with pytest.raises(ValueError, match="int4_format must be one of gptq, gptq_v2, awq, compressed or null, got 'nf4'"):
        dataclasses.replace(AWQ_CONFIG, int4_format="nf4")


def _truncated_zeros(tensors):
    name = next(n for n in tensors if n.endswith("qzeros"))
    tensors[name] = tensors[name][:, :-1].copy()


@pytest.mark.parametrize("edit, message", [
    (_truncated_zeros, r"q_proj.qzeros is int32 \(4, 15\), expected int32 \(4, 16\)"),
    (lambda t: t.pop("model.layers.1.self_attn.o_proj.scales"), "o_proj.scales is missing .the AWQ checkpoint's"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.g_idx": np.zeros(128, np.int32)}),
     "does not use: model.layers.0.mlp.up_proj.g_idx"),
])
def test_an_awq_checkpoint_the_kernels_cannot_compute_is_refused(edit, message, tmp_path):
    config, _ = save_int4(tmp_path, AWQ_CONFIG, edit=edit)
    with pytest.raises(ValueError, match=message):
        ModelWeights.load(config, tmp_path)


def test_weights_quantised_for_a_zero_point_config_carry_zero_points():
    """quantize_q4 makes what the config's kernels take: an asymmetric config's layers get zero
    points, so weights generated for it run on the same kernels as its checkpoint."""
    weights = ModelWeights.random(AWQ_CONFIG, seed=1).quantize_q4(AWQ_GROUP)
    assert all(q.zeros is not None for q in weights.quantized.values())
    symmetric = ModelWeights.random(FLOAT_CONFIG, seed=1).quantize_q4(AWQ_GROUP)
    with pytest.raises(ValueError, match="is int4 without zero points"):
        ModelWeights(AWQ_CONFIG, dict(symmetric.tensors), dict(symmetric.quantized), AWQ_GROUP)


def test_an_int4_checkpoint_in_float16_on_the_cpu_reads_its_lm_head_as_float16_words(tmp_path, default_kernels):
    """The int4 layers read their codes; the float LM head, the largest tensor left, reads the
    checkpoint's float16 words (half of float32's bytes) and computes with their exact values."""
    config, _ = save_int4(tmp_path, AWQ_CONFIG)
    weights = ModelWeights.load(config, tmp_path)
    prompts = np.random.default_rng(6).integers(0, config.vocab_size, (1, 6))
    model = LlamaModel(config, weights, default_kernels, dtype="float16")
    ours = model.generate(prompts, 12)
    reference = ReferenceModel(config, weights).generate(prompts, 12)  # the checkpoint's values are float16
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    assert np.abs(ours.logits - reference.logits).max() < 1e-4 * np.abs(reference.logits).max()
    specs = {kernel.spec.op: kernel.spec for kernel in model.used.values()}
    assert specs["gemv"].attr == {"weight": "float16"} and specs["gemv"].dtype == "float32"
    assert specs["gemv_q4"].dtype == "float32" and "weight" not in specs["gemv_q4"].attr
    assert model._weight("lm_head.weight", linear=True).dtype == np.float16
