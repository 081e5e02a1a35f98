"""Small random checkpoints saved by the installed transformers, one per supported family, run
by the runtime (default kernels, CPU) and by the numpy reference decoder: the same greedy
tokens as transformers over 32 new tokens, and teacher-forced logits within 1e-4 (float32).

transformers (and torch) are a test dependency only (the ``test`` extra). Checkpoints are
saved with ``save_pretrained`` (safetensors, transformers 5 layout) and some configs are
rewritten into the transformers 4.x layout (top-level ``rope_theta``, ``rope_scaling``) that
the real Llama 2 / 3.1 / TinyLlama repositories ship, so both layouts are read.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from runtime.llama import LlamaModel  # noqa: E402
from runtime.model_config import ModelConfig, load_model_config  # noqa: E402
from runtime.reference import ReferenceModel  # noqa: E402
from runtime.rope_frequencies import inverse_frequencies  # noqa: E402
from runtime.weights import ModelWeights, halves_order  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, BATCH = 7, 32, 2
LOGITS_TOLERANCE = 1e-4
# every family shares these dims, so the compiled kernels serve them all (the rope kernels
# differ only by their frequencies)
DIMS = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2, vocab_size=96, max_position_embeddings=256, rms_norm_eps=1e-5)
# the llama3 scaling of Llama 3.1, with the original context shrunk from 8192 to 64 so that a
# 16-dim head has pairs in each band (kept, blended, slowed down) at these short sequences
LLAMA3_SCALING = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)


def _to_4x_layout(folder: Path, rope_theta: bool = True) -> None:
    """Rewrite a transformers 5 config.json the way transformers 4.x wrote it: the base at the
    top level (or not at all, as in Llama 2's config), the scaling in ``rope_scaling``."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    rope = dict(data.pop("rope_parameters"))
    theta = rope.pop("rope_theta")
    if rope_theta:
        data["rope_theta"] = theta
    else:
        assert theta == 10000.0  # the 4.x default
    rope.pop("type", None)
    data["rope_scaling"] = None if rope.get("rope_type", "default") == "default" else rope
    data.pop("layer_types", None)  # Qwen2's: transformers 4.x had no such field
    path.write_text(json.dumps(data, indent=2))


PHI3_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
# longrope's factors for a head of 16 dims: within the original context the short ones (far enough
# from 1 and from the long ones to matter at these lengths)
LONGROPE_FACTORS = {"short_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0],
                    "long_factor": [1.0, 3.0, 5.0, 9.0, 17.0, 33.0, 65.0, 129.0]}
MINISTRAL3_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 16.0, "original_max_position_embeddings": 38,
                   "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                   "llama_4_scaling_beta": 0.1}
# a one-block Qwen2.5-VL vision tower (never run: the prompts are text)
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                   spatial_merge_size=2, window_size=28, fullatt_block_indexes=[0])
# name -> (transformers config class, its arguments, layout of the saved config.json)
FAMILIES = {
    "llama2": ("LlamaConfig", dict(rope_theta=10000.0), "4.x-no-theta"),
    "llama2-mha": ("LlamaConfig", dict(rope_theta=10000.0, num_key_value_heads=4), "4.x"),  # as many KV heads
    "llama3": ("LlamaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}), "5.x"),
    "llama3.1": ("LlamaConfig", dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0}), "4.x"),
    "llama3.2": ("LlamaConfig", dict(rope_parameters={**LLAMA3_SCALING, "factor": 32.0, "rope_theta": 500000.0},
                                     tie_word_embeddings=True), "5.x"),
    "linear": ("LlamaConfig", dict(rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=10000.0), "5.x"),
    "linear-4.x": ("LlamaConfig", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}),
                   "4.x"),
    "mistral": ("MistralConfig", dict(rope_theta=1e6, sliding_window=64), "5.x"),  # window past the sequence
    # a window shorter than the prompt: prefill and every decode step see only the last 5 positions
    "mistral-window": ("MistralConfig", dict(rope_theta=1e6, sliding_window=5), "5.x"),
    "tinyllama": ("LlamaConfig", dict(rope_theta=10000.0, num_key_value_heads=1), "4.x"),
    # biases on q, k and v; the 4.x one as Qwen2 / Qwen2.5 ship (tied embeddings in the small ones)
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "5.x"),
    "qwen2-4.x": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                      tie_word_embeddings=True), "4.x"),
    # use_sliding_window on: the layers from max_window_layers on see the last 5 positions
    "qwen2-window": ("Qwen2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                         use_sliding_window=True, sliding_window=5, max_window_layers=1), "5.x"),
    # Llama with every projection biased
    "llama-biases": ("LlamaConfig", dict(rope_theta=10000.0, attention_bias=True, mlp_bias=True), "5.x"),
    # norms of each query and key head; the 4.x one as Qwen3-0.6B ships (tied embeddings, a head_dim
    # other than hidden / heads), with its attention biases switched on
    "qwen3": ("Qwen3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}), "5.x"),
    "qwen3-4.x": ("Qwen3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6}, head_dim=32,
                                      tie_word_embeddings=True, attention_bias=True), "4.x"),
    # Q/K/V and gate/up stored stacked; a window past the sequence (Phi-3-mini's is 2047), and none (Phi-4)
    # (token ids inside this small vocabulary: Phi3Config's defaults are 32000)
    "phi3": ("Phi3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}, sliding_window=64,
                                **PHI3_IDS), "5.x"),
    "phi4-4.x": ("Phi3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 250000.0}, **PHI3_IDS),
                 "4.x"),
    # Granite's four scalars (granite-3.1-2b's), tied as it ships
    "granite": ("GraniteConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e6},
                                      embedding_multiplier=12.0, residual_multiplier=0.22,
                                      attention_multiplier=0.015625, logits_scaling=8.0, tie_word_embeddings=True),
                "5.x"),
    # GeGLU, norms by 1 + weight, embeddings times sqrt(hidden); saved with the legacy hidden_act "gelu" of
    # Google's Gemma releases, which transformers reads as the tanh form
    "gemma": ("GemmaConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4}), "5.x"),
    # Gemma 2: the sublayers' output norms, a window in every second layer (shorter than the prompt),
    # query_pre_attn_scalar and soft-capped scores and logits (caps small enough to matter here); the
    # 4.x one as gemma-2-2b ships (its caps 50 and 30, hidden_act and hidden_activation, no layer_types)
    "gemma2": ("Gemma2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                    query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=1.5,
                                    final_logit_softcapping=2.0), "5.x"),
    "gemma2-4.x": ("Gemma2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4},
                                        sliding_window=64), "4.x"),
    # Gemma 3 adds the head norms, the sublayers' output norms, query_pre_attn_scalar (not head_dim, so
    # that it matters) and sliding layers rotating with their own base; the global rope scaled, as in
    # Gemma 3 4B and up. The window lies past the sequence (the runtime refuses sequences beyond it).
    "gemma3": ("Gemma3TextConfig", dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, query_pre_attn_scalar=24, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False), "5.x"),
    # its window shorter than the prompt: the sliding layer sees 5 positions, the global one all
    "gemma3-window": ("Gemma3TextConfig", dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"]), "5.x"),
    # as Gemma 3 1B's config.json: the 4.x layout (rope_theta, rope_local_base_freq, sliding_window_pattern)
    "gemma3-4.x": ("Gemma3TextConfig", dict(rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"]), "gemma3-4.x"),
    # SmolLM3: layers without a rotary embedding (here every second one; every fourth in SmolLM3-3B),
    # tied embeddings; the 4.x one as SmolLM3-3B ships (no_rope_layers listed, an unread pretraining_tp 2)
    "smollm3": ("SmolLM3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 2e6},
                                      no_rope_layer_interval=2, **PHI3_IDS), "5.x"),
    "smollm3-4.x": ("SmolLM3Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e6},
                                          no_rope_layers=[0, 1], **PHI3_IDS), "4.x"),
    # OLMo 2: norms after the sublayers only, the whole q and k projections normalised; the 4.x one as
    # OLMo-2-0425-1B ships (rope_theta at the top level, rope_scaling null), with attention biases on
    "olmo2": ("Olmo2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}), "5.x"),
    "olmo2-4.x": ("Olmo2Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5},
                                      attention_bias=True, **PHI3_IDS), "4.x"),
    # YaRN: the original context shrunk to 16 so that the blend band and the attention factor act at these
    # lengths; the 4.x one with every parameter given, the 5.x one with transformers' defaults
    "qwen3-yarn": ("Qwen3Config", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                                        "original_max_position_embeddings": 16}), "5.x"),
    "llama-yarn-4.x": ("LlamaConfig", dict(rope_parameters={
        "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16, "attention_factor": 1.3,
        "beta_fast": 16.0, "beta_slow": 2.0, "rope_theta": 1e4}), "4.x"),
    # OLMo 3: OLMo 2 with a window (shorter than the prompt) in its sliding layers and YaRN in its full
    # ones; the 4.x one as Olmo-3-7B ships (rope_theta and rope_scaling at the top level)
    "olmo3": ("Olmo3Config", dict(rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                           "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"]), "5.x"),
    "olmo3-4.x": ("Olmo3Config", dict(rope_parameters={
        "full_attention": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 16,
                           "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}, sliding_window=64,
        layer_types=["sliding_attention", "full_attention"]), "olmo3-4.x"),
    # Phi-3.5's longrope (Phi-3-mini-128k's under its old name su, which transformers 5 saves beside rope_type
    # longrope), its original context shrunk to the 38 positions the generations run (7 prompt tokens, 32 new
    # ones, the last never read back): the short factors throughout, the attention factor from 256 / 38
    "phi3-longrope": ("Phi3Config", dict(rope_scaling={"type": "su", **LONGROPE_FACTORS}, rope_theta=1e4,
                                         original_max_position_embeddings=38, **PHI3_IDS), "5.x"),
    "phi3-longrope-4.x": ("Phi3Config", dict(rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                              **LONGROPE_FACTORS},
                                             original_max_position_embeddings=38, **PHI3_IDS), "4.x"),
    # Phi-4-mini's partial rotary (0.75: 12 of the 16 dims of a head turn, the last 4 pass through) with
    # longrope over the rotary dims (6 factors), as Phi-4-mini ships it (the factor at the top level)
    "phi4-mini-partial": ("Phi3Config", dict(rope_scaling={"type": "longrope",
                                                           **{k: v[:6] for k, v in LONGROPE_FACTORS.items()}},
                                             rope_theta=1e4, partial_rotary_factor=0.75,
                                             original_max_position_embeddings=38, **PHI3_IDS), "5.x"),
    # the multimodal Gemma 3 (4B and up): the same language model inside Gemma3ForConditionalGeneration,
    # its config the text_config, its tensors under language_model, beside a (tiny) vision tower
    "gemma3-mm": ("Gemma3Config", dict(text_config=dict(rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}, query_pre_attn_scalar=24, sliding_window=5,
        layer_types=["sliding_attention", "full_attention"]), vision_config=dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
        patch_size=14), mm_tokens_per_image=4), "5.x"),
    # Mistral Small 3.1 / 3.2 (Mistral3ForConditionalGeneration): a Mistral language model beside a Pixtral
    # vision tower, its config as the releases write it: no tie_word_embeddings beside the text_config
    # (Mistral3Config's default is true; transformers leaves the LM head the checkpoint holds untied)
    "mistral3-mm": ("Mistral3Config", dict(text_config=dict(model_type="mistral", sliding_window=None, rope_theta=1e6),
                                           vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                              num_attention_heads=2, head_dim=16, image_size=28,
                                                              patch_size=14),
                                           tie_word_embeddings=False), "mistral3-4.x"),
    # Qwen2.5-VL's language model (a Qwen2) on text prompts, its multimodal rope (mrope: three sections
    # of a head's dims, each turned by a position of its own, all the token's on text), as the releases
    # write it (transformers 4.49: every text field at the top level; transformers 5's text_config
    # layout reads the same: test_hf_configs)
    "qwen2.5-vl-4.x": ("Qwen2_5_VLConfig", dict(text_config=dict(rope_scaling={"type": "mrope",
                                                                               "mrope_section": [2, 3, 3]}),
                                                vision_config=QWEN_VISION), "qwen2.5-vl-4.x"),
    # Qwen3-VL's language model (a Qwen3: norms of the query and key heads), its mrope interleaved
    "qwen3-vl": ("Qwen3VLConfig", dict(text_config=dict(rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                                      "mrope_interleaved": True}),
                                       vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                                                          out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                                                          deepstack_visual_indexes=[0], num_position_embeddings=16)),
                 "5.x"),
    # rotary pairs of adjacent dims: ERNIE 4.5 (0.3B: tied embeddings), here with a bias on every
    # projection, and Helium, here with q/k/v biases (its o_proj has none)
    "ernie4_5": ("Ernie4_5Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 5e5}, head_dim=16,
                                        use_bias=True), "5.x"),
    "helium": ("HeliumConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e5}, head_dim=16,
                                    attention_bias=True), "5.x"),
    # GLM-4 (0414): q/k/v biases, pairs of adjacent dims over half of each head, gate/up stacked, the norms
    # of the sublayers' outputs under GLM's names
    "glm4": ("Glm4Config", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                 "partial_rotary_factor": 0.5}, head_dim=16, **PHI3_IDS), "5.x"),
    # Seed-OSS: each projection's bias switched apart (here o and the MLP's, not q/k/v's; the release has
    # q/k/v's alone)
    "seed_oss": ("SeedOssConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e7}, head_dim=16,
                                       attention_bias=False, attention_out_bias=True, mlp_bias=True, **PHI3_IDS),
                 "5.x"),
    # EXAONE 4.0: OLMo 2's norms after the sublayers with a norm of each query and key head; 1.2B's
    # (no window, llama3 rope scaling) and the 32B's hybrid (a window in the sliding layer, shorter than
    # the prompt, which rotates by the scaled rope; the global layer without rope)
    "exaone4": ("Exaone4Config", dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 1e6}, sliding_window=None,
                                      layer_types=["full_attention"] * 2), "5.x"),
    "exaone4-hybrid": ("Exaone4Config", dict(rope_parameters={**LLAMA3_SCALING, "rope_theta": 1e6},
                                             sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
                       "5.x"),
    # Ministral (8B-Instruct-2410): Mistral's window in the layers layer_types names (here the second: it
    # sees 5 positions, the first all)
    "ministral": ("MinistralConfig", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e8}, sliding_window=5,
                                          layer_types=["full_attention", "sliding_attention"]), "5.x"),
    # Ministral 3: Mistral with YaRN (its mscales) and queries scaled past the original context, here 38
    # positions (7 prompt tokens, 32 new ones, the last never read back): the scaling is 1 throughout;
    # and inside Mistral3ForConditionalGeneration, as the releases (and Devstral 2) ship it
    "ministral3": ("Ministral3Config", dict(rope_parameters=MINISTRAL3_ROPE), "5.x"),
    "ministral3-mm": ("Mistral3Config", dict(text_config=dict(model_type="ministral3", rope_parameters=MINISTRAL3_ROPE),
                                             vision_config=dict(hidden_size=32, intermediate_size=64,
                                                                num_hidden_layers=1, num_attention_heads=2,
                                                                head_dim=16, image_size=28, patch_size=14),
                                             tie_word_embeddings=False), "5.x"),
    # mixtures of experts (4 experts, 2 a token): Mixtral (the top two renormalised), Qwen3-MoE (norms of the
    # query and key heads; experts of their own size, renormalised as Qwen3-30B-A3B ships), Qwen2-MoE
    # (q/k/v biases, a shared expert gated by a sigmoid, not renormalised) and OLMoE (norms of the whole
    # query and key projections)
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2), "5.x"),
    "qwen3-moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         norm_topk_prob=True), "5.x"),
    "qwen2-moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=128), "5.x"),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, **PHI3_IDS), "5.x"),
    # dense MLPs among the experts' layers: Qwen3-MoE's first layer (mlp_only_layers), Qwen2-MoE's every
    # other (decoder_sparse_step 2: the first), each of the dense intermediate_size
    "qwen3-moe-dense": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                               norm_topk_prob=True, mlp_only_layers=[0]), "5.x"),
    "qwen2-moe-sparse-step": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                                     shared_expert_intermediate_size=128, decoder_sparse_step=2),
                              "5.x"),
    # Granite MoE: Granite's four scalars (granite-3.1-1b-a400m's), tied as it ships, each layer's experts
    # stacked in two tensors
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, embedding_multiplier=12.0,
                                            residual_multiplier=0.22, attention_multiplier=0.015625,
                                            logits_scaling=6.0, tie_word_embeddings=True), "5.x"),
    # ERNIE 4.5 MoE (21B-A3B's layout): rotary pairs of adjacent dims, the first layer dense, two experts'
    # worth of shared expert added ungated, the experts picked by probability plus a bias of each
    "ernie4.5-moe": ("Ernie4_5_MoeConfig", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=64,
                                                moe_num_shared_experts=2, moe_layer_start_index=1), "5.x"),
    # GLM-4.5 (GLM-4.5-Air's layout): q/k/v biases, head norms, half of each head rotated; DeepSeek-V3's
    # routing (sigmoid scores plus a bias, 8 experts in 2 groups of which the better one is picked from,
    # the weights times 2.5), the first layer dense, an ungated shared expert
    "glm4.5-moe": ("Glm4MoeConfig", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                                         n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5,
                                         first_k_dense_replace=1, use_qk_norm=True, attention_bias=True), "5.x"),
}
MIXTURES = ["mixtral", "qwen3-moe", "qwen2-moe", "olmoe", "granitemoe", "ernie4.5-moe", "glm4.5-moe"]
# the model class of a config class, where it is not the config's name with ForCausalLM
MODEL_CLASSES = {"Gemma3TextConfig": "Gemma3ForCausalLM", "Gemma3Config": "Gemma3ForConditionalGeneration",
                 "Mistral3Config": "Mistral3ForConditionalGeneration",
                 "Qwen2_5_VLConfig": "Qwen2_5_VLForConditionalGeneration",
                 "Qwen3VLConfig": "Qwen3VLForConditionalGeneration"}
