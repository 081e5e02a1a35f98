"""Weights of a Llama-style model under Hugging Face tensor names, in the precision they were
stored in (float32, float16, or bfloat16 as ``precision.Bfloat16Words``): a bfloat16 checkpoint
takes half the memory of float32 and a model in bfloat16 uploads it as it is; every reader that
computes in float32 widens one tensor at a time (``ModelWeights.__getitem__``, ``linear``).

From safetensors files (``model.safetensors`` or shards, as ``save_pretrained`` writes
them), or generated from a seed for tests. ``quantize_q4`` packs every linear layer into
the int4 format of ``runtime.q4``; the float32 weights those codes stand for are kept for
the numpy reference, so that both sides compute with the same numbers.
"""
from __future__ import annotations

import functools
import json
import os
import re
import stat
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .model_config import ModelConfig
from .plan import head_quantize
from .q4 import dequantize_q4, pack_codes, quantize_q4
from .precision import Bfloat16Words, precision_of, rounded, widened

# Rotary frequencies some older transformers versions saved as buffers: they are a function
# of rope_theta, head_dim and the config's rope type, recomputed by the rope kernel as
# transformers recomputes them. Every other tensor the decoder does not read makes
# ``ModelWeights.load`` refuse.
IGNORED_TENSORS = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# An image-and-text checkpoint (``ModelConfig.multimodal``): the language model's tensors under
# these prefixes (what transformers writes, and the layout 4.5x saved), the image side's
# (``IMAGE_SIDE``) beside them, not read
TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."),
                 ("language_model.lm_head.", "lm_head."))
IMAGE_SIDE = re.compile(r"(model\.)?(vision_tower|multi_modal_projector|visual)\..*")


# GLM-4's norms around its sublayers by the names the decoder reads (Gemma 2's): its
# post_attention_layernorm is the MLP's input norm, post_self_attn_layernorm attention's output norm
GLM_NORMS = {"post_self_attn_layernorm": "post_attention_layernorm",
             "post_attention_layernorm": "pre_feedforward_layernorm",
             "post_mlp_layernorm": "post_feedforward_layernorm"}
_GLM_NORM_NAME = re.compile(r"(model\.layers\.\d+\.)(\w+)(\.weight)")


_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def _ignored(config: ModelConfig, name: str) -> bool:
    """Whether checkpoint tensor ``name`` is one the decoder leaves unread (``IGNORED_TENSORS``, and the
    multi-token-prediction layers of ERNIE 4.5 MoE, its ``mtp`` tensors, and of GLM-4.5, layers past
    ``num_hidden_layers``, which transformers does not load either)."""
    if IGNORED_TENSORS.fullmatch(name):
        return True
    if not config.expert_selection_bias:
        return False
    found = _LAYER_INDEX.match(name)
    return "mtp" in name or (found is not None and int(found.group(1)) >= config.num_hidden_layers)


def glm_norms(config: ModelConfig) -> bool:
    """Whether ``config``'s checkpoints name their norms as GLM-4's (pairs of adjacent dims and norms
    of the sublayers' outputs: GLM-4 is the family with both)."""
    return config.rope_interleaved and config.post_norms


def renamed_norm(name: str, names: Mapping[str, str]) -> str:
    """``name`` with a layer norm's part renamed by ``names`` (GLM_NORMS or its inverse)."""
    found = _GLM_NORM_NAME.fullmatch(name)
    if found is None or found.group(2) not in names:
        return name
    return found.group(1) + names[found.group(2)] + found.group(3)


def text_name(config: ModelConfig, name: str) -> str | None:
    """The name the decoder reads checkpoint tensor ``name`` under: itself (GLM-4's norms:
    ``GLM_NORMS``), or in an image-and-text checkpoint its language model's name without the
    prefix, None for the image side's tensors."""
    if glm_norms(config):
        return renamed_norm(name, GLM_NORMS)
    if config.moe:  # Mixtral's names, Granite MoE's router, ERNIE 4.5's shared experts
        found = _GRANITE_ROUTER.fullmatch(name)
        if found:
            return f"{found.group(1)}{ROUTER}.weight"
        return from_mixtral_name(name).replace(".mlp.shared_experts.", ".mlp.shared_expert.")
    if config.multimodal is None:
        return name
    if IMAGE_SIDE.fullmatch(name):
        return None
    for prefix, plain in TEXT_PREFIXES:
        if name.startswith(prefix):
            return plain + name[len(prefix):]
    return name  # not the language model's: refused as a tensor the decoder does not use


INDEX_FILE = "model.safetensors.index.json"

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# Projections that read the same input run as one matrix, their weights stacked along N
# (rows): one launch and one pass over the input instead of three (Q, K, V) or two (gate, up).
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj")}
# LINEARS as the decoder runs them: each fused group in place of its parts
DEVICE_LINEARS = tuple(dict.fromkeys(next((f for f, parts in FUSED.items() if p in parts), p) for p in LINEARS))


# A mixture of experts' MLP (``ModelConfig.num_experts``) under the names Qwen's MoE checkpoints use:
# the router ``mlp.gate`` [E, H], expert e's ``mlp.experts.e.{gate,up,down}_proj``, Qwen2-MoE's
# ``mlp.shared_expert.{gate,up,down}_proj`` and ``mlp.shared_expert_gate`` [1, H]. Mixtral's names
# are read and written as its checkpoints hold them (``from_mixtral_name``). The decoder runs each
# expert's projections as they are stored (stacking gate and up would copy most of the model), the
# shared expert's gate and up as one matrix, and the router and the shared expert's gate as one
# (``mlp.router``: E + 1 rows).
ROUTER, SHARED_GATE, ROUTER_WITH_SHARED_GATE = "mlp.gate", "mlp.shared_expert_gate", "mlp.router"
_GATED = ("gate_proj", "up_proj", "down_proj")
# the shared expert's gate/up stacked, its parts (fused_parts)
_SHARED_GATE_UP = re.compile(r"(.*\.mlp\.shared_expert)\.gate_up_proj\.(\w+)")
# Mixtral's checkpoints: its block_sparse_moe is Qwen's mlp, its experts' w1, w3, w2 gate, up, down
_MIXTRAL_NAME = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.(gate|experts\.\d+\.(w1|w2|w3))(\.weight)")
_MIXTRAL_PROJS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_QWEN_EXPERT_NAME = re.compile(r"(model\.layers\.\d+\.)mlp\.(gate|experts\.\d+\.(gate_proj|up_proj|down_proj))(\.weight)")


# Granite MoE's checkpoints: a layer's experts in one tensor each, ``block_sparse_moe.input_linear``
# [E, 2I, H] (each expert's gate rows, then its up rows) and ``output_linear`` [E, H, I] (each one's
# down), the router as ``block_sparse_moe.router.layer``; loaded as views of each expert's projections
_GRANITE_STACK = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.(input_linear|output_linear)\.weight")
_GRANITE_PROJECTIONS = {"input_linear": ("gate_proj", "up_proj"), "output_linear": ("down_proj",)}
_GRANITE_ROUTER = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.router\.layer\.weight")


def _checkpoint_family(config: ModelConfig) -> str | None:
    """The model_type a mixture of experts' checkpoints are written as (its names of the experts
    follow it); None for a dense model."""
    return config.to_hf_dict()["model_type"] if config.moe else None


def stacked_parts(config: ModelConfig, name: str) -> tuple[str, ...]:
    """``fused_parts``, and the experts' projections a Granite MoE's stacked tensor ``name`` holds,
    in order."""
    found = _GRANITE_STACK.fullmatch(name) if config.moe else None
    if found is None:
        return fused_parts(name)
    projections = _GRANITE_PROJECTIONS[found.group(2)]
    return tuple(f"{found.group(1)}mlp.experts.{e}.{p}.weight" for e in range(config.num_experts) for p in projections)


