"""Llama-style model configurations: Hugging Face ``config.json`` files and shipped presets.

Every field of a ``config.json`` is either honoured or refused with one line naming it and
its value, never silently dropped: a runtime that loads a popular checkpoint and quietly
computes something else is the worst failure it can have. ``head_dim`` defaults to hidden /
heads and ``num_key_value_heads`` to the number of heads (multi-head attention), as in
transformers. ``rope_theta`` is read at the top level (transformers 4.x) or under
``rope_parameters`` (5.x), and so is the rope scaling: ``rope_scaling`` (4.x) or
``rope_parameters`` (5.x), with ``rope_type`` (or the older ``type``) ``default``, ``linear``
(``factor``), ``llama3`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
``original_max_position_embeddings``; Llama 3.1 / 3.2), ``yarn`` (``factor`` and what
transformers fills in where left out: ``_yarn_defaults``) or, in Phi-3, ``longrope`` (``su``;
``_longrope_defaults``; past the original context a pass rotates by ``long_factor``:
``ModelConfig.rope_is_long``),
computed as transformers computes them (``runtime.rope_frequencies``). Projection biases:
Llama's ``attention_bias`` (q, k, v and o) and ``mlp_bias`` (gate, up, down), Qwen2's fixed
q/k/v biases and Qwen3's ``attention_bias`` (q, k, v and o). Qwen3 also normalises each query
and key head (``qk_norm``). Phi-3 (and Phi-4) is Llama with Q/K/V and gate/up stored stacked in the
checkpoint (``runtime.weights`` splits them) and an optional sliding window as Mistral's.
Granite is Llama with four scalars: the embeddings times ``embedding_multiplier``, each
sublayer's output times ``residual_multiplier`` before its residual add, ``attention_multiplier``
as the softmax scale and the logits over ``logits_scaling``. Gemma is Llama with its embeddings
times sqrt(hidden_size), every RMSNorm scaling by 1 + its weight and GeGLU (the tanh form of
GeLU) as the MLP's gate; Gemma 2 adds a norm of each sublayer's output before its residual add,
``query_pre_attn_scalar`` as the softmax scale, a sliding window in every second layer and the
soft-capping of attention scores and logits; Gemma 3 (text) has Qwen3's norms of the query and
key heads instead of the caps and, in its sliding-window layers, a rotary embedding of its own
base. OLMo 2 normalises no sublayer's input, only its output (before the residual add), and
RMS-normalises the whole query and key projections (one row of heads x head_dim each) before
the rotary embedding; OLMo 3 adds Gemma 3's sliding layers (the default rope of the model's
base there, the scaled one in the full layers). The lists below say what is accepted and why.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from .abi import is_number
from .rope_frequencies import PARAMETERS as ROPE_PARAMETERS
from .rope_frequencies import (ROPE_TYPES, factors_problem, longrope_attention_factor, rope_attrs, rope_problem,
                               rotary_dim_problem, yarn_attention_factor)

# The decoder is Llama's (RMSNorm, rotate-half RoPE, grouped-query attention, SwiGLU), with
# projection biases where the config says. Mistral is the same network plus an optional
# sliding window (each query sees the last ``sliding_window`` positions: the attention kernels'
# ``window``, see ``ModelConfig.layer_window``); Qwen2 is Llama with biases on q, k and v (always, whatever
# ``attention_bias`` says: transformers' Qwen2 does not read it); Qwen3 is Llama with an RMSNorm
# of each query and key head before the rotary embedding (``qk_norm``), its head_dim 128 unless
# said (not hidden / heads).
# Phi-3 and Phi-4 are Llama with stacked Q/K/V and gate/up tensors and Mistral's optional window.
# ERNIE 4.5 (dense) is Llama with every projection biased or none (``use_bias``) and rotary pairs of
# adjacent dims (``rope_interleaved``); Helium is Llama with such pairs and no o_proj bias. GLM-4
# (0414) is Qwen2's biases with such pairs over half of each head, gate/up stacked as Phi-3's, and a
# norm of each sublayer's output before its residual add (Gemma 2's, by the weight itself).
# Seed-OSS is Llama whose q/k/v (attention_bias), o (attention_out_bias) and MLP biases switch apart.
# EXAONE 4.0 is OLMo 2's layer (norms after the sublayers only) with Qwen3's norms of each query and
# key head; with a window, its sliding layers rotate and its global ones do not (NoPE, SmolLM3's).
# Ministral (Ministral-8B-Instruct-2410) is Mistral whose window applies in the layers ``layer_types``
# names (three in four). Ministral 3 (and Devstral 2) is Mistral (no window unless said) with YaRN
# whose queries past the original context are scaled up by position (``query_scale_beta``; those
# positions are refused).
# SmolLM3 is Llama whose layers in ``no_rope_layers`` (every fourth) apply no rotary embedding
# (NoPE), with Qwen's switched-off sliding window. Gemma and Gemma 3: see the module's docstring
# (Gemma 3's window applies in its sliding layers only). OLMo 2: see the module's docstring.
# Mixtures of experts (``ModelConfig.num_experts``), by family: (architecture, the dense family whose
# attention and fields its own follow). Mixtral is Mistral's layer with a routed MLP (the top-k
# probabilities renormalised); Qwen3-MoE Qwen3's, Qwen2-MoE Qwen2's (plus a shared expert, gated by
# a sigmoid), OLMoE Llama's with OLMo 2's norms of the whole query and key projections, Granite MoE
# Granite's (its four scalars; the top experts' logits softmaxed, which renormalises as Mixtral does),
# ERNIE 4.5 MoE ERNIE 4.5's (its first layer dense, ungated shared experts, the experts picked by
# their probabilities plus a bias of their own, ``expert_selection_bias``), GLM-4.5's (GLM-4.5-Air:
# q/k/v biases, optional head norms, half of each head rotated; DeepSeek-V3's routing by sigmoid
# scores with a bias, in groups, scaled; its first layers dense, ungated shared experts).
MOE_FAMILIES = {"mixtral": ("MixtralForCausalLM", "mistral"), "qwen2_moe": ("Qwen2MoeForCausalLM", "qwen2"),
                "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3"), "olmoe": ("OlmoeForCausalLM", "llama"),
                "granitemoe": ("GraniteMoeForCausalLM", "granite"),
                "ernie4_5_moe": ("Ernie4_5_MoeForCausalLM", "ernie4_5"),
                "glm4_moe": ("Glm4MoeForCausalLM", "qwen3")}
FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "phi3": "Phi3ForCausalLM", "granite": "GraniteForCausalLM",
            "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
            "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
            "olmo3": "Olmo3ForCausalLM", "ministral": "MinistralForCausalLM", "ministral3": "Ministral3ForCausalLM",
            "exaone4": "Exaone4ForCausalLM", "ernie4_5": "Ernie4_5ForCausalLM", "helium": "HeliumForCausalLM",
            "glm4": "Glm4ForCausalLM", "seed_oss": "SeedOssForCausalLM",
            **{family: architecture for family, (architecture, _) in MOE_FAMILIES.items()}}
# Image-and-text models whose language model is one of FAMILIES (its config the ``text_config``
# inside, its tensors under ``language_model``): the runtime runs that language model on text
# prompts, as transformers runs the whole model on inputs without images. model_type ->
# (architecture, the text config's model_type).
MULTIMODAL = {"gemma3": ("Gemma3ForConditionalGeneration", "gemma3_text"),
              "mistral3": ("Mistral3ForConditionalGeneration", "mistral"),
              "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2"),
              "qwen3_vl": ("Qwen3VLForConditionalGeneration", "qwen3")}
# The model_type a multimodal release's text_config names, where it is not its family's: Qwen2.5-VL's
# language model is a Qwen2 under a name of its own (and its releases write no text_config at all:
# the language model's fields at the top level, ``_FLAT_MULTIMODAL``), Qwen3-VL's a Qwen3
_TEXT_MODEL_TYPES = {"qwen2_5_vl": "qwen2_5_vl_text", "qwen3_vl": "qwen3_vl_text"}
# The other families a multimodal model's language model may be: Ministral 3's and Devstral 2's
# Mistral3ForConditionalGeneration holds a ministral3
_OTHER_TEXT_FAMILIES = {"mistral3": ("ministral3",)}
_FLAT_MULTIMODAL = frozenset({"qwen2_5_vl"})
# Multimodal rotary embeddings (Qwen2.5-VL's mrope): a text token's position is the same on each of
# the sections' axes, so on text prompts they turn as the plain rope of the same base
_MROPE_KEYS = ("mrope_section", "mrope_interleaved")
# What the text config class gives the sizes a multimodal release's text_config leaves out
# (gemma-3-4b-it names neither its heads nor its vocabulary): Gemma3TextConfig's. A Mistral 3
# text_config given as an object takes MistralConfig's own defaults, as the family's config does.
_TEXT_DEFAULTS = {"gemma3": {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                             "num_hidden_layers": 26, "num_attention_heads": 8}, "mistral3": {},
                  # Qwen2_5_VLTextConfig's
                  "qwen2_5_vl": {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                                 "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                                 "max_position_embeddings": 32768, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                                 "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 80},
                  # Qwen3VLTextConfig's (no window)
                  "qwen3_vl": {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016,
                               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
                               "head_dim": 128, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
                               "rope_theta": 500000.0, "attention_bias": False}}
SUPPORTED_ARCHITECTURES = (*FAMILIES.values(), *(arch for arch, _ in MULTIMODAL.values()))
SUPPORTED_MODEL_TYPES = (*FAMILIES, *MULTIMODAL)
# A multimodal config's own fields besides text_config: the image side (vision_config, the image
# tokens' ids and count, how image features are projected), which a text prompt never reaches,
# the tying of the LM head, and an int4 checkpoint's quantization_config (its language model's).
_MULTIMODAL_FIELDS = {
    wrapper: frozenset({"text_config", "vision_config", "architectures", "model_type", "tie_word_embeddings",
                        "image_token_index", "quantization_config", *image_side})
    for wrapper, image_side in (("gemma3", ("boi_token_index", "eoi_token_index", "mm_tokens_per_image")),
                                ("mistral3", ("projector_hidden_act", "multimodal_projector_bias",
                                              "spatial_merge_size", "vision_feature_layer")),
                                ("qwen2_5_vl", ("image_token_id", "video_token_id", "vision_start_token_id",
                                                "vision_end_token_id", "vision_token_id")),
                                ("qwen3_vl", ("image_token_id", "video_token_id", "vision_start_token_id",
                                              "vision_end_token_id")))}
# Why some popular look-alikes are refused, said in the error line.
_WHY_NOT = {"DeepseekV3ForCausalLM": "its attention is latent (MLA) and its router grouped",
            "deepseek_v3": "its attention is latent (MLA) and its router grouped"}
# how a router scores the experts (ModelConfig.router_scoring, runtime.experts.route)
ROUTER_SCORINGS = ("softmax", "sigmoid")
# silu and swish are the same function (x * sigmoid(x)), the gate of SwiGLU.
SUPPORTED_ACTIVATIONS = ("silu", "swish")
# Gemma's gate: GeLU's tanh form (transformers reads Gemma's legacy "gelu" as it, with a warning)
GEMMA_ACTIVATIONS = {"gemma": ("gelu_pytorch_tanh", "gelu"), "gemma2": ("gelu_pytorch_tanh",),
                     "gemma3_text": ("gelu_pytorch_tanh",)}
# ModelConfig.activation: the gate's function, by the kernel that applies it (runtime.plan)
ACTIVATIONS = ("silu", "gelu_tanh")
# ModelConfig.qk_norm_span: what one RMS row of the q/k norms is (the qk_norm kernel's ``span``)
QK_NORM_SPANS = ("head", "projection")
# Rotary embedding variants implemented (``runtime.rope_frequencies``); dynamic ... changes the
# frequencies with the sequence length and would give other logits, so it is refused.
SUPPORTED_ROPE_TYPES = ROPE_TYPES
# Phi3Config reads these rope types as longrope (su: its old name); longrope is refused elsewhere
_PHI3_LONGROPE_NAMES = ("su", "yarn")
# Phi3Config's original_max_position_embeddings where a config.json leaves it out
_PHI3_ORIGINAL_CONTEXT = 4096

# Fields read into ModelConfig or checked by ``from_hf_dict`` (honoured, or refused by value).
READ_FIELDS = frozenset({
    "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_hidden_layers", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "tie_word_embeddings", "max_position_embeddings", "sliding_window", "architectures", "model_type",
    "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp",
    # nanotron's (SmolLM, SmolLM2): rotary pairs interleaved (refused) or, false, rotate-half
    "rope_interleaved",
    # Qwen2's and Qwen3's: sliding window on (refused) or off, its first layer, and the per-layer
    # attention kind
    "use_sliding_window", "max_window_layers", "layer_types",
    # Qwen2.5-Math's and DeepSeek-R1-Distill-Qwen's: false, the plain rotary embedding (true: Qwen2-VL's)
    "use_mrope",
    # ERNIE 4.5's: a bias on every projection, or none; Seed-OSS's: o_proj's bias
    "use_bias", "attention_out_bias",
    # SmolLM3's: which layers rotate (1) or not (0), else every no_rope_layer_interval-th does not
    "no_rope_layers", "no_rope_layer_interval",
    # Phi-3's: the context its longrope scaling was trained at; any other rope ignores it (checked: phi3 only)
    "original_max_position_embeddings",
    # Phi-4-mini's: the share of each head that is rotated (phi3 only: _partial_rotary_factor)
    "partial_rotary_factor",
    # Granite's scalars (granite only: _GRANITE_FIELDS)
    "embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling",
    # an int4 checkpoint's, GPTQ or AWQ (_int4_checkpoint)
    "quantization_config",
    # a mixture of experts' (MOE_FAMILIES only: _moe_fields); Qwen2-MoE's switch of its q/k/v biases;
    # OLMoE's clipping of q, k and v (null only)
    "num_local_experts", "num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
    "decoder_sparse_step", "mlp_only_layers", "shared_expert_intermediate_size", "qkv_bias", "clip_qkv",
    # ERNIE 4.5 MoE's names of them (_ernie_moe_fields)
    "moe_num_experts", "moe_k", "moe_num_shared_experts", "moe_layer_start_index", "moe_layer_end_index",
    "moe_layer_interval", "moe_norm_min", "num_nextn_predict_layers",
    # GLM-4.5's (_glm_moe_fields)
    "n_routed_experts", "n_shared_experts", "routed_scaling_factor", "n_group", "topk_group", "first_k_dense_replace",
    "use_qk_norm",
    # Gemma's and Gemma 3's (gemma families only: _GEMMA_FIELDS)
    *("hidden_activation", "query_pre_attn_scalar", "rope_local_base_freq", "sliding_window_pattern",
      "_sliding_window_pattern", "final_logit_softcapping", "attn_logit_softcapping", "use_bidirectional_attention")})
# Granite's scalars: config.json fields and ModelConfig fields of the same names
_GRANITE_FIELDS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
_QWEN_FIELDS = ("use_sliding_window", "max_window_layers", "use_mrope")
_GEMMA_FIELDS = ("hidden_activation", "query_pre_attn_scalar", "rope_local_base_freq", "sliding_window_pattern",
                 "_sliding_window_pattern", "final_logit_softcapping", "attn_logit_softcapping",
                 "use_bidirectional_attention")
_GEMMA_FAMILIES = ("gemma", "gemma2", "gemma3_text")
# the Gemma fields each family's config class has
_GEMMA_OWN = {"gemma": ("hidden_activation", "use_bidirectional_attention"),
              "gemma2": ("hidden_activation", "use_bidirectional_attention", "query_pre_attn_scalar",
                         "final_logit_softcapping", "attn_logit_softcapping"),
              "gemma3_text": _GEMMA_FIELDS, "exaone4": ("sliding_window_pattern",)}
_QWEN_FAMILIES = ("qwen2", "qwen3")
_OLMO_FAMILIES = ("olmo2", "olmo3")
# the families whose sliding layers ``layer_types`` names (read by _sliding_layers)
_LAYER_KINDS = ("gemma2", "gemma3_text", "olmo3", "ministral", "exaone4")
# the families whose sliding window use_sliding_window switches (off: ignored), as Qwen2's
_WINDOW_SWITCHED = (*_QWEN_FAMILIES, "smollm3", "qwen2_moe", "qwen3_moe")
# Fields that change nothing a greedy decoder computes from the weights: token ids (the
# caller's business), training-only settings (initialisation, dropout: inference has none),
# the storage dtype (weights become float32 on load), the attention implementation transformers
# picks (same math), and bookkeeping. Any field on neither list is refused by name, so a new
# semantics is never dropped silently; add a field here only once it is known to be harmless.
HARMLESS_FIELDS = frozenset({
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "initializer_range", "use_cache", "attention_dropout", "max_sequence_length",
    "output_attentions", "output_hidden_states", "return_dict", "torchscript", "_attn_implementation_autoset",
    "tokenizer_class", "id2label", "label2id",
    "unsloth_version",  # the fine-tuning tool's version, written into the checkpoints it saves
    "cache_implementation",  # Gemma 3's: the KV cache class transformers' generate() picks
    "resid_pdrop", "embd_pdrop", "residual_dropout",  # Phi-3's and Seed-OSS's dropouts: inference has none
    # a mixture of experts' training settings: the load-balancing loss, and Mixtral's router noise
    # (applied in training mode only)
    "router_aux_loss_coef", "output_router_logits", "router_jitter_noise",
    "is_llama_config"})  # nanotron's (SmolLM2): says the config is Llama's, which it is checked to be
# Keys inside ``rope_scaling`` / ``rope_parameters`` that any rope may carry (its type and,
# under ``rope_parameters``, the base); the scaling parameters depend on the type.
_ROPE_TYPE_KEYS = ("rope_type", "type")
# ModelConfig's field for each scaling parameter
_ROPE_FIELDS = {"factor": "rope_factor", "low_freq_factor": "rope_low_freq_factor",
                "high_freq_factor": "rope_high_freq_factor",
                "original_max_position_embeddings": "rope_original_max_position_embeddings",
                "beta_fast": "rope_beta_fast", "beta_slow": "rope_beta_slow", "truncate": "rope_truncate",
                "attention_factor": "rope_attention_factor", "short_factor": "rope_short_factor",
                "long_factor": "rope_long_factor"}
# the scaling parameters a config holds: its rope kernels' and, longrope's, the factors transformers
# switches to past the original context and that context (``ModelConfig.rope_is_long``)
_CONFIG_ROPE_PARAMETERS = {**ROPE_PARAMETERS, "longrope": (*ROPE_PARAMETERS["longrope"], "long_factor",
                                                            "original_max_position_embeddings")}
# keys that only say how a rope type's attention factor is computed (``yarn_attention_factor``,
# ``longrope_attention_factor``): read into ``attention_factor`` where that is not given
_ATTENTION_FACTOR_INPUTS = {"yarn": ("mscale", "mscale_all_dim"), "longrope": ("factor",)}
# keys a family's rope parameters carry besides the rope's own: Ministral 3's query scaling
_FAMILY_ROPE_KEYS = {"ministral3": ("llama_4_scaling_beta",)}


@dataclass(frozen=True)
class ModelConfig:
    name: str
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_hidden_layers: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    # Mistral: each token attends to at most this many positions (its own and those before), in
    # every layer or, where local_layers are given (Gemma 3), in those; None: all
    sliding_window: int | None = None
    # rope scaling (``runtime.rope_frequencies``): the parameters of ``rope_type`` are set, the others None
    rope_type: str = "default"
    rope_factor: float | None = None
    rope_low_freq_factor: float | None = None
    rope_high_freq_factor: float | None = None
    rope_original_max_position_embeddings: int | None = None
    # yarn's: the band of the blend, whether its edges are rounded, and the factor cos and sin are
    # multiplied by (transformers' attention_scaling: given, or from factor, mscale, mscale_all_dim)
    rope_beta_fast: float | None = None
    rope_beta_slow: float | None = None
    rope_truncate: bool | None = None
    rope_attention_factor: float | None = None
    # longrope's (Phi-3): pair i's frequency divided by short_factor[i] within the original context
    # (rope_original_max_position_embeddings), by long_factor[i] in a pass past it (rope_is_long)
    rope_short_factor: tuple[float, ...] | None = None
    rope_long_factor: tuple[float, ...] | None = None
    # Ministral 3's (rope_parameters.llama_4_scaling_beta): a query at position p is scaled by
    # 1 + beta ln(1 + floor(p / rope_original_max_position_embeddings)), which is 1 within the
    # original context; a generation past it is refused (``position_limit``)
    query_scale_beta: float = 0.0
    # ERNIE 4.5's and Helium's: the rotary pairs are adjacent dims (2i, 2i + 1), not halves (i, i +
    # rotary_dim / 2). The loader permutes each head's q and k rows (``runtime.weights``) so that the
    # rope kernels rotate halves: q.k is the same sum in another order
    rope_interleaved: bool = False
    # Phi-4-mini's 0.75: only the first int(head_dim * this) dims of a head are rotated (``rotary_dim``),
    # the rest pass through
    partial_rotary_factor: float = 1.0
    # projection biases: q/k/v (Qwen2; Llama's attention_bias), o (Llama's attention_bias),
    # gate/up/down (Llama's mlp_bias)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # Qwen3: each query and key head RMS-normalised over head_dim (gains q_norm, k_norm) before RoPE;
    # with qk_norm_span "projection" (OLMo 2) the whole query and key projections, each as one row
    # (gains of q_size and kv_size values)
    qk_norm: bool = False
    qk_norm_span: str = "head"
    # Granite: embeddings times embedding_multiplier; each attention and MLP output times
    # residual_multiplier before its residual add; the softmax scale attention_multiplier (None:
    # 1/sqrt(head_dim)); the logits divided by logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # Gemma: the gated MLP's activation ("silu": SwiGLU; "gelu_tanh": GeGLU) and every RMSNorm
    # (the query and key heads' too) scaling by 1 + its weight
    activation: str = "silu"
    offset_norms: bool = False
    # Gemma 3: each sublayer's output RMS-normalised (post_attention_layernorm,
    # post_feedforward_layernorm) before its residual add, the MLP's input by pre_feedforward_layernorm
    post_norms: bool = False
    # OLMo 2: False, no norm before the sublayers: attention and the MLP read the residual stream as
    # it is, and only their outputs are normalised (post_norms) before each residual add
    pre_norms: bool = True
    # Gemma 3: the layers of sliding-window attention, whose rotary embedding (the default one)
    # has the base local_rope_theta; None: they rotate as the other layers (EXAONE 4.0's)
    local_layers: tuple[int, ...] = ()
    local_rope_theta: float | None = None
    # SmolLM3: the layers that apply no rotary embedding (NoPE): attention reads q and k as projected
    nope_layers: tuple[int, ...] = ()
    # Gemma 2: each scaled attention score s becomes attn_softcap * tanh(s / attn_softcap), and the
    # logits final_softcap * tanh(logits / final_softcap); None: not capped
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # the image-and-text model (a key of MULTIMODAL) whose language model this is: its checkpoint
    # holds these tensors under language_model, beside the image side's, which are not read
    multimodal: str | None = None
    # an int4 checkpoint's (GPTQ or AWQ): how its tensors pack the codes (a key of INT4_FORMATS; None:
    # a float checkpoint), and as the q4 kernels take them: one scale per ``int4_group_size`` weights
    # along K and, with ``int4_zero_points``, a zero point per group (asymmetric codes; else 8).
    # Its LM head is not quantised (``runtime.weights``). ``int4_act_order``: a GPTQ checkpoint made
    # with act-order (desc_act, without static_groups), whose g_idx gives each weight row its group
    # out of order: the rows are stored sorted by group and each such layer's input gathered into
    # that order (``gather_columns``) before it. ``int4_channelwise``: a checkpoint with one scale
    # (and zero point) per output row (GPTQ's group_size -1, compressed-tensors' strategy "channel"):
    # loaded as groups of ``int4_group_size`` (the largest the kernels take that divides every
    # layer's K), each holding its row's scale, which computes the same weights
    int4_format: str | None = None
    int4_group_size: int | None = None
    int4_zero_points: bool = False
    int4_act_order: bool = False
    int4_channelwise: bool = False
    # a mixture of experts (MOE_FAMILIES); 0: a dense MLP. Each layer's MLP is then ``num_experts``
    # gated experts of ``intermediate_size`` each, of which the router (``mlp.gate``) picks
    # ``experts_per_token`` per token: a softmax over every expert, the top ones' probabilities
    # (renormalised to sum 1 with ``norm_topk_prob``) weighting their outputs (``runtime.experts``).
    # With ``shared_expert_intermediate_size`` (Qwen2-MoE) a shared expert of that size runs for
    # every token too, its output times sigmoid(``mlp.shared_expert_gate`` . x)
    num_experts: int = 0
    experts_per_token: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    # a mixture of experts' layers whose MLP is a dense one of ``dense_intermediate_size`` (Qwen MoE's
    # mlp_only_layers and decoder_sparse_step); every other layer's is the experts'
    dense_layers: tuple[int, ...] = ()
    dense_intermediate_size: int = 0
    # whether the shared expert's output is gated (Qwen2-MoE's sigmoid of ``mlp.shared_expert_gate``) or
    # added as it is (ERNIE 4.5's); and whether the experts are picked by their probabilities plus a
    # bias of each (ERNIE 4.5's ``mlp.moe_statics.e_score_correction_bias``, [1, E]), the probabilities
    # alone weighting their outputs
    shared_expert_gated: bool = True
    expert_selection_bias: bool = False
    # GLM-4.5's (DeepSeek-V3's) routing: each expert scored by the sigmoid of its logit ("sigmoid"; else a
    # softmax over them), the weights times ``routed_scaling_factor``, the experts picked from the
    # ``expert_groups_per_token`` best of ``expert_groups`` equal groups (``runtime.experts.route``)
    router_scoring: str = "softmax"
    routed_scaling_factor: float = 1.0
    expert_groups: int = 1
    expert_groups_per_token: int = 1

    def __post_init__(self) -> None:
        for field in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "num_hidden_layers", "vocab_size", "max_position_embeddings"):
            value = getattr(self, field)
            if not _positive_int(value):
                raise ValueError(f"model {self.name}: {field} must be a positive integer, got {value!r}")
        for field in ("tie_word_embeddings", "qkv_bias", "o_bias", "mlp_bias", "qk_norm", "offset_norms", "post_norms",
                      "pre_norms", "rope_interleaved"):
            if not isinstance(getattr(self, field), bool):  # "no" would read as true
                raise ValueError(f"model {self.name}: {field} must be true or false, got {getattr(self, field)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model {self.name}: num_attention_heads = {self.num_attention_heads} must be a "
                             f"multiple of num_key_value_heads = {self.num_key_value_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model {self.name}: head_dim = {self.head_dim} must be even (rotary embedding)")
        for field in ("rms_norm_eps", "rope_theta", "embedding_multiplier", "residual_multiplier", "logits_scaling",
                      *(f for f in ("attention_multiplier", "attn_softcap", "final_softcap")
                        if getattr(self, f) is not None)):
            value = getattr(self, field)
            # an infinite eps zeroes every norm's output; a string or a bool is no number
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not (number and value > 0 and math.isfinite(value)):
                raise ValueError(f"model {self.name}: {field} must be a positive finite number, got {value!r}")
        self._check_int4()
        self._check_experts()
        beta = self.query_scale_beta
        if (isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0)
                or (beta and self.rope_type != "yarn")):
            raise ValueError(f"model {self.name}: query_scale_beta (Ministral 3's llama_4_scaling_beta) must be a "
                             f"finite number >= 0, and above 0 with yarn's original context only, got {beta!r} with "
                             f"rope type {self.rope_type!r}")
        if self.multimodal is not None and self.multimodal not in MULTIMODAL:
            raise ValueError(f"model {self.name}: multimodal must be one of {', '.join(MULTIMODAL)} or null, "
                             f"got {self.multimodal!r}")
        if self.qk_norm_span not in QK_NORM_SPANS:
            raise ValueError(f"model {self.name}: qk_norm_span must be one of {', '.join(QK_NORM_SPANS)}, "
                             f"got {self.qk_norm_span!r}")
        if self.qk_norm_span != "head" and not self.qk_norm:
            raise ValueError(f"model {self.name}: qk_norm_span {self.qk_norm_span!r} without qk_norm normalises nothing")
        if not (self.pre_norms or self.post_norms):
            raise ValueError(f"model {self.name}: a layer without norms before or after its sublayers (pre_norms and "
                             "post_norms both false) is no family's")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"model {self.name}: activation must be one of {', '.join(ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        for field in ("local_layers", "nope_layers"):
            layers = getattr(self, field)
            if not isinstance(layers, (tuple, list)) or not all(
                    isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers for i in layers):
                raise ValueError(f"model {self.name}: {field} must be a list of indices of its "
                                 f"{self.num_hidden_layers} layers, got {layers!r}")
            object.__setattr__(self, field, tuple(sorted(set(layers))))  # a JSON list reads back equal
        if set(self.local_layers) & set(self.nope_layers):
            raise ValueError(f"model {self.name}: a layer cannot both rotate with the local base and not rotate")
        if self.local_rope_theta is not None and not self.local_layers:
            raise ValueError(f"model {self.name}: local_rope_theta is the rotary base of local_layers; there are none")
        theta = self.local_rope_theta
        if theta is not None and not (isinstance(theta, (int, float)) and not isinstance(theta, bool)
                                      and theta > 0 and math.isfinite(theta)):
            raise ValueError(f"model {self.name}: local_rope_theta must be a positive finite number, got {theta!r}")
        window = self.sliding_window
        if window is not None and not _positive_int(window):
            raise ValueError(f"model {self.name}: sliding_window must be a positive integer or null, got {window!r}")
        for field in ("rope_short_factor", "rope_long_factor"):
            if isinstance(getattr(self, field), list):  # a JSON list reads back equal
                object.__setattr__(self, field, tuple(getattr(self, field)))
        takes = _CONFIG_ROPE_PARAMETERS.get(self.rope_type, ())
        stray = [f for p, f in _ROPE_FIELDS.items() if p not in takes and getattr(self, f) is not None]
        if stray:
            raise ValueError(f"model {self.name}: {stray[0]} = {getattr(self, stray[0])!r} does not apply to "
                             f"rope_type {self.rope_type!r}")
        factor = self.partial_rotary_factor
        if not (is_number(factor) and math.isfinite(factor)) or rotary_dim_problem(self.rotary_dim, self.head_dim):
            raise ValueError(f"model {self.name}: partial_rotary_factor = {factor!r} does not give an even rotary dim "
                             f"in 2 .. head_dim = {self.head_dim} (int(head_dim * factor), as transformers computes it)")
        if self.rotary_dim < self.head_dim and self.local_layers:  # their rope (layer_rope_attrs) has no rotary_dim
            raise ValueError(f"model {self.name}: partial_rotary_factor = {factor!r} with local layers is not implemented")
        problem = rope_problem(self.rope_type, self.rope_scaling, self.rotary_dim)
        if self.rope_type == "longrope" and not problem:
            context = self.rope_original_max_position_embeddings
            problem = (factors_problem("long_factor", self.rope_long_factor, self.rotary_dim)
                       or (None if _positive_int(context) else
                           f"original_max_position_embeddings = {context!r} is not a positive integer"))
        if problem:
            raise ValueError(f"model {self.name}: rope {problem}")

    @property
    def scaled(self) -> bool:
        """Whether the runtime folds anything into the weights as it uploads them: Granite's
        embedding, residual or logit scalars, Gemma's embedding scale or its norms' 1 + weight
        (the attention scale is the kernels' own attribute)."""
        return ((self.embedding_multiplier, self.residual_multiplier, self.logits_scaling) != (1.0, 1.0, 1.0)
                or self.offset_norms)

    def layer_rope_attrs(self, layer: int) -> dict[str, Any]:
        """The rope kernel's attributes in ``layer``: Gemma 3's local ones in its sliding layers."""
        if layer in self.local_layers and self.local_rope_theta is not None:
            return rope_attrs(self.local_rope_theta)
        return self.rope_attrs

    def layer_window(self, layer: int) -> int:
        """The sliding window of ``layer``'s attention, 0 for none: every layer's (Mistral, Phi-3),
        or in a model with local layers (Gemma 3) theirs alone."""
        if self.sliding_window is None or (self.local_layers and layer not in self.local_layers):
            return 0
        return self.sliding_window

    @property
    def split_rope(self) -> bool:
        """Whether some layers rotate otherwise than the others (``layer_rope_attrs``)."""
        return (bool(self.local_layers) and self.local_rope_theta is not None
                and rope_attrs(self.local_rope_theta) != self.rope_attrs)

    @property
    def attention_scale(self) -> float:
        """The softmax scale of Q.K: Granite's attention_multiplier, else 1/sqrt(head_dim)."""
        return self.attention_multiplier if self.attention_multiplier is not None else self.head_dim ** -0.5

    @property
    def rope_scaling(self) -> dict[str, float | int]:
        """The parameters of the rope type by transformers' names (empty for ``default``), as its
        kernels and ``inverse_frequencies`` take them (longrope's: short_factor, attention_factor)."""
        return {p: getattr(self, _ROPE_FIELDS[p]) for p in ROPE_PARAMETERS.get(self.rope_type, ())
                if getattr(self, _ROPE_FIELDS[p]) is not None}

    @property
    def rotary_dim(self) -> int:
        """The leading dims of each head that are rotated: transformers' int(head_dim * partial_rotary_factor)."""
        return int(self.head_dim * self.partial_rotary_factor) if is_number(self.partial_rotary_factor) else 0

    @property
    def rope_attrs(self) -> dict[str, Any]:
        """The rope kernel's attributes: ``{"theta": ...}`` for a default rope, plus the type and
        its parameters for a scaled one, and ``rotary_dim`` for a partial rotary."""
        attrs = rope_attrs(self.rope_theta, self.rope_type, **self.rope_scaling)
        if self.rotary_dim < self.head_dim:
            attrs["rotary_dim"] = self.rotary_dim
        return attrs

    @property
    def position_limit(self) -> int | None:
        """The most positions a sequence may take where queries are not scaled by position (None:
        any): Ministral 3's past its original context are (``query_scale_beta``, ``query_scales``),
        which the CPU runtime and the reference do and the CUDA kernels do not."""
        return self.rope_original_max_position_embeddings if self.query_scale_beta else None

    def query_scales(self, positions) -> np.ndarray | None:
        """What Ministral 3 multiplies a query at each of ``positions`` by after its rotary embedding,
        1 + beta ln(1 + floor(p / original context)) in float32 as transformers computes it (1 within
        the original context); None for a model that scales no query, or positions that are all
        within it."""
        limit = self.position_limit
        p = np.asarray(positions)
        if limit is None or not (p >= limit).any():
            return None
        return (1 + self.query_scale_beta * np.log(1 + np.floor(p.astype(np.float32) / np.float32(limit)))).astype(
            np.float32)

    def rope_is_long(self, positions: int) -> bool:
        """Whether a forward pass over positions up to ``positions`` (the last one's index + 1)
        rotates by longrope's long_factor: past the original context, as transformers picks the
        factors per pass by its largest position. (A generation that crosses it runs the whole
        sequence again there, as transformers' Phi-3 does: ``runtime.llama.LlamaModel.generate``.)"""
        return self.rope_type == "longrope" and positions > self.rope_original_max_position_embeddings

    def rope_scaling_for(self, positions: int) -> dict[str, Any]:
        """``rope_scaling`` of a forward pass over positions up to ``positions``: long_factor in
        the place of short_factor where the pass rotates by it (``rope_is_long``)."""
        if not self.rope_is_long(positions):
            return self.rope_scaling
        return {**self.rope_scaling, "short_factor": self.rope_long_factor}

    def rope_attrs_for(self, long: bool) -> dict[str, Any]:
        """The rope kernel's attributes in a pass that rotates by long_factor (``long``) or not:
        the kernels divide pair i's frequency by the i-th of the factors named ``short_factor``."""
        if not long or self.rope_type != "longrope":
            return self.rope_attrs
        return {**self.rope_attrs, "short_factor": tuple(map(float, self.rope_long_factor))}

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def parameters(self) -> int:
        """Number of weights (embedding and LM head counted once each unless tied)."""
        h, i = self.hidden_size, self.intermediate_size
        mlp = 3 * h * i
        if self.moe:  # every expert, the router, and Qwen2-MoE's shared expert and its gate
            shared = self.shared_expert_intermediate_size
            mlp = self.num_experts * (3 * h * i + h) + (3 * h * shared + h if shared else 0)
        dense_mlps = len(self.dense_layers) * (3 * h * self.dense_intermediate_size - mlp)
        layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + mlp + 2 * h
        qk_gains = 2 * self.head_dim if self.qk_norm_span == "head" else self.q_size + self.kv_size
        layer += ((self.q_size + 2 * self.kv_size) * self.qkv_bias + h * self.o_bias
                  + (2 * i + h) * self.mlp_bias + qk_gains * self.qk_norm + 2 * h * (self.post_norms - (not self.pre_norms)))
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.num_hidden_layers * layer + dense_mlps + self.vocab_size * h + head + h

    def _check_int4(self) -> None:
        """An int4 checkpoint's fields: all three or none, each a value its loader reads."""
        fmt, group = self.int4_format, self.int4_group_size
        if fmt is not None and fmt not in INT4_FORMATS:
            raise ValueError(f"model {self.name}: int4_format must be one of {', '.join(INT4_FORMATS)} or null, "
                             f"got {fmt!r}")
        if (fmt is None) != (group is None) or (fmt is None and self.int4_zero_points is not False):
            raise ValueError(f"model {self.name}: int4_format, int4_group_size and int4_zero_points describe an "
                             "int4 checkpoint together: set int4_format and int4_group_size, or neither")
        if group is not None and not _is_int4_group(group):
            raise ValueError(f"model {self.name}: int4_group_size must be one of "
                             f"{', '.join(map(str, INT4_GROUP_SIZES))} or null, got {group!r}")
        if not isinstance(self.int4_zero_points, bool):
            raise ValueError(f"model {self.name}: int4_zero_points must be true or false, got {self.int4_zero_points!r}")
        if fmt == "awq" and not self.int4_zero_points:
            raise ValueError(f"model {self.name}: an AWQ checkpoint has zero points (int4_zero_points true)")
        if not isinstance(self.int4_act_order, bool) or (self.int4_act_order and fmt not in _ACT_ORDER_FORMATS):
            raise ValueError(f"model {self.name}: int4_act_order is true only for a GPTQ or compressed-tensors "
                             f"checkpoint (int4_format {', '.join(_ACT_ORDER_FORMATS)}), got {self.int4_act_order!r}")
        channelwise = self.int4_channelwise
        if not isinstance(channelwise, bool) or (channelwise and (fmt not in _ACT_ORDER_FORMATS
                                                                   or self.int4_act_order)):
            raise ValueError(f"model {self.name}: int4_channelwise is true only for a GPTQ or compressed-tensors "
                             f"checkpoint without act-order (one group per row has no order), got {channelwise!r}")

    def _check_experts(self) -> None:
        """A mixture of experts' fields: all zero (dense), or counts that pick from the experts."""
        counts = {f: getattr(self, f) for f in ("num_experts", "experts_per_token", "shared_expert_intermediate_size")}
        for field, value in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"model {self.name}: {field} must be a whole number >= 0, got {value!r}")
        for field in ("norm_topk_prob", "shared_expert_gated", "expert_selection_bias"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"model {self.name}: {field} must be true or false, got {getattr(self, field)!r}")
        if self.expert_selection_bias and not self.num_experts:
            raise ValueError(f"model {self.name}: expert_selection_bias describes a mixture of experts; num_experts is 0")
        if self.router_scoring not in ROUTER_SCORINGS:
            raise ValueError(f"model {self.name}: router_scoring must be one of {', '.join(ROUTER_SCORINGS)}, "
                             f"got {self.router_scoring!r}")
        scale = self.routed_scaling_factor
        if not (is_number(scale) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"model {self.name}: routed_scaling_factor must be a positive finite number, got {scale!r}")
        dense = self.dense_layers
        if not isinstance(dense, (tuple, list)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < self.num_hidden_layers for i in dense):
            raise ValueError(f"model {self.name}: dense_layers must be a list of indices of its "
                             f"{self.num_hidden_layers} layers, got {dense!r}")
        object.__setattr__(self, "dense_layers", tuple(sorted(set(dense))))  # a JSON list reads back equal
        size = self.dense_intermediate_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0 or bool(size) != bool(self.dense_layers):
            raise ValueError(f"model {self.name}: dense_intermediate_size is the MLP size of dense_layers: a positive "
                             f"integer where there are some, else 0; got {size!r} with dense_layers {dense!r}")
        if not self.num_experts:
            routing = (self.router_scoring, self.routed_scaling_factor, self.expert_groups,
                       self.expert_groups_per_token, self.shared_expert_gated) != ("softmax", 1.0, 1, 1, True)
            if (self.experts_per_token or self.shared_expert_intermediate_size or self.norm_topk_prob or dense
                    or routing):
                raise ValueError(f"model {self.name}: experts_per_token, shared_expert_intermediate_size, "
                                 "norm_topk_prob, dense_layers and the routing fields describe a mixture of experts; "
                                 "num_experts is 0 (a dense MLP)")
            return
        if len(self.dense_layers) == self.num_hidden_layers:
            raise ValueError(f"model {self.name}: every layer is in dense_layers: no layer has the experts")
        if not 1 <= self.experts_per_token <= self.num_experts:
            raise ValueError(f"model {self.name}: experts_per_token = {self.experts_per_token} must be in 1 .. "
                             f"num_experts = {self.num_experts}")
        groups, picked = self.expert_groups, self.expert_groups_per_token
        if not (_positive_int(groups) and _positive_int(picked) and picked <= groups
                and (self.num_experts % groups == 0 and (groups == 1 or self.num_experts // groups >= 2))):
            raise ValueError(f"model {self.name}: expert_groups = {groups!r} must divide the {self.num_experts} experts "
                             f"into groups of two or more, and expert_groups_per_token = {picked!r} pick 1 .. that many")
        if self.num_experts and (self.num_experts // groups) * picked < self.experts_per_token:
            raise ValueError(f"model {self.name}: {picked} of {groups} expert groups hold fewer than the "
                             f"{self.experts_per_token} experts a token picks")
        if self.mlp_bias or self.activation != "silu" or self.offset_norms:
            raise ValueError(f"model {self.name}: a mixture of experts' experts are SwiGLU MLPs without biases, "
                             "normalised by the weight itself (not Gemma's 1 + weight)")
        if self.int4_act_order:  # each expert's input would be gathered into an order of its own
            raise ValueError(f"model {self.name}: act-order int4 checkpoints (desc_act) of a mixture of experts are "
                             "not implemented")

    @property
    def moe(self) -> bool:
        """Whether the MLP is a mixture of experts (``num_experts``), in some layers at least."""
        return self.num_experts > 0

    def moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s MLP is the mixture of experts (not a dense one: ``dense_layers``)."""
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def moe_layers(self) -> int:
        """How many layers' MLPs are the mixture of experts."""
        return self.num_hidden_layers - len(self.dense_layers) if self.moe else 0

    @property
    def dense_size(self) -> int:
        """The size of a dense MLP: ``intermediate_size`` of a dense model, ``dense_intermediate_size``
        of the dense layers among a mixture of experts'."""
        return self.dense_intermediate_size if self.moe else self.intermediate_size

    @property
    def int4_name(self) -> str | None:
        """What a message calls this model's int4 checkpoint ("GPTQ", "AWQ"); None for a float one."""
        return None if self.int4_format is None else INT4_FORMATS[self.int4_format]

    def _int4_hf_dict(self) -> dict[str, Any]:
        """The quantization_config of this int4 checkpoint, as its method writes it."""
        if self.int4_format == "compressed":
            weights = {"num_bits": 4, "type": "int", "strategy": "channel" if self.int4_channelwise else "group",
                       "group_size": None if self.int4_channelwise else self.int4_group_size,
                       "symmetric": not self.int4_zero_points, "dynamic": False,
                       "actorder": "group" if self.int4_act_order else None}
            return {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
                    "quantization_status": "compressed", "config_groups": {"group_0": {
                        "targets": ["Linear"], "weights": weights, "input_activations": None,
                        "output_activations": None}}}
        if self.int4_format == "awq":
            return {"quant_method": "awq", "bits": 4, "group_size": self.int4_group_size, "zero_point": True,
                    "version": "gemm"}
        return {"quant_method": "gptq", "bits": 4, "group_size": -1 if self.int4_channelwise else self.int4_group_size,
                "sym": not self.int4_zero_points, "desc_act": self.int4_act_order, "checkpoint_format": self.int4_format}

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json of a family that computes this model (``from_hf_dict`` reads it back
        equal): Qwen3 for norms of the query and key heads, Qwen2 for q/k/v biases alone, Llama
        for other biases or none, Mistral for a sliding window without biases."""
        if self.multimodal is not None:  # the text config inside the image-and-text model's
            architecture, text_type = MULTIMODAL[self.multimodal]
            text = replace(self, multimodal=None).to_hf_dict()
            text.pop("architectures")  # the outer config's
            if text_type == "mistral" and text["model_type"] == "llama" and "attention_bias" not in text:
                text.update(model_type="mistral", sliding_window=self.sliding_window)  # MistralConfig's absent is 4096
            if text["model_type"] == text_type and self.multimodal in _TEXT_MODEL_TYPES:
                text["model_type"] = _TEXT_MODEL_TYPES[self.multimodal]  # the name the release's text_config has
            others = _OTHER_TEXT_FAMILIES.get(self.multimodal, ())
            if text["model_type"] not in (text_type, _TEXT_MODEL_TYPES.get(self.multimodal), *others):
                raise ValueError(f"model {self.name}: {self.multimodal}'s language model is a "
                                 f"{' or '.join((text_type, *others))}, not a {text['model_type']}")
            # an int4 checkpoint's quantization_config beside text_config, as its tools write it
            quantization = {"quantization_config": text.pop("quantization_config")} if self.int4_format else {}
            return {"architectures": [architecture], "model_type": self.multimodal,
                    "tie_word_embeddings": self.tie_word_embeddings, "text_config": text, **quantization}
        if self.int4_format is not None:  # the model's config with the checkpoint's quantisation
            float_config = replace(self, int4_format=None, int4_group_size=None, int4_zero_points=False,
                                   int4_act_order=False, int4_channelwise=False)
            return {**float_config.to_hf_dict(), "quantization_config": self._int4_hf_dict()}
        data = asdict(self)
        data.pop("name")
        for field in ("multimodal", "int4_format", "int4_group_size", "int4_zero_points", "int4_act_order",
                      "int4_channelwise", "rope_type", "query_scale_beta", "rope_interleaved",
                      *_ROPE_FIELDS.values(), "partial_rotary_factor", "qkv_bias", "o_bias", "mlp_bias", "qk_norm",
                      "qk_norm_span", *_GRANITE_FIELDS, "activation", "offset_norms", "post_norms", "pre_norms",
                      "local_layers", "local_rope_theta", "nope_layers", "attn_softcap", "final_softcap",
                      "num_experts", "experts_per_token", "norm_topk_prob", "shared_expert_intermediate_size",
                      "dense_layers", "dense_intermediate_size", "shared_expert_gated", "expert_selection_bias",
                      "router_scoring", "routed_scaling_factor", "expert_groups", "expert_groups_per_token"):
            data.pop(field)
        if self.moe:
            return self._moe_hf_dict(data)
        if (self.attn_softcap or self.final_softcap) and not self.offset_norms:
            raise ValueError(f"model {self.name}: soft-capping outside a Gemma has no config.json this runtime reads")
        if self.rope_interleaved:
            return self._interleaved_hf_dict(data)
        if self.rope_type == "longrope" or self.partial_rotary_factor != 1.0:
            return self._phi3_hf_dict(data)
        if self.query_scale_beta:
            return self._ministral3_hf_dict(data)
        if not self.pre_norms or self.qk_norm_span != "head":
            return self._olmo_hf_dict(data)
        if self.nope_layers and (self.offset_norms or self.activation != "silu" or self.post_norms or self.local_layers
                                 or self.qk_norm or self.scaled or self.attention_multiplier is not None
                                 or self.sliding_window is not None or self.qkv_bias != self.o_bias):
            raise ValueError(f"model {self.name}: layers without a rotary embedding (SmolLM3) in a model that is not "
                             "otherwise Llama's have no config.json this runtime reads")
        if self.nope_layers:
            data.update(model_type="smollm3", architectures=[FAMILIES["smollm3"]], hidden_act="silu",
                        attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias, use_sliding_window=False,
                        no_rope_layers=[int(i not in self.nope_layers) for i in range(self.num_hidden_layers)])
            return data
        if self.offset_norms or self.activation != "silu" or self.post_norms:
            return self._gemma_hf_dict(data)
        if self.rope_type != "default":  # transformers 4.x layout, beside the top-level rope_theta
            data["rope_scaling"] = {"rope_type": self.rope_type, **self.rope_scaling}
        if self.sliding_window is None:
            data.pop("sliding_window")
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        if self.scaled or self.attention_multiplier is not None:
            if self.qk_norm or self.sliding_window is not None or self.qkv_bias != self.o_bias:
                raise ValueError(f"model {self.name}: Granite's multipliers with norms of the query and key heads, a "
                                 "sliding_window or biases on only some attention projections have no config.json "
                                 "this runtime reads")
            family = "granite"
            data.update({name: getattr(self, name) for name in _GRANITE_FIELDS}, attention_bias=self.qkv_bias,
                        mlp_bias=self.mlp_bias, attention_multiplier=self.attention_scale)
        elif self.qk_norm:
            if self.split_rope or self.mlp_bias or self.qkv_bias != self.o_bias:
                raise ValueError(f"model {self.name}: norms of the query and key heads (Qwen3) with a local rope, "
                                 "MLP biases or biases on only some attention projections have no config.json this "
                                 "runtime reads")
            family = "qwen3"
            data.update(self._qwen_window(), attention_bias=self.qkv_bias)
        elif biases == (True, False, False):
            if self.split_rope:
                raise ValueError(f"model {self.name}: q/k/v biases (Qwen2) with a local rope have no config.json "
                                 "this runtime reads")
            family = "qwen2"
            data.update(self._qwen_window())
        elif self.qkv_bias != self.o_bias:  # Seed-OSS switches each projection's bias apart
            if self.sliding_window is not None or self.local_layers:
                raise ValueError(f"model {self.name}: biases on q/k/v and o apart (Seed-OSS) with a sliding window "
                                 "have no config.json this runtime reads")
            family = "seed_oss"
            data.update(attention_bias=self.qkv_bias, attention_out_bias=self.o_bias, mlp_bias=self.mlp_bias)
        elif self.local_layers:
            if any(biases) or self.split_rope:
                raise ValueError(f"model {self.name}: a window in some layers only with biases on every attention "
                                 "projection, or a rope of their own, has no config.json this runtime reads")
            family = "ministral"
            data.update(layer_types=["sliding_attention" if i in self.local_layers else "full_attention"
                                     for i in range(self.num_hidden_layers)])
        else:
            family = "llama" if self.sliding_window is None or any(biases) else "mistral"
            if any(biases):
                data.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        data.update(model_type=family, architectures=[FAMILIES[family]], hidden_act="silu")
        return data

    def _plain_layers(self) -> bool:
        """Whether every layer is Llama's but for its biases and its output norms: no head norms,
        Granite's or Gemma's scalars, no local or NoPE layers, SwiGLU, a norm before each sublayer
        (what the writers of the families built on Llama's layer check first)."""
        return not (self.qk_norm or self.scaled or self.attention_multiplier is not None or self.local_layers
                    or self.nope_layers or self.activation != "silu" or not self.pre_norms)

    def _phi3_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of a model with longrope scaling or a partial rotary: Phi-3's (Llama's network
        with an optional window; the one family whose longrope and partial rotary this runtime reads),
        the original context and partial_rotary_factor at the top level as Phi-3 and Phi-4-mini write
        them; refused for a model that is not otherwise Phi-3's."""
        plain = self._plain_layers() and not (self.qkv_bias or self.o_bias or self.mlp_bias or self.post_norms)
        if not plain or self.rope_type not in ("default", "longrope"):  # Phi3Config's rope types
            raise ValueError(f"model {self.name}: longrope or a partial rotary (Phi-3's) with biases, head norms, "
                             "Granite's scalars, Gemma's or OLMo's norms, layers of their own or another rope type "
                             "has no config.json this runtime reads")
        if self.sliding_window is None:
            data.pop("sliding_window")
        data.update(model_type="phi3", architectures=[FAMILIES["phi3"]], hidden_act="silu")
        if self.partial_rotary_factor != 1.0:
            data["partial_rotary_factor"] = self.partial_rotary_factor
        if self.rope_type == "longrope":
            # lists, as json.loads gives them and Phi3Config checks them to be
            data["rope_scaling"] = {"rope_type": "longrope", "short_factor": list(self.rope_short_factor),
                                    "long_factor": list(self.rope_long_factor),
                                    "attention_factor": self.rope_attention_factor}
            data["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
        return data

    def _ministral3_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of a model whose queries are scaled by position past the original context
        (``query_scale_beta``): Ministral 3's (Mistral's network, its YaRN in rope_parameters beside
        llama_4_scaling_beta); refused for a model that is not otherwise Mistral's."""
        plain = self._plain_layers() and not (self.qkv_bias or self.o_bias or self.mlp_bias or self.post_norms)
        if not plain:
            raise ValueError(f"model {self.name}: queries scaled by position (Ministral 3's llama_4_scaling_beta) "
                             "with biases, head norms, Granite's scalars, Gemma's or OLMo's norms or layers of their "
                             "own have no config.json this runtime reads")
        if self.sliding_window is None:
            data.pop("sliding_window")
        rope = {"rope_type": self.rope_type, **self.rope_scaling, "rope_theta": data.pop("rope_theta"),
                "llama_4_scaling_beta": self.query_scale_beta}
        data.update(model_type="ministral3", architectures=[FAMILIES["ministral3"]], hidden_act="silu",
                    rope_parameters=rope)
        return data

    def _interleaved_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of a model whose rotary pairs are adjacent dims: GLM-4's (norms of the
        sublayers' outputs), ERNIE 4.5's (a bias on every projection or none) or Helium's (no
        o_proj bias); refused for a model that is not otherwise Llama's."""
        plain = self._plain_layers() and self.sliding_window is None
        biases = (self.qkv_bias, self.o_bias, self.mlp_bias)
        if plain and self.post_norms and not (self.o_bias or self.mlp_bias):
            data.pop("sliding_window")
            rope = {"rope_type": self.rope_type, **self.rope_scaling, "rope_theta": data.pop("rope_theta"),
                    "partial_rotary_factor": self.partial_rotary_factor}
            data.update(model_type="glm4", architectures=[FAMILIES["glm4"]], hidden_act="silu",
                        attention_bias=self.qkv_bias, rope_parameters=rope)
            return data
        if (not plain or self.post_norms or self.partial_rotary_factor != 1.0
                or not (len(set(biases)) == 1 or not self.o_bias)):
            raise ValueError(f"model {self.name}: rotary pairs of adjacent dims (ERNIE 4.5's, Helium's) in a model "
                             "that is not otherwise Llama's, or with an o_proj bias without the others, have no "
                             "config.json this runtime reads")
        data.pop("sliding_window")
        if self.rope_type != "default":
            data["rope_scaling"] = {"rope_type": self.rope_type, **self.rope_scaling}
        if len(set(biases)) == 1:
            data.update(model_type="ernie4_5", architectures=[FAMILIES["ernie4_5"]], use_bias=self.qkv_bias)
        else:
            data.update(model_type="helium", architectures=[FAMILIES["helium"]], attention_bias=self.qkv_bias,
                        mlp_bias=self.mlp_bias)
        data["hidden_act"] = "silu"
        return data

    def _olmo_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of an OLMo 2 (norms after the sublayers only, the whole q and k projections
        normalised), with sliding layers an OLMo 3; refused for a mix that is no OLMo's."""
        if self.qk_norm_span == "head" and self.qk_norm and not self.pre_norms:
            return self._exaone4_hf_dict(data)
        olmo = (not self.pre_norms and self.post_norms and self.qk_norm and self.qk_norm_span == "projection"
                and self.activation == "silu" and not (self.offset_norms or self.scaled or self.mlp_bias
                                                       or self.nope_layers)
                and self.qkv_bias == self.o_bias and (self.sliding_window is None) == (not self.local_layers)
                and self.attention_multiplier is None and not (self.attn_softcap or self.final_softcap))
        if not olmo:
            raise ValueError(f"model {self.name}: norms after the sublayers only or of the whole q and k projections "
                             "in a mix that is no OLMo 2's or 3's have no config.json this runtime reads")
        family = "olmo3" if self.local_layers else "olmo2"
        data.update(model_type=family, architectures=[FAMILIES[family]], hidden_act="silu",
                    attention_bias=self.qkv_bias)
        if family == "olmo2":
            if self.rope_type != "default":
                data["rope_scaling"] = {"rope_type": self.rope_type, **self.rope_scaling}
            data.pop("sliding_window")
            return data
        full = {"rope_type": self.rope_type, **self.rope_scaling, "rope_theta": data.pop("rope_theta")}
        data.update(layer_types=["sliding_attention" if i in self.local_layers else "full_attention"
                                 for i in range(self.num_hidden_layers)],
                    rope_parameters={"full_attention": full,
                                     "sliding_attention": {"rope_type": "default", "rope_theta": self.local_rope_theta}})
        return data

    def _exaone4_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of an EXAONE 4.0 (OLMo 2's norms after the sublayers, a norm of each query
        and key head; with a window, sliding layers that rotate and global ones that do not);
        refused for a mix that is no EXAONE's."""
        hybrid = self.sliding_window is not None
        exaone = (self.post_norms and self.activation == "silu"
                  and not (self.offset_norms or self.scaled or self.qkv_bias or self.o_bias or self.mlp_bias
                           or self.attention_multiplier is not None or self.attn_softcap or self.final_softcap)
                  and (set(self.nope_layers) == set(range(self.num_hidden_layers)) - set(self.local_layers)
                       if hybrid else not (self.local_layers or self.nope_layers))
                  and (not hybrid or (bool(self.local_layers) and not self.split_rope)))
        if not exaone:
            raise ValueError(f"model {self.name}: norms after the sublayers only with norms of each query and key "
                             "head in a mix that is no EXAONE 4.0's have no config.json this runtime reads")
        if self.rope_type != "default":
            data["rope_scaling"] = {"rope_type": self.rope_type, **self.rope_scaling}
        data.update(model_type="exaone4", architectures=[FAMILIES["exaone4"]], hidden_act="silu",
                    layer_types=["sliding_attention" if i in self.local_layers else "full_attention"
                                 for i in range(self.num_hidden_layers)])
        return data

    def _moe_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of a mixture of experts: ERNIE 4.5 MoE's with rotary pairs of adjacent dims,
        GLM-4.5's with sigmoid scores, Granite MoE's with Granite's scalars, Qwen2-MoE's with a shared
        expert, Qwen3-MoE's with norms of each query and key head, OLMoE's with norms of the whole
        projections, else Mixtral's."""
        if self.rope_interleaved:  # ERNIE 4.5's pairs of adjacent dims
            return self._ernie_moe_hf_dict(data)
        if self.router_scoring == "sigmoid":
            return self._glm_moe_hf_dict(data)
        shared, span = self.shared_expert_intermediate_size, self.qk_norm_span if self.qk_norm else None
        granite = self.scaled or self.attention_multiplier is not None
        if granite:
            family = "granitemoe"
            fits = (self.norm_topk_prob and not (shared or span or self.local_layers or self.sliding_window)
                    and self.qkv_bias == self.o_bias)
        elif shared:
            family = "qwen2_moe"
            fits = span is None and not self.o_bias and not self.split_rope
        elif span == "head":
            family, fits = "qwen3_moe", self.qkv_bias == self.o_bias and not self.split_rope
        elif span == "projection":
            family, fits = "olmoe", self.qkv_bias == self.o_bias and self.sliding_window is None
        else:
            family = "mixtral"
            fits = self.norm_topk_prob and not (self.qkv_bias or self.o_bias or self.local_layers)
        if self.dense_layers and family not in ("qwen2_moe", "qwen3_moe"):  # the family with mlp_only_layers
            fits = False
        if not self.shared_expert_gated or self.expert_selection_bias:  # ERNIE 4.5's and GLM-4.5's (above)
            fits = False
        plain = not (self.nope_layers or self.post_norms or not self.pre_norms or self.rope_interleaved
                     or self.query_scale_beta or self.rope_type == "longrope" or self.partial_rotary_factor != 1.0)
        if not (fits and plain):
            raise ValueError(f"model {self.name}: a mixture of experts with these attention settings has no "
                             f"config.json this runtime reads (the nearest family, {family}, cannot hold them)")
        if self.rope_type != "default":
            data["rope_scaling"] = {"rope_type": self.rope_type, **self.rope_scaling}
        experts = {"num_experts_per_tok": self.experts_per_token}
        if family in ("mixtral", "granitemoe"):
            experts["num_local_experts"] = self.num_experts
        else:
            experts.update(num_experts=self.num_experts, norm_topk_prob=self.norm_topk_prob)
        if family != "mixtral":  # Mixtral's window is its config's; the others write theirs below or have none
            data.pop("sliding_window")
        if granite:  # Granite's scalars, its softmax scale given (GraniteMoeConfig's absent one is 1.0)
            experts.update({name: getattr(self, name) for name in _GRANITE_FIELDS},
                           attention_multiplier=self.attention_scale, attention_bias=self.qkv_bias)
        if family in ("qwen2_moe", "qwen3_moe"):  # the experts' size under Qwen's name; the dense layers' theirs
            experts.update(moe_intermediate_size=self.intermediate_size, decoder_sparse_step=1,
                           mlp_only_layers=list(self.dense_layers), **self._qwen_window())
            if self.dense_layers:
                experts["intermediate_size"] = self.dense_intermediate_size
        if family == "qwen2_moe":
            experts.update(shared_expert_intermediate_size=shared, qkv_bias=self.qkv_bias)
        elif family not in ("mixtral", "granitemoe"):
            experts["attention_bias"] = self.qkv_bias
        data.update(experts, model_type=family, architectures=[FAMILIES[family]], hidden_act="silu")
        return data

    def _ernie_moe_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of ERNIE 4.5 MoE: its dense layers those before ``moe_layer_start_index``,
        its shared experts ungated (a multiple of the experts' size), the experts picked with a bias."""
        moe = [i for i in range(self.num_hidden_layers) if self.moe_layer(i)]
        shared, size = self.shared_expert_intermediate_size, self.intermediate_size
        fits = (moe == list(range(moe[0], self.num_hidden_layers)) and bool(self.dense_layers) == bool(moe[0])
                and not self.shared_expert_gated and self.expert_selection_bias and self.norm_topk_prob
                and shared % size == 0 and self.qkv_bias == self.o_bias == self.mlp_bias
                and self._plain_layers() and self.sliding_window is None and self.rope_type == "default"
                and self.rotary_dim == self.head_dim and self.head_dim * self.num_attention_heads == self.hidden_size)
        if not fits:
            raise ValueError(f"model {self.name}: a mixture of experts with rotary pairs of adjacent dims is ERNIE 4.5 "
                             "MoE's, which cannot hold these settings")
        data.pop("sliding_window")
        data.update(model_type="ernie4_5_moe", architectures=[FAMILIES["ernie4_5_moe"]], hidden_act="silu",
                    use_bias=self.qkv_bias, intermediate_size=self.dense_intermediate_size or size,
                    moe_intermediate_size=size, moe_k=self.experts_per_token, moe_num_experts=self.num_experts,
                    moe_num_shared_experts=shared // size, moe_layer_start_index=moe[0],
                    moe_layer_end_index=self.num_hidden_layers - 1, moe_layer_interval=1, moe_norm_min=1e-12)
        data.pop("head_dim")  # hidden_size / num_attention_heads, as the family computes it
        return data

    def _glm_moe_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of GLM-4.5 (the family whose router scores by sigmoid): its dense layers the
        first ones, its shared experts ungated (a multiple of the experts' size), the experts picked
        with a bias, a rotary share of each head."""
        dense, shared, size = self.dense_layers, self.shared_expert_intermediate_size, self.intermediate_size
        fits = (dense == tuple(range(len(dense))) and not self.shared_expert_gated and self.expert_selection_bias
                and shared % size == 0 and not (self.o_bias or self.mlp_bias) and self.qk_norm_span == "head"
                and not (self.scaled or self.attention_multiplier is not None or self.local_layers or self.nope_layers
                         or self.post_norms or not self.pre_norms or self.sliding_window is not None
                         or self.query_scale_beta or self.rope_type != "default"))
        if not fits:
            raise ValueError(f"model {self.name}: a mixture of experts scored by sigmoid is GLM-4.5's, which cannot "
                             "hold these settings")
        data.pop("sliding_window")
        data.update(model_type="glm4_moe", architectures=[FAMILIES["glm4_moe"]], hidden_act="silu",
                    attention_bias=self.qkv_bias, use_qk_norm=self.qk_norm, partial_rotary_factor=self.partial_rotary_factor,
                    intermediate_size=self.dense_intermediate_size or size, moe_intermediate_size=size,
                    n_routed_experts=self.num_experts, num_experts_per_tok=self.experts_per_token,
                    n_shared_experts=shared // size, routed_scaling_factor=self.routed_scaling_factor,
                    n_group=self.expert_groups, topk_group=self.expert_groups_per_token,
                    first_k_dense_replace=len(dense), norm_topk_prob=self.norm_topk_prob)
        return data

    def _qwen_window(self) -> dict[str, Any]:
        """Qwen's window fields: switched off, or on with ``layer_types`` naming the windowed layers."""
        if self.sliding_window is None:
            return {"use_sliding_window": False}
        return {"use_sliding_window": True, "sliding_window": self.sliding_window, "max_window_layers": 0,
                "layer_types": ["sliding_attention" if self.layer_window(i) else "full_attention"
                                for i in range(self.num_hidden_layers)]}

    def _gemma_hf_dict(self, data: dict[str, Any]) -> dict[str, Any]:
        """``to_hf_dict`` of a Gemma (GeGLU, norms by 1 + weight, embeddings times sqrt(hidden)),
        with the sublayers' output norms a Gemma 2, and with the head norms too a Gemma 3; refused
        for a mix no family computes."""
        family = ("gemma" if not self.post_norms else "gemma3_text" if self.qk_norm else "gemma2")
        common = (self.activation == "gelu_tanh" and self.offset_norms and not self.mlp_bias
                  and self.qkv_bias == self.o_bias and self.embedding_multiplier == self.hidden_size ** 0.5
                  and (self.residual_multiplier, self.logits_scaling) == (1.0, 1.0))
        own = {"gemma": not (self.qk_norm or self.local_layers or self.sliding_window is not None
                             or self.attention_multiplier is not None or self.attn_softcap or self.final_softcap),
               "gemma2": not self.split_rope, "gemma3_text": True}[family]
        if not (common and own):
            raise ValueError(f"model {self.name}: GeGLU, norms by 1 + weight, output norms or local rope layers in a "
                             "mix that is no Gemma's have no config.json this runtime reads")
        data.update(model_type=family, architectures=[FAMILIES[family]], hidden_act="gelu_pytorch_tanh",
                    attention_bias=self.qkv_bias)
        if family != "gemma":
            data.update(attn_logit_softcapping=self.attn_softcap, final_logit_softcapping=self.final_softcap,
                        layer_types=["sliding_attention" if i in self.local_layers else "full_attention"
                                     for i in range(self.num_hidden_layers)],
                        sliding_window=self.sliding_window, hidden_activation="gelu_pytorch_tanh")
            scalar = self.attention_scale ** -2  # query_pre_attn_scalar, an integer in every release
            data["query_pre_attn_scalar"] = round(scalar) if abs(scalar - round(scalar)) < 1e-9 else scalar
        if family == "gemma3_text":
            full = {"rope_type": self.rope_type, **self.rope_scaling, "rope_theta": data.pop("rope_theta")}
            local = {"rope_type": "default", "rope_theta": self.local_rope_theta or 10000.0}
            data.pop("rope_scaling", None)
            data.update(rope_parameters={"full_attention": full, "sliding_attention": local})
        return data

    @classmethod
    def from_hf_dict(cls, data: Mapping[str, Any], name: str = "model", source: str | None = None) -> "ModelConfig":
        """The config a transformers ``config.json`` (4.x or 5.x layout) describes, or a
        ValueError of one line naming the first field that is not implemented. ``source``
        begins that line (the file's path); by default ``model config NAME``."""
        where = source or f"model config {name}"
        wrapper = _multimodal(data)
        if wrapper is not None:
            return cls._from_multimodal(data, wrapper, name, where)
        family = _check_family(data, where)
        data, experts = _moe_fields(data, family, where)
        if family == "ministral3" and data.get("rope_parameters") is None and data.get("rope_scaling") is None:
            data = {**data, "rope_parameters": _MINISTRAL3_ROPE}  # Ministral3Config's where none is given
        unknown = sorted(k for k in data if k not in READ_FIELDS and k not in HARMLESS_FIELDS)
        if "auto_map" in unknown:  # said first: the one a user can resolve by deleting it
            raise ValueError(f"{where}: auto_map = {_show(data['auto_map'])} names the repository's own model code, "
                             "which may compute something else and which this runtime cannot check; a copy of the "
                             f"config.json without auto_map runs as transformers' {FAMILIES[family]} (what "
                             "transformers itself runs unless trust_remote_code is set)")
        if unknown:
            more = f" (and {', '.join(unknown[1:4])}{' ...' if len(unknown) > 4 else ''})" if len(unknown) > 1 else ""
            raise ValueError(f"{where}: unknown field {unknown[0]} = {_show(data[unknown[0]])}{more} is refused: "
                             "it may change the computation, and this runtime does not implement it")
        missing = [k for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                               "vocab_size") if k not in data]
        if missing:
            raise ValueError(f"{where}: missing {', '.join(missing)}")
        _check_layers(data, family, where)
        biases = _biases(data, family, where)
        qwen_windowed = _check_qwen_fields(data, family, where)
        _check_phi3_fields(data, family, where)
        scalars = {**_granite_scalars(data, family, where), **_gemma_fields(data, family, where)}
        if family in _OLMO_FAMILIES:  # norms after the sublayers only; q and k normalised as whole projections
            scalars.update(qk_norm=True, qk_norm_span="projection", pre_norms=False, post_norms=True)
        if family == "olmo3":  # OLMo 2 with Gemma 3's sliding layers (every fourth one global)
            scalars["local_layers"] = _sliding_layers(data, family, where)
        if family == "exaone4":  # OLMo 2's norms, Qwen3's head norms; with a window, NoPE in the global layers
            scalars.update(qk_norm=True, pre_norms=False, post_norms=True)
            if data.get("sliding_window", _ABSENT_WINDOW[family]) is not None:
                sliding = _sliding_layers(data, family, where)
                scalars.update(local_layers=sliding, local_rope_theta=None,  # they rotate by the model's rope
                               nope_layers=tuple(i for i in range(_layer_count(data, where)) if i not in sliding))
        if family == "ministral":  # Mistral's window in the sliding layers, which rotate as the others
            scalars.update(local_layers=_sliding_layers(data, family, where), local_rope_theta=_rope_theta(data, where))
        if family in ("gemma3_text", "olmo3"):
            data, scalars["local_rope_theta"] = _layer_kind_ropes(data, where, family)
        if family == "gemma2":  # its sliding layers rotate as the others
            scalars["local_rope_theta"] = _rope_theta(data, where)
        if family in _LAYER_KINDS and not scalars.get("local_layers"):  # no sliding layer
            scalars["local_rope_theta"] = None
        # Qwen's: see _check_qwen_fields; an absent one is what the family's config class defaults it to
        window = None if family in _WINDOW_SWITCHED else data.get("sliding_window", _ABSENT_WINDOW.get(family))
        if qwen_windowed:  # Qwen's switched-on window: in every layer as Mistral's, else in some
            window = data.get("sliding_window", 4096)
            if len(qwen_windowed) < data["num_hidden_layers"]:  # those rotate as the others
                scalars.update(local_layers=qwen_windowed, local_rope_theta=_rope_theta(data, where))
        if family in _LAYER_KINDS and not scalars.get("local_layers"):  # only its sliding layers have it
            window = None
        if family == "ministral" and (window is None or len(scalars["local_layers"]) == data["num_hidden_layers"]):
            scalars.update(local_layers=(), local_rope_theta=None)  # no window, or Mistral's in every layer
        heads = data["num_attention_heads"]
        # null or absent means the default, as in transformers; any other value (0 too) is
        # honoured or refused by __post_init__, never replaced
        head_dim = _or(data.get("head_dim"), _ABSENT_HEAD_DIM.get(family))
        if head_dim is None:  # 0 where the sizes are not counts: __post_init__ names the one that is not
            counts = _positive_int(data["hidden_size"]) and _positive_int(heads)
            head_dim = data["hidden_size"] // heads if counts else 0
        positions = _or(data.get("max_position_embeddings"), _ABSENT_POSITIONS[family])
        partial = _partial_rotary_factor(data, family, where)
        rotary_dim = int(head_dim * partial) if _positive_int(head_dim) else head_dim
        if _positive_int(head_dim) and rotary_dim_problem(rotary_dim, head_dim):
            raise ValueError(f"{where}: partial_rotary_factor = {partial!r} gives a rotary dim of int({head_dim} x "
                             f"{partial!r}) = {rotary_dim}, not an even number in 2 .. head_dim = {head_dim}")
        rope_type, scaling = _rope_scaling(data, where, positions, family, rotary_dim)
        # they'd need it too (Gemma 3's and OLMo 3's sliding layers have a rope of their own, EXAONE 4.0's
        # the model's)
        if scalars.get("local_layers") and family not in ("gemma3_text", "olmo3", "exaone4") and rope_type != "default":
            raise ValueError(f"{where}: rope scaling {rope_type!r} with a sliding window in some layers is not "
                             "implemented; supported: default")
        q_size = heads * head_dim if _positive_int(heads) and _positive_int(head_dim) else None
        scalars.update(_int4_checkpoint(data, where, (data["hidden_size"], data["intermediate_size"], q_size)))
        scalars["query_scale_beta"] = _query_scale_beta(data, family, rope_type, where)
        scalars["rope_interleaved"] = family in ("ernie4_5", "ernie4_5_moe", "helium", "glm4")
        if family == "glm4":  # Gemma 2's norms of the sublayers' outputs, by the weight itself
            scalars["post_norms"] = True
        if family == "olmoe":  # OLMo 2's norms of the whole query and key projections, before the sublayers
            scalars.update(qk_norm=True, qk_norm_span="projection")
        scalars.update(experts)
        return cls(name=name, hidden_size=data["hidden_size"], intermediate_size=data["intermediate_size"],
                   num_attention_heads=heads,
                   num_key_value_heads=_or(data.get("num_key_value_heads", _ABSENT_KV_HEADS.get(family)), heads),
                   head_dim=head_dim, num_hidden_layers=data["num_hidden_layers"], vocab_size=data["vocab_size"],
                   # absent: the family's config class default (_ABSENT_EPS); null is no epsilon
                   rms_norm_eps=_number(data.get("rms_norm_eps", _ABSENT_EPS.get(family, 1e-6)), "rms_norm_eps",
                                        where),
                   rope_theta=_rope_theta(data, where, _ABSENT_THETA.get(family, 10000.0)),
                   tie_word_embeddings=_flag(data, "tie_word_embeddings", where,
                                             family in (*_GEMMA_FAMILIES, "smollm3", "ernie4_5", "ernie4_5_moe")),
                   max_position_embeddings=_or(data.get("max_position_embeddings"), _ABSENT_POSITIONS[family]),
                   sliding_window=window, rope_type=rope_type, partial_rotary_factor=partial,
                   **{_ROPE_FIELDS[p]: v for p, v in scaling.items()}, **biases,
                   **{"qk_norm": family in ("qwen3", "qwen3_moe"), "nope_layers": _nope_layers(data, family, where),
                      **scalars})

    @classmethod
    def _from_multimodal(cls, data: Mapping[str, Any], wrapper: str, name: str, where: str) -> "ModelConfig":
        """The language model of an image-and-text config (``MULTIMODAL``): its ``text_config`` read as
        its own family's, the LM head tied as the outer config says (transformers ties by it)."""
        architecture, text_type = MULTIMODAL[wrapper]
        flat = wrapper in _FLAT_MULTIMODAL and "text_config" not in data
        if flat:  # the release's layout: the language model's fields beside the image side's
            fields = _MULTIMODAL_FIELDS[wrapper]
            data = {**{k: v for k, v in data.items() if k in fields},
                    "text_config": {k: v for k, v in data.items() if k not in fields}}
        unknown = sorted(k for k in data if k not in _MULTIMODAL_FIELDS[wrapper] and k not in HARMLESS_FIELDS)
        if unknown:
            raise ValueError(f"{where}: unknown field {unknown[0]} = {_show(data[unknown[0]])} of {architecture} is "
                             "refused: it may change the computation, and this runtime does not implement it")
        architectures = data.get("architectures")
        if architectures is not None and architectures != [architecture]:
            raise ValueError(f"{where}: architectures = {_show(architectures)} and model_type = {_show(wrapper)} "
                             "name different models")
        text = data.get("text_config")
        if not isinstance(text, dict):
            raise ValueError(f"{where}: text_config = {_show(text)} is not an object (the language model's config)")
        if text.get("model_type") in _OTHER_TEXT_FAMILIES.get(wrapper, ()):
            text_type = text["model_type"]
        if text.get("model_type", text_type) not in (text_type, _TEXT_MODEL_TYPES.get(wrapper)) or text.get(
                "architectures", [FAMILIES[text_type]]) != [FAMILIES[text_type]]:
            kinds = " or ".join((text_type, *_OTHER_TEXT_FAMILIES.get(wrapper, ())))
            raise ValueError(f"{where}: text_config names {_show(text.get('architectures') or text.get('model_type'))}; "
                             f"{architecture}'s language model is a {kinds}")
        text = _without_mrope(text, where)
        if "quantization_config" in data and "quantization_config" in text:
            raise ValueError(f"{where}: quantization_config is given twice, beside text_config and inside it")
        # an int4 checkpoint (GPTQ, AWQ) says how beside text_config: its language model's layers
        quantization = {"quantization_config": data["quantization_config"]} if "quantization_config" in data else {}
        config = cls.from_hf_dict({**_TEXT_DEFAULTS[wrapper], **text, **quantization, "model_type": text_type}, name,
                                  f"{where}: text_config")
        # absent: the text config's (Mistral Small 3.1 names neither and ships an LM head of its own,
        # which transformers 5 then leaves untied although Mistral3Config's default is true)
        tie = _flag(data, "tie_word_embeddings", where, config.tie_word_embeddings)
        return replace(config, tie_word_embeddings=tie, multimodal=wrapper)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf_dict(), indent=2) + "\n")


# An absent num_key_value_heads is what the family's config class defaults it to in
# transformers 4.x and 5.x (Llama's: one per query head); null, as 4.x reads it, is one per query head.
_ABSENT_KV_HEADS = {"mistral": 8, "mixtral": 8, "qwen2_moe": 16, "qwen3_moe": 4, "glm4": 2, "seed_oss": 8, "qwen2": 32,
                    "qwen3": 32, "gemma": 16, "gemma2": 4,
                    "gemma3_text": 4, "smollm3": 4,
                    "ministral": 8, "ministral3": 8, "exaone4": 32, "ernie4_5": 2, "helium": 20, "ernie4_5_moe": 4,
                    "glm4_moe": 8}
# Likewise an absent sliding_window (MistralConfig's is 4096; null: none) and an absent
# max_position_embeddings (kept, and written back by to_hf_dict; nothing computes with it)
_ABSENT_WINDOW = {"mistral": 4096, "gemma2": 4096, "gemma3_text": 4096, "olmo3": 4096, "ministral": 4096,
                  "exaone4": 4096}
# the config classes' rms_norm_eps where left out; every other family's: 1e-6
_ABSENT_EPS = {"glm4": 1.5625e-07, "phi3": 1e-5, "olmo2": 1e-5, "olmo3": 1e-5, "ministral3": 1e-5, "exaone4": 1e-5,
               "ernie4_5": 1e-5, "helium": 1e-8, "mixtral": 1e-5, "olmoe": 1e-5, "ernie4_5_moe": 1e-5,
               "glm4_moe": 1e-5}
_ABSENT_POSITIONS = {"llama": 2048, "mistral": 131072, "qwen2": 32768, "qwen3": 32768, "phi3": 4096, "granite": 2048,
                     "gemma": 8192, "gemma2": 8192, "gemma3_text": 131072, "smollm3": 32768, "olmo2": 2048,
                     "olmo3": 2048,
                     "ministral3": 262144, "ministral": 131072, "exaone4": 2048, "ernie4_5": 131072, "glm4": 131072,
                     "seed_oss": 524288,
                     "helium": 4096, "mixtral": 131072, "qwen2_moe": 32768, "qwen3_moe": 32768, "olmoe": 4096,
                     "granitemoe": 2048, "ernie4_5_moe": 131072, "glm4_moe": 131072}
# the config classes' bases (SmolLM3's, ERNIE 4.5's, Helium's); 10000 elsewhere (Gemma 3, OLMo 3: _layer_kind_ropes)
_ABSENT_THETA = {"smollm3": 2000000.0, "ernie4_5": 500000.0, "helium": 100000.0, "mixtral": 1000000.0,
                 "ernie4_5_moe": 500000.0}
# Qwen3Config's head_dim is 128 whatever hidden_size / num_attention_heads is, Gemma's 256
_ABSENT_HEAD_DIM = {"seed_oss": 128, "qwen3": 128, "gemma": 256, "gemma2": 256, "gemma3_text": 256, "ministral3": 128,
                    "ernie4_5": 128, "helium": 128, "glm4": 128}
# Ministral3Config's rope where a config names none: YaRN from a 16384-position context, the
# queries scaled past it
_MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 16.0,
                    "original_max_position_embeddings": 16384, "beta_fast": 32.0, "beta_slow": 1.0,
                    "mscale_all_dim": 1.0, "mscale": 1.0, "llama_4_scaling_beta": 0.1}


# more layers than any model has: a per-layer list of this many would not be built (a config
# naming 10**30 layers is refused, not enumerated)
MAX_LAYERS = 100_000


def _layer_count(data: Mapping[str, Any], where: str) -> int:
    """``num_hidden_layers`` where per-layer lists are derived from it: 0 for one that is no
    count (``ModelConfig`` refuses it by name), ValueError past ``MAX_LAYERS``."""
    layers = data["num_hidden_layers"]
    if not _positive_int(layers):
        return 0
    if layers > MAX_LAYERS:
        raise ValueError(f"{where}: num_hidden_layers = {layers} is more than {MAX_LAYERS} layers")
    return layers


def _positive_int(value: Any) -> bool:
    """A count: an int of at least 1 (a bool is no count, though Python says it is an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _without_mrope(text: dict[str, Any], where: str) -> dict[str, Any]:
    """A multimodal language model's config with its multimodal rotary embedding (mrope, by
    ``rope_scaling`` or ``rope_parameters``) as the plain rope it is on text prompts (``_MROPE_KEYS``)."""
    out = dict(text)
    for key in ("rope_scaling", "rope_parameters"):
        rope = out.get(key)
        if not isinstance(rope, dict) or not (set(_MROPE_KEYS) & set(rope)
                                              or "mrope" in (rope.get("type"), rope.get("rope_type"))):
            continue
        rope = {k: v for k, v in rope.items() if k not in _MROPE_KEYS}
        for name in ("type", "rope_type"):  # mrope's type, or the default one transformers 5 writes beside it
            if rope.get(name) in ("mrope", "default"):
                rope.pop(name)
        if set(rope) - {"rope_theta"}:
            raise ValueError(f"{where}: text_config.{key} = {_show(text[key])}: mrope with another rope scaling is "
                             "not implemented")
        if key == "rope_parameters" and rope:
            out[key] = {"rope_type": "default", **rope}
        elif "rope_theta" in rope:
            out.pop(key)
            out["rope_theta"] = rope["rope_theta"]
        else:
            out.pop(key)
    return out


def _multimodal(data: Mapping[str, Any]) -> str | None:
    """The key of ``MULTIMODAL`` that ``model_type`` or ``architectures`` names, else None."""
    model_type, architectures = data.get("model_type"), data.get("architectures")
    for wrapper, (architecture, _) in MULTIMODAL.items():
        if model_type == wrapper or (isinstance(architectures, list) and architecture in architectures):
            return wrapper
    return None


def _check_family(data: Mapping[str, Any], where: str) -> str:
    """The family (a key of ``FAMILIES``) ``architectures`` and ``model_type`` name (Llama when
    neither is given), or refused: another network, or the two naming different families."""
    architectures = data.get("architectures")
    if architectures is not None:
        if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
            raise ValueError(f"{where}: architectures = {_show(architectures)} is not a list of class names")
        for arch in architectures:
            if arch not in SUPPORTED_ARCHITECTURES:
                why = f" ({_WHY_NOT[arch]})" if arch in _WHY_NOT else ""
                raise ValueError(f"{where}: architectures {arch!r} is not supported{why}; supported: "
                                 f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    model_type = data.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        why = f" ({_WHY_NOT[model_type]})" if isinstance(model_type, str) and model_type in _WHY_NOT else ""
        raise ValueError(f"{where}: model_type {_show(model_type)} is not supported{why}; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    named = {family for family, arch in FAMILIES.items() if arch in (architectures or [])}
    named |= {model_type} if model_type is not None else set()
    if len(named) > 1:
        raise ValueError(f"{where}: architectures = {_show(architectures)} and model_type = {_show(model_type)} "
                         "name different families")
    return named.pop() if named else "llama"


# each mixture-of-experts family's fields (MOE_FAMILIES) and their config class's values where left
# out; None: required. intermediate_size is Mixtral's experts' size, moe_intermediate_size Qwen's
# (whose intermediate_size is that of dense layers, which a model of experts only has none of)
_MOE_DEFAULTS = {
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2},
    "qwen2_moe": {"num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "norm_topk_prob": False, "decoder_sparse_step": 1,
                  "mlp_only_layers": []},
    "qwen3_moe": {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                  "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "olmoe": {"num_experts": 64, "num_experts_per_tok": 8, "norm_topk_prob": False, "clip_qkv": None},
    "granitemoe": {"num_local_experts": 8, "num_experts_per_tok": 2},
    # its own names (_ERNIE_MOE_FIELDS); moe_layer_end_index -1: the last layer
    "ernie4_5_moe": {"moe_num_experts": 64, "moe_k": 6, "moe_intermediate_size": 1536, "moe_num_shared_experts": 2,
                     "moe_layer_start_index": 1, "moe_layer_end_index": -1, "moe_layer_interval": 1,
                     "moe_norm_min": 1e-12, "num_nextn_predict_layers": None},
    "glm4_moe": {"n_routed_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1408, "n_shared_experts": 1,
                 "routed_scaling_factor": 1.0, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
                 "norm_topk_prob": True, "use_qk_norm": False, "num_nextn_predict_layers": 1}}
# every field _MOE_DEFAULTS names: refused in a dense family's config
_MOE_KEYS = frozenset(k for fields in _MOE_DEFAULTS.values() for k in fields) | {"num_experts"}


def _ernie_moe_fields(data: Mapping[str, Any], fields: Mapping[str, Any], where: str
                      ) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``_moe_fields`` of ERNIE 4.5 MoE, from its own names: the experts from
    ``moe_layer_start_index`` to ``moe_layer_end_index`` every ``moe_layer_interval``-th layer, the
    other layers dense; ``moe_num_shared_experts`` experts' worth of a shared one, added ungated; the
    experts picked by probability plus ``e_score_correction_bias``, their weights renormalised
    (``moe_norm_min``, transformers' floor of the sum, 1e-12 only: no sum of probabilities comes
    near it). Its multi-token-prediction layers (``num_nextn_predict_layers``) are not run, as
    transformers runs none."""
    experts, per_token, size, shared = (fields[k] for k in ("moe_num_experts", "moe_k", "moe_intermediate_size",
                                                             "moe_num_shared_experts"))
    for field, value in (("moe_num_experts", experts), ("moe_k", per_token), ("moe_intermediate_size", size)):
        if not _positive_int(value):
            raise ValueError(f"{where}: {field} = {_show(value)} is not a positive integer")
    if not (type(shared) is int and shared >= 0):
        raise ValueError(f"{where}: moe_num_shared_experts = {_show(shared)} is not a whole number")
    if per_token > experts:
        raise ValueError(f"{where}: moe_k = {per_token} is more than the {experts} experts")
    if fields["moe_norm_min"] != 1e-12:
        raise ValueError(f"{where}: moe_norm_min = {_show(fields['moe_norm_min'])} is not implemented; supported: 1e-12")
    layers = _layer_count(data, where) if "num_hidden_layers" in data else 0
    start, end, interval = (fields[k] for k in ("moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval"))
    end = layers - 1 if end == -1 else end
    if not (type(start) is int and start >= 0 and type(end) is int and _positive_int(interval)):
        raise ValueError(f"{where}: moe_layer_start_index = {_show(start)}, moe_layer_end_index = {_show(end)}, "
                         f"moe_layer_interval = {_show(interval)} do not say which layers have the experts")
    dense = tuple(i for i in range(layers) if not ((i + 1) % interval == 0 and start <= i <= end))
    if layers and len(dense) == layers:
        raise ValueError(f"{where}: moe_layer_start_index = {start} .. moe_layer_end_index = {end} leave no layer with "
                         "the experts")
    return _with_experts(data, where, size, dense, {
        "num_experts": experts, "experts_per_token": per_token, "norm_topk_prob": True,
        "shared_expert_intermediate_size": size * shared, "shared_expert_gated": False, "expert_selection_bias": True})