# config.json fields set after saving: a Qwen2 window far shorter than the sequence, ignored (by
# transformers too) because use_sliding_window is false, as in the real checkpoints
CONFIG_EDITS = {"qwen2-4.x": dict(sliding_window=16, max_window_layers=1), "gemma": dict(hidden_act="gelu"),
                "smollm3-4.x": dict(pretraining_tp=2, max_window_layers=1, use_sliding_window=False),
                "gemma2-4.x": dict(hidden_act="gelu_pytorch_tanh")}
BIASED = ["qwen2", "qwen2-4.x", "llama-biases", "qwen3-4.x", "olmo2-4.x"]
QK_NORMED = ["qwen3", "qwen3-4.x", "gemma3", "gemma3-4.x", "olmo2", "olmo2-4.x", "olmo3"]
YARNS = ["qwen3-yarn", "llama-yarn-4.x", "olmo3", "olmo3-4.x"]
LONGROPES = ["phi3-longrope", "phi3-longrope-4.x", "phi4-mini-partial"]
GEMMAS = ["gemma", "gemma2", "gemma3", "gemma3-4.x"]


def _randomize(model) -> None:
    """Weights far from transformers' tiny init, so that logits spread and greedy picks are clear
    (norm gains near 1, projections and biases around 0)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=gen)
            gain = param.dim() == 1 and not name.endswith(".bias")
            param.copy_(1.0 + 0.1 * noise if gain else 0.1 * noise)
        for name, buffer in sorted(model.named_buffers()):  # GLM-4.5's selection bias is a buffer
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=gen))


def _gemma3_to_4x_layout(folder: Path) -> None:
    """Rewrite a transformers 5 Gemma 3 config.json as Gemma 3 1B ships it (transformers 4.50):
    the bases at the top level, no layer_types but a sliding_window_pattern saying the same."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    rope = data.pop("rope_parameters")
    assert data.pop("layer_types") == ["sliding_attention", "full_attention"]
    data.pop("_sliding_window_pattern", None)
    data.update(rope_theta=rope["full_attention"]["rope_theta"], rope_scaling=None,
                rope_local_base_freq=rope["sliding_attention"]["rope_theta"], sliding_window_pattern=2)
    path.write_text(json.dumps(data, indent=2))