def _granite_stacks(config: ModelConfig, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``tensors`` as a Granite MoE's checkpoint holds them (the inverse of loading: stacked experts,
    its router's name), float32 where a tensor is bfloat16 words."""
    out = {}
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for stack, projections in _GRANITE_PROJECTIONS.items():
            experts = [np.concatenate([widened(tensors.pop(f"{prefix}mlp.experts.{e}.{p}.weight")) for p in projections])
                       for e in range(config.num_experts)]
            out[f"{prefix}block_sparse_moe.{stack}.weight"] = np.stack(experts)
        out[f"{prefix}block_sparse_moe.router.layer.weight"] = tensors.pop(f"{prefix}{ROUTER}.weight")
    return {**tensors, **out}


def _renamed_expert(name: str, pattern: re.Pattern, block: str, projections: Mapping[str, str]) -> str:
    """``name`` of a router or an expert's projection (``pattern``) under ``block`` (the MLP's name),
    its projection renamed by ``projections``; any other name as it is."""
    found = pattern.fullmatch(name)
    if found is None:
        return name
    part = found.group(2)
    if found.group(3):
        part = part[: -len(found.group(3))] + projections[found.group(3)]
    return f"{found.group(1)}{block}.{part}{found.group(4)}"


def from_mixtral_name(name: str) -> str:
    """A Mixtral checkpoint's tensor ``name`` as the decoder reads it (any other name as it is)."""
    return _renamed_expert(name, _MIXTRAL_NAME, "mlp", _MIXTRAL_PROJS)


def to_mixtral_name(name: str) -> str:
    """The inverse of ``from_mixtral_name``."""
    return _renamed_expert(name, _QWEN_EXPERT_NAME, "block_sparse_moe", {p: w for w, p in _MIXTRAL_PROJS.items()})


def _expert_parts(config: ModelConfig) -> tuple[str, ...]:
    """Every expert's three projections (Hugging Face parts), as checkpoints and the decoder name them."""
    return tuple(f"mlp.experts.{e}.{proj}" for e in range(config.num_experts) for proj in _GATED)


def mlp_parts(config: ModelConfig, layer: int) -> tuple[str, ...]:
    """The linear layers of ``layer``'s MLP (Hugging Face parts): Llama's three, or a mixture of
    experts' router, every expert's three and Qwen2-MoE's shared expert and its gate."""
    if not config.moe_layer(layer):
        return tuple(f"mlp.{proj}" for proj in _GATED)
    experts = _expert_parts(config)
    shared = tuple(f"mlp.shared_expert.{proj}" for proj in _GATED) if config.shared_expert_intermediate_size else ()
    gate = (SHARED_GATE,) if shared and config.shared_expert_gated else ()
    return (ROUTER, *experts, *gate, *shared)


# the bias of each expert's selection (``ModelConfig.expert_selection_bias``) as the checkpoints hold it:
# ERNIE 4.5 MoE's [1, E], GLM-4.5's (its router's, scoring by sigmoid) [E]
SELECTION_BIAS = {"softmax": "mlp.moe_statics.e_score_correction_bias", "sigmoid": "mlp.gate.e_score_correction_bias"}


def selection_bias_name(config: ModelConfig, layer: int) -> str:
    return f"model.layers.{layer}.{SELECTION_BIAS[config.router_scoring]}"


def _selection_bias_shape(config: ModelConfig) -> tuple[int, ...]:
    return (1, config.num_experts) if config.router_scoring == "softmax" else (config.num_experts,)


def router_part(config: ModelConfig) -> str:
    """The router's part as the decoder runs it: with a shared expert, stacked with its gate."""
    return ROUTER_WITH_SHARED_GATE if config.shared_expert_intermediate_size and config.shared_expert_gated else ROUTER


def device_mlp_parts(config: ModelConfig, layer: int) -> tuple[str, ...]:
    """``mlp_parts`` as the decoder runs them: a dense or shared expert's gate and up stacked, the
    router with the shared gate; the experts' projections as they are."""
    if not config.moe_layer(layer):
        return ("mlp.gate_up_proj", "mlp.down_proj")
    experts = _expert_parts(config)
    shared = (("mlp.shared_expert.gate_up_proj", "mlp.shared_expert.down_proj")
              if config.shared_expert_intermediate_size else ())
    return (router_part(config), *experts, *shared)


# Qwen3's norms of each query and key head (``ModelConfig.qk_norm``)
QK_NORMS = ("self_attn.q_norm", "self_attn.k_norm")
# Gemma 2's and 3's norms around the MLP (``ModelConfig.post_norms``; its post_attention_layernorm
# normalises attention's output, where Llama's normalises the MLP's input; OLMo 2 has the second
# alone, ``ModelConfig.pre_norms``)
MLP_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def is_norm_gain(name: str) -> bool:
    """Whether tensor ``name`` is the gain of an RMSNorm (the layers', the heads', the final one)."""
    return name.endswith("norm.weight")


def layer_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.{part}.weight"


def bias_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.{part}.bias"


def biased_parts(config: ModelConfig) -> tuple[str, ...]:
    """The projections (Hugging Face parts) that have a bias in ``config``."""
    return ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if config.qkv_bias else ())
            + (("self_attn.o_proj",) if config.o_bias else ())
            + (("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj") if config.mlp_bias else ()))


# what a fused projection's tensors may be: its weights, its biases, an int4 checkpoint's parts
_STACKED_KINDS = ("weight", "bias", "qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale",
                  "weight_zero_point", "weight_g_idx", "weight_shape")


def fused_parts(name: str) -> tuple[str, ...]:
    """The Hugging Face tensors a fused projection stacks, its weights, its biases or an int4
    checkpoint's tensors of it ((name,) for any other tensor)."""
    expert = _SHARED_GATE_UP.fullmatch(name)
    if expert is not None:
        return tuple(f"{expert.group(1)}.{proj}.{expert.group(2)}" for proj in _GATED[:2])
    router = f".{ROUTER_WITH_SHARED_GATE}.weight"
    if name.endswith(router):
        prefix = name[: -len(router)]
        return (f"{prefix}.{ROUTER}.weight", f"{prefix}.{SHARED_GATE}.weight")
    for fused, parts in FUSED.items():
        for kind in _STACKED_KINDS:
            suffix = f".{fused}.{kind}"
            if name.endswith(suffix):
                prefix = name[: -len(suffix)]
                return tuple(f"{prefix}.{part}.{kind}" for part in parts)
    return (name,)