def _glm_moe_fields(data: Mapping[str, Any], fields: Mapping[str, Any], where: str
                    ) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """``_moe_fields`` of GLM-4.5 from its names: ``n_routed_experts`` scored by sigmoid and picked
    with a bias, from the ``topk_group`` best of ``n_group`` groups, their weights (renormalised with
    ``norm_topk_prob``) times ``routed_scaling_factor``; the first ``first_k_dense_replace`` layers
    dense; ``n_shared_experts`` experts' worth of a shared one added ungated; ``use_qk_norm``: norms
    of each query and key head. Its multi-token-prediction layers (``num_nextn_predict_layers``,
    stored as layers past ``num_hidden_layers``) are not run, as transformers runs none."""
    experts, per_token, size, shared, first = (fields[k] for k in ("n_routed_experts", "num_experts_per_tok",
                                                                    "moe_intermediate_size", "n_shared_experts",
                                                                    "first_k_dense_replace"))
    for field, value in (("n_routed_experts", experts), ("num_experts_per_tok", per_token),
                         ("moe_intermediate_size", size), ("n_group", fields["n_group"]),
                         ("topk_group", fields["topk_group"])):
        if not _positive_int(value):
            raise ValueError(f"{where}: {field} = {_show(value)} is not a positive integer")
    for field, value in (("n_shared_experts", shared), ("first_k_dense_replace", first)):
        if not (type(value) is int and value >= 0):
            raise ValueError(f"{where}: {field} = {_show(value)} is not a whole number")
    for field in ("norm_topk_prob", "use_qk_norm"):
        if not isinstance(fields[field], bool):
            raise ValueError(f"{where}: {field} = {_show(fields[field])} is not true or false")
    layers = _layer_count(data, where) if "num_hidden_layers" in data else 0
    dense = tuple(range(min(first, layers)))
    if layers and len(dense) == layers:
        raise ValueError(f"{where}: first_k_dense_replace = {first} leaves no layer with the experts")
    return _with_experts(data, where, size, dense, {
        "num_experts": experts, "experts_per_token": per_token, "norm_topk_prob": fields["norm_topk_prob"],
        "shared_expert_intermediate_size": size * shared, "shared_expert_gated": False, "expert_selection_bias": True,
        "router_scoring": "sigmoid", "routed_scaling_factor": _number(fields["routed_scaling_factor"],
                                                                      "routed_scaling_factor", where),
        "expert_groups": fields["n_group"], "expert_groups_per_token": fields["topk_group"],
        "qk_norm": fields["use_qk_norm"]})