def _mistral3_to_4x_layout(folder: Path) -> None:
    """Rewrite a transformers 5 Mistral 3 config.json as Mistral Small 3.1 ships it (transformers 4.50):
    no tie_word_embeddings beside the text_config. (transformers 5 saves the tensors under
    ``language_model.model.`` and ``language_model.lm_head.``, as the releases hold them.)"""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    assert data.pop("tie_word_embeddings") is False
    path.write_text(json.dumps(data, indent=2))


def _qwen25vl_to_4x_layout(folder: Path) -> None:
    """Rewrite a transformers 5 Qwen2.5-VL config.json as the releases ship it (transformers 4.49):
    the text_config's fields at the top level, the base beside ``rope_scaling`` of type mrope."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    text = data.pop("text_config")
    rope = text.pop("rope_parameters")
    text.pop("model_type")
    data.update(text, rope_theta=rope["rope_theta"], rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]})
    path.write_text(json.dumps(data, indent=2))


def _olmo3_to_4x_layout(folder: Path) -> None:
    """Rewrite a transformers 5 OLMo 3 config.json as Olmo-3-7B ships it (transformers 4.57): the
    base at the top level, the full layers' scaling in ``rope_scaling``."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    rope = data.pop("rope_parameters")
    full = dict(rope["full_attention"])
    assert rope["sliding_attention"] == {"rope_type": "default", "rope_theta": full["rope_theta"]}
    data.update(rope_theta=full.pop("rope_theta"), rope_scaling=full)
    path.write_text(json.dumps(data, indent=2))