def device_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The weights a decoder reads where its kernels run: ``expected_shapes`` with the fused
    projections stacked, and no embedding table unless it is also the LM head (it is
    gathered on the host)."""
    if config.moe:
        raise ValueError(f"{config.name}: a mixture of experts runs on CPU kernels only (no device weights)")
    shapes = dict(expected_shapes(config))
    for layer in range(config.num_hidden_layers):
        for fused, parts in FUSED.items():
            rows = sum(shapes.pop(layer_name(layer, part))[0] for part in parts)
            shapes[layer_name(layer, fused)] = (rows, config.hidden_size)
            if bias_name(layer, parts[0]) in shapes:  # biases stacked like their weights
                shapes[bias_name(layer, fused)] = (sum(shapes.pop(bias_name(layer, part))[0] for part in parts),)
    if not config.tie_word_embeddings:
        shapes.pop("model.embed_tokens.weight")
    return shapes


def device_linear_names(config: ModelConfig) -> list[str]:
    """The linear layers as the decoder runs them (fused projections, the LM head included)."""
    return _linear_names(config, DEVICE_LINEARS[:2], device_mlp_parts)


def _linear_names(config: ModelConfig, attention: tuple[str, ...], mlp) -> list[str]:
    """Every layer's ``attention`` parts and ``mlp(config, layer)`` parts, then the LM head."""
    names = [layer_name(layer, part) for layer in range(config.num_hidden_layers)
             for part in (*attention, *mlp(config, layer))]
    return names + ["lm_head.weight" if not config.tie_word_embeddings else "model.embed_tokens.weight"]


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the decoder reads, by Hugging Face name, with its shape."""
    c = config
    h, i = c.hidden_size, c.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for layer in range(c.num_hidden_layers):
        shapes.update({
            layer_name(layer, "input_layernorm"): (h,), layer_name(layer, "post_attention_layernorm"): (h,),
            layer_name(layer, "self_attn.q_proj"): (c.q_size, h), layer_name(layer, "self_attn.k_proj"): (c.kv_size, h),
            layer_name(layer, "self_attn.v_proj"): (c.kv_size, h), layer_name(layer, "self_attn.o_proj"): (h, c.q_size)})
        shapes.update({layer_name(layer, part): _mlp_shape(c, part) for part in mlp_parts(c, layer)})
        if c.expert_selection_bias and c.moe_layer(layer):
            shapes[selection_bias_name(c, layer)] = _selection_bias_shape(c)
        shapes.update({bias_name(layer, part): shapes[layer_name(layer, part)][:1] for part in biased_parts(c)})
        if c.qk_norm:  # Qwen3: one gain per head dim, shared by the heads of q (and of k); OLMo 2: one per value
            q_norm, k_norm = QK_NORMS
            shapes.update({layer_name(layer, q_norm): (c.head_dim if c.qk_norm_span == "head" else c.q_size,),
                           layer_name(layer, k_norm): (c.head_dim if c.qk_norm_span == "head" else c.kv_size,)})
        if c.post_norms:
            shapes.update({layer_name(layer, part): (h,) for part in MLP_NORMS})
        if not c.pre_norms:  # OLMo 2: post_attention_layernorm and post_feedforward_layernorm alone
            del shapes[layer_name(layer, "input_layernorm")], shapes[layer_name(layer, "pre_feedforward_layernorm")]
    return shapes


def _mlp_shape(config: ModelConfig, part: str) -> tuple[int, int]:
    """The shape of an MLP's linear layer ``part`` (``mlp_parts``)."""
    h = config.hidden_size
    if part in (ROUTER, SHARED_GATE):
        return (config.num_experts if part == ROUTER else 1, h)
    if part.startswith("mlp.shared_expert."):
        i = config.shared_expert_intermediate_size
    else:  # an expert's, or a dense MLP's
        i = config.intermediate_size if part.startswith("mlp.experts.") else config.dense_size
    return (h, i) if part.endswith("down_proj") else (i, h)


def linear_names(config: ModelConfig) -> list[str]:
    return _linear_names(config, LINEARS[:4], mlp_parts)


def q4_linear_names(config: ModelConfig, device: bool = False) -> list[str]:
    """The linear layers a q4 model holds as int4 codes: every one, but an int4 checkpoint's LM head
    (the last name) and a mixture of experts' routers (and Qwen2-MoE's shared gates), which GPTQ,
    AWQ and llm-compressor leave in floats; ``device``: named as the decoder runs them
    (``device_linear_names``)."""
    names = device_linear_names(config) if device else linear_names(config)
    if head_quantize(config, "q4") == "q4":
        return names
    floats = (f".{ROUTER}.weight", f".{SHARED_GATE}.weight", f".{ROUTER_WITH_SHARED_GATE}.weight")
    return [name for name in names[:-1] if not name.endswith(floats)]


# An int4 checkpoint's tensors in place of each int4 linear layer's ``weight``, by format
# (``ModelConfig.int4_format``), with G the group size:
# - GPTQ (AutoGPTQ's packing): qweight [K/8, N] int32 (eight 4-bit codes along K, the first in the
#   low bits), qzeros [K/G, N/8] int32 (eight zero points along N, stored minus one; gptq_v2 stores
#   them as they are), scales [K/G, N], g_idx [K] (optional: each k's group).
# - AWQ (AutoAWQ's gemm packing): qweight [K, N/8] int32 (eight codes along N, in the nibble order
#   AWQ_ORDER), qzeros [K/G, N/8] int32 (the zero points, packed the same way), scales [K/G, N].
# - compressed-tensors (pack-quantized): weight_packed [N, K/8] int32 (eight codes along K, the first
#   in the low bits, each the signed value plus 8), weight_zero_point [N/8, K/G] int32 (asymmetric
#   only: eight along N, plus 8 likewise), weight_scale [N, K/G], weight_g_idx [K] (act-order
#   "group" only), weight_shape [2] (N, K).
# A weight is scales[g, n] * (code - zero) (compressed-tensors: zero 8 where it stores none).
INT4_PARTS = {"gptq": ("qweight", "qzeros", "scales", "g_idx"), "awq": ("qweight", "qzeros", "scales"),
              "compressed": ("weight_packed", "weight_zero_point", "weight_scale", "weight_g_idx", "weight_shape")}
# the parts a layer may leave out: GPTQ's g_idx (in order), compressed-tensors' zero points (symmetric)
# and g_idx (no act-order)
_OPTIONAL_INT4_PARTS = ("g_idx", "weight_g_idx", "weight_zero_point")
# the parts that hold floats (the others integers)
_INT4_SCALES = ("scales", "weight_scale")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a packed word holds column AWQ_ORDER[i] of its eight
_NIBBLE_SHIFTS = 4 * np.arange(8, dtype=np.uint32)


def int4_method(config: ModelConfig) -> str:
    """The key of INT4_PARTS of an int4 checkpoint's config: its quantisation method."""
    return config.int4_format if config.int4_format in ("awq", "compressed") else "gptq"