def _moe_fields(data: Mapping[str, Any], family: str, where: str) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """(the config with a Qwen MoE's experts' size as intermediate_size, ModelConfig's expert fields)
    of a mixture of experts (``MOE_FAMILIES``); a dense family's config as it is and no fields. The
    number of experts may be named num_experts or num_local_experts (transformers maps one to the
    other); layers with a dense MLP among the experts' (``mlp_only_layers``, ``decoder_sparse_step``
    above 1) and OLMoE's clipping of q, k and v are refused."""
    if family not in MOE_FAMILIES:
        stray = sorted(k for k in _MOE_KEYS if k in data)
        if stray:
            raise ValueError(f"{where}: {stray[0]} = {_show(data[stray[0]])} is a mixture of experts' field, not "
                             f"read for model_type {family!r} (supported: {', '.join(MOE_FAMILIES)})")
        return data, {}
    own = _MOE_DEFAULTS[family]
    # one maps to the other (the families with names of their own have neither)
    aliases = set() if family in ("ernie4_5_moe", "glm4_moe") else {"num_experts", "num_local_experts"}
    stray = sorted(k for k in _MOE_KEYS - set(own) - aliases if k in data)
    if stray:
        raise ValueError(f"{where}: {stray[0]} = {_show(data[stray[0]])} is not read by transformers for model_type "
                         f"{family!r}")
    if family in ("ernie4_5_moe", "glm4_moe"):
        fields = {k: _or(data.get(k), v) if v is not None else data.get(k) for k, v in own.items()}
        return (_ernie_moe_fields if family == "ernie4_5_moe" else _glm_moe_fields)(data, fields, where)
    named = {k: data[k] for k in ("num_experts", "num_local_experts") if data.get(k) is not None}
    if len(named) == 2 and named["num_experts"] != named["num_local_experts"]:
        raise ValueError(f"{where}: num_experts = {_show(named['num_experts'])} and num_local_experts = "
                         f"{_show(named['num_local_experts'])} name different counts of experts")
    fields = {k: _or(data.get(k), v) for k, v in own.items()}
    experts = next(iter(named.values()), fields.get("num_experts", fields.get("num_local_experts")))
    counts = {"num_experts": experts, "num_experts_per_tok": fields["num_experts_per_tok"]}
    if "moe_intermediate_size" in own:
        counts["moe_intermediate_size"] = fields["moe_intermediate_size"]
    if "shared_expert_intermediate_size" in own:
        counts["shared_expert_intermediate_size"] = fields["shared_expert_intermediate_size"]
    for field, value in counts.items():
        if not _positive_int(value):
            raise ValueError(f"{where}: {field} = {_show(value)} is not a positive integer")
    if counts["num_experts_per_tok"] > experts:
        raise ValueError(f"{where}: num_experts_per_tok = {counts['num_experts_per_tok']} is more than the "
                         f"{experts} experts")
    dense = _dense_layers(data, fields, where)
    if family == "granitemoe" and data.get("quantization_config") is not None:
        raise ValueError(f"{where}: int4 checkpoints of Granite MoE (every expert of a layer in one tensor) are not "
                         "implemented")
    if fields.get("clip_qkv") is not None:
        raise ValueError(f"{where}: clip_qkv = {_show(fields['clip_qkv'])} (q, k and v clamped) is not implemented; "
                         "supported: null")
    norm = fields.get("norm_topk_prob", True)  # Mixtral always renormalises
    if not isinstance(norm, bool):
        raise ValueError(f"{where}: norm_topk_prob = {_show(norm)} is not true or false")
    return _with_experts(data, where, counts.get("moe_intermediate_size"), dense, {
        "num_experts": experts, "experts_per_token": counts["num_experts_per_tok"], "norm_topk_prob": norm,
        "shared_expert_intermediate_size": counts.get("shared_expert_intermediate_size", 0)})