def _save(folder: Path, family: str):
    config_class, arguments, layout = FAMILIES[family]
    if "text_config" in arguments:  # an image-and-text model: the shared dims are its language model's
        arguments = {**arguments, "text_config": {**DIMS, **arguments["text_config"]}}
        config = getattr(transformers, config_class)(**arguments)
    else:
        config = getattr(transformers, config_class)(**{**DIMS, **arguments})
    model_class = MODEL_CLASSES.get(config_class, config_class.replace("Config", "ForCausalLM"))
    model = getattr(transformers, model_class)(config).eval()
    _randomize(model)
    model.save_pretrained(folder, safe_serialization=True)
    if layout == "gemma3-4.x":
        _gemma3_to_4x_layout(folder)
    elif layout == "olmo3-4.x":
        _olmo3_to_4x_layout(folder)
    elif layout == "mistral3-4.x":
        _mistral3_to_4x_layout(folder)
    elif layout == "qwen2.5-vl-4.x":
        _qwen25vl_to_4x_layout(folder)
    elif layout.startswith("4.x"):
        _to_4x_layout(folder, rope_theta=layout == "4.x")
    if family in CONFIG_EDITS:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **CONFIG_EDITS[family]}, indent=2))
    return model


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """torch on one thread in this module: models this small gain nothing from more, and on a
    busy machine the extra threads spin while they wait (8x the CPU time of one thread here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Each family saved once: (transformers model, folder)."""
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    return {family: (_save(root / family, family), root / family) for family in FAMILIES}


@pytest.fixture(scope="module")
def prompts():
    return np.random.default_rng(7).integers(0, DIMS["vocab_size"], (BATCH, PROMPT_TOKENS))


@pytest.fixture(scope="module")
def greedy(checkpoints, prompts):
    """family -> transformers' greedy tokens (``_transformers_greedy``), generated once: the
    runtime, reference and CUDA tests of a family compare with the same tokens."""
    return functools.cache(lambda family: _transformers_greedy(checkpoints[family][0], prompts))


def _transformers_greedy(model, prompts: np.ndarray) -> np.ndarray:
    """transformers' own greedy generation: the NEW_TOKENS new tokens [B, NEW_TOKENS]."""
    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert out.shape == (BATCH, PROMPT_TOKENS + NEW_TOKENS)  # no early stop on an end-of-sequence token
    return out[:, PROMPT_TOKENS:].numpy()


def _teacher_forced_logits(model, prompts: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """transformers' logits [B, NEW_TOKENS, V] over ``prompts`` followed by ``tokens``: those
    from the last prompt position on, each predicting the next token."""
    sequence = torch.from_numpy(np.concatenate([prompts, tokens[:, :-1]], axis=1))
    with torch.no_grad():
        logits = model(sequence).logits.float().numpy()
    return logits[:, PROMPT_TOKENS - 1:]


def _check_against_transformers(generation, model, prompts, greedy_tokens) -> None:
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert generation.logits.shape == want.shape
    error = float(np.abs(generation.logits - want).max())
    assert error < LOGITS_TOLERANCE, f"logits differ from transformers by {error:.2e}"
    np.testing.assert_array_equal(generation.tokens, greedy_tokens)


def _load(folder: Path):
    config = load_model_config(folder)
    return config, ModelWeights.load(config, folder)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_runtime_generates_what_transformers_generates(family, checkpoints, default_kernels, prompts, greedy):
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    generation = LlamaModel(config, weights, default_kernels).generate(prompts, NEW_TOKENS)
    _check_against_transformers(generation, model, prompts, greedy(family))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_reference_decoder_generates_what_transformers_generates(family, checkpoints, prompts, greedy):
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    _check_against_transformers(ReferenceModel(config, weights).generate(prompts, NEW_TOKENS), model, prompts,
                                greedy(family))


def test_sequences_end_at_their_stop_ids_as_transformers_ends_them(checkpoints, default_kernels, prompts, greedy):
    """Two end-of-sequence ids, one first generated by each sequence at a different step: the
    sequence that ends first is padded from then on, and the generation stops when the second
    ends, in transformers' generate and in the runtime and the reference."""
    model, folder = checkpoints["llama3"]
    config, weights = _load(folder)
    tokens = greedy("llama3")

    def first_step(row, ids):  # where ``row`` first generates one of ``ids`` (past the end: none)
        return next((step for step, token in enumerate(row) if token in ids), NEW_TOKENS)

    # ids that sequence 0 ends at, after 2 steps or more, and sequence 1 later still
    stop = next([int(a), int(b)] for a in tokens[0][2:] for b in tokens[1]
                if 2 <= first_step(tokens[0], (a, b)) < first_step(tokens[1], (a, b)) < NEW_TOKENS - 1)
    pad = 3
    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                              eos_token_id=stop, pad_token_id=pad)[:, PROMPT_TOKENS:].numpy()
    assert want.shape[1] < NEW_TOKENS and want[0, -1] == pad  # sequence 0 ended first: padded
    for generation in (LlamaModel(config, weights, default_kernels).generate(prompts, NEW_TOKENS, stop_ids=stop,
                                                                              pad_id=pad),
                       ReferenceModel(config, weights).generate(prompts, NEW_TOKENS, stop_ids=stop, pad_id=pad)):
        np.testing.assert_array_equal(generation.tokens, want)
        assert generation.logits.shape[1] == want.shape[1] and generation.decode_tokens == BATCH * (want.shape[1] - 1)