def int4_shapes(config: ModelConfig) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{int4 checkpoint tensor name: (the linear layer's weight name, its shape)} of an int4 config."""
    shapes = expected_shapes(config)
    method = int4_method(config)
    out = {}
    for name in q4_linear_names(config):
        n, k = shapes[name]
        groups = 1 if config.int4_channelwise else k // config.int4_group_size  # scales (and zeros) per row
        prefix = name[: -len("weight")]
        if method == "compressed":  # along K within each output row
            layout = ((n, k // 8), (n // 8, groups), (n, groups), (k,), (2,))
        else:
            layout = ((k // 8, n) if method == "gptq" else (k, n // 8), (groups, n // 8), (groups, n), (k,))
        for part, shape in zip(INT4_PARTS[method], layout):
            out[prefix + part] = (name, shape)
    return out


def _nibbles(packed: np.ndarray, axis: int) -> np.ndarray:
    """The eight 4-bit values of each int32 of ``packed``, the first from the low bits, spread
    along ``axis`` (0: a row becomes eight rows; 1: a column eight columns)."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    if axis == 0:
        return ((words[:, None, :] >> _NIBBLE_SHIFTS[None, :, None]) & 15).reshape(-1, words.shape[1])
    return ((words[:, :, None] >> _NIBBLE_SHIFTS[None, None, :]) & 15).reshape(words.shape[0], -1)


def int4_linear(name: str, parts: dict[str, np.ndarray], config: ModelConfig) -> QuantizedLinear:
    """The q4 layer an int4 checkpoint's tensors of linear ``name`` stand for (``INT4_PARTS``): the
    codes repacked as the kernels read them, the zero points kept where the config has them (a
    ValueError for a symmetric checkpoint whose zero points are not all 8). A GPTQ g_idx that puts
    rows out of group order (act-order) has them stored sorted by group, and the layer's ``order``
    says where each came from; it must give every group ``int4_group_size`` rows."""
    group = config.int4_group_size
    if config.int4_format == "awq":  # packed along N in AWQ_ORDER: undo the order within each eight
        undo = np.argsort(AWQ_ORDER)
        codes = _nibbles(parts["qweight"], 1)
        zeros = _nibbles(parts["qzeros"], 1)
        n = codes.shape[1]
        codes = codes.reshape(-1, n // 8, 8)[:, :, undo].reshape(-1, n)
        zeros = zeros.reshape(-1, n // 8, 8)[:, :, undo].reshape(-1, n)
    elif config.int4_format == "compressed":  # [N, K] as stored; the signed values plus 8 are codes
        (n, k) = (int(d) for d in parts["weight_shape"])
        codes = _nibbles(parts["weight_packed"], 1)
        if (n, k) != codes.shape:
            raise ValueError(f"{name}: weight_shape says {n} x {k}, the packed codes hold {codes.shape[0]} x "
                             f"{codes.shape[1]}")
        codes = codes.T  # [K, N], as the other formats' codes
        stored = parts.get("weight_zero_point")
        if config.int4_zero_points != (stored is not None):
            raise ValueError(f"{name}: weight_zero_point {'missing' if stored is None else 'given'} where "
                             f"quantization_config's weights are {'not ' if config.int4_zero_points else ''}symmetric")
        groups = parts["weight_scale"].shape[1]
        zeros = np.full((groups, n), 8, np.uint32) if stored is None else _nibbles(stored, 0).T
        order = _act_order(name, parts.get("weight_g_idx"), k, config)
        if order is not None:
            codes = codes[order]
        parts = {**parts, "scales": parts["weight_scale"].T}
    else:
        codes = _nibbles(parts["qweight"], 0)
        zeros = _nibbles(parts["qzeros"], 1) + (1 if config.int4_format == "gptq" else 0)
        order = _act_order(name, parts.get("g_idx"), codes.shape[0], config)
        if order is not None:
            codes = codes[order]
    if not config.int4_zero_points and not (zeros == 8).all():
        raise ValueError(f"{name}: zero points other than 8 where the config says the codes are symmetric "
                         "(quantization_config.sym true)")
    scales = widened(parts["scales"])  # [groups, N]
    if config.int4_channelwise:  # a row's one scale and zero point for each of the kernels' groups
        scales, zeros = (np.repeat(a, codes.shape[0] // group, axis=0) for a in (scales, zeros))
    kept = np.ascontiguousarray(zeros.T, dtype=np.float32) if config.int4_zero_points else None
    return QuantizedLinear(pack_codes(codes.T.astype(np.uint8)), np.ascontiguousarray(scales.T),
                           group, kept, order if config.int4_format != "awq" else None)


def _act_order(name: str, g_idx: np.ndarray | None, k: int, config: ModelConfig) -> np.ndarray | None:
    """The rows of a GPTQ or compressed-tensors layer of an act-order model sorted by group (int32 [K]: where row j of the
    sorted codes came from), None in a model without act-order. ValueError for a g_idx out of order
    where the config says there is no act-order, or one that does not give each group
    ``int4_group_size`` rows."""
    group = config.int4_group_size
    in_order = np.zeros(k, np.int64) if config.int4_channelwise else np.arange(k) // group
    if not config.int4_act_order:
        if g_idx is not None and not np.array_equal(g_idx, in_order):
            if config.int4_channelwise:
                raise ValueError(f"{name}: g_idx names groups other than 0 where quantization_config says one per "
                                 "output row (group_size -1)")
            raise ValueError(f"{name}: g_idx puts rows out of group order (act-order), but quantization_config "
                             "says none (GPTQ's desc_act true, compressed-tensors' actorder \"group\")")
        return None
    if g_idx is None:  # every layer of an act-order model has an order, if only this one's
        g_idx = in_order
    if g_idx.min() < 0 or g_idx.max() >= k // group or (np.bincount(g_idx, minlength=k // group) != group).any():
        raise ValueError(f"{name}: g_idx does not give each of the {k // group} groups {group} rows")
    return np.argsort(g_idx, kind="stable").astype(np.int32)


@dataclass
class QuantizedLinear:
    """One linear layer in int4: the kernel's arrays, and the float32 weights they stand for
    (``dequantized``: made on first use, by the reference decoder; a run on the kernels never
    holds them, which would take 8x the bytes of the codes)."""

    wq: np.ndarray         # [N, K/2] uint8
    scales: np.ndarray     # [N, K/G] float32
    group_size: int
    zeros: np.ndarray | None = None  # [N, K/G] float32 (whole numbers): the zero points; None: 8 (symmetric)
    # act-order (int32 [K]): column j of wq holds input k = order[j] of the layer, so the kernels read
    # the input gathered so (``gather_columns``); None: in order
    order: np.ndarray | None = None

    @functools.cached_property
    def dequantized(self) -> np.ndarray:  # [N, K] float32, in the layer's input order
        weights = dequantize_q4(self.wq, self.scales, self.zeros, self.group_size).astype(np.float32)
        if self.order is None:
            return weights
        unsorted = np.empty_like(weights)
        unsorted[:, self.order] = weights
        return unsorted


@dataclass
class ModelWeights:
    config: ModelConfig
    tensors: dict[str, np.ndarray]
    quantized: dict[str, QuantizedLinear] = field(default_factory=dict)
    group_size: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.tensors, Mapping):
            raise ValueError(f"weights of {self.config.name} must be a mapping of names to arrays, "
                             f"not {type(self.tensors).__name__}")
        problems = []
        for name, shape in expected_shapes(self.config).items():
            tensor, codes = self.tensors.get(name), self.quantized.get(name)
            if tensor is not None:
                actual = tuple(np.shape(tensor))
            elif codes is not None:  # held as int4 codes only (an int4 checkpoint): two a byte
                actual = (codes.wq.shape[0], 2 * codes.wq.shape[1])
            else:
                problems.append(f"{name} is missing")
                continue
            if actual != shape:
                problems.append(f"{name} has shape {actual}, expected {shape}")
        zero_points = self.config.int4_zero_points
        problems += [f"{name} is int4 {'without' if zero_points else 'with'} zero points"
                     for name, codes in self.quantized.items() if (codes.zeros is not None) != zero_points]
        problems += [f"{name} has {'no' if self.config.int4_act_order else 'an'} act-order"
                     for name, codes in self.quantized.items() if (codes.order is not None) != self.config.int4_act_order]
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ValueError(f"weights do not fit {self.config.name}: {'; '.join(problems[:3])}{more}")
        stored = {}
        for name, tensor in self.tensors.items():
            try:
                stored[name] = _stored(tensor)
            except ValueError as exc:
                raise ValueError(f"weights of {self.config.name}: {name}: {exc}") from None
        self.tensors = stored

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor as float32 (widened here when it is stored narrower)."""
        return widened(self.tensors[name])

    @property
    def lm_head(self) -> np.ndarray:
        return self["model.embed_tokens.weight" if self.config.tie_word_embeddings else "lm_head.weight"]

    def linear(self, name: str) -> np.ndarray:
        """The float32 weights a linear layer computes with: the dequantised ones when quantised."""
        q = self.quantized.get(name)
        return q.dequantized if q is not None else self[name]

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0) -> "ModelWeights":
        """Seeded weights at the scale of a trained model (std 0.02; norm gains near 1, Gemma's
        weights near 0 as it scales by 1 + weight; biases std 0.1, large enough to change the logits)."""
        rng = np.random.default_rng(seed)
        tensors = {}
        for name, shape in expected_shapes(config).items():
            if name.endswith(".bias"):
                tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.1).astype(np.float32)
            elif len(shape) == 1:
                offset = 1.0 if config.offset_norms else 0.0
                tensors[name] = (rng.uniform(0.8, 1.2, shape) - offset).astype(np.float32)
            else:
                tensors[name] = (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)
        return cls(config, tensors)

    def check_finite(self) -> None:
        """ValueError naming the tensors that hold a NaN or an infinity (a damaged checkpoint
        otherwise generates nonsense without a word). One pass over every weight: seconds for
        a 7B model, so it is asked for (``load(check_finite=True)``, ``autotune run
        --check-weights``) rather than done on every load."""
        bad = [name for name, tensor in self.tensors.items() if not _all_finite(tensor)]
        if bad:
            more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
            raise ValueError(f"weights of {self.config.name}: {', '.join(bad[:3])}{more} hold NaN or infinite values")

    @classmethod
    def load(cls, config: ModelConfig, folder: str | Path, check_finite: bool = False,
             mapped: bool = False) -> "ModelWeights":
        """The checkpoint in ``folder`` (``checkpoint_files``), each tensor in its file's precision;
        with ``check_finite``, refused when a tensor holds a NaN or an infinity; ``mapped``: the
        tensors are views of the files mapped into memory (``mapped_safetensors``: no copy, pages
        read as they are used; the files must not change while the weights are in use).

        Every tensor of the checkpoint must be one the decoder reads (``expected_shapes``: the
        projection biases too where the config has them): a checkpoint that holds others
        (biases its config does not announce, modules of another architecture) is refused with
        their names rather than loaded without them.
        Rotary ``inv_freq`` buffers are the one exception (``IGNORED_TENSORS``). A projection
        stored stacked as the decoder runs it (``FUSED``: Phi-3's ``qkv_proj`` and
        ``gate_up_proj``) stands for its parts, which are views of its rows. An image-and-text
        checkpoint (``ModelConfig.multimodal``) holds them under its language model's prefix
        (``text_name``); its image side's tensors are not read."""
        files = checkpoint_files(folder)
        shapes = expected_shapes(config)
        int4 = int4_shapes(config) if config.int4_format is not None else {}
        # an int4 checkpoint's int4 layers: their packed tensors in place of their weights
        wanted = (set(shapes) - {linear for linear, _ in int4.values()}) | set(int4)
        found: dict[str, Path] = {}  # every tensor of the checkpoint -> its file
        for path in files:
            header, _ = read_header(path)
            for name in header:
                if name == "__metadata__":
                    continue
                if name in found:
                    raise ValueError(f"{folder}: tensor {name} is in both {found[name].name} and {path.name}")
                found[name] = path
        _check_index(Path(folder), found)
        # by the names the decoder reads (an image-and-text checkpoint's language model: text_name)
        renamed = {name: text_name(config, name) for name in found}
        found = {renamed[name]: path for name, path in found.items() if renamed[name] is not None}
        stacked = {name: parts for name in found
                   if len(parts := stacked_parts(config, name)) > 1 and wanted >= set(parts)}
        twice = sorted(part for parts in stacked.values() for part in parts if part in found)
        if twice:
            raise ValueError(f"{folder}: tensor {twice[0]} is in the checkpoint both alone and stacked in "
                             f"{next(n for n, parts in stacked.items() if twice[0] in parts)}")
        unused = sorted(n for n in found if n not in wanted and n not in stacked and not _ignored(config, n))
        tied_head = config.tie_word_embeddings and "lm_head.weight" in unused
        if tied_head:  # checked below: the LM head is the embedding, so it may only repeat it
            unused.remove("lm_head.weight")
        if unused:
            more = f" (and {len(unused) - 4} more)" if len(unused) > 4 else ""
            raise ValueError(f"{folder}: the checkpoint holds {len(unused)} tensors {config.name} does not use: "
                             f"{', '.join(unused[:4])}{more}; biases the config does not announce and modules "
                             "the decoder lacks are not implemented")
        tensors: dict[str, np.ndarray] = {}
        read = {raw for raw, name in renamed.items()
                if name is not None and (name in wanted or name in stacked or (tied_head and name == "lm_head.weight"))}
        ints = {raw for raw, name in renamed.items() if (name in int4 or stacked.get(name, (None,))[0] in int4)
                and not name.endswith(tuple("." + part for part in _INT4_SCALES))}
        for path in files:
            tensors.update({renamed[k]: v for k, v in read_safetensors(path, read, ints, mapped).items()})
        for name, parts in stacked.items():
            if name.endswith(".weight_shape"):  # compressed-tensors': the stack's (N, K)
                tensors.update(_stacked_weight_shapes(folder, name, tensors.pop(name),
                                                      {p: shapes[int4[p][0]] for p in parts}))
            elif parts[0] in int4:  # an int4 checkpoint's stacked layer: its parts along N
                tensors.update(_int4_unstacked(folder, name, tensors.pop(name), {p: int4[p][1] for p in parts}))
            else:
                tensors.update(_unstacked(folder, name, tensors.pop(name), {part: shapes[part] for part in parts},
                                          config.num_experts if _GRANITE_STACK.fullmatch(name) else None))
        quantized = _int4_layers(folder, tensors, int4, config) if int4 else {}
        if tied_head:
            head, embed = tensors.pop("lm_head.weight"), tensors.get("model.embed_tokens.weight")
            if embed is None:  # the one table stored under the head's name: transformers ties it the same
                tensors["model.embed_tokens.weight"] = head
            elif head.shape != embed.shape or not np.array_equal(head, embed):
                raise ValueError(f"{folder}: tie_word_embeddings is true but lm_head.weight differs from "
                                 "model.embed_tokens.weight")
        if config.rope_interleaved:
            tensors, quantized = _pairs_as_halves(config, tensors, quantized)
        weights = cls(config, tensors, quantized, config.int4_group_size or 0)
        if check_finite:
            weights.check_finite()
        return weights

    def save(self, folder: str | Path) -> Path:
        """``model.safetensors`` and ``config.json`` in ``folder``, loadable by ``load``."""
        from safetensors.numpy import save_file

        codes_only = sorted(set(self.quantized) - set(self.tensors))
        if codes_only:  # an int4 checkpoint's: written as float weights they would be another checkpoint
            raise ValueError(f"weights of {self.config.name}: {codes_only[0]} is held as int4 codes only; "
                             "save writes float checkpoints")
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors
        if self.config.rope_interleaved:  # back in the checkpoint's order of each head's dims
            tensors, _ = _pairs_as_halves(self.config, tensors, {}, inverse=True)
        if glm_norms(self.config):  # and under its names of the norms
            back = {internal: glm for glm, internal in GLM_NORMS.items()}
            tensors = {renamed_norm(name, back): tensor for name, tensor in tensors.items()}
        family = _checkpoint_family(self.config)
        if family == "mixtral":
            tensors = {to_mixtral_name(name): tensor for name, tensor in tensors.items()}
        elif family == "granitemoe":
            tensors = _granite_stacks(self.config, dict(tensors))
        elif self.config.moe and not self.config.shared_expert_gated:  # ERNIE 4.5's name of its shared experts
            tensors = {name.replace(".mlp.shared_expert.", ".mlp.shared_experts."): t for name, t in tensors.items()}
        # numpy has no bfloat16: such tensors are written widened (float32, the same values)
        save_file({name: widened(t) if isinstance(t, Bfloat16Words) else t for name, t in tensors.items()},
                  str(out / "model.safetensors"))
        self.config.save(out / "config.json")
        return out

    def widened(self) -> "ModelWeights":
        """These weights with every tensor in float32 (itself when they already are): what a
        float32 computation like the numpy reference works on."""
        if all(precision_of(t) == "float32" for t in self.tensors.values()):
            return self
        return ModelWeights(self.config, {name: self[name] for name in self.tensors}, dict(self.quantized),
                            self.group_size)

    def rounded(self, dtype: str) -> "ModelWeights":
        """The weights a model in ``dtype`` holds, widened back to float32 (the int4 scales
        rounded too): a float32 reference of a half-precision model computes from these."""
        if dtype == "float32":
            return self
        quantized = {}
        for name, q in self.quantized.items():
            quantized[name] = replace(q, scales=rounded(q.scales, dtype))
        tensors = {name: rounded(self[name], dtype) for name in self.tensors}
        return ModelWeights(self.config, tensors, quantized, self.group_size)

    def quantize_q4(self, group_size: int = 128) -> "ModelWeights":
        """A copy whose linear layers (LM head included, but an int4 checkpoint's) are int4 with group
        scales (and zero points where the config's kernels take them); itself when they already are
        (an int4 checkpoint). For an act-order config each layer input's rows are grouped in an
        order of their own (seeded; Q/K/V share one, gate/up one), as GPTQ's act-order groups them."""
        if self.quantized:
            if group_size != self.group_size:
                raise ValueError(f"the weights are int4 with group size {self.group_size}, not {group_size}")
            return self
        quantized = {}
        orders: dict[str, np.ndarray] = {}
        rng = np.random.default_rng(0)
        for name in q4_linear_names(self.config):
            weights, order = self[name], None
            if self.config.int4_act_order:  # one order per layer input: a fused projection's parts share it
                order = orders.setdefault(_input_of(name), rng.permutation(weights.shape[1]).astype(np.int32))
                weights = weights[:, order]
            packed = quantize_q4(weights, group_size, zero_point=self.config.int4_zero_points)
            quantized[name] = QuantizedLinear(packed["WQ"], packed["SCALES"], group_size, packed.get("ZEROS"), order)
        return ModelWeights(self.config, dict(self.tensors), quantized, group_size)


@dataclass
class DeviceWeights:
    """A model's weights already where its CUDA kernels run, in the model's precision: made on
    the device by another framework (shared, not copied) or generated there, so a large model
    needs no host copy. ``tensors`` maps every name of ``device_shapes`` (Q/K/V and gate/up
    stacked as ``FUSED`` says, their biases too where the config has them) to a device array
    (anything with ``gpudata``, ``shape`` and ``dtype``, e.g. ``runtime.arrays.DeviceArray``);
    an int4 layer named in ``quantized`` has "NAME#wq" ([N, K/2] uint8) and "NAME#scales"
    ([N, K/group_size]) instead, and where the config's codes have zero points
    (``ModelConfig.int4_zero_points``) "NAME#zeros" ([N, K/group_size]) too. In an act-order
    checkpoint (``ModelConfig.int4_act_order``) every int4 layer but down_proj has "NAME#order" ([K]
    int32: where each of its rows, stored sorted by group, came from; ``QuantizedLinear.order``), and
    gate/up's rows lie in the order down_proj's read (as ``runtime.llama.LlamaModel`` uploads host
    weights). ``embedding`` is the token table on the host, in the model's storage format (bfloat16
    as uint16 words): each step gathers its rows there.

    ``folded``: the tensors already carry what the runtime folds into weights it uploads
    (``ModelConfig.scaled``: Granite's scalars, Gemma's embedding scale and norm gains of 1 +
    weight), as ``runtime.llama.LlamaModel`` would have uploaded them; without it such a model's
    device weights are refused, since they are used as they lie."""

    config: ModelConfig
    tensors: dict[str, Any]
    embedding: np.ndarray
    quantized: frozenset[str] = frozenset()
    group_size: int = 0
    folded: bool = False

    def __post_init__(self) -> None:
        self.quantized = frozenset(self.quantized)
        shapes = device_shapes(self.config)
        unknown = sorted(self.quantized - set(device_linear_names(self.config)))
        if unknown:
            raise ValueError(f"int4 layers must be linear layers as the decoder runs them; not {unknown[0]}")
        for name in self.quantized:
            n, k = shapes.pop(name)
            if not self.group_size or k % self.group_size:
                raise ValueError(f"int4 layer {name}: K = {k} is not a multiple of the group size {self.group_size}")
            shapes[f"{name}#wq"] = (n, k // 2)
            shapes[f"{name}#scales"] = (n, k // self.group_size)
            if self.config.int4_zero_points:  # an asymmetric int4 checkpoint's zero points
                shapes[f"{name}#zeros"] = (n, k // self.group_size)
            if self.config.int4_act_order and not name.endswith("mlp.down_proj.weight"):  # its input's gather
                shapes[f"{name}#order"] = (k,)
        problems = [f"{name} is missing" if name not in self.tensors else
                    f"{name} has shape {tuple(self.tensors[name].shape)}, expected {shape}"
                    for name, shape in shapes.items()
                    if name not in self.tensors or tuple(self.tensors[name].shape) != shape]
        if problems:
            raise ValueError(f"device weights do not fit {self.config.name}: {'; '.join(problems[:3])}")
        if self.embedding.shape != (self.config.vocab_size, self.config.hidden_size):
            raise ValueError(f"the embedding table has shape {self.embedding.shape}, expected "
                             f"{(self.config.vocab_size, self.config.hidden_size)}")

    def device(self, name: str, part: str = "") -> Any:
        return self.tensors[f"{name}#{part}" if part else name]


def halves_order(config: ModelConfig) -> np.ndarray:
    """The order of a head's dims in which rotary pairs of adjacent dims (2i, 2i + 1: ERNIE 4.5's,
    Helium's) are halves (i, i + rotary_dim / 2: what the rope kernels and the reference rotate);
    the dims past the rotary ones stay."""
    r, d = config.rotary_dim, config.head_dim
    return np.concatenate([np.arange(0, r, 2), np.arange(1, r, 2), np.arange(r, d)])


def _pairs_as_halves(config: ModelConfig, tensors: dict[str, np.ndarray], quantized: dict[str, "QuantizedLinear"],
                     inverse: bool = False) -> tuple[dict[str, np.ndarray], dict[str, "QuantizedLinear"]]:
    """``tensors`` and ``quantized`` with each query and key head's rows (weights, biases, int4
    codes, scales and zero points) in ``halves_order`` (``inverse``: back). q.k sums the same
    products in another order, so attention is unchanged and the rotation becomes rotate-half."""
    order = halves_order(config)
    if inverse:
        order = np.argsort(order)
    tensors, quantized = dict(tensors), dict(quantized)
    for layer in range(config.num_hidden_layers):
        for part, heads in (("self_attn.q_proj", config.num_attention_heads),
                            ("self_attn.k_proj", config.num_key_value_heads)):
            rows = (np.arange(heads)[:, None] * config.head_dim + order[None, :]).reshape(-1)
            for name in (layer_name(layer, part), bias_name(layer, part)):
                if name in tensors:
                    tensors[name] = tensors[name][rows]
            name = layer_name(layer, part)
            if name in quantized:
                q = quantized[name]
                quantized[name] = replace(q, wq=q.wq[rows], scales=q.scales[rows],
                                          zeros=None if q.zeros is None else q.zeros[rows])
    return tensors, quantized


def _int4_layers(folder, tensors: dict[str, np.ndarray], int4: dict[str, tuple[str, tuple[int, ...]]],
                 config: ModelConfig) -> dict[str, QuantizedLinear]:
    """The int4 layers of an int4 checkpoint, their tensors taken out of ``tensors`` (checked:
    every one present but g_idx, of its shape, integers where the format stores them)."""
    layers: dict[str, dict[str, np.ndarray]] = {}
    for name, (linear, shape) in int4.items():
        part = name.rsplit(".", 1)[1]
        tensor = tensors.pop(name, None)
        if tensor is None:
            if part not in _OPTIONAL_INT4_PARTS:
                raise ValueError(f"{folder}: {name} is missing (the {config.int4_name} checkpoint's int4 layer "
                                 f"{linear})")
            continue
        # int32 words and indices (weight_shape: any integers, torch writes int64)
        integer = np.asarray(tensor).dtype in ((np.int32, np.int64) if part == "weight_shape" else (np.int32,))
        if tuple(np.shape(tensor)) != shape or integer != (part not in _INT4_SCALES):
            kind = "float" if part in _INT4_SCALES else "int32"
            raise ValueError(f"{folder}: {name} is {np.asarray(tensor).dtype} {tuple(np.shape(tensor))}, expected "
                             f"{kind} {shape}")
        layers.setdefault(linear, {})[part] = tensor
    quantized = {linear: int4_linear(f"{folder}: {linear}", parts, config) for linear, parts in layers.items()}
    if config.int4_act_order:
        _check_act_orders(folder, quantized, config)
    return quantized


def _input_of(name: str) -> str:
    """The input linear layer ``name`` reads, named by the first part of its fused projection
    (``FUSED``: q_proj for k_proj and v_proj, gate_proj for up_proj); itself for the others."""
    for parts in FUSED.values():
        for part in parts[1:]:
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{parts[0]}.")
    return name


def _check_act_orders(folder, quantized: dict[str, QuantizedLinear], config: ModelConfig) -> None:
    """The layers of one fused projection (``FUSED``) of an act-order checkpoint read their input in
    one order (they share it), as GPTQ makes them: each orders a layer input by the same statistics."""
    for layer in range(config.num_hidden_layers):
        for fused, parts in FUSED.items():
            orders = [quantized[layer_name(layer, part)].order for part in parts]
            if any(not np.array_equal(o, orders[0]) for o in orders[1:]):
                raise ValueError(f"{folder}: the act-order (g_idx) of {', '.join(layer_name(layer, p) for p in parts)} "
                                 f"differs, and they run as one projection ({fused}): not implemented")


def _unstacked(folder, name: str, tensor: np.ndarray, parts: dict[str, tuple[int, ...]],
               experts: int | None = None) -> dict[str, np.ndarray]:
    """The parts a stacked tensor holds, in order along its rows (views: no copy); ``experts``: the
    tensor is [experts, rows of one expert's parts, K] (Granite MoE's)."""
    rows = [shape[0] for shape in parts.values()]
    want = (sum(rows), *next(iter(parts.values()))[1:])
    if experts is not None:
        want = (experts, want[0] // experts, *want[1:])
        if tuple(tensor.shape) != want:
            raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected {want} (its experts stacked)")
        tensor = tensor.reshape(-1, tensor.shape[-1])
        want = tensor.shape
    if tuple(tensor.shape) != want:
        raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected {want} (its parts stacked)")
    starts = np.cumsum([0, *rows])
    return {part: tensor[begin:end] for part, begin, end in zip(parts, starts, starts[1:])}


def _int4_unstacked(folder, name: str, tensor: np.ndarray, parts: dict[str, tuple[int, ...]]
                    ) -> dict[str, np.ndarray]:
    """The parts an int4 checkpoint's stacked tensor holds (``INT4_PARTS``): GPTQ's and AWQ's
    qweight, qzeros and scales hold them side by side along their last axis (N, or N/8 packed),
    compressed-tensors' weight_packed, weight_scale and weight_zero_point one above the other
    (along N); g_idx is the one each part shares (they read the same input)."""
    if name.rsplit(".", 1)[1] in ("weight_packed", "weight_scale", "weight_zero_point"):
        return _unstacked(folder, name, tensor, parts)
    if len(next(iter(parts.values()))) == 1:  # g_idx: one per input row
        want = next(iter(parts.values()))
        if tuple(tensor.shape) != want:
            raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected {want}")
        return {part: tensor for part in parts}
    columns = [shape[1] for shape in parts.values()]
    want = (next(iter(parts.values()))[0], sum(columns))
    if tuple(tensor.shape) != want:
        raise ValueError(f"{folder}: {name} has shape {tuple(tensor.shape)}, expected {want} (its parts side by side)")
    starts = np.cumsum([0, *columns])
    return {part: tensor[:, begin:end] for part, begin, end in zip(parts, starts, starts[1:])}


def _stacked_weight_shapes(folder, name: str, tensor: np.ndarray, parts: dict[str, tuple[int, int]]
                           ) -> dict[str, np.ndarray]:
    """compressed-tensors' weight_shape of a stacked layer, (N summed, K), as each part's (N, K)."""
    want = (sum(n for n, _ in parts.values()), next(iter(parts.values()))[1])
    given = np.asarray(tensor)
    if given.shape != (2,) or given.dtype.kind not in "iu" or tuple(int(v) for v in given) != want:
        raise ValueError(f"{folder}: {name} is {given.tolist()}, expected {list(want)} (its parts stacked)")
    return {part: np.array(shape, dtype=np.int64) for part, shape in parts.items()}


_FINITE_CHUNK = 1 << 22  # elements checked at a time: the check's scratch stays a few MB


def _all_finite(tensor: np.ndarray) -> bool:
    """Whether a stored weight tensor holds no NaN or infinity (bfloat16 words: exponent not all ones)."""
    flat = np.asarray(tensor).reshape(-1)
    bfloat16 = isinstance(tensor, Bfloat16Words)
    for start in range(0, flat.size, _FINITE_CHUNK):
        chunk = flat[start:start + _FINITE_CHUNK]
        if bfloat16:
            if ((chunk.view(np.uint16) & 0x7F80) == 0x7F80).any():
                return False
        elif not np.isfinite(chunk).all():
            return False
    return True


def _stored(tensor) -> np.ndarray:
    """A weight tensor kept in its precision (float32, float16, bfloat16 words), contiguous;
    anything else (float64, lists) as float32."""
    if isinstance(tensor, Bfloat16Words):
        return np.ascontiguousarray(tensor).view(Bfloat16Words)
    array = np.asarray(tensor)
    if array.dtype.kind not in "fiu":  # complex would lose its imaginary part, text be parsed, objects anything
        raise ValueError(f"a weight tensor must hold real numbers, not {array.dtype}")
    if array.dtype == np.uint16:  # how numpy holds bfloat16: its words would be taken for integers
        raise ValueError("uint16 values are ambiguous: for bfloat16 words, mark them "
                         "(array.view(runtime.precision.Bfloat16Words)); for integers, give another dtype")
    if array.dtype in (np.float16, np.float32):
        return np.ascontiguousarray(array)
    return np.ascontiguousarray(array, dtype=np.float32)


def checkpoint_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, as transformers picks them: the shards a
    ``model.safetensors.index.json`` names (``save_pretrained`` of a large model), else
    ``model.safetensors``, else every ``*.safetensors`` file in the folder. Other files beside
    an index or a ``model.safetensors`` (Mistral's ``consolidated.safetensors``) are not read."""
    folder = Path(folder)
    if not folder.is_dir():  # a weights file named where its folder belongs, or nothing there
        raise ValueError(f"{folder} is not a directory: name the folder that holds the checkpoint's "
                         ".safetensors files" if folder.exists() else f"{folder} does not exist")
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = _weight_map(index)
        names = sorted(set(weight_map.values()))
        bad = [n for n in names if Path(n).name != n or not n.endswith(".safetensors")]
        if bad:
            raise ValueError(f"{index}: weight_map names {bad[0]!r}, not a .safetensors file beside the index")
        # a shard that is there but not a regular file is refused by read_header, by what it is
        absent = [n for n in names if not (folder / n).exists()]
        dangling = [n for n in absent if (folder / n).is_symlink()]
        if dangling:
            raise ValueError(f"{index}: weight_map names {', '.join(dangling[:3])}, a link to nothing in {folder} "
                             f"(to {os.readlink(folder / dangling[0])})")
        if absent:
            raise ValueError(f"{index}: weight_map names {', '.join(absent[:3])}, not in {folder}")
        return [folder / n for n in names]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = sorted(f.name for f in folder.glob("*.bin")) + sorted(f.name for f in folder.glob("*.pt"))
        if pickled:  # a pickle runs code when loaded: only safetensors are read
            raise ValueError(f"no .safetensors files in {folder}, only {pickled[0]}, a PyTorch pickle, which is not "
                             "read (save the model with safe_serialization=True, transformers' default)")
        raise ValueError(f"no .safetensors files in {folder}")
    return files


def _weight_map(index: Path) -> dict[str, str]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {index}: {exc}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{index}: no weight_map of tensor names to file names")
    return weight_map


def _check_index(folder: Path, found: dict[str, Path]) -> None:
    """Each tensor the index maps lies in the file it names."""
    index = folder / INDEX_FILE
    if not index.is_file():
        return
    for name, file in _weight_map(index).items():
        if name not in found:
            raise ValueError(f"{index}: tensor {name} is not in {file}")
        if found[name].name != file:
            raise ValueError(f"{index}: tensor {name} is in {found[name].name}, not in {file}")


_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_safetensors(path: str | Path, keep=None, ints=frozenset(), mapped: bool = False) -> dict[str, np.ndarray]:
    """The float tensors of one safetensors file (``keep``: only those it names): float32 and
    float16 as they are (float64 as float32), bfloat16 as ``Bfloat16Words`` copied out of the file;
    those ``ints`` names may be int32 instead (an int4 checkpoint's codes, zero points, groups).

    Read with the safetensors package where numpy knows the dtype; bfloat16, which numpy
    lacks, is read from the file's header. The header is checked first (``read_header``): a
    malformed file is a ValueError, never a MemoryError. ``mapped``: ``mapped_safetensors``."""
    if mapped:
        return mapped_safetensors(path, keep, ints)
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    header, data_start = read_header(path)
    try:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                info = header[name]
                if info["dtype"] == "BF16" or (keep is not None and name not in keep):
                    continue
                if name in ints and info["dtype"] in ("I32", "I64"):  # I64: compressed-tensors' weight_shape
                    tensors[name] = f.get_tensor(name)
                    continue
                if info["dtype"] not in _SAFETENSORS_DTYPES:
                    raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}, expected a float type")
                tensor = f.get_tensor(name)
                tensors[name] = tensor if tensor.dtype in (np.float16, np.float32) else tensor.astype(np.float32)
    except SafetensorError as exc:  # what the package finds beyond the header: one line, a ValueError
        raise ValueError(f"{path}: not a valid safetensors file: {exc}") from None
    bf16 = [n for n, info in header.items() if n != "__metadata__" and info["dtype"] == "BF16"
            and (keep is None or n in keep)]
    if bf16:
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
        for name in bf16:
            begin, end = header[name]["data_offsets"]
            words = raw[begin:end].view(np.uint16).reshape(header[name]["shape"])
            tensors[name] = np.array(words).view(Bfloat16Words)  # a copy: the file may change after
    return tensors


_MAPPED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I32": np.int32, "I64": np.int64}


def mapped_safetensors(path: str | Path, keep=None, ints=frozenset()) -> dict[str, np.ndarray]:
    """``read_safetensors`` without reading: each tensor a read-only view of the file mapped into
    memory, so that loading costs no copy and the operating system pages in what the kernels
    read (a mixture of experts touches the experts its tokens pick). The file must then stay as
    it is while the weights are in use. float64 tensors, and a tensor whose offset in the file does
    not suit its type's alignment, are copied out as ``read_safetensors`` would."""
    header, data_start = read_header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start)
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__" or (keep is not None and name not in keep):
            continue
        dtype = info["dtype"]
        if dtype in ("I32", "I64") and name not in ints or dtype not in _MAPPED_DTYPES and dtype != "F64":
            raise ValueError(f"{path}: tensor {name} has dtype {dtype}, expected a float type")
        begin, end = info["data_offsets"]
        if dtype == "F64":
            tensors[name] = raw[begin:end].view(np.float64).reshape(info["shape"]).astype(np.float32)
            continue
        tensor = raw[begin:end].view(_MAPPED_DTYPES[dtype]).reshape(info["shape"])
        if not tensor.flags.aligned:  # the kernels take aligned arrays only
            tensor = np.array(tensor)
        tensors[name] = tensor.view(Bfloat16Words) if dtype == "BF16" else tensor.view(np.ndarray)
    return tensors


MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit: a longer header is a corrupt or hostile file


def read_header(path: str | Path) -> tuple[dict, int]:
    """A safetensors file's header (tensor name -> dtype, shape, data offsets) and where its data
    starts, checked against the file: a ValueError names the file and what is wrong with it."""
    path = Path(path)
    try:
        info = os.stat(path)
        # only a regular file: a directory fails to open, a FIFO blocks the open forever
        if not stat.S_ISREG(info.st_mode):
            kind = "a directory" if stat.S_ISDIR(info.st_mode) else "not a regular file"
            raise ValueError(f"{path}: not a safetensors file ({kind})")
        size = info.st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            length = struct.unpack("<Q", prefix)[0]
            if length > min(size - 8, MAX_HEADER_BYTES):
                raise ValueError(f"{path}: not a safetensors file (header length {length} exceeds the file's "
                                 f"{size} bytes or the limit of {MAX_HEADER_BYTES})")
            text = f.read(length)
    except OSError as exc:  # no permission, a dangling symlink, an I/O error: one line, a ValueError
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or nested past the parser's depth
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    for name, info in header.items():
        if name != "__metadata__":
            _check_tensor_info(path, name, info, size - 8 - length)
    return header, 8 + length


def _check_tensor_info(path: Path, name: str, info, data_bytes: int) -> None:
    """A tensor's entry: a dtype, a shape of counts and data offsets inside the file's data."""
    shape = info.get("shape") if isinstance(info, dict) else None
    offsets = info.get("data_offsets") if isinstance(info, dict) else None
    well_formed = (isinstance(shape, list) and all(_is_count(d) for d in shape)
                   and isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                   and isinstance(info.get("dtype"), str) and offsets[0] <= offsets[1] <= data_bytes)
    if not well_formed:
        raise ValueError(f"{path}: not a safetensors file (tensor {name}'s dtype, shape or data offsets "
                         "are malformed or lie outside the file)")


def _is_count(value) -> bool:
    return type(value) is int and value >= 0