def _with_experts(data: Mapping[str, Any], where: str, size: int | None, dense: tuple[int, ...],
                  fields: dict[str, Any]) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """(``data`` with the experts' ``size``, where the family names it apart, as intermediate_size;
    the expert ``fields`` with the ``dense`` layers and their MLP size, the config's
    intermediate_size): what each family's reader of expert fields returns."""
    dense_size = data.get("intermediate_size", 0) if dense else 0
    if dense and not _positive_int(dense_size):
        raise ValueError(f"{where}: intermediate_size = {_show(dense_size)} (the dense layers' MLP size) is not a "
                         "positive integer")
    if size is not None:
        data = {**data, "intermediate_size": size}
    return data, {**fields, "dense_layers": dense, "dense_intermediate_size": dense_size}


def _dense_layers(data: Mapping[str, Any], fields: Mapping[str, Any], where: str) -> tuple[int, ...]:
    """The layers of a Qwen MoE whose MLP is dense, as transformers picks them: those in
    ``mlp_only_layers``, and those whose index + 1 is no multiple of ``decoder_sparse_step``."""
    step, only = fields.get("decoder_sparse_step", 1), fields.get("mlp_only_layers", [])
    layers = _layer_count(data, where) if "num_hidden_layers" in data else 0  # none: refused as missing
    if not _positive_int(step):
        raise ValueError(f"{where}: decoder_sparse_step = {_show(step)} is not a positive integer")
    if not isinstance(only, list) or not all(type(i) is int and 0 <= i < max(layers, 1) for i in only):
        raise ValueError(f"{where}: mlp_only_layers = {_show(only)} is not a list of indices of its layers")
    dense = tuple(i for i in range(layers) if i in only or (i + 1) % step)
    if layers and len(dense) == layers:
        raise ValueError(f"{where}: decoder_sparse_step = {_show(step)}, mlp_only_layers = {_show(only)} leave no "
                         "layer with the experts")
    return dense