@pytest.mark.parametrize("family", ["llama3", "llama3.1", "llama3.2", "linear", "linear-4.x"])
def test_the_rope_settings_matter_at_these_lengths(family, checkpoints, prompts):
    """The comparisons above can fail: run with the plain rope at theta 10000 (what a loader that
    ignored rope_parameters / rope_scaling would do), the logits leave the tolerance far behind."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    plain = dataclasses.replace(config, rope_theta=10000.0, rope_type="default", rope_factor=None,
                                rope_low_freq_factor=None, rope_high_freq_factor=None,
                                rope_original_max_position_embeddings=None)
    assert plain != config
    generation = ReferenceModel(plain, weights).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE


@pytest.mark.parametrize("family", YARNS)
def test_yarn_matters_its_frequencies_and_its_attention_factor(family, checkpoints, prompts):
    """The comparisons above can fail: with the default rope of the same base in place of YaRN, or
    YaRN's frequencies without its attention factor (cos and sin scaled by it, in the full layers
    only in OLMo 3), the logits leave the tolerance far behind."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.rope_type == "yarn" and config.rope_attention_factor > 1.0
    assert (config.local_layers == (0,)) == family.startswith("olmo3")
    plain = dict(rope_type="default", rope_factor=None, rope_original_max_position_embeddings=None,
                 rope_beta_fast=None, rope_beta_slow=None, rope_truncate=None, rope_attention_factor=None)
    for changed in (plain, dict(rope_attention_factor=1.0)):
        other = dataclasses.replace(config, **changed)
        generation = ReferenceModel(other, weights).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE, changed


@pytest.mark.parametrize("family", LONGROPES)
def test_longrope_matters_its_short_factors_and_its_attention_factor(family, checkpoints, prompts):
    """The comparisons above can fail: with the default rope of the same base, the long factors in
    place of the short ones (what transformers turns to only past the original context) or without
    the attention factor, the logits leave the tolerance far behind."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.rope_type == "longrope" and config.rope_attention_factor > 1.0
    assert config.rope_original_max_position_embeddings == PROMPT_TOKENS + NEW_TOKENS - 1
    plain = dict(rope_type="default", rope_short_factor=None, rope_long_factor=None,
                 rope_original_max_position_embeddings=None, rope_attention_factor=None)
    for changed in (plain, dict(rope_short_factor=config.rope_long_factor), dict(rope_attention_factor=1.0)):
        other = dataclasses.replace(config, **changed)
        generation = ReferenceModel(other, weights).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE, changed


def test_a_partial_rotary_matters(checkpoints, prompts):
    """The comparisons above can fail: rotating every dim of the head (with the factors of a
    whole head) moves the logits far past the tolerance."""
    model, folder = checkpoints["phi4-mini-partial"]
    config, weights = _load(folder)
    assert (config.head_dim, config.rotary_dim) == (16, 12)
    whole = dataclasses.replace(config, partial_rotary_factor=1.0, rope_short_factor=config.rope_short_factor + (1.0,) * 2,
                                rope_long_factor=config.rope_long_factor + (1.0,) * 2)
    generation = ReferenceModel(whole, weights).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE


@pytest.mark.parametrize("family", MIXTURES)
def test_the_routing_matters(family, checkpoints, prompts):
    """The comparisons above can fail: one expert a token instead of two, the top probabilities
    renormalised or not the other way, or (Qwen2-MoE) the shared expert ungated, and the logits
    leave the tolerance far behind (ten times over at least: Granite's residual_multiplier of 0.22
    scales the experts' part down)."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.num_experts == (8 if family == "glm4.5-moe" else 4) and config.experts_per_token == 2
    assert config.norm_topk_prob == (family in ("mixtral", "qwen3-moe", "granitemoe", "ernie4.5-moe", "glm4.5-moe"))
    changes = [dict(experts_per_token=1), dict(norm_topk_prob=not config.norm_topk_prob)]
    for changed in changes:
        other = dataclasses.replace(config, **changed)
        generation = ReferenceModel(other, weights).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 10 * LOGITS_TOLERANCE, changed
    if config.expert_selection_bias:  # the experts picked by their scores alone, without the bias (ERNIE, GLM)
        from runtime.weights import selection_bias_name

        name = selection_bias_name(config, 1)
        unbiased = dict(weights.tensors, **{name: np.zeros_like(weights[name])})
        generation = ReferenceModel(config, ModelWeights(config, unbiased)).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 10 * LOGITS_TOLERANCE
    if family == "glm4.5-moe":  # its groups: every expert open to every token
        generation = ReferenceModel(dataclasses.replace(config, expert_groups=1, expert_groups_per_token=1),
                                    weights).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 10 * LOGITS_TOLERANCE
    if family == "qwen2-moe":  # its shared expert's gate: a gain of 1 instead of sigmoid(gate . x)
        ungated = dict(weights.tensors)
        for layer in range(config.num_hidden_layers):
            ungated[f"model.layers.{layer}.mlp.shared_expert_gate.weight"] = np.zeros((1, config.hidden_size),
                                                                                      np.float32)
        generation = ReferenceModel(config, ModelWeights(config, ungated)).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 10 * LOGITS_TOLERANCE


@pytest.mark.parametrize("family, stored", [("mixtral", "block_sparse_moe.experts.3.w2.weight"),
                                            ("granitemoe", "block_sparse_moe.output_linear.weight"),
                                            ("ernie4.5-moe", "mlp.shared_experts.down_proj.weight"),
                                            ("glm4.5-moe", "mlp.gate.e_score_correction_bias")])
def test_mixtures_of_experts_keep_their_checkpoints_names(family, stored, checkpoints, tmp_path):
    """Mixtral's checkpoints name the MLP block_sparse_moe and the experts' projections w1, w3, w2;
    Granite MoE's stack a layer's experts in two tensors and call the router router.layer; ERNIE 4.5
    MoE's name its shared expert shared_experts: read so (each expert's projections as views), and
    written back so by ``save``."""
    from runtime.weights import read_header

    _, folder = checkpoints[family]
    config, weights = _load(folder)
    names = set(read_header(folder / "model.safetensors")[0]) - {"__metadata__"}
    assert f"model.layers.1.{stored}" in names
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in weights.tensors
    weights.save(tmp_path)
    assert set(read_header(tmp_path / "model.safetensors")[0]) - {"__metadata__"} == names
    model_type = {"ernie4.5-moe": "ernie4_5_moe", "glm4.5-moe": "glm4_moe"}.get(family, family)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    again = ModelWeights.load(load_model_config(tmp_path), tmp_path)
    assert all(np.array_equal(again.tensors[name], tensor) for name, tensor in weights.tensors.items())


def test_ministral3_past_its_original_context_scales_its_queries_as_transformers_does(
        checkpoints, default_kernels, prompts, fake_gpu):
    """Ministral 3's queries at positions from the original context on are scaled up (by 1 + 0.1
    ln 2 at 38 here): transformers' logits move there. The CPU runtime and the reference scale them
    too: transformers' tokens and logits over a generation that crosses position 38 and one whose
    prompt is past it; the CUDA kernels do not, and a generation that reaches it is refused there
    by name."""
    from fakes import FAKE_GPU_TARGET

    from export import TunedKernels

    model, folder = checkpoints["ministral3"]
    config, weights = _load(folder)
    assert config.position_limit == 38
    long_prompts = np.concatenate([prompts] * 6, axis=1)  # 42 positions
    parameters = model.config.rope_parameters
    with torch.no_grad():
        scaled = model(torch.from_numpy(long_prompts)).logits
        parameters["llama_4_scaling_beta"] = 0.0
        try:
            plain = model(torch.from_numpy(long_prompts)).logits
        finally:
            parameters["llama_4_scaling_beta"] = 0.1
    assert torch.equal(scaled[:, :38], plain[:, :38]) and (scaled[:, 38:] - plain[:, 38:]).abs().max() > 1e-3
    for given, new in ((prompts, 40), (long_prompts, 6)):
        want_tokens, want_logits = _transformers_generation(model, given, new)
        for generate in (LlamaModel(config, weights, default_kernels).generate,
                         ReferenceModel(config, weights).generate):
            generation = generate(given, new)
            np.testing.assert_array_equal(generation.tokens, want_tokens)
            assert np.abs(generation.logits - want_logits).max() < LOGITS_TOLERANCE
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        with pytest.raises(ValueError, match="ministral3 scales its queries by position past its first 38 positions "
                                             r"\(rope_parameters.llama_4_scaling_beta, Ministral 3's\), which the "
                                             r"CUDA kernels do not implement \(the CPU runtime does\): this sequence "
                                             "takes 39 positions"):
            LlamaModel(config, weights, kernels).generate(prompts, NEW_TOKENS + 1)


def _transformers_generation(model, prompts: np.ndarray, new: int) -> tuple[np.ndarray, np.ndarray]:
    """transformers' greedy generation step by step, as its own cache runs it: (the new tokens
    [B, new], their logits [B, new, V]). Past longrope's original context only this shows what it
    computes: a teacher-forced pass over the whole sequence rotates every position by long_factor."""
    ids = torch.from_numpy(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    logits = torch.stack(out.logits, dim=1).float().numpy()
    return out.sequences[:, prompts.shape[1]:].numpy(), logits


@pytest.mark.parametrize("prompt, new", [(30, 16), (38, 3), (40, 4)], ids=["crossing", "at-the-edge", "long-prompt"])
def test_past_longropes_original_context_the_runtime_generates_what_transformers_generates(
        prompt, new, checkpoints, default_kernels):
    """transformers rotates a forward pass by the long factors once its largest position is past
    the original context (38), and its Phi-3 runs a generation's whole sequence again (its cache
    dropped) at the step that crosses it: position 38, the first decode step after a prompt of 38;
    a prompt past it is long from the start. The runtime and the reference generate transformers'
    tokens and logits; with only the short factors the logits differ."""
    model, folder = checkpoints["phi3-longrope"]
    config, weights = _load(folder)
    prompts = np.random.default_rng(11).integers(0, DIMS["vocab_size"], (BATCH, prompt))
    # a copy: a pass past the context leaves the rotary embedding of the module's model on the long factors
    tokens, want = _transformers_generation(copy.deepcopy(model), prompts, new)
    for generation in (LlamaModel(config, weights, default_kernels).generate(prompts, new),
                       ReferenceModel(config, weights).generate(prompts, new)):
        np.testing.assert_array_equal(generation.tokens, tokens)
        assert np.abs(generation.logits - want).max() < LOGITS_TOLERANCE
    short_only = dataclasses.replace(config, rope_long_factor=config.rope_short_factor)
    other = ReferenceModel(short_only, weights).generate(prompts, new)
    assert np.abs(other.logits - want).max() > 100 * LOGITS_TOLERANCE


def test_past_longropes_original_context_on_the_cuda_path(checkpoints, fake_gpu):
    """The same crossing on the CUDA path (fake GPU), with Phi-4-mini's partial rotary: a captured
    step of each kind, the sequence run again on the device between them; transformers' tokens
    and logits. (Its longrope within the context, and the partial rotary's kernels, on the way.)"""
    from fakes import FAKE_GPU_TARGET

    from export import TunedKernels

    model, folder = checkpoints["phi4-mini-partial"]
    config, weights = _load(folder)
    prompts = np.random.default_rng(11).integers(0, DIMS["vocab_size"], (BATCH, 34))
    tokens, want = _transformers_generation(copy.deepcopy(model), prompts, 7)
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        runtime_model = LlamaModel(config, weights, kernels)
        generation = runtime_model.generate(prompts, 7)
    assert runtime_model.decode_mode == "graph"
    np.testing.assert_array_equal(generation.tokens, tokens)
    assert np.abs(generation.logits - want).max() < LOGITS_TOLERANCE
    factors = {k.spec.attr["short_factor"] for k in runtime_model.used.values() if "short_factor" in k.spec.attr}
    assert factors == {config.rope_short_factor, config.rope_long_factor}


@pytest.mark.parametrize("family", BIASED)
def test_the_biases_matter(family, checkpoints, prompts):
    """The comparisons above can fail: without its biases (what a loader that skipped them would
    run) the model's logits leave the tolerance far behind."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    plain = dataclasses.replace(config, qkv_bias=False, o_bias=False, mlp_bias=False)
    assert plain != config and any(name.endswith(".bias") for name in weights.tensors)
    unbiased = ModelWeights(plain, {n: t for n, t in weights.tensors.items() if not n.endswith(".bias")})
    generation = ReferenceModel(plain, unbiased).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE


def test_the_bias_flags_are_those_of_each_family(checkpoints):
    flags = {family: tuple(getattr(load_model_config(checkpoints[family][1]), f)
                           for f in ("qkv_bias", "o_bias", "mlp_bias")) for family in BIASED}
    assert flags == {"qwen2": (True, False, False), "qwen2-4.x": (True, False, False),
                     "llama-biases": (True, True, True), "qwen3-4.x": (True, True, False),
                     "olmo2-4.x": (True, True, False)}
    assert load_model_config(checkpoints["qwen2-4.x"][1]).sliding_window is None


def test_granites_scalars_matter(checkpoints, prompts):
    """Each of Granite's four scalars, left at 1 (what a loader reading the checkpoint as Llama's
    would run), moves the logits far past the tolerance."""
    model, folder = checkpoints["granite"]
    config, weights = _load(folder)
    fields = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")
    assert (config.embedding_multiplier, config.residual_multiplier, config.attention_multiplier,
            config.logits_scaling) == (12.0, 0.22, 0.015625, 8.0)
    for field in fields:
        plain = dataclasses.replace(config, **{field: None if field == "attention_multiplier" else 1.0})
        generation = ReferenceModel(plain, ModelWeights(plain, weights.tensors)).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE, field


@pytest.mark.parametrize("family", QK_NORMED)
def test_the_norms_of_the_query_and_key_heads_matter(family, checkpoints, prompts):
    """The comparisons above can fail: without Qwen3's norms of the query and key heads (what a
    loader that read the checkpoint as Qwen2's or Llama's would run) the logits leave the
    tolerance far behind."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.qk_norm and (family != "qwen3-4.x" or config.head_dim == 32)
    if config.offset_norms:  # Gemma 3: without them the runtime would not compute Gemma 3 at all
        config = dataclasses.replace(config, offset_norms=False)
        weights = ModelWeights(config, {n: t + 1 if n.endswith("norm.weight") else t for n, t in weights.tensors.items()})
    plain = dataclasses.replace(config, qk_norm=False, qk_norm_span="head")
    kept = ModelWeights(plain, {n: t for n, t in weights.tensors.items() if "_norm." not in n or "layernorm" in n})
    assert len(kept.tensors) == len(weights.tensors) - 2 * config.num_hidden_layers
    generation = ReferenceModel(plain, kept).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE


def test_gemmas_are_read_as_transformers_reads_them(checkpoints):
    gemma, gemma2, gemma3, gemma3_4x = (load_model_config(checkpoints[family][1]) for family in GEMMAS)
    assert json.loads((checkpoints["gemma"][1] / "config.json").read_text())["hidden_act"] == "gelu"
    for config in (gemma, gemma2, gemma3, gemma3_4x):
        assert (config.activation, config.offset_norms, config.embedding_multiplier) == ("gelu_tanh", True, 8.0)
    assert not (gemma.post_norms or gemma.qk_norm or gemma.local_layers) and gemma.tie_word_embeddings
    assert (gemma3.post_norms, gemma3.qk_norm, gemma3.attention_multiplier) == (True, True, 24 ** -0.5)
    assert (gemma3.local_layers, gemma3.local_rope_theta, gemma3.rope_theta, gemma3.rope_type) == (
        (0,), 1e4, 1e6, "linear")
    assert (gemma3_4x.local_layers, gemma3_4x.local_rope_theta, gemma3_4x.attention_multiplier) == (
        (0,), 1e4, 256 ** -0.5)
    assert gemma3.sliding_window == gemma3_4x.sliding_window == 64
    assert (gemma2.post_norms, gemma2.qk_norm, gemma2.attn_softcap, gemma2.final_softcap) == (True, False, 1.5, 2.0)
    assert (gemma2.local_layers, gemma2.sliding_window, gemma2.split_rope) == ((0,), 5, False)
    gemma2_4x = load_model_config(checkpoints["gemma2-4.x"][1])
    assert (gemma2_4x.attn_softcap, gemma2_4x.final_softcap, gemma2_4x.local_layers) == (50.0, 30.0, (0,))


@pytest.mark.parametrize("family", GEMMAS)
def test_what_gemma_does_otherwise_matters(family, checkpoints, prompts):
    """The comparisons above can fail: each of Gemma's departures from Llama, undone (a loader
    reading the checkpoint as Llama's), moves the logits far past the tolerance: the embedding
    scale, the norms by 1 + weight, the GeLU gate, and in Gemma 3 the output norms (dropped) and
    the sliding layers' own rope base."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    undone = {"embedding scale": dict(embedding_multiplier=1.0), "norm offset": dict(offset_norms=False),
              "GeLU gate": dict(activation="silu")}
    if config.post_norms:
        undone["output norms"] = dict(post_norms=False)
    if config.split_rope:
        undone["local rope"] = dict(local_layers=(), local_rope_theta=None)
    if config.attn_softcap:
        undone["score caps"] = dict(attn_softcap=None)
        undone["logit caps"] = dict(final_softcap=None)
    for what, fields in undone.items():
        plain = dataclasses.replace(config, **fields)
        kept = ModelWeights(plain, {n: t for n, t in weights.tensors.items()
                                    if plain.post_norms or "feedforward_layernorm" not in n})
        generation = ReferenceModel(plain, kept).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE, what


def test_exaone4s_rope_in_its_sliding_layers_only_and_its_head_norms_matter(checkpoints, prompts):
    """EXAONE 4.0's hybrid: rope in every layer, no window, or the sliding layer turned by the
    unscaled rope each move the logits far past the tolerance."""
    model, folder = checkpoints["exaone4-hybrid"]
    config, weights = _load(folder)
    assert (config.local_layers, config.nope_layers, config.qk_norm_span) == ((0,), (1,), "head")
    for change in (dict(nope_layers=()), dict(local_layers=(), nope_layers=(), sliding_window=None),
                   dict(local_rope_theta=1e6)):  # the sliding layer turned by the unscaled rope
        other = dataclasses.replace(config, **change)
        generation = ReferenceModel(other, ModelWeights(other, weights.tensors)).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE, change


@pytest.mark.parametrize("family", ["ernie4_5", "helium", "glm4"])
def test_rotary_pairs_of_adjacent_dims_matter_and_are_saved_as_they_came(family, checkpoints, prompts, tmp_path):
    """ERNIE 4.5's and Helium's q and k rows run as loaded, without the permutation that makes their
    rotary pairs halves, move the logits far past the tolerance; saved weights load back equal."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.rope_interleaved and ModelConfig.from_hf_dict(config.to_hf_dict(), config.name) == config
    back = np.argsort(halves_order(config))  # each head's q and k rows as the checkpoint stores them
    raw = {name: t.reshape(-1, config.head_dim, *t.shape[1:])[:, back].reshape(t.shape)
           if ".q_proj." in name or ".k_proj." in name else t for name, t in weights.tensors.items()}
    generation = ReferenceModel(config, ModelWeights(config, raw)).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE
    again = ModelWeights.load(config, weights.save(tmp_path / "saved"))
    assert all(np.array_equal(again.tensors[name], tensor) for name, tensor in weights.tensors.items())