def _check_layers(data: Mapping[str, Any], family: str, where: str) -> None:
    """Fields that would change a layer's computation: only Llama's own values pass (Gemma's
    activation is its own, see _gemma_fields)."""
    act = data.get("hidden_act", "silu" if family not in _GEMMA_FAMILIES else GEMMA_ACTIVATIONS[family][0])
    supported = SUPPORTED_ACTIVATIONS if family not in _GEMMA_FAMILIES else GEMMA_ACTIVATIONS[family]
    if act not in supported:
        raise ValueError(f"{where}: hidden_act {_show(act)} is not implemented; supported: {', '.join(supported)}")
    tp = data.get("pretraining_tp")
    if family != "smollm3" and (tp not in (None, 1) or isinstance(tp, bool)):  # SmolLM3 ships 2, never read
        raise ValueError(f"{where}: pretraining_tp = {_show(tp)} is not supported; supported: 1")
    if _flag(data, "rope_interleaved", where):
        raise ValueError(f"{where}: rope_interleaved = true (rotary pairs of adjacent dims) is not implemented; "
                         "this runtime rotates halves, as transformers' Llama does")
    window = data.get("sliding_window")
    if family in _WINDOW_SWITCHED and not data.get("use_sliding_window", False):
        window = None  # dropped unread (Qwen2MoeConfig writes 0 there)
    if window is not None and not _positive_int(window):
        raise ValueError(f"{where}: sliding_window = {_show(window)} is not a positive integer or null")