def test_ministrals_window_applies_in_its_sliding_layers_only(checkpoints, prompts):
    """Ministral's window in every layer (Mistral's) or in none moves the logits far past the
    tolerance: the comparisons above see it in the second layer only."""
    model, folder = checkpoints["ministral"]
    config, weights = _load(folder)
    assert (config.local_layers, config.sliding_window) == ((1,), 5)
    for window in (5, None):
        other = dataclasses.replace(config, local_layers=(), local_rope_theta=None, sliding_window=window)
        generation = ReferenceModel(other, ModelWeights(other, weights.tensors)).generate(prompts, NEW_TOKENS)
        want = _teacher_forced_logits(model, prompts, generation.tokens)
        assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE, window


@pytest.mark.parametrize("family", ["smollm3", "smollm3-4.x"])
def test_smollm3s_layers_without_rope_matter(family, checkpoints, prompts):
    """The comparisons above can fail: rotating every layer (a loader reading SmolLM3 as Llama)
    moves the logits far past the tolerance."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.nope_layers == ((1,) if family == "smollm3" else (0,)) and config.tie_word_embeddings
    plain = dataclasses.replace(config, nope_layers=())
    generation = ReferenceModel(plain, ModelWeights(plain, weights.tensors)).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE


@pytest.mark.parametrize("family", ["llama3.1", "llama3.2", "linear", "linear-4.x", *LONGROPES])
def test_inverse_frequencies_are_those_of_transformers(family, checkpoints):
    """Each of the head's pairs, in every band of the llama3 scaling, against transformers'
    own rotary embedding module (float32 there, float64 here)."""
    model, folder = checkpoints[family]
    config = load_model_config(folder)
    theirs = model.model.rotary_emb.inv_freq.double().numpy()
    ours = inverse_frequencies(config.rotary_dim, config.rope_theta, config.rope_type, **config.rope_scaling)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    if config.rope_type == "llama3":  # the three bands: kept, blended, divided by the factor
        plain = inverse_frequencies(config.head_dim, config.rope_theta)
        ratio = plain / ours
        assert ratio[0] == 1.0 and np.isclose(ratio[-1], config.rope_factor)
        assert ((ratio > 1.0) & (ratio < config.rope_factor * (1 - 1e-9))).any()


# ----------------------------------------------------------------------------- refusals

def _save_config(folder: Path, config) -> Path:
    """Only the config.json of a transformers config (no weights needed to be refused)."""
    config.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("arguments, message", [
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}),
     "rope scaling 'dynamic' (rope_parameters.rope_type) is not implemented; supported: default, linear, llama3, yarn"),
    (dict(hidden_act="gelu_pytorch_tanh"), "hidden_act 'gelu_pytorch_tanh' is not implemented; supported: silu"),
    (dict(config="Qwen2Config", layer_types=["full_attention", "sliding_attention"]),
     'layer_types = ["full_attention", "sliding_attention"] is not implemented'),
], ids=["dynamic", "gelu", "qwen2-layer-types"])
def test_a_transformers_config_the_runtime_does_not_implement_is_refused(arguments, message, tmp_path):
    arguments = dict(arguments)
    config_class = getattr(transformers, arguments.pop("config", "LlamaConfig"))
    folder = _save_config(tmp_path, config_class(**{**DIMS, **arguments}))
    with pytest.raises(ValueError) as caught:
        load_model_config(folder)
    text = str(caught.value)
    assert text.startswith(str(folder / "config.json")) and message in text and "\n" not in text, text


@pytest.mark.parametrize("family", ["mistral-window", "gemma3-window", "gemma2", "qwen2-window"])
def test_the_sliding_window_matters(family, checkpoints, default_kernels, prompts):
    """The comparisons above can fail: attending to the whole sequence (a runtime without
    sliding-window attention) moves the logits far past the tolerance, and the runtime ran
    windowed attention kernels in prefill and decode."""
    model, folder = checkpoints[family]
    config, weights = _load(folder)
    assert config.sliding_window == 5 < PROMPT_TOKENS
    plain = dataclasses.replace(config, sliding_window=None)
    generation = ReferenceModel(plain, ModelWeights(plain, weights.tensors)).generate(prompts, NEW_TOKENS)
    want = _teacher_forced_logits(model, prompts, generation.tokens)
    assert np.abs(generation.logits - want).max() > 100 * LOGITS_TOLERANCE
    runtime_model = LlamaModel(config, weights, default_kernels)
    runtime_model.generate(prompts, 4)
    windowed = {k.spec.op for k in runtime_model.used.values() if k.spec.attr.get("window") == 5}
    assert windowed == {"attention_prefill", "attention_decode"}


@pytest.mark.parametrize("family", ["llama3.1", "qwen2", "qwen3", "qwen3-4.x", "granite", "gemma", "gemma3",
                                    "smollm3", "mistral-window", "gemma3-window", "gemma2", "qwen2-window",
                                    "olmo2-4.x", "olmo3", "gemma3-mm", "exaone4-hybrid"])
def test_the_cuda_path_generates_what_transformers_generates(family, checkpoints, prompts, greedy, fake_gpu):
    """The same on the CUDA path (fake GPU: cubins built by nvcc, run on the emulator): device
    buffers, the decode step captured as a graph, rope scaling (Llama 3.1), biases (Qwen2) and
    the norms of the query and key heads (Qwen3: in the fused decode step, whose GEMVs take the
    norms and attention the rotary embedding, and with biases, where they cannot) and Granite's
    scalars (folded into the weights; the softmax scale an attribute of every attention kernel).
    Longrope's on the CUDA path: ``test_past_longropes_original_context_on_the_cuda_path``."""
    from fakes import FAKE_GPU_TARGET

    from export import TunedKernels

    model, folder = checkpoints[family]
    config, weights = _load(folder)
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        runtime_model = LlamaModel(config, weights, kernels)
        generation = runtime_model.generate(prompts, NEW_TOKENS)
    assert runtime_model.decode_mode == "graph"
    if family == "qwen3":
        assert {"qk_norm", "rope_append_attention"} <= {kernel.spec.op for kernel in runtime_model.used.values()}
    _check_against_transformers(generation, model, prompts, greedy(family))