def _biases(data: Mapping[str, Any], family: str, where: str) -> dict[str, bool]:
    """ModelConfig's bias fields: Llama's ``attention_bias`` (q, k, v, o) and ``mlp_bias`` (gate,
    up, down); Qwen2's q/k/v biases; Qwen3's ``attention_bias`` (q, k, v, o). Where a family's
    transformers code has no switch, a true value is refused (the checkpoint would lack the
    biases it announces)."""
    for field, owner, name in (("use_bias", "ernie4_5", "an ERNIE 4.5"), ("qkv_bias", "qwen2_moe", "a Qwen2-MoE"),
                               ("attention_out_bias", "seed_oss", "a Seed-OSS")):
        if field in data and family != owner and not (field == "use_bias" and family == "ernie4_5_moe"):
            raise ValueError(f"{where}: {field} = {_show(data[field])} is {name} field, not implemented for "
                             f"model_type {family!r}")
    if family == "seed_oss":  # each projection's bias its own switch
        flags = {field: _or(data.get(field), default) for field, default in
                 (("attention_bias", True), ("attention_out_bias", False), ("mlp_bias", False))}
        for field, value in flags.items():
            if not isinstance(value, bool):
                raise ValueError(f"{where}: {field} = {_show(value)} is not true or false")
        return {"qkv_bias": flags["attention_bias"], "o_bias": flags["attention_out_bias"],
                "mlp_bias": flags["mlp_bias"]}
    attention, mlp = (_or(data.get(field), False) for field in ("attention_bias", "mlp_bias"))
    for field, value in (("attention_bias", attention), ("mlp_bias", mlp)):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: {field} = {_show(value)} is not true or false")
    if family in ("llama", "granite", "smollm3", "granitemoe"):  # both switches read as Llama's reads them
        return {"qkv_bias": attention, "o_bias": attention, "mlp_bias": mlp}
    if family == "helium":  # Granite's attention with an unbiased o_proj, Llama's MLP
        return {"qkv_bias": attention, "o_bias": False, "mlp_bias": mlp}
    if family == "glm4":  # q/k/v biased by attention_bias (true where left out), o_proj and the MLP never
        qkv = _or(data.get("attention_bias"), True)
        if not isinstance(qkv, bool) or mlp:
            raise ValueError(f"{where}: attention_bias = {_show(qkv)}, mlp_bias = {_show(mlp)}: GLM-4 reads "
                             "attention_bias (true or false) alone")
        return {"qkv_bias": qkv}
    if family in ("ernie4_5", "ernie4_5_moe"):  # use_bias: every projection's, or none
        every = _or(data.get("use_bias"), False)
        if not isinstance(every, bool) or attention or mlp:
            raise ValueError(f"{where}: use_bias = {_show(data.get('use_bias'))} with attention_bias "
                             f"{_show(attention)} and mlp_bias {_show(mlp)}: ERNIE 4.5 reads use_bias (true or "
                             "false) alone")
        return {"qkv_bias": every, "o_bias": every, "mlp_bias": every}
    if family == "glm4_moe":  # q/k/v biased by attention_bias, o_proj never
        if mlp:
            raise ValueError(f"{where}: mlp_bias = {_show(mlp)}: GLM-4.5's MLPs have no biases")
        return {"qkv_bias": attention}
    if family == "qwen2_moe":  # Qwen2's q/k/v biases, which transformers 5 can switch off (qkv_bias)
        qkv = _flag(data, "qkv_bias", where, True)
        if attention or mlp:
            raise ValueError(f"{where}: attention_bias = {_show(attention)}, mlp_bias = {_show(mlp)}: Qwen2-MoE "
                             "reads qkv_bias alone")
        return {"qkv_bias": qkv}
    own = ("qwen3", "qwen3_moe", "olmoe", *_OLMO_FAMILIES, *_GEMMA_FAMILIES)
    switches = ("attention_bias",) if family in own else ()
    for field, value in (("attention_bias", attention), ("mlp_bias", mlp)):
        if value and field not in switches:
            raise ValueError(f"{where}: {field} = true is not read by transformers for model_type {family!r}; "
                             "supported there: false")
    if family in own:  # q, k, v and o, as Llama's
        return {"qkv_bias": attention, "o_bias": attention}
    return {"qkv_bias": family == "qwen2"}


def _check_qwen_fields(data: Mapping[str, Any], family: str, where: str) -> tuple[int, ...]:
    """Qwen2's and Qwen3's sliding window: with ``use_sliding_window`` false (as every Qwen2,
    Qwen2.5 and Qwen3 checkpoint ships) transformers drops ``sliding_window`` and every layer
    attends to the whole sequence, whatever ``max_window_layers`` says; true windows the layers
    from ``max_window_layers`` on (or those ``layer_types`` names).
    SmolLM3 has the same switch (and ships an unread ``max_window_layers``).
    ``layer_types`` (transformers 5) must then name full attention for every layer.
    ``use_mrope`` false (Qwen2.5-Math and the DeepSeek-R1 distills built on it) is the plain rotary
    embedding; true, Qwen2-VL's multimodal rotary embedding, is refused. Other families have none
    of these fields. Returns the windowed layers (use_sliding_window true: ``_qwen_window_layers``)."""
    if family not in _WINDOW_SWITCHED:
        # layer_types: Gemma 2's and 3's are read by _gemma_fields
        present = [f for f in (*_QWEN_FIELDS, *(("layer_types",) if family not in _LAYER_KINDS else ()))
                   if f in data]
        if present:
            raise ValueError(f"{where}: {present[0]} = {_show(data[present[0]])} is a Qwen field, not implemented "
                             f"for model_type {family!r}")
        return ()
    if family not in _QWEN_FAMILIES and "use_mrope" in data:
        raise ValueError(f"{where}: use_mrope = {_show(data['use_mrope'])} is a Qwen field, not implemented for "
                         f"model_type {family!r}")
    if _flag(data, "use_mrope", where):
        raise ValueError(f"{where}: use_mrope = true (Qwen2-VL's multimodal rotary embedding) is not implemented; "
                         "supported: false")
    kinds = data.get("layer_types")
    if _flag(data, "use_sliding_window", where):
        if family == "smollm3":  # its windowed layers would be its layers without rope
            raise ValueError(f"{where}: use_sliding_window = true (SmolLM3's window in its layers without rope) is "
                             "not implemented; supported: false")
        return _qwen_window_layers(data, where)
    if kinds is not None and (not isinstance(kinds, list) or len(kinds) != data["num_hidden_layers"]
                              or any(kind != "full_attention" for kind in kinds)):
        raise ValueError(f"{where}: layer_types = {_show(kinds)} is not implemented; supported: "
                         "\"full_attention\" for each of the num_hidden_layers layers")
    return ()


def _qwen_window_layers(data: Mapping[str, Any], where: str) -> tuple[int, ...]:
    """Qwen's windowed layers with ``use_sliding_window`` true: ``layer_types``' sliding ones, else
    those from ``max_window_layers`` on (28 where absent, as Qwen2Config); none without a window."""
    if data.get("sliding_window", 4096) is None:
        return ()
    layers = _layer_count(data, where)
    if not layers:
        return ()
    named = _named_sliding_layers(data, layers, where)
    if named is not None:
        return named
    first = data.get("max_window_layers", 28)
    if isinstance(first, bool) or not isinstance(first, int) or first < 0:
        raise ValueError(f"{where}: max_window_layers = {_show(first)} is not a layer index")
    return tuple(range(first, layers))


def _granite_scalars(data: Mapping[str, Any], family: str, where: str) -> dict[str, float]:
    """Granite's four scalars as ModelConfig fields (GraniteConfig's 1.0 where one is left out:
    its attention_multiplier too, not 1/sqrt(head_dim)); refused by name in another family."""
    present = [name for name in _GRANITE_FIELDS if name in data]
    if family not in ("granite", "granitemoe"):
        if present:
            raise ValueError(f"{where}: {present[0]} = {_show(data[present[0]])} is a Granite field, not implemented "
                             f"for model_type {family!r}")
        return {}
    return {name: _number(data.get(name, 1.0), name, where) for name in _GRANITE_FIELDS}


def _gemma_fields(data: Mapping[str, Any], family: str, where: str) -> dict[str, Any]:
    """ModelConfig's fields for Gemma (GeGLU, norms by 1 + weight, embeddings times
    sqrt(hidden_size), as transformers' GemmaTextScaledWordEmbedding) and Gemma 3 (also the head
    norms, the sublayers' output norms, ``query_pre_attn_scalar`` and the sliding layers given by
    ``layer_types``, else every layer but each ``sliding_window_pattern``-th); refused by name in
    another family, and soft-capping or bidirectional attention refused by value."""
    own = _GEMMA_OWN.get(family, ())
    present = [name for name in _GEMMA_FIELDS if name in data and name not in own]
    if present:
        raise ValueError(f"{where}: {present[0]} = {_show(data[present[0]])} is a Gemma 2 / 3 field, not implemented "
                         f"for model_type {family!r}")
    if family not in _GEMMA_FAMILIES:
        return {}
    if data.get("use_bidirectional_attention") not in (None, False):
        raise ValueError(f"{where}: use_bidirectional_attention = {_show(data['use_bidirectional_attention'])} "
                         "(EmbeddingGemma's) is not implemented; supported: false")
    # Gemma's config class has no hidden_activation (transformers ignores one left in old files);
    # Gemma 3's has it for hidden_act
    act = data.get("hidden_activation")
    if act is not None and act not in GEMMA_ACTIVATIONS[family][:1]:
        raise ValueError(f"{where}: hidden_activation {_show(act)} is not implemented; supported: "
                         f"{GEMMA_ACTIVATIONS[family][0]}")
    hidden = data.get("hidden_size")
    fields: dict[str, Any] = {"activation": "gelu_tanh", "offset_norms": True,
                              "embedding_multiplier": hidden ** 0.5 if _positive_int(hidden) else 1.0}
    if family == "gemma":
        return fields
    # Gemma 2's caps where left out: 50 and 30 (Gemma2Config's); Gemma 3's: none
    absent = {"gemma2": (50.0, 30.0)}.get(family, (None, None))
    caps = [_optional_number(data.get(name, default), name, where)
            for name, default in zip(("attn_logit_softcapping", "final_logit_softcapping"), absent)]
    scalar = _number(data.get("query_pre_attn_scalar", 256), "query_pre_attn_scalar", where)
    fields.update(qk_norm=family == "gemma3_text", post_norms=True, attention_multiplier=scalar ** -0.5,
                  local_layers=_sliding_layers(data, family, where), attn_softcap=caps[0], final_softcap=caps[1])
    return fields


def _named_sliding_layers(data: Mapping[str, Any], layers: int, where: str) -> tuple[int, ...] | None:
    """The ``sliding_attention`` layers ``layer_types`` names (transformers 5), None without it."""
    kinds = data.get("layer_types")
    if kinds is None:
        return None
    if (not isinstance(kinds, list) or len(kinds) != layers
            or any(kind not in ("sliding_attention", "full_attention") for kind in kinds)):
        raise ValueError(f"{where}: layer_types = {_show(kinds)} is not \"sliding_attention\" or "
                         "\"full_attention\" for each of the num_hidden_layers layers")
    return tuple(i for i, kind in enumerate(kinds) if kind == "sliding_attention")


def _sliding_layers(data: Mapping[str, Any], family: str, where: str) -> tuple[int, ...]:
    """Gemma 2's, Gemma 3's and OLMo 3's sliding-window layers: ``layer_types`` (transformers 5),
    else every layer but each ``sliding_window_pattern``-th (6 where absent, as Gemma3TextConfig;
    Gemma 2: every second, as Gemma2Config; OLMo 3, which has no pattern field: every fourth)."""
    layers = _layer_count(data, where)
    if not layers:  # no count: ModelConfig names num_hidden_layers
        return ()
    named = _named_sliding_layers(data, layers, where)
    if named is not None:
        return named
    if family == "exaone4" and isinstance(data.get("sliding_window_pattern"), str):
        raise ValueError(f"{where}: sliding_window_pattern = {_show(data['sliding_window_pattern'])} (a pattern of "
                         "letters) is not implemented; supported: an integer, or layer_types")
    if family == "ministral":  # MinistralConfig's: every layer where it has a window
        return tuple(range(layers)) if data.get("sliding_window", _ABSENT_WINDOW[family]) is not None else ()
    patterns = [data[name] for name in ("sliding_window_pattern", "_sliding_window_pattern") if name in data]
    pattern = {"gemma3_text": 6, "olmo3": 4, "exaone4": 4}.get(family, 2) if not patterns else patterns[0]
    if any(other != pattern for other in patterns):
        raise ValueError(f"{where}: sliding_window_pattern = {_show(patterns[0])} and _sliding_window_pattern = "
                         f"{_show(patterns[1])} disagree")
    if not _positive_int(pattern):
        raise ValueError(f"{where}: sliding_window_pattern = {_show(pattern)} is not one positive integer")
    return tuple(i for i in range(layers) if (i + 1) % pattern)


# the full-attention layers' rotary base where a config leaves it out (Gemma3TextConfig's, Olmo3Config's)
_ABSENT_FULL_THETA = {"gemma3_text": 1000000.0, "olmo3": 500000.0}


def _layer_kind_ropes(data: Mapping[str, Any], where: str, family: str) -> tuple[dict[str, Any], float]:
    """Gemma 3's and OLMo 3's two rotary embeddings: (``data`` with its full-attention layers' rope
    where ``_rope_scaling`` and ``_rope_theta`` read it, the sliding layers' base). transformers 5
    writes ``rope_parameters`` by layer kind; 4.x ``rope_theta`` and ``rope_scaling`` (the full
    layers'; base ``_ABSENT_FULL_THETA`` where absent) and, Gemma 3's, ``rope_local_base_freq``
    (10000 where absent; OLMo 3's sliding layers turn by ``rope_theta`` unscaled). The sliding
    layers' rope must be the default one."""
    data = dict(data)
    params = data.get("rope_parameters")
    local_base = data.get("rope_local_base_freq")
    if family == "olmo3":  # its sliding layers: the default rope of the model's base
        local_base = _or(data.get("rope_theta"), _ABSENT_FULL_THETA[family])
    if isinstance(params, dict) and {"full_attention", "sliding_attention"} & set(params):
        extra = sorted(set(params) - {"full_attention", "sliding_attention"})
        if extra:
            raise ValueError(f"{where}: rope_parameters.{extra[0]} is not a layer kind; supported: full_attention, "
                             "sliding_attention")
        full, local = (params.get(kind) or {"rope_type": "default"} for kind in ("full_attention", "sliding_attention"))
        for kind, spec in (("full_attention", full), ("sliding_attention", local)):
            if not isinstance(spec, dict):
                raise ValueError(f"{where}: rope_parameters.{kind} = {_show(spec)} is not an object")
        data["rope_parameters"] = full
        if family == "gemma3_text" and local_base is not None and local.get("rope_theta", local_base) != local_base:
            raise ValueError(f"{where}: rope_local_base_freq = {_show(local_base)} and "
                             f"rope_parameters.sliding_attention.rope_theta = {_show(local['rope_theta'])} disagree")
        local = {"rope_theta": local_base if local_base is not None else 10000.0, **local}
    else:
        local = {"rope_type": "default", "rope_theta": local_base if local_base is not None else 10000.0}
    nested = data.get("rope_parameters")
    if data.get("rope_theta") is None and not (isinstance(nested, dict) and nested.get("rope_theta") is not None):
        data["rope_theta"] = _ABSENT_FULL_THETA[family]
    spot = f"{where}: the sliding layers'"
    if _rope_scaling({"rope_parameters": local}, spot) != ("default", {}):
        raise ValueError(f"{where}: rope_parameters.sliding_attention = {_show(local)}: a scaled rope in the sliding "
                         "layers is not implemented; supported: the default one")
    return data, _rope_theta({"rope_parameters": local}, spot)


# int4 checkpoints: how each packs its codes (INT4_FORMATS: the name a message gives it), the group
# sizes the q4 kernels take, and the keys of each method's quantization_config that say how the
# checkpoint was made or how other runtimes should run it (calibration, packing and kernel options)
# and change nothing it computes
INT4_FORMATS = {"gptq": "GPTQ", "gptq_v2": "GPTQ", "awq": "AWQ", "compressed": "compressed-tensors"}
# the formats whose layers carry a g_idx, so that their rows may come in act-order
_ACT_ORDER_FORMATS = ("gptq", "gptq_v2", "compressed")
INT4_GROUP_SIZES = (32, 64, 128)
_INT4_HARMLESS = {
    "gptq": frozenset({
        "quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format", "damp_percent",
        "damp_auto_increment", "true_sequential", "static_groups", "model_name_or_path", "model_file_base_name",
        "lm_head", "meta", "pack_dtype", "use_exllama", "exllama_config", "use_cuda_fp16", "tokenizer", "dataset",
        "batch_size", "cache_block_outputs", "max_input_length", "module_name_preceding_first_block",
        "block_name_to_quantize", "disable_exllama", "use_marlin", "pad_token_id", "backend"}),
    "awq": frozenset({
        "quant_method", "bits", "group_size", "zero_point", "version", "backend", "do_fuse", "fuse_max_seq_len",
        "modules_to_fuse", "modules_to_not_convert", "exllama_config"}),
}


def _is_int4_group(value: Any) -> bool:
    """A group size the q4 kernels take, as an int (128.0 is not carried into shapes)."""
    return _positive_int(value) and value in INT4_GROUP_SIZES


def _check_accepted(spec: Mapping[str, Any], accepted: Mapping[str, tuple], what: str) -> None:
    """Each key of ``accepted`` in ``spec`` one of its values (the first where it is left out), of
    that value's type (1 is not True); a ValueError naming it as ``what.key`` otherwise."""
    for key, values in accepted.items():
        given = spec.get(key, values[0])
        if given not in values or not any(type(given) is type(value) for value in values):
            raise ValueError(f"{what}.{key} = {_show(given)} is not implemented; "
                             f"supported: {', '.join(map(_show, values))}")


def _int4_group(spec: Mapping[str, Any], what: str) -> int:
    """``spec``'s group_size, one the q4 kernels take (else a ValueError naming it as ``what``)."""
    group = spec.get("group_size")
    if not _is_int4_group(group):
        raise ValueError(f"{what}.group_size = {_show(group)} is not implemented; supported: "
                         f"{', '.join(map(str, INT4_GROUP_SIZES))}")
    return group


def _channel_group(ks: tuple, what: str) -> int:
    """The group a checkpoint with one scale per output row loads as (``int4_channelwise``): the
    largest the q4 kernels take that divides ``ks``, the K of every quantised layer (a size that is
    no count is left to ModelConfig to name)."""
    ks = tuple(k for k in ks if _positive_int(k))
    for group in sorted(INT4_GROUP_SIZES, reverse=True):
        if all(k % group == 0 for k in ks):
            return group
    raise ValueError(f"{what}: one scale per output row (group_size -1) of layers whose K ({', '.join(map(str, ks))}) "
                     f"is not a multiple of {min(INT4_GROUP_SIZES)} is not implemented")


def _int4_checkpoint(data: Mapping[str, Any], where: str, ks: tuple = ()) -> dict[str, Any]:
    """The ModelConfig fields of an int4 checkpoint's ``quantization_config`` ({} without one):
    GPTQ (4 bits, symmetric or with zero points, in groups or one per output row (group_size -1),
    with or without act-order (``desc_act``), the LM head not quantised, the gptq or gptq_v2
    packing), AWQ (4 bits, zero points, the gemm packing) or compressed-tensors
    (``_compressed_tensors_checkpoint``); anything else refused by name. ``ks``: the K of the
    quantised layers (hidden, intermediate and attention sizes), for a group per row."""
    spec = data.get("quantization_config")
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ValueError(f"{where}: quantization_config = {_show(spec)} is not an object")
    method = spec.get("quant_method")
    if method == "compressed-tensors":
        return _compressed_tensors_checkpoint(spec, where, ks)
    if method not in _INT4_HARMLESS:
        raise ValueError(f"{where}: quantization_config.quant_method = {_show(method)} is not implemented; "
                         "supported: gptq (4 bits), awq (4 bits, gemm packing), compressed-tensors (4-bit "
                         "weights, pack-quantized)")
    unknown = sorted(k for k in spec if k not in _INT4_HARMLESS[method])
    if unknown:
        raise ValueError(f"{where}: quantization_config.{unknown[0]} = {_show(spec[unknown[0]])} is not implemented")
    # the values each key may take, the first where it is left out
    if method == "gptq":
        accepted = {"bits": (4,), "desc_act": (False, True), "static_groups": (False, True), "lm_head": (False,),
                    "sym": (True, False), "checkpoint_format": ("gptq", "gptq_v2")}
    else:
        # AutoAWQ writes its version in capitals in some checkpoints (GEMM), transformers reads either
        version = spec.get("version", "gemm")
        if isinstance(version, str) and version.lower() == "gemm":
            spec = {**spec, "version": "gemm"}
        accepted = {"bits": (4,), "zero_point": (True,), "version": ("gemm",)}
        skipped = spec.get("modules_to_not_convert")
        if skipped is not None and not (isinstance(skipped, list) and all(
                isinstance(name, str) and _outside_the_decoder(name) for name in skipped)):
            raise ValueError(f"{where}: quantization_config.modules_to_not_convert = {_show(skipped)} is not "
                             "implemented; supported: null, or modules outside the decoder's layers (the LM head, "
                             "an image-and-text model's vision_tower and multi_modal_projector)")
    _check_accepted(spec, accepted, f"{where}: quantization_config")
    if method == "gptq" and spec.get("group_size") == -1 and type(spec.get("group_size")) is int:
        # one group per row: act-order changed the order of the work only (every g_idx 0)
        return {"int4_format": spec.get("checkpoint_format", "gptq"),
                "int4_group_size": _channel_group(ks, f"{where}: quantization_config"),
                "int4_zero_points": not spec.get("sym", True), "int4_channelwise": True}
    group = _int4_group(spec, f"{where}: quantization_config")
    if method == "gptq":
        # static_groups fixes each group's rows before act-order reorders the work: g_idx stays in order
        return {"int4_format": spec.get("checkpoint_format", "gptq"), "int4_group_size": group,
                "int4_zero_points": not spec.get("sym", True),
                "int4_act_order": spec.get("desc_act", False) and not spec.get("static_groups", False)}
    return {"int4_format": "awq", "int4_group_size": group, "int4_zero_points": True}


# compressed-tensors (llm-compressor's W4A16 checkpoints): the keys that say how the checkpoint was
# made and change nothing it computes, and those of its one group's weight quantisation
_COMPRESSED_HARMLESS = frozenset({"quant_method", "format", "config_groups", "ignore", "kv_cache_scheme",
                                  "quantization_status", "global_compression_ratio", "version", "sparsity_config",
                                  "transform_config", "provider"})
_COMPRESSED_GROUP_KEYS = frozenset({"targets", "weights", "input_activations", "output_activations", "format"})
_COMPRESSED_WEIGHT_HARMLESS = frozenset({"num_bits", "type", "strategy", "group_size", "symmetric", "dynamic",
                                         "actorder", "observer", "observer_kwargs", "block_structure", "zp_dtype",
                                         "scale_dtype"})


def _compressed_tensors_checkpoint(spec: Mapping[str, Any], where: str, ks: tuple = ()) -> dict[str, Any]:
    """The ModelConfig fields of a compressed-tensors ``quantization_config``: one config group of
    4-bit int weights in groups of 32, 64 or 128 (symmetric or not, act-order "group" giving a g_idx)
    or one per output row (strategy "channel") on every Linear but those ``ignore`` names outside
    the decoder's layers, packed (pack-quantized), no activation or KV cache quantisation; anything
    else refused by name."""
    what = f"{where}: quantization_config"
    unknown = sorted(k for k in spec if k not in _COMPRESSED_HARMLESS)
    if unknown:
        raise ValueError(f"{what}.{unknown[0]} = {_show(spec[unknown[0]])} is not implemented")
    for key, want in (("format", "pack-quantized"), ("quantization_status", "compressed")):
        if spec.get(key, want) != want:
            raise ValueError(f"{what}.{key} = {_show(spec.get(key))} is not implemented; supported: {_show(want)}")
    for key in ("kv_cache_scheme", "sparsity_config", "transform_config"):
        if spec.get(key) not in (None, {}):
            raise ValueError(f"{what}.{key} = {_show(spec[key])} is not implemented; supported: null")
    ignored = spec.get("ignore", [])
    if not isinstance(ignored, list) or not all(isinstance(name, str) and (
            _outside_the_decoder(name) or _IMAGE_SIDE_PATTERN.search(name)) for name in ignored):
        raise ValueError(f"{what}.ignore = {_show(ignored)} is not implemented; supported: modules outside the "
                         "decoder's layers (lm_head, an image-and-text model's vision side)")
    groups = spec.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError(f"{what}.config_groups = {_show(groups)} is not implemented; supported: one group")
    (name, group), = groups.items()
    if not isinstance(group, dict) or set(group) - _COMPRESSED_GROUP_KEYS or group.get("targets") != ["Linear"]:
        raise ValueError(f"{what}.config_groups.{name} = {_show(group)} is not implemented; supported: targets "
                         "[\"Linear\"], weights only")
    for key in ("input_activations", "output_activations"):
        if group.get(key) is not None:
            raise ValueError(f"{what}.config_groups.{name}.{key} = {_show(group[key])} is not implemented (weight-"
                             "only checkpoints: W4A16)")
    weights = group.get("weights")
    if not isinstance(weights, dict) or set(weights) - _COMPRESSED_WEIGHT_HARMLESS:
        raise ValueError(f"{what}.config_groups.{name}.weights = {_show(weights)} is not implemented")
    accepted = {"num_bits": (4,), "type": ("int",), "strategy": ("group", "channel"), "symmetric": (True, False),
                "dynamic": (False,), "actorder": (None, "group", "weight", "static"), "block_structure": (None,)}
    _check_accepted(weights, accepted, f"{what}.config_groups.{name}.weights")
    if weights.get("strategy") == "channel":
        # a row is one group: act-order "group" would have no groups to order, the others order the work only
        _check_accepted(weights, {"group_size": (None,), "actorder": (None, "weight", "static")},
                        f"{what}.config_groups.{name}.weights (strategy 'channel')")
        return {"int4_format": "compressed", "int4_group_size": _channel_group(ks, what),
                "int4_zero_points": not weights.get("symmetric", True), "int4_channelwise": True}
    size = _int4_group(weights, f"{what}.config_groups.{name}.weights")
    # act-order "group" keeps each column's group in weight_g_idx; "weight" (static) keeps groups in order
    return {"int4_format": "compressed", "int4_group_size": size, "int4_zero_points": not weights.get("symmetric", True),
            "int4_act_order": weights.get("actorder") == "group"}


# an ignored module of the image side, as compressed-tensors names them (paths or "re:" patterns)
_IMAGE_SIDE_PATTERN = re.compile(r"vision_tower|multi_modal_projector|visual|vision_model")


# modules an AWQ checkpoint may keep unquantised (modules_to_not_convert) without changing what the
# decoder reads: its float LM head, and the image side of an image-and-text model (vision_tower,
# multi_modal_projector, Qwen2.5-VL's visual, which the runtime does not read), under any prefix
_NOT_CONVERTED_OUTSIDE = re.compile(r"((model|language_model)\.)*(lm_head|vision_tower|multi_modal_projector|visual)")


def _outside_the_decoder(module: str) -> bool:
    return _NOT_CONVERTED_OUTSIDE.fullmatch(module) is not None


def _nope_layers(data: Mapping[str, Any], family: str, where: str) -> tuple[int, ...]:
    """SmolLM3's layers without a rotary embedding: the zeros of ``no_rope_layers`` (a 0 or 1 per
    layer), else every ``no_rope_layer_interval``-th layer (4 where absent, as SmolLM3Config);
    refused by name in another family."""
    present = [name for name in ("no_rope_layers", "no_rope_layer_interval") if name in data]
    if family != "smollm3":
        if present:
            raise ValueError(f"{where}: {present[0]} = {_show(data[present[0]])} is a SmolLM3 field, not implemented "
                             f"for model_type {family!r}")
        return ()
    layers = _layer_count(data, where)
    if not layers:  # no count: ModelConfig names num_hidden_layers
        return ()
    flags = data.get("no_rope_layers")
    if flags is not None:
        if (not isinstance(flags, list) or len(flags) != layers
                or any(flag not in (0, 1) or isinstance(flag, float) for flag in flags)):
            raise ValueError(f"{where}: no_rope_layers = {_show(flags)} is not a 0 or 1 for each of the "
                             "num_hidden_layers layers")
        return tuple(i for i, flag in enumerate(flags) if not flag)
    interval = data.get("no_rope_layer_interval", 4)
    if not _positive_int(interval):
        raise ValueError(f"{where}: no_rope_layer_interval = {_show(interval)} is not a positive integer")
    return tuple(i for i in range(layers) if (i + 1) % interval == 0)


def _partial_rotary_factor(data: Mapping[str, Any], family: str, where: str) -> float:
    """The share of each head that is rotated: Phi3Config's partial_rotary_factor, from rope_scaling
    or rope_parameters, else the top level (Phi-4-mini's), else 1. Other families' rotary embeddings
    do not apply it (transformers' Llama rotates every dim whatever it says, its scaled ropes fail):
    there any value but 1 is refused (in rope_scaling or rope_parameters by ``_rope_scaling``)."""
    given = {f"{field}.partial_rotary_factor": data[field]["partial_rotary_factor"]
             for field in ("rope_scaling", "rope_parameters")
             if isinstance(data.get(field), dict) and "partial_rotary_factor" in data[field]}
    if "partial_rotary_factor" in data:
        given["partial_rotary_factor"] = data["partial_rotary_factor"]
    for key, value in given.items():
        if not is_number(value) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {key} = {_show(value)} is not a positive number")
        if family not in ("phi3", "glm4", "glm4_moe") and value != 1:
            raise ValueError(f"{where}: {key} = {_show(value)} is implemented for Phi-3, GLM-4 and GLM-4.5 (model_type "
                             f"'phi3', 'glm4', 'glm4_moe') only: transformers' {FAMILIES[family]} does not apply it")
    if len(set(given.values())) > 1:
        raise ValueError(f"{where}: {' and '.join(f'{k} = {_show(v)}' for k, v in given.items())} disagree")
    # Glm4Config's and Glm4MoeConfig's where left out
    return float(next(iter(given.values()), 0.5 if family in ("glm4", "glm4_moe") else 1.0))


def _check_phi3_fields(data: Mapping[str, Any], family: str, where: str) -> None:
    """Phi-3's top-level ``original_max_position_embeddings``: only its longrope scaling reads it
    (``_longrope_defaults``), so any count passes here; other families keep it inside their rope
    scaling."""
    if "original_max_position_embeddings" not in data:
        return
    value = data["original_max_position_embeddings"]
    if family != "phi3":
        raise ValueError(f"{where}: original_max_position_embeddings = {_show(value)} at the top level is a Phi-3 "
                         f"field, not implemented for model_type {family!r}")
    if value is not None and not _positive_int(value):
        raise ValueError(f"{where}: original_max_position_embeddings = {_show(value)} is not a positive integer")


def _optional_number(value: Any, field: str, where: str) -> float | None:
    """A positive finite number, or None for null (json reads Infinity and NaN too)."""
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{where}: {field} = {_show(value)} is not a number")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{where}: {field} = {_show(value)} is not a positive finite number")
    return float(value)


def _number(value: Any, field: str, where: str) -> float:
    """A positive finite number; null is refused (a value given is never replaced)."""
    if value is None:
        raise ValueError(f"{where}: {field} = null is not a positive finite number")
    return _optional_number(value, field, where)


def _flag(data: Mapping[str, Any], field: str, where: str, absent: bool = False) -> bool:
    """A true or false field; ``absent``: its value where left out (Gemma's config classes tie
    the embeddings unless told otherwise, the others do not)."""
    value = data.get(field, absent)
    if not isinstance(value, bool):
        raise ValueError(f"{where}: {field} = {_show(value)} is not true or false")
    return value


def _rope_scaling(data: Mapping[str, Any], where: str, positions: int | None = None, family: str | None = None,
                  head_dim: int | None = None) -> tuple[str, dict[str, Any]]:
    """The rope type and its parameters, from ``rope_scaling`` (transformers 4.x) or
    ``rope_parameters`` (5.x); a type or key this runtime does not compute is refused.
    ``positions``: the model's max_position_embeddings (yarn's original context where not given,
    longrope's attention factor); ``family``: longrope is Phi-3's (``su`` and ``yarn`` read as it
    there, as Phi3Config does); ``head_dim``: the length longrope's factor lists are checked against."""
    found: dict[str, tuple[str, dict[str, float | int]]] = {}
    for field in ("rope_scaling", "rope_parameters"):
        spec = data.get(field)
        if spec is None:
            continue
        if not isinstance(spec, dict):
            raise ValueError(f"{where}: {field} = {_show(spec)} is not an object")
        kinds = {key: spec[key] for key in _ROPE_TYPE_KEYS if key in spec}
        if family == "phi3":  # transformers 5 keeps the name given in type beside rope_type longrope
            kinds = {key: "longrope" if kind in _PHI3_LONGROPE_NAMES else kind for key, kind in kinds.items()}
        if len(set(map(str, kinds.values()))) > 1:
            raise ValueError(f"{where}: {field}.rope_type and {field}.type disagree ({_show(kinds)})")
        if not kinds and field == "rope_scaling":
            raise ValueError(f"{where}: rope_scaling = {_show(spec)} names no rope type; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        key, kind = next(iter(kinds.items())) if kinds else ("rope_type", "default")
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"{where}: rope scaling {_show(kind)} ({field}.{key}) is not implemented; supported: "
                             f"{', '.join(SUPPORTED_ROPE_TYPES)}")
        if kind == "longrope" and family != "phi3":
            raise ValueError(f"{where}: rope scaling 'longrope' ({field}.{key}) is implemented for Phi-3 "
                             f"(model_type 'phi3') only, not for model_type {_show(family)}")
        takes = _CONFIG_ROPE_PARAMETERS[kind]
        allowed = ({*_ROPE_TYPE_KEYS, *takes} | ({"rope_theta"} if field == "rope_parameters" else set())
                   | set(_ATTENTION_FACTOR_INPUTS.get(kind, ())) | set(_FAMILY_ROPE_KEYS.get(family, ())))
        if "max_position_embeddings" in spec and family == "ministral3":
            # Ministral3Config writes the model's own here; yarn reads the top-level one
            if spec["max_position_embeddings"] != _or(data.get("max_position_embeddings"), _ABSENT_POSITIONS[family]):
                raise ValueError(f"{where}: {field}.max_position_embeddings = {_show(spec['max_position_embeddings'])} "
                                 "differs from max_position_embeddings")
            allowed.add("max_position_embeddings")
        # a partial rotary factor of 1 rotates every dim (Phi3Config writes it); Phi-3's any other,
        # read and checked by _partial_rotary_factor
        extra = sorted(k for k in spec if k not in allowed
                       and not (k == "partial_rotary_factor"
                                and (family in ("phi3", "glm4", "glm4_moe") or spec[k] == 1
                                     and not isinstance(spec[k], bool))))
        if extra:
            raise ValueError(f"{where}: {field}.{extra[0]} = {_show(spec[extra[0]])} is not implemented for rope "
                             f"type {kind!r}; supported: {', '.join(sorted(allowed))}")
        params = {p: _rope_parameter(spec[p], p) for p in takes if spec.get(p) is not None}
        if kind == "yarn":
            params = _yarn_defaults(spec, params, positions, f"{where}: {field}")
        if kind == "longrope":
            params = _longrope_defaults(spec, params, data, positions, head_dim, f"{where}: {field}")
        problem = rope_problem(kind, {p: v for p, v in params.items() if p in ROPE_PARAMETERS[kind]},
                               head_dim if _positive_int(head_dim) else None)
        if problem:
            raise ValueError(f"{where}: {field}.{problem}")
        found[field] = (kind, params)
    if len(found) == 2 and found["rope_scaling"] != found["rope_parameters"]:
        raise ValueError(f"{where}: rope_scaling = {_show(data['rope_scaling'])} and rope_parameters = "
                         f"{_show(data['rope_parameters'])} disagree")
    return found.get("rope_parameters") or found.get("rope_scaling") or ("default", {})


def _query_scale_beta(data: Mapping[str, Any], family: str, rope_type: str, where: str) -> float:
    """Ministral 3's ``llama_4_scaling_beta`` (inside its rope parameters; 0 where absent, which
    scales nothing): a number >= 0, above 0 with yarn only (whose original context it divides by)."""
    if family != "ministral3":
        return 0.0
    spec = data.get("rope_parameters") or data.get("rope_scaling") or {}
    beta = spec.get("llama_4_scaling_beta", 0.0)
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta >= 0):
        raise ValueError(f"{where}: llama_4_scaling_beta = {_show(beta)} is not a finite number >= 0")
    if beta and rope_type != "yarn":
        raise ValueError(f"{where}: llama_4_scaling_beta = {_show(beta)} with rope type {rope_type!r} is not "
                         "implemented; supported: with yarn (whose original_max_position_embeddings it divides by)")
    return float(beta)


def _yarn_defaults(spec: Mapping[str, Any], params: dict[str, Any], positions: int | None,
                   where: str) -> dict[str, Any]:
    """yarn's parameters with what transformers fills in: the original context from
    max_position_embeddings, beta_fast 32 and beta_slow 1 (for 0 too: transformers reads them with
    ``or``), truncate true, and the attention factor from the factor and the mscales where not
    given. (Phi-3's yarn is read as longrope, as Phi3Config reads it.)"""
    params = dict(params)
    if positions is not None:
        params.setdefault("original_max_position_embeddings", positions)
    params["beta_fast"] = params.get("beta_fast") or 32.0
    params["beta_slow"] = params.get("beta_slow") or 1.0
    params.setdefault("truncate", True)
    factor = params.get("factor")
    if "attention_factor" not in params and isinstance(factor, float) and factor > 0 and math.isfinite(factor):
        try:
            params["attention_factor"] = yarn_attention_factor(factor, None,
                                                               *(spec.get(k) for k in _ATTENTION_FACTOR_INPUTS["yarn"]))
        except ValueError as exc:
            raise ValueError(f"{where}.{str(exc).removeprefix('rope: ')}") from None
    return params


def _longrope_defaults(spec: Mapping[str, Any], params: dict[str, Any], data: Mapping[str, Any], positions: Any,
                       head_dim: Any, where: str) -> dict[str, Any]:
    """longrope's parameters as Phi3Config standardises them: the original context is the top-level
    ``original_max_position_embeddings`` (Phi3Config's 4096 where absent; one inside the scaling,
    which transformers overrides, must agree), the attention factor the one given, else from
    ``factor``, else from max_position_embeddings / the original context
    (``longrope_attention_factor``); both factor lists checked (their lengths: head_dim / 2)."""
    params = dict(params)
    context = data.get("original_max_position_embeddings", _PHI3_ORIGINAL_CONTEXT)
    if context is None:  # Phi3Config refuses a null one
        raise ValueError(f"{where} (longrope) reads the top-level original_max_position_embeddings, which is null")
    inner = params.get("original_max_position_embeddings")
    if inner is not None and inner != context:
        absent = "" if "original_max_position_embeddings" in data else " (Phi3Config's where the field is absent)"
        raise ValueError(f"{where}.original_max_position_embeddings = {_show(inner)} and the top-level "
                         f"original_max_position_embeddings = {_show(context)}{absent} disagree: transformers reads "
                         "the top-level one")
    params["original_max_position_embeddings"] = context
    pairs = head_dim if _positive_int(head_dim) else None  # else ModelConfig names head_dim
    for key in ("short_factor", "long_factor"):
        if key not in params:
            raise ValueError(f"{where}.{key} is missing: rope type 'longrope' needs short_factor and long_factor")
        problem = factors_problem(key, params[key], pairs)
        if problem:
            raise ValueError(f"{where}.{problem}")
    if "attention_factor" not in params:
        factor = spec.get("factor")
        if factor is None:  # Phi-3's: how far max_position_embeddings reaches past the original context
            if not _positive_int(positions):
                raise ValueError(f"{where} (longrope): max_position_embeddings = {_show(positions)} is not a "
                                 "positive integer (the attention factor is computed from it)")
            factor = positions / context
        try:
            params["attention_factor"] = longrope_attention_factor(factor, context)
        except ValueError as exc:
            raise ValueError(f"{where}.{str(exc).removeprefix('rope: ')}") from None
    return params


def _rope_parameter(value: Any, key: str) -> Any:
    """One kind of number per parameter (8 and 8.0 alike), so that equal configs give equal
    kernel attributes; a list of numbers (longrope's factors) as a tuple of floats; anything
    else is left for ``rope_problem`` to name."""
    if isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return tuple(map(float, value))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if key == "original_max_position_embeddings":
        return int(value) if float(value).is_integer() else value
    return float(value)


def _rope_theta(data: Mapping[str, Any], where: str, absent: float = 10000.0) -> float:
    """The rotary base, from ``rope_theta`` (transformers 4.x) or ``rope_parameters.rope_theta`` (5.x)."""
    params = data.get("rope_parameters")
    top = _optional_number(data.get("rope_theta"), "rope_theta", where)
    nested = (_optional_number(params.get("rope_theta"), "rope_parameters.rope_theta", where)
              if isinstance(params, dict) else None)
    if top is not None and nested is not None and top != nested:
        raise ValueError(f"{where}: rope_theta = {top:g} and rope_parameters.rope_theta = {nested:g} disagree")
    theta = nested if nested is not None else top
    return absent if theta is None else theta


def _preset(name: str, **fields: Any) -> ModelConfig:
    return ModelConfig(name=name, **fields)


PRESETS: dict[str, ModelConfig] = {
    "llama-2-7b": _preset("llama-2-7b", hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                          num_key_value_heads=32, head_dim=128, num_hidden_layers=32, vocab_size=32000,
                          rms_norm_eps=1e-5, rope_theta=10000.0),
    "llama-3-8b": _preset("llama-3-8b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                          rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3.1-8b": _preset("llama-3.1-8b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=128256,
                            rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                            rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                            rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192),
    "mistral-7b": _preset("mistral-7b", hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                          num_key_value_heads=8, head_dim=128, num_hidden_layers=32, vocab_size=32000,
                          rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=32768),
    "qwen3-8b": _preset("qwen3-8b", hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, num_hidden_layers=36, vocab_size=151936,
                        rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=40960, qk_norm=True),
    "gemma-3-1b": _preset("gemma-3-1b", hidden_size=1152, intermediate_size=6912, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=256, num_hidden_layers=26, vocab_size=262144,
                          rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
                          max_position_embeddings=32768, sliding_window=512, qk_norm=True,
                          embedding_multiplier=1152 ** 0.5, attention_multiplier=256 ** -0.5, activation="gelu_tanh",
                          offset_norms=True, post_norms=True, local_layers=tuple(i for i in range(26) if (i + 1) % 6),
                          local_rope_theta=10000.0),
    # small enough to tune and run in seconds; dims are multiples of 128 so q4 (group 128) applies
    "tiny": _preset("tiny", hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=32, num_hidden_layers=2, vocab_size=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                    max_position_embeddings=1024),
    # the tiny model with a mixture of experts' MLP (Mixtral's routing: 8 experts, 2 a token)
    "tiny-moe": _preset("tiny-moe", hidden_size=128, intermediate_size=128, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=512, rms_norm_eps=1e-5,
                        rope_theta=10000.0, max_position_embeddings=1024, num_experts=8, experts_per_token=2,
                        norm_topk_prob=True),
}


def load_model_config(name_or_path: str | Path) -> ModelConfig:
    """A preset by name, or a Hugging Face ``config.json`` (a file, or a directory holding one).

    Raises ValueError with a readable message for an unknown name, an unreadable file, or a
    field this runtime does not implement (the line begins with the file's path)."""
    text = str(name_or_path)
    if text in PRESETS:
        return PRESETS[text]
    path = Path(text)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ValueError(f"model folder {path} has no config.json")
        path = path / "config.json"
    if path.exists() and not path.is_file():  # a FIFO would block the read, a device never ends
        raise ValueError(f"model config {path} is not a regular file")
    if not path.is_file():
        if path.suffix == ".json" or "/" in text:  # meant as a path
            raise ValueError(f"model config {text} does not exist")
        raise ValueError(f"unknown model {text!r}: not a preset ({', '.join(PRESETS)}) nor a config.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read model config {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"model config {path}: expected a JSON object")
    name = data.get("_name_or_path") or path.parent.name or path.stem
    try:
        return ModelConfig.from_hf_dict(data, name=str(name), source=str(path))
    except TypeError as exc:
        raise ValueError(f"model config {path}: {exc}") from None
    except ValueError as exc:  # the checks of the config built from it name the model: name the file
        text, own = str(exc), f"model {name}: "
        if text.startswith(own):
            raise ValueError(f"{path}: {text[len(own):]}") from None
        raise
