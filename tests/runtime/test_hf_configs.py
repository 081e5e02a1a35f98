"""Real Hugging Face configs and checkpoints: every field honoured or refused by name.

The config dicts are those transformers 4.x and 5.x write for popular checkpoints (Llama 2,
Llama 3, Llama 3.1, TinyLlama, Mistral, Qwen2); no transformers needed."""
from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from runtime.abi import canonical_attrs
from runtime.generation import checked_generation
from runtime.llama import LlamaModel
from runtime.model_config import PRESETS, ModelConfig, load_model_config
from runtime.plan import decode_calls, prefill_calls
from runtime.reference import ReferenceModel, rotate
from runtime.rope_frequencies import inverse_frequencies
from runtime.weights import ModelWeights

LLAMA2_4X = {  # meta-llama/Llama-2-7b-hf
    "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"], "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 11008, "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0", "use_cache": True, "vocab_size": 32000}
LLAMA3_4X = {  # meta-llama/Meta-Llama-3-8B
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 128256}
LLAMA3_5X = {  # the same checkpoint saved by transformers 5: no top-level rope_theta
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "dtype": "bfloat16", "eos_token_id": 128001, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}, "tie_word_embeddings": False,
    "transformers_version": "5.0.0", "use_cache": True, "vocab_size": 128256}
_LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 8192}
LLAMA31_4X = {**LLAMA3_4X, "eos_token_id": [128001, 128008, 128009], "max_position_embeddings": 131072,
              "mlp_bias": False, "rope_scaling": {**_LLAMA3_SCALING, "rope_type": "llama3"},
              "transformers_version": "4.43.0.dev0"}
LLAMA31_5X = {**LLAMA3_5X, "max_position_embeddings": 131072,
              "rope_parameters": {**_LLAMA3_SCALING, "rope_theta": 500000.0, "rope_type": "llama3"}}
TINYLLAMA = {  # TinyLlama/TinyLlama-1.1B-Chat-v1.0
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 5632,
    "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 22,
    "num_key_value_heads": 4, "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0", "use_cache": True, "vocab_size": 32000}
LLAMA32_5X = {  # meta-llama/Llama-3.2-1B saved by transformers 5: llama3 scaling (factor 32), tied head
    **LLAMA3_5X, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "head_dim": 64,
    "max_position_embeddings": 131072, "tie_word_embeddings": True,
    "rope_parameters": {**_LLAMA3_SCALING, "factor": 32.0, "rope_theta": 500000.0, "rope_type": "llama3"}}
YARN_5X = {**LLAMA3_5X, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                            "original_max_position_embeddings": 8192}}
DYNAMIC_5X = {**LLAMA3_5X, "rope_parameters": {"rope_type": "dynamic", "factor": 4.0, "rope_theta": 1e6}}
MISTRAL_V01 = {  # mistralai/Mistral-7B-v0.1: a 4096-token sliding window
    "architectures": ["MistralForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 32768,
    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.34.0.dev0", "use_cache": True, "vocab_size": 32000}
MISTRAL_V02 = {**MISTRAL_V01, "attention_dropout": 0.0, "rope_theta": 1000000.0, "sliding_window": None,
               "transformers_version": "4.36.0"}  # mistralai/Mistral-7B-Instruct-v0.2: no window
QWEN2 = {  # Qwen/Qwen2-0.5B: Llama-like, but q/k/v have biases; the window is off (use_sliding_window)
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 131072, "max_window_layers": 24, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
# deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B: Qwen2 (from Qwen2.5-Math-1.5B), use_mrope false, a window switched off
R1_DISTILL_QWEN = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 131072, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.44.0",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936}
QWEN3 = {  # Qwen/Qwen3-0.6B: norms of each query and key head; head_dim 128, not hidden / heads (64)
    "architectures": ["Qwen3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 1024,
    "initializer_range": 0.02, "intermediate_size": 3072, "max_position_embeddings": 40960,
    "max_window_layers": 28, "model_type": "qwen3", "num_attention_heads": 16, "num_hidden_layers": 28,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": None, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.51.0",
    "use_cache": True, "use_sliding_window": False, "vocab_size": 151936}
PHI3_MINI = {  # microsoft/Phi-3-mini-4k-instruct, its auto_map left out: Q/K/V and gate/up stored stacked
    "_name_or_path": "Phi-3-mini-4k-instruct", "architectures": ["Phi3ForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 32000, "hidden_act": "silu",
    "hidden_size": 3072, "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 4096,
    "model_type": "phi3", "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 32,
    "original_max_position_embeddings": 4096, "pad_token_id": 32000, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "sliding_window": 2047, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.2", "use_cache": True, "vocab_size": 32064}
PHI4 = {  # microsoft/phi-4: Phi-3's network at 14B, grouped-query attention, no window
    "architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 100257,
    "embd_pdrop": 0.0, "eos_token_id": 100265, "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02,
    "intermediate_size": 17920, "max_position_embeddings": 16384, "model_type": "phi3", "num_attention_heads": 40,
    "num_hidden_layers": 40, "num_key_value_heads": 10, "original_max_position_embeddings": 16384,
    "pad_token_id": 100349, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 250000,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.47.0",
    "use_cache": True, "vocab_size": 100352}
# microsoft/Phi-3.5-mini-instruct: longrope scaling from a pretrained 4096 to 131072 positions (its
# auto_map left out); the factors of its release, 48 each for a head of 96 dims
PHI35_SHORT = [1.0, 1.0199999809265137, 1.0299999713897705, 1.0299999713897705, 1.0499999523162842, 1.0499999523162842,
               1.0499999523162842, 1.0499999523162842, 1.0499999523162842, 1.0699999332427979, 1.0999999046325684,
               1.1099998950958252, 1.1599998474121094, 1.1599998474121094, 1.1699998378753662, 1.2899998426437378,
               1.339999794960022, 1.679999828338623, 1.7899998426437378, 1.8199998140335083, 1.8499997854232788,
               1.8799997568130493, 1.9099997282028198, 1.9399996995925903, 1.9899996519088745, 2.0199997425079346,
               2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346, 2.0199997425079346,
               2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914,
               2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0299997329711914, 2.0799996852874756,
               2.0899996757507324, 2.189999580383301, 2.2199995517730713, 2.5899994373321533, 2.729999542236328,
               2.749999523162842, 2.8399994373321533]
PHI35_LONG = [1.0800000429153442, 1.1100000143051147, 1.1399999856948853, 1.340000033378601, 1.5899999141693115,
              1.600000023841858, 1.6200000047683716, 2.620000123977661, 3.2300000190734863, 3.2300000190734863,
              4.789999961853027, 7.400000095367432, 7.700000286102295, 9.09000015258789, 12.199999809265137,
              17.670000076293945, 24.46000099182129, 28.57000160217285, 30.420001983642578, 30.840002059936523,
              32.590003967285156, 32.93000411987305, 42.320003509521484, 44.96000289916992, 50.340003967285156,
              50.45000457763672, 57.55000305175781, 57.93000411987305, 58.21000289916992, 60.1400032043457,
              62.61000442504883, 62.62000274658203, 62.71000289916992, 63.1400032043457, 63.1400032043457,
              63.77000427246094, 63.93000411987305, 63.96000289916992, 63.970001220703125, 64.02999877929688,
              64.06999969482422, 64.08000183105469, 64.12000274658203, 64.41000366210938, 64.4800033569336,
              64.51000213623047, 64.52999877929688, 64.83999633789062]
PHI35_MINI = {**PHI3_MINI, "_name_or_path": "Phi-3.5-mini-instruct", "max_position_embeddings": 131072,
              "rope_scaling": {"long_factor": PHI35_LONG, "short_factor": PHI35_SHORT, "type": "longrope"},
              "sliding_window": 262144, "transformers_version": "4.43.3"}
GRANITE = {  # ibm-granite/granite-3.1-2b-instruct: Llama with four scalars, tied embeddings
    "architectures": ["GraniteForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
    "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
    "logits_scaling": 8.0, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "granite",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 8, "pad_token_id": 0,
    "residual_multiplier": 0.22, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 5000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.47.0", "use_cache": True,
    "vocab_size": 49155}
SMOLLM2 = {  # HuggingFaceTB/SmolLM2-135M: Llama, with two fields of nanotron's that transformers ignores
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 0,
    "eos_token_id": 0, "hidden_act": "silu", "hidden_size": 576, "initializer_range": 0.041666666666666664,
    "intermediate_size": 1536, "is_llama_config": True, "max_position_embeddings": 8192, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30, "num_key_value_heads": 3,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_interleaved": False, "rope_scaling": None,
    "rope_theta": 100000, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.40.1",
    "use_cache": True, "vocab_size": 49152}
GEMMA_2B = {  # google/gemma-2b: GeGLU under its legacy name "gelu", one KV head of 256 dims, tied embeddings
    "architectures": ["GemmaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 2,
    "eos_token_id": 1, "head_dim": 256, "hidden_act": "gelu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 16384, "max_position_embeddings": 8192, "model_type": "gemma", "num_attention_heads": 8,
    "num_hidden_layers": 18, "num_key_value_heads": 1, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000.0, "torch_dtype": "bfloat16", "transformers_version": "4.38.0.dev0",
    "use_cache": True, "vocab_size": 256000}
GEMMA2_2B = {  # google/gemma-2-2b-it: output norms, a window every second layer, soft-capped scores and logits
    "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0, "head_dim": 256, "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2304, "initializer_range": 0.02,
    "intermediate_size": 9216, "max_position_embeddings": 8192, "model_type": "gemma2", "num_attention_heads": 8,
    "num_hidden_layers": 26, "num_key_value_heads": 4, "pad_token_id": 0, "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06, "rope_theta": 10000.0, "sliding_window": 4096, "torch_dtype": "float32",
    "transformers_version": "4.42.4", "use_cache": True, "vocab_size": 256000}
GEMMA3_1B = {  # google/gemma-3-1b-it: five sliding layers of window 512 to one global, two rope bases
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": [1, 106],
    "final_logit_softcapping": None, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
    "initializer_range": 0.02, "intermediate_size": 6912, "max_position_embeddings": 32768,
    "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
    "rope_scaling": None, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144}
SMOLLM3_3B = {  # HuggingFaceTB/SmolLM3-3B: every fourth layer without a rotary embedding (NoPE)
    "architectures": ["SmolLM3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 128012, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 11008, "layer_types": ["full_attention"] * 36, "max_position_embeddings": 65536,
    "max_window_layers": 28, "mlp_bias": False, "model_type": "smollm3", "no_rope_layer_interval": 4,
    "no_rope_layers": [int((i + 1) % 4 != 0) for i in range(36)], "num_attention_heads": 16,
    "num_hidden_layers": 36, "num_key_value_heads": 4, "pad_token_id": 128004, "pretraining_tp": 2,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 5000000.0, "sliding_window": None,
    "torch_dtype": "bfloat16", "transformers_version": "4.54.0.dev0", "use_cache": False,
    "use_sliding_window": False, "vocab_size": 128256}
OLMO2_1B = {  # allenai/OLMo-2-0425-1B: norms after the sublayers only, whole-projection q/k norms
    "architectures": ["Olmo2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": None,
    "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 4096, "model_type": "olmo2", "num_attention_heads": 16,
    "num_hidden_layers": 16, "num_key_value_heads": 16, "pad_token_id": 100277, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 500000, "tie_word_embeddings": False, "torch_dtype": "float32",
    "transformers_version": "4.48.0", "use_cache": True, "vocab_size": 100352}
OLMO3_7B = {  # allenai/Olmo-3-1025-7B: OLMo 2 with three sliding layers of four, YaRN in the full ones
    **OLMO2_1B, "architectures": ["Olmo3ForCausalLM"], "model_type": "olmo3", "hidden_size": 4096,
    "intermediate_size": 11008, "max_position_embeddings": 65536, "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 32, "vocab_size": 100278, "sliding_window": 4096, "transformers_version": "4.57.0",
    "layer_types": ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(32)],
    "rope_scaling": {"attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1, "factor": 8.0,
                     "original_max_position_embeddings": 8192, "rope_type": "yarn"}}
GEMMA3_4B = {  # google/gemma-3-4b-it: the language model's config inside, the rest Gemma3TextConfig's defaults
    "architectures": ["Gemma3ForConditionalGeneration"], "boi_token_index": 255999, "eoi_token_index": 256000,
    "eos_token_id": [1, 106], "image_token_index": 262144, "initializer_range": 0.02, "mm_tokens_per_image": 256,
    "model_type": "gemma3", "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "text_config": {"hidden_size": 2560, "intermediate_size": 10240, "model_type": "gemma3_text",
                    "num_hidden_layers": 34, "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
                    "sliding_window": 1024},
    "vision_config": {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14, "vision_use_head": False}}
MISTRAL_SMALL_31 = {  # mistralai/Mistral-Small-3.1-24B-Instruct-2503 (no tie_word_embeddings: its own LM head)
    "architectures": ["Mistral3ForConditionalGeneration"], "image_token_index": 10, "model_type": "mistral3",
    "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
    "text_config": {"attention_dropout": 0.0, "head_dim": 128, "hidden_act": "silu", "hidden_size": 5120,
                    "initializer_range": 0.02, "intermediate_size": 32768, "max_position_embeddings": 131072,
                    "model_type": "mistral", "num_attention_heads": 32, "num_hidden_layers": 40,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 1000000000.0, "sliding_window": None,
                    "use_cache": True, "vocab_size": 131072},
    "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0",
    "vision_config": {"head_dim": 64, "hidden_act": "silu", "hidden_size": 1024, "image_size": 1540,
                      "intermediate_size": 4096, "model_type": "pixtral", "num_attention_heads": 16,
                      "num_channels": 3, "num_hidden_layers": 24, "patch_size": 14, "rope_theta": 10000.0},
    "vision_feature_layer": -1}

MINISTRAL_3_8B = {  # mistralai/Ministral-3-8B-Instruct-2512-BF16 (vision_config shortened): a ministral3 inside
    "architectures": ["Mistral3ForConditionalGeneration"], "image_token_index": 10, "model_type": "mistral3",
    "multimodal_projector_bias": False, "projector_hidden_act": "gelu", "spatial_merge_size": 2,
    "text_config": {"head_dim": 128, "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
                    "max_position_embeddings": 262144, "model_type": "ministral3", "num_attention_heads": 32,
                    "num_hidden_layers": 34, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                    "rope_parameters": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 16.0,
                                        "llama_4_scaling_beta": 0.1, "mscale": 1.0, "mscale_all_dim": 1.0,
                                        "original_max_position_embeddings": 16384, "rope_theta": 1000000.0,
                                        "rope_type": "yarn", "type": "yarn"},
                    "sliding_window": None, "use_cache": True, "vocab_size": 131072},
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "5.0.0.dev0",
    "vision_config": {"head_dim": 64, "hidden_act": "silu", "hidden_size": 1024, "image_size": 1540,
                      "intermediate_size": 4096, "model_type": "pixtral", "num_attention_heads": 16,
                      "num_hidden_layers": 24, "patch_size": 14, "rope_theta": 10000.0},
    "vision_feature_layer": -1}

# a model small enough to run in milliseconds, in each layout
SMALL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "hidden_size": 64,
         "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
         "vocab_size": 96, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": False}


def parse(data: dict) -> ModelConfig:
    return ModelConfig.from_hf_dict(data, "m", source="config.json")


@pytest.mark.parametrize("data, theta, kv_heads, window", [
    (LLAMA2_4X, 10000.0, 32, None), (LLAMA3_4X, 500000.0, 8, None), (LLAMA3_5X, 500000.0, 8, None),
    (TINYLLAMA, 10000.0, 4, None), (MISTRAL_V01, 10000.0, 8, 4096), (MISTRAL_V02, 1000000.0, 8, None),
    (QWEN2, 1000000.0, 2, None), (SMOLLM2, 100000.0, 3, None), (QWEN3, 1000000.0, 8, None),
    (PHI3_MINI, 10000.0, 32, 2047), (PHI4, 250000.0, 10, None), (GRANITE, 5000000.0, 8, None),
    (R1_DISTILL_QWEN, 10000.0, 2, None), (GEMMA_2B, 10000.0, 1, None), (GEMMA3_1B, 1000000.0, 1, 512),
    (SMOLLM3_3B, 5000000.0, 4, None), (GEMMA2_2B, 10000.0, 4, 4096), (OLMO2_1B, 500000.0, 16, None),
    (OLMO3_7B, 500000.0, 32, 4096),
], ids=["llama2", "llama3-4.x", "llama3-5.x", "tinyllama", "mistral-v0.1", "mistral-v0.2", "qwen2", "smollm2",
        "qwen3", "phi-3-mini", "phi-4", "granite-3.1", "r1-distill-qwen", "gemma-2b", "gemma-3-1b", "smollm3-3b",
        "gemma-2-2b", "olmo-2-1b", "olmo-3-7b"])
def test_supported_checkpoints_parse_with_their_rope_theta(data, theta, kv_heads, window):
    config = parse(data)
    assert config.rope_theta == theta and config.num_key_value_heads == kv_heads
    assert config.sliding_window == window
    assert config.head_dim == data.get("head_dim", data["hidden_size"] // data["num_attention_heads"])
    assert config.qk_norm == (data["model_type"] in ("qwen3", "gemma3_text", "olmo2", "olmo3"))
    assert config.attn_softcap == data.get("attn_logit_softcapping")
    assert config.max_position_embeddings == data["max_position_embeddings"]
    assert parse(config.to_hf_dict()) == config  # what the reference worker receives parses back the same


@pytest.mark.parametrize("data, rope_type, scaling", [
    (LLAMA31_4X, "llama3", _LLAMA3_SCALING), (LLAMA31_5X, "llama3", _LLAMA3_SCALING),
    (LLAMA32_5X, "llama3", {**_LLAMA3_SCALING, "factor": 32.0}),
    ({**LLAMA2_4X, "rope_scaling": {"type": "linear", "factor": 2}}, "linear", {"factor": 2.0}),
    ({**LLAMA3_5X, "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}}, "linear",
     {"factor": 4.0}),
    ({**LLAMA3_4X, "rope_scaling": {"rope_type": "default"}}, "default", {}),
], ids=["llama3.1-4.x", "llama3.1-5.x", "llama3.2-5.x", "linear-4.x", "linear-5.x", "default-4.x"])
def test_rope_scaling_of_both_layouts_is_read(data, rope_type, scaling):
    config = parse(data)
    assert config.rope_type == rope_type and config.rope_scaling == scaling
    theta = data.get("rope_theta") or data.get("rope_parameters", {}).get("rope_theta", 10000.0)
    assert config.rope_theta == theta
    assert parse(config.to_hf_dict()) == config  # the reference worker's copy parses back the same
    rope = {c.role: c for c in prefill_calls(config, 16)}["rope_k"].spec
    want = {"theta": theta} if rope_type == "default" else {"theta": theta, "rope_type": rope_type, **scaling}
    assert rope.attr == canonical_attrs("rope", want)  # theta 10000.0, the default, is left out of the key
    assert all(type(v) is type(want[k]) for k, v in rope.attr.items())  # 2 and 2.0 name one kernel


def test_a_default_rope_keeps_the_kernel_attributes_of_older_records():
    """Older records name a default rope by its theta alone (10000.0 left out: the default)."""
    for data in (LLAMA2_4X, LLAMA3_5X, {**LLAMA3_4X, "rope_scaling": {"rope_type": "default"}}):
        theta = parse(data).rope_theta
        for call in prefill_calls(parse(data), 16):
            if call.spec.op == "rope":
                assert call.spec.attrs == ((("theta", theta),) if theta != 10000.0 else ())


def test_rope_theta_of_both_layouts_reaches_the_rope_kernel_and_the_reference():
    default = parse(SMALL)
    v5 = parse({**SMALL, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}})
    v4 = parse({**SMALL, "rope_theta": 500000.0, "rope_scaling": None})
    assert (default.rope_theta, v5.rope_theta, v4.rope_theta) == (10000.0, 500000.0, 500000.0)
    for config in (v4, v5):
        rope = {c.role: c for c in prefill_calls(config, 16)}["rope_q"]
        assert rope.spec.attr["theta"] == 500000.0
    prompts = np.random.default_rng(0).integers(0, SMALL["vocab_size"], (1, 12))
    logits = {name: ReferenceModel(config, ModelWeights.random(config, seed=1)).generate(prompts, 3).logits
              for name, config in (("default", default), ("v5", v5), ("v4", v4))}
    np.testing.assert_array_equal(logits["v5"], logits["v4"])
    assert np.abs(logits["v5"] - logits["default"]).max() > 1e-3 * np.abs(logits["default"]).max()


def test_the_compiled_rope_kernel_rotates_with_the_parsed_theta():
    from export import TunedKernels

    config = parse({**SMALL, "rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}})
    spec = {c.role: c for c in prefill_calls(config, 8)}["rope_q"].spec
    x = np.random.default_rng(2).standard_normal((8, config.q_size)).astype(np.float32)
    positions = np.arange(100, 108, dtype=np.int32)  # far enough for the two thetas to differ clearly
    y = np.zeros_like(x)
    with TunedKernels.defaults() as kernels:
        kernels.get(spec.op, spec.dims, spec.dtype, spec.attr, spec.dynamic).bind(
            {"X": x, "P": positions, "Y": y}, {"T": 8})()
    heads = x.reshape(8, config.num_attention_heads, config.head_dim)
    want = rotate(heads, positions, 500000.0).reshape(8, -1)
    wrong = rotate(heads, positions, 10000.0).reshape(8, -1)
    assert np.abs(y - want).max() < 1e-4 < np.abs(y - wrong).max()


@pytest.mark.parametrize("data, message", [
    (DYNAMIC_5X, "rope scaling 'dynamic' (rope_parameters.rope_type) is not implemented; supported: default, linear, "
                 "llama3, yarn"),
    ({**LLAMA2_4X, "rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope scaling 'dynamic' (rope_scaling.type)"),
    ({**LLAMA2_4X, "rope_scaling": {"type": "linear"}},
     "rope_scaling.factor is missing: rope type 'linear' needs factor"),
    ({**LLAMA2_4X, "rope_scaling": {"type": "linear", "factor": 0}}, "rope_scaling.factor = 0.0 is not a positive"),
    ({**LLAMA2_4X, "rope_scaling": {"type": "linear", "factor": "2"}}, "rope_scaling.factor = '2' is not a positive"),
    ({**LLAMA31_5X, "rope_parameters": {**LLAMA31_5X["rope_parameters"], "high_freq_factor": 1.0}},
     "rope_parameters.low_freq_factor = 1.0 is not below high_freq_factor = 1.0"),
    ({**LLAMA31_4X, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
     "rope_scaling.low_freq_factor is missing: rope type 'llama3' needs factor, low_freq_factor"),
    ({**LLAMA31_4X, "rope_scaling": {**LLAMA31_4X["rope_scaling"], "original_max_position_embeddings": 8192.5}},
     "rope_scaling.original_max_position_embeddings = 8192.5 is not a positive integer"),
    ({**LLAMA31_4X, "rope_scaling": {**LLAMA31_4X["rope_scaling"], "attention_factor": 1.0}},
     "rope_scaling.attention_factor = 1.0 is not implemented for rope type 'llama3'"),
    ({**LLAMA2_4X, "rope_scaling": {"type": "linear", "factor": 2.0},
      "rope_parameters": {"rope_type": "linear", "factor": 4.0}}, "rope_scaling = {\"type\": \"linear\", "),
    ({**LLAMA2_4X, "rope_scaling": {"type": "linear", "rope_type": "llama3", "factor": 2.0}},
     "rope_scaling.rope_type and rope_scaling.type disagree"),
    ({**LLAMA3_4X, "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 32}},
     "rope_scaling.beta_fast = 1.0 is below beta_slow = 32.0"),
    ({**LLAMA3_5X, "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope scaling 'longrope'"),
    ({**LLAMA3_5X, "rope_parameters": {"rope_type": "something-new", "rope_theta": 1e4}}, "'something-new'"),
    ({**LLAMA2_4X, "rope_scaling": {"factor": 2.0}}, "rope_scaling = {\"factor\": 2.0} names no rope type"),
    ({**LLAMA3_5X, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}},
     "rope_parameters.partial_rotary_factor = 0.5 is implemented for Phi-3, GLM-4 and GLM-4.5 (model_type 'phi3', "
     "'glm4', 'glm4_moe') only"),
    ({**LLAMA3_4X, "rope_parameters": {"rope_theta": 10000.0}}, "rope_theta = 500000 and rope_parameters.rope_theta"),
    ({**QWEN2, "use_sliding_window": True, "max_window_layers": 12, "rope_scaling": {"rope_type": "linear",
                                                                                    "factor": 2.0}},
     "rope scaling 'linear' with a sliding window in some layers is not implemented"),
    ({**QWEN2, "layer_types": ["full_attention"] * 23 + ["sliding_attention"]}, "layer_types = [\"full_attention\""),
    ({**QWEN2, "layer_types": ["full_attention"]}, "layer_types = [\"full_attention\"] is not implemented"),
    ({**QWEN2, "model_type": "llama"}, "and model_type = 'llama' name different families"),
    ({**LLAMA2_4X, "max_window_layers": 28}, "max_window_layers = 28 is a Qwen field, not implemented for "
                                             "model_type 'llama'"),
    ({**GEMMA2_2B, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope scaling 'linear' with a sliding window in some layers is not implemented"),
    ({**GEMMA3_1B, "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3"},
     "unknown field attention_bias = false of Gemma3ForConditionalGeneration is refused"),
    ({"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": None},
     "text_config = null is not an object (the language model's config)"),
    ({**GEMMA3_4B, "text_config": {**GEMMA3_4B["text_config"], "model_type": "gemma2"}},
     "text_config names 'gemma2'; Gemma3ForConditionalGeneration's language model is a gemma3_text"),
    ({**GEMMA3_4B, "text_config": {**GEMMA3_4B["text_config"], "rope_interleaved": True}},
     "config.json: text_config: rope_interleaved = true"),
    ({**GEMMA2_2B, "attn_logit_softcapping": 0}, "attn_logit_softcapping = 0 is not a positive finite number"),
    ({**GEMMA2_2B, "final_logit_softcapping": "30"}, "final_logit_softcapping = '30' is not a number"),
    ({**GEMMA3_1B, "use_bidirectional_attention": True}, "use_bidirectional_attention = true (EmbeddingGemma's)"),
    ({**GEMMA3_1B, "hidden_activation": "gelu"}, "hidden_activation 'gelu' is not implemented; supported: "
                                                 "gelu_pytorch_tanh"),
    ({**GEMMA_2B, "hidden_act": "silu"}, "hidden_act 'silu' is not implemented; supported: gelu_pytorch_tanh, gelu"),
    ({**GEMMA_2B, "query_pre_attn_scalar": 256}, "query_pre_attn_scalar = 256 is a Gemma 2 / 3 field, not implemented "
                                                 "for model_type 'gemma'"),
    ({**LLAMA3_4X, "rope_local_base_freq": 10000}, "rope_local_base_freq = 10000 is a Gemma 2 / 3 field"),
    ({**LLAMA3_4X, "no_rope_layer_interval": 4}, "no_rope_layer_interval = 4 is a SmolLM3 field, not implemented for "
                                                 "model_type 'llama'"),
    ({**SMOLLM3_3B, "no_rope_layers": [1] * 35}, "no_rope_layers = [1, 1, "),
    ({**SMOLLM3_3B, "no_rope_layers": None, "no_rope_layer_interval": 0}, "no_rope_layer_interval = 0 is not"),
    ({**SMOLLM3_3B, "use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window = true"),
    ({**SMOLLM3_3B, "use_mrope": False}, "use_mrope = false is a Qwen field, not implemented for model_type "
                                         "'smollm3'"),
    ({**GEMMA3_1B, "layer_types": ["sliding_attention"] * 25 + ["chunked_attention"]}, "layer_types = "),
    ({**GEMMA3_1B, "sliding_window_pattern": 0}, "sliding_window_pattern = 0 is not one positive integer"),
    ({**GEMMA3_1B, "sliding_window_pattern": [6]}, "sliding_window_pattern = [6] is not one positive integer"),
    ({**GEMMA3_1B, "_sliding_window_pattern": 4}, "sliding_window_pattern = 6 and _sliding_window_pattern = 4 "
                                                  "disagree"),
    ({**GEMMA3_1B, "num_hidden_layers": 10 ** 30}, "num_hidden_layers = 1000000000000000000000000000000 is more "
                                                    "than 100000 layers"),
    ({**GEMMA3_1B, "rope_scaling": None, "rope_theta": None, "rope_local_base_freq": None,
      "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "a scaled rope in the sliding layers is not implemented"),
    ({**GEMMA3_1B, "rope_scaling": None, "rope_parameters": {"global": {"rope_theta": 1e6},
                                                              "sliding_attention": {"rope_theta": 1e4}}},
     "rope_parameters.global is not a layer kind"),
    ({**LLAMA2_4X, "architectures": ["LlamaForSequenceClassification"]},
     "architectures 'LlamaForSequenceClassification'"),
    ({**MISTRAL_V01, "attention_bias": True}, "attention_bias = true is not read by transformers for model_type "
                                              "'mistral'"),
    ({**QWEN2, "mlp_bias": True}, "mlp_bias = true is not read by transformers for model_type 'qwen2'"),
    ({**QWEN3, "mlp_bias": True}, "mlp_bias = true is not read by transformers for model_type 'qwen3'"),
    ({**QWEN3, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": -1},
     "max_window_layers = -1 is not a layer index"),
    ({**PHI3_MINI, "auto_map": {"AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}},
     "names the repository's own model code, which may compute something else and which this runtime cannot "
     "check; a copy of the config.json without auto_map runs as transformers' Phi3ForCausalLM"),
    ({**PHI4, "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}},
     "rope_scaling.short_factor has length 1; 128 rotary dims make 64 rotary pairs, one factor each"),
    ({**LLAMA3_5X, "partial_rotary_factor": 0.75},
     "partial_rotary_factor = 0.75 is implemented for Phi-3, GLM-4 and GLM-4.5 (model_type 'phi3', 'glm4', "
     "'glm4_moe') only: transformers' LlamaForCausalLM does not apply it"),
    ({**LLAMA3_4X, "original_max_position_embeddings": 8192}, "original_max_position_embeddings = 8192 at the "
                                                              "top level is a Phi-3 field"),
    ({**PHI4, "original_max_position_embeddings": "4k"}, "original_max_position_embeddings = '4k' is not a "
                                                         "positive integer"),
    ({**R1_DISTILL_QWEN, "use_mrope": True}, "use_mrope = true (Qwen2-VL's multimodal rotary embedding) is not "
                                             "implemented"),
    ({**LLAMA3_4X, "use_mrope": False}, "use_mrope = false is a Qwen field, not implemented for model_type 'llama'"),
    ({**LLAMA3_4X, "logits_scaling": 8.0}, "logits_scaling = 8.0 is a Granite field, not implemented for "
                                           "model_type 'llama'"),
    ({**GRANITE, "residual_multiplier": 0}, "residual_multiplier = 0 is not a positive finite number"),
    ({**GRANITE, "attention_multiplier": None}, "attention_multiplier = null is not a positive finite number"),
    ({**TINYLLAMA, "attention_bias": "yes"}, "attention_bias = 'yes' is not true or false"),
    ({**LLAMA2_4X, "hidden_act": "gelu"}, "hidden_act 'gelu' is not implemented; supported: silu, swish"),
    ({**LLAMA2_4X, "pretraining_tp": 2}, "pretraining_tp = 2"),
    ({**SMOLLM2, "rope_interleaved": True}, "rope_interleaved = true (rotary pairs of adjacent dims) is not implemented"),
    ({**SMOLLM2, "rope_interleaved": "no"}, "rope_interleaved = 'no' is not true or false"),
    ({**LLAMA2_4X, "rms_norm_eps": None}, "rms_norm_eps = null is not a positive finite number"),
    ({**LLAMA2_4X, "quantization_config": {"quant_method": "bitsandbytes", "load_in_4bit": True}},
     "quantization_config.quant_method = 'bitsandbytes' is not implemented; supported: gptq"),
    ({**LLAMA2_4X, "auto_map": {"AutoModelForCausalLM": "x.Y"}}, "auto_map = {\"AutoModelForCausalLM\": \"x.Y\"} names"),
    ({**MISTRAL_V01, "sliding_window": -1}, "sliding_window = -1"),
    ({**LLAMA2_4X, "rope_theta": "10000"}, "rope_theta = '10000' is not a number"),
    ({**LLAMA2_4X, "rope_theta": float("inf")}, "rope_theta = Infinity is not a positive finite number"),
    ({**LLAMA3_5X, "rope_parameters": {"rope_type": "default", "rope_theta": float("inf")}},
     "rope_parameters.rope_theta = Infinity is not a positive finite number"),
    ({**LLAMA2_4X, "rope_theta": 0}, "rope_theta = 0 is not a positive finite number"),
    ({**LLAMA2_4X, "rms_norm_eps": float("inf")}, "rms_norm_eps = Infinity is not a positive finite number"),
    ({**LLAMA2_4X, "rms_norm_eps": float("nan")}, "rms_norm_eps = NaN is not a positive finite number"),
], ids=["dynamic-5.x", "dynamic", "linear-no-factor", "linear-zero", "linear-string", "llama3-band", "llama3-missing",
        "llama3-context", "llama3-extra", "layouts-disagree", "types-disagree", "yarn-betas", "longrope", "unknown-rope",
        "untyped-scaling", "partial-rotary", "thetas-disagree", "qwen2-window", "qwen2-layer-types",
        "qwen2-layer-count", "families-disagree", "qwen2-field", "gemma2-rope-scaling", "gemma3-multimodal",
        "multimodal-no-text", "multimodal-other-text", "multimodal-text-field",
        "gemma2-zero-cap", "gemma2-string-cap", "gemma3-bidirectional", "gemma3-erf-gelu", "gemma-silu", "gemma3-field-in-gemma",
        "gemma3-field-in-llama", "smollm3-field-in-llama", "smollm3-short-list", "smollm3-interval",
        "smollm3-window", "smollm3-mrope", "gemma3-layer-kind", "gemma3-pattern", "gemma3-pattern-list", "gemma3-patterns-disagree",
        "gemma3-too-many-layers", "gemma3-local-scaling", "gemma3-rope-key",
        "classifier", "mistral-bias",
        "qwen2-mlp-bias", "qwen3-mlp-bias", "qwen3-window", "phi3-auto-map", "phi3-longrope", "llama-partial",
        "phi3-field", "phi3-bad-context", "mrope", "mrope-field", "granite-field", "granite-zero", "granite-null", "bias-not-a-flag", "gelu", "pretraining-tp", "rope-interleaved", "rope-interleaved-not-a-flag", "eps-null", "quantized", "custom-code", "bad-window",
        "theta-string", "theta-infinite", "nested-theta-infinite", "theta-zero", "eps-infinite", "eps-nan"])
def test_a_field_that_is_not_implemented_is_refused_by_name(data, message):
    with pytest.raises(ValueError) as caught:
        parse(data)
    text = str(caught.value)
    assert text.startswith("config.json: ") and message in text and "\n" not in text, text


@pytest.mark.parametrize("field", ["num_key_value_heads", "head_dim"])
def test_a_zero_count_is_refused_not_replaced_by_its_default(field):
    # before: `data.get(field) or default` ran a model of 0 KV heads (or head_dim 0) as the default
    with pytest.raises(ValueError, match=rf"^model m: {field} must be a positive integer, got 0$"):
        parse({**SMALL, field: 0})


@pytest.mark.parametrize("value", ["4096", None, [64], 64.0])
def test_a_hidden_size_that_is_no_count_is_refused_by_name(value):
    """From Python too (the CLI's loader caught the TypeError that dividing it by the heads raised)."""
    with pytest.raises(ValueError, match=r"^model m: hidden_size must be a positive integer, got "):
        parse({**SMALL, "hidden_size": value})


def test_null_counts_take_the_defaults_as_in_transformers():
    config = parse({**SMALL, "num_key_value_heads": None, "head_dim": None})
    assert (config.num_key_value_heads, config.head_dim) == (4, 16)


@pytest.mark.parametrize("family, name, heads", [("llama", "LlamaForCausalLM", 4), ("mistral", "MistralForCausalLM", 16),
                                                 ("qwen2", "Qwen2ForCausalLM", 32), ("qwen3", "Qwen3ForCausalLM", 32),
                                                 ("phi3", "Phi3ForCausalLM", 8), ("granite", "GraniteForCausalLM", 8)])
def test_absent_fields_take_the_defaults_transformers_gives_them(family, name, heads):
    """A config.json may leave out what its family's config class defaults: the model must then
    be the one transformers builds from the same file (rms_norm_eps was 1e-5 here, 1e-6 there;
    Mistral's KV heads default to 8 and Qwen2's to 32, not to one per query head)."""
    import transformers

    data = {k: v for k, v in SMALL.items() if k not in ("rms_norm_eps", "num_key_value_heads")}
    data.update(architectures=[name], model_type=family, num_attention_heads=heads, hidden_size=256)
    theirs = transformers.AutoConfig.for_model(family, **{k: v for k, v in data.items() if k != "model_type"})
    ours = parse(data)
    assert ours.rms_norm_eps == theirs.rms_norm_eps
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    assert ours.rope_theta == theirs.rope_parameters["rope_theta"]
    # Mistral's window is 4096 unless said; Qwen2's is off unless use_sliding_window; Llama has none
    window = getattr(theirs, "sliding_window", None) if getattr(theirs, "use_sliding_window", True) else None
    assert ours.sliding_window == window and (family != "mistral" or window == 4096)
    assert ours.max_position_embeddings == theirs.max_position_embeddings
    # as the attention modules read it
    assert ours.head_dim == getattr(theirs, "head_dim", theirs.hidden_size // theirs.num_attention_heads)
    assert ours.head_dim == (128 if family == "qwen3" else 256 // heads)  # Qwen3Config's, whatever the sizes


@pytest.mark.parametrize("field, value", [("embedding_multiplier", "2"), ("rms_norm_eps", None),
                                          ("attention_multiplier", "0.1"), ("logits_scaling", True),
                                          ("qk_norm", "no"), ("tie_word_embeddings", 1), ("mlp_bias", None)])
def test_a_model_config_refuses_a_scalar_that_is_no_number(field, value):
    """From Python too: a str, None or a bool was a TypeError (or taken as 1) there, and a flag
    given as "no" read as true."""
    kind = "true or false" if field in ("qk_norm", "tie_word_embeddings", "mlp_bias") else "a positive finite number"
    with pytest.raises(ValueError, match=rf"^model tiny: {field} must be {kind}, got "):
        dataclasses.replace(PRESETS["tiny"], **{field: value})


@pytest.mark.parametrize("field", ["rms_norm_eps", "rope_theta"])
def test_a_model_config_refuses_an_infinite_float(field):
    with pytest.raises(ValueError, match=rf"^model tiny: {field} must be a positive finite number, got inf$"):
        dataclasses.replace(PRESETS["tiny"], **{field: float("inf")})


def test_harmless_fields_are_accepted_and_attention_dropout_too():
    config = parse({**LLAMA2_4X, "attention_dropout": 0.1, "pad_token_id": 0, "dtype": "float32",
                    "unsloth_version": "2025.3.19",
                    "use_cache": False, "initializer_range": 0.5, "head_dim": None, "num_key_value_heads": None,
                    "hidden_act": "swish", "attention_bias": False, "mlp_bias": False})
    assert config.num_key_value_heads == 32 and config.head_dim == 128


@pytest.mark.parametrize("data, biases", [
    (QWEN2, (True, False, False)), ({**QWEN2, "attention_bias": False}, (True, False, False)),
    ({**TINYLLAMA, "attention_bias": True}, (True, True, False)),
    ({**LLAMA3_5X, "mlp_bias": True}, (False, False, True)),
    ({**LLAMA3_5X, "attention_bias": True, "mlp_bias": True}, (True, True, True)),
    ({**LLAMA2_4X, "attention_bias": None}, (False, False, False)),
    (QWEN3, (False, False, False)), ({**QWEN3, "attention_bias": True}, (True, True, False)),
], ids=["qwen2", "qwen2-attention-bias-false", "llama-attention", "llama-mlp", "llama-both", "null", "qwen3",
        "qwen3-attention-bias"])
def test_projection_biases_are_read_per_family(data, biases):
    config = parse(data)
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == biases
    assert parse(config.to_hf_dict()) == config
    calls = [c.role for c in prefill_calls(config, 16) if c.spec.op == "bias_add"]
    assert calls == [r for r, on in zip(("qkv_bias", "o_bias", "gate_up_bias", "down_bias"),
                                        (biases[0], biases[1], biases[2], biases[2])) if on]


def test_bias_combinations_of_no_family_cannot_be_written_as_a_config():
    base = parse(SMALL)
    for flags, named in ((dict(o_bias=True, sliding_window=8), "biases on q/k/v and o apart .Seed-OSS. with a "
                                                               "sliding window"),
                         (dict(qkv_bias=True, o_bias=True, sliding_window=8, local_layers=(1,), local_rope_theta=1e4),
                          "in some layers only with biases on every attention projection")):
        with pytest.raises(ValueError, match=named):
            dataclasses.replace(base, **flags).to_hf_dict()
    # q/k/v and o biases apart: Seed-OSS's (q/k/v alone: Qwen2's)
    for flags in (dict(o_bias=True), dict(qkv_bias=True, mlp_bias=True)):
        seed = dataclasses.replace(base, **flags)
        assert seed.to_hf_dict()["model_type"] == "seed_oss" and parse(seed.to_hf_dict()) == seed
    release = parse({**SMALL, "architectures": ["SeedOssForCausalLM"], "model_type": "seed_oss",
                     "residual_dropout": 0.1})  # Seed-OSS-36B's switches: attention_bias true, the others false
    assert (release.qkv_bias, release.o_bias, release.mlp_bias) == (True, False, False)
    with pytest.raises(ValueError, match="attention_out_bias = true is a Seed-OSS field, not implemented for "
                                         "model_type 'llama'"):
        parse({**SMALL, "attention_out_bias": True})
    # a window in some layers without biases: Ministral's
    ministral = dataclasses.replace(base, sliding_window=8, local_layers=(1,), local_rope_theta=base.rope_theta)
    assert ministral.to_hf_dict()["model_type"] == "ministral" and parse(ministral.to_hf_dict()) == ministral
    qwen2 = dataclasses.replace(base, qkv_bias=True, sliding_window=8)  # Qwen2's window, on in every layer
    assert parse(qwen2.to_hf_dict()) == qwen2 and qwen2.to_hf_dict()["use_sliding_window"]
    windowed = dataclasses.replace(base, qkv_bias=True, o_bias=True, sliding_window=8)
    assert parse(windowed.to_hf_dict()) == windowed  # Llama's biases, the window enforced as Mistral's


def test_qwen3_plans_a_norm_of_the_query_and_key_heads_after_their_projection():
    config = parse({**QWEN3, "attention_bias": True})
    for calls in (prefill_calls(config, 16), decode_calls(config, 1, 64), decode_calls(config, 4, 64, resident=True)):
        roles = [c.role for c in calls]
        assert roles.index("qkv_bias") < roles.index("qk_norm")
        norm = calls[roles.index("qk_norm")].spec
        assert norm.dims == {"T": calls[roles.index("qkv_proj")].spec.dims["M"], "H": 16, "HKV": 8, "D": 128}
        assert norm.attr == {"eps": 1e-6} or norm.attr == {}  # 1e-6, the default, may be left out of the key
    assert "qk_norm" not in [c.role for c in prefill_calls(parse(QWEN2), 16)]
    unbiased = dataclasses.replace(config, qkv_bias=False, o_bias=False)
    assert parse(unbiased.to_hf_dict()) == unbiased and unbiased.to_hf_dict()["model_type"] == "qwen3"


def test_the_qwen3_8b_preset_is_the_checkpoints_config():
    """Qwen/Qwen3-8B's config.json (the 0.6B one's fields with the 8B's sizes) parses to the preset."""
    data = {**QWEN3, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "max_window_layers": 36, "tie_word_embeddings": False}
    assert dataclasses.replace(parse(data), name="qwen3-8b") == PRESETS["qwen3-8b"]
    assert 8.1e9 < PRESETS["qwen3-8b"].parameters < 8.3e9  # 8.2B, as the model card says


def test_granites_scalars_are_read_and_written_back_and_scale_every_attention_kernel():
    config = parse(GRANITE)
    assert (config.embedding_multiplier, config.residual_multiplier, config.attention_multiplier,
            config.logits_scaling, config.scaled) == (12.0, 0.22, 0.015625, 8.0, True)
    assert parse(config.to_hf_dict()) == config and config.to_hf_dict()["model_type"] == "granite"
    resident = decode_calls(config, 1, 64, resident=True)
    for calls in (prefill_calls(config, 16), decode_calls(config, 2, 64), resident):
        attention = next(c for c in calls if c.role == "attention").spec
        assert attention.attr["scale"] == 0.015625, attention
    assert next(c for c in resident if c.role == "attention").spec.op == "rope_append_attention"
    # left out: GraniteConfig's 1.0 each, the attention one too (not 1/sqrt(head_dim))
    bare = parse({k: v for k, v in GRANITE.items() if k not in ("embedding_multiplier", "residual_multiplier",
                                                               "attention_multiplier", "logits_scaling")})
    assert (bare.attention_scale, bare.scaled) == (1.0, False)
    assert parse(LLAMA3_4X).attention_scale == 128 ** -0.5


def test_gemmas_are_read_written_back_and_planned_with_their_kernels():
    gemma, gemma3 = parse(GEMMA_2B), parse(GEMMA3_1B)
    for config in (gemma, gemma3):
        assert (config.activation, config.offset_norms, config.tie_word_embeddings, config.head_dim) == (
            "gelu_tanh", True, True, 256)
        assert config.embedding_multiplier == config.hidden_size ** 0.5 and config.scaled
        assert parse(config.to_hf_dict()) == config
    assert gemma.to_hf_dict()["model_type"] == "gemma" and not (gemma.post_norms or gemma.qk_norm or gemma.split_rope)
    assert (gemma3.post_norms, gemma3.qk_norm, gemma3.attention_scale) == (True, True, 1 / 16)
    assert gemma3.local_layers == tuple(i for i in range(26) if (i + 1) % 6)  # layers 5, 11, 17, 23 are global
    assert gemma3.layer_rope_attrs(0) == {"theta": 10000.0} and gemma3.layer_rope_attrs(5) == {"theta": 1e6}
    assert 0.99e9 < gemma3.parameters < 1.01e9  # Gemma 3 1B
    for calls in (prefill_calls(gemma3, 16), decode_calls(gemma3, 1, 64), decode_calls(gemma3, 4, 64, resident=True)):
        roles = {c.role: c for c in calls}
        assert "geglu" in roles and "swiglu" not in roles and roles["post_norm"].count == 2 * 26
        ropes = [(c, c.spec.attr.get("theta", 1e4)) for c in calls if c.spec.op in ("rope", "rope_append")]
        assert {theta for _, theta in ropes} == {1e4, 1e6}  # 1e4, the default, may be left out of the key
        assert sum(c.count for c, theta in ropes if theta == 1e4) == 22 * len(ropes) // 2
        assert all(c.role.endswith("_local") == (theta == 1e4) for c, theta in ropes)
    resident = decode_calls(gemma, 1, 64, resident=True)  # no fused norms: the GEMVs know SwiGLU only
    assert "first_norm" in {c.role for c in resident} and "geglu" in {c.role for c in resident}


def test_smollm3_is_read_written_back_and_planned_without_rope_in_its_nope_layers():
    config = parse(SMOLLM3_3B)
    assert config.nope_layers == tuple(range(3, 36, 4)) and config.tie_word_embeddings
    assert parse(config.to_hf_dict()) == config and config.to_hf_dict()["model_type"] == "smollm3"
    bare = parse({k: v for k, v in SMOLLM3_3B.items() if k not in ("no_rope_layers", "rope_theta")})
    assert bare.nope_layers == config.nope_layers and bare.rope_theta == 2e6  # SmolLM3Config's defaults
    for calls in (prefill_calls(config, 16), decode_calls(config, 1, 64), decode_calls(config, 4, 64, resident=True)):
        rotating = [c for c in calls if c.spec.op in ("rope", "rope_append")]
        assert rotating and all(c.count == 27 for c in rotating)  # 36 layers, 9 without
    resident = {c.role: c for c in decode_calls(config, 1, 64, resident=True)}
    assert resident["kv_append"].count == 9 and "first_norm" in resident  # no fused norms: attention rotates


def test_olmo2_is_read_written_back_and_planned_with_norms_after_its_sublayers():
    config = parse(OLMO2_1B)
    assert (config.pre_norms, config.post_norms, config.qk_norm, config.qk_norm_span) == (False, True, True, "projection")
    assert round(config.parameters / 1e6) == 1485  # OLMo-2-0425-1B's 1.48 B weights
    assert parse(config.to_hf_dict()) == config and config.to_hf_dict()["model_type"] == "olmo2"
    bare = parse({k: v for k, v in OLMO2_1B.items() if k not in ("rms_norm_eps", "rope_theta", "max_position_embeddings")})
    assert (bare.rms_norm_eps, bare.rope_theta, bare.max_position_embeddings) == (1e-5, 10000.0, 2048)  # Olmo2Config's
    for calls in (prefill_calls(config, 16), decode_calls(config, 1, 64), decode_calls(config, 1, 64, resident=True)):
        roles = {c.role: c for c in calls}
        assert not {"first_norm", "residual_norm"} & set(roles)  # no input norms
        assert roles["post_norm"].count == roles["residual_add"].count == 32 and roles["final_norm"].count == 1
        assert roles["qk_norm"].spec.attr["span"] == "projection"
    with pytest.raises(ValueError, match="mlp_bias = true is not read by transformers for model_type 'olmo2'"):
        parse({**OLMO2_1B, "mlp_bias": True})
    with pytest.raises(ValueError, match="no OLMo 2's"):  # OLMo 2's norms with Gemma's GeGLU
        dataclasses.replace(config, activation="gelu_tanh").to_hf_dict()
    with pytest.raises(ValueError, match="qk_norm_span 'projection' without qk_norm"):
        dataclasses.replace(config, qk_norm=False)
    with pytest.raises(ValueError, match="qk_norm_span must be one of head, projection"):
        dataclasses.replace(config, qk_norm_span="token")
    with pytest.raises(ValueError, match="pre_norms and post_norms both false"):
        dataclasses.replace(config, post_norms=False)


def test_yarn_is_read_with_transformers_defaults_and_written_back():
    import math

    config = parse(YARN_5X)
    assert (config.rope_type, config.rope_factor, config.rope_original_max_position_embeddings) == ("yarn", 4.0, 8192)
    assert (config.rope_beta_fast, config.rope_beta_slow, config.rope_truncate) == (32.0, 1.0, True)
    assert config.rope_attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)  # from the factor, not given
    assert parse(config.to_hf_dict()) == config
    assert config.rope_attrs["attention_factor"] == config.rope_attention_factor  # the rope kernels scale by it
    # DeepSeek's mscales: their ratio; the original context from max_position_embeddings where left out
    deepseek = parse({**LLAMA3_5X, "rope_parameters": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                                       "mscale_all_dim": 0.707, "rope_theta": 1e4}})
    assert deepseek.rope_attention_factor == 1.0 and deepseek.rope_original_max_position_embeddings == 8192
    with pytest.raises(ValueError, match="rope_parameters.factor is missing: rope type 'yarn' needs factor"):
        parse({**LLAMA3_5X, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(ValueError, match="rope_parameters.mscale = '1' is not a number"):
        parse({**LLAMA3_5X, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "mscale": "1", "rope_theta": 1e4}})


def test_olmo3_is_read_written_back_and_planned_with_windows_and_yarn_in_its_layer_kinds():
    config = parse(OLMO3_7B)
    assert config.local_layers == tuple(i for i in range(32) if (i + 1) % 4) and config.sliding_window == 4096
    assert config.local_rope_theta == config.rope_theta == 500000.0 and config.rope_type == "yarn"
    assert config.layer_rope_attrs(0) == {"theta": 500000.0} and config.layer_rope_attrs(3)["rope_type"] == "yarn"
    assert round(config.parameters / 1e9, 2) == 7.30
    assert parse(config.to_hf_dict()) == config and config.to_hf_dict()["model_type"] == "olmo3"
    assert parse({k: v for k, v in OLMO3_7B.items() if k != "layer_types"}) == config  # every fourth layer full
    plain = parse({k: v for k, v in OLMO3_7B.items() if k not in ("rope_scaling", "rope_theta")})
    assert plain.rope_theta == plain.local_rope_theta == 500000.0 and not plain.split_rope  # Olmo3Config's base
    calls = {c.role: c for c in prefill_calls(config, 8192)}
    assert calls["attention_local"].spec.attr["window"] == 4096 and calls["attention"].count == 8
    assert calls["rope_q_local"].count == 24 and calls["rope_q"].spec.attr["rope_type"] == "yarn"
    with pytest.raises(ValueError, match="sliding_window_pattern = 4 is a Gemma 2 / 3 field"):
        parse({**OLMO3_7B, "sliding_window_pattern": 4})


def test_the_multimodal_gemma3_is_read_as_its_language_model():
    config = parse(GEMMA3_4B)
    assert (config.multimodal, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        "gemma3", 2560, 34, 262208)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (8, 4, 256)
    assert (config.rope_type, config.rope_factor, config.rope_theta, config.local_rope_theta) == (
        "linear", 8.0, 1e6, 1e4)
    assert config.sliding_window == 1024 and len(config.local_layers) == 34 - 34 // 6 and config.tie_word_embeddings
    assert round(config.parameters / 1e9, 2) == 3.88  # Gemma 3 4B's language model (the vision tower aside)
    assert config.to_hf_dict()["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert parse(config.to_hf_dict()) == config


def test_the_multimodal_mistral3_is_read_as_its_language_model():
    config = parse(MISTRAL_SMALL_31)
    assert (config.multimodal, config.hidden_size, config.num_hidden_layers, config.vocab_size) == (
        "mistral3", 5120, 40, 131072)
    assert (config.num_key_value_heads, config.head_dim, config.rope_theta) == (8, 128, 1e9)
    assert config.sliding_window is None and not config.tie_word_embeddings
    assert round(config.parameters / 1e9, 2) == 23.57  # the language model of Mistral Small 3.1 24B
    assert config.to_hf_dict()["text_config"]["model_type"] == "mistral" and parse(config.to_hf_dict()) == config
    assert parse({**MISTRAL_SMALL_31, "tie_word_embeddings": True}).tie_word_embeddings
    with pytest.raises(ValueError, match="unknown field mm_tokens_per_image = 256 of Mistral3ForConditionalGeneration"):
        parse({**MISTRAL_SMALL_31, "mm_tokens_per_image": 256})  # a Gemma 3 field
    with pytest.raises(ValueError, match="text_config names 'llama'; Mistral3ForConditionalGeneration's language "
                                         "model is a mistral"):
        parse({**MISTRAL_SMALL_31, "text_config": {**MISTRAL_SMALL_31["text_config"], "model_type": "llama"}})


def test_ministral3_is_read_as_mistral3s_language_model_with_its_query_scaling_and_position_limit():
    config = parse(MINISTRAL_3_8B)
    assert (config.multimodal, config.hidden_size, config.num_hidden_layers, config.sliding_window) == (
        "mistral3", 4096, 34, None)
    assert (config.rope_type, config.rope_factor, config.rope_attention_factor) == ("yarn", 16.0, 1.0)  # the mscales
    assert config.query_scale_beta == 0.1 and config.position_limit == 16384
    assert config.to_hf_dict()["text_config"]["model_type"] == "ministral3" and parse(config.to_hf_dict()) == config
    text = dict(MINISTRAL_3_8B["text_config"], architectures=["Ministral3ForCausalLM"])
    alone = parse(text)
    assert alone == dataclasses.replace(config, multimodal=None) and parse(alone.to_hf_dict()) == alone
    rope = text["rope_parameters"]
    for data, message in (
            ({**MINISTRAL_3_8B, "quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
             "quantization_config.quant_method = 'fp8' is not implemented"),
            ({**text, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "llama_4_scaling_beta": 0.1}},
             "llama_4_scaling_beta = 0.1 with rope type 'default' is not implemented"),
            ({**text, "rope_parameters": {**rope, "llama_4_scaling_beta": -1}},
             "llama_4_scaling_beta = -1 is not a finite number >= 0"),
            ({**text, "rope_parameters": {**rope, "max_position_embeddings": 4096}},
             "rope_parameters.max_position_embeddings = 4096 differs from max_position_embeddings"),
            ({**SMALL, "rope_parameters": {**rope, "rope_theta": 1e4}},
             "rope_parameters.llama_4_scaling_beta = 0.1 is not implemented for rope type 'yarn'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse(data)
    # Ministral3Config's rope where none is given
    assert parse({k: v for k, v in text.items() if k != "rope_parameters"}) == alone
    assert parse({**text, "rope_parameters": {**rope, "max_position_embeddings": 262144}}) == alone


EXAONE_4_1B = {  # LGAI-EXAONE/EXAONE-4.0-1.2B: no window, llama3 rope scaling, tied embeddings
    "architectures": ["Exaone4ForCausalLM"], "bos_token_id": 1, "eos_token_id": 361, "head_dim": 64,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 4096,
    "layer_types": ["full_attention"] * 30, "max_position_embeddings": 65536, "model_type": "exaone4",
    "num_attention_heads": 32, "num_hidden_layers": 30, "num_key_value_heads": 8, "pad_token_id": 0,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 16.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 1000000, "sliding_window": None, "sliding_window_pattern": None, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.54.0", "use_cache": True, "vocab_size": 102400}


def test_exaone4_is_read_written_back_and_its_hybrid_layers_split_into_windowed_and_nope_ones():
    config = parse(EXAONE_4_1B)
    assert (config.pre_norms, config.post_norms, config.qk_norm, config.qk_norm_span) == (False, True, True, "head")
    assert (config.rope_type, config.sliding_window) == ("llama3", None)
    assert config.local_layers == config.nope_layers == ()
    assert parse(config.to_hf_dict()) == config and config.tie_word_embeddings
    hybrid = parse({**EXAONE_4_1B, "rope_scaling": None, "sliding_window": 4096, "num_hidden_layers": 8,
                    "layer_types": None, "sliding_window_pattern": 4})
    assert (hybrid.local_layers, hybrid.nope_layers) == ((0, 1, 2, 4, 5, 6), (3, 7))
    assert parse(hybrid.to_hf_dict()) == hybrid
    # the 32B's: llama3 scaling in its sliding layers, which rotate by the model's rope
    big = parse({**EXAONE_4_1B, "sliding_window": 4096, "layer_types": ["sliding_attention"] * 3 + ["full_attention"]
                 + ["sliding_attention"] * 26})
    assert big.local_rope_theta is None and not big.split_rope and big.layer_rope_attrs(0) == big.rope_attrs
    assert big.nope_layers == (3,) and parse(big.to_hf_dict()) == big
    with pytest.raises(ValueError, match=re.escape("sliding_window_pattern = 'LLLG' (a pattern of letters) is not")):
        parse({**EXAONE_4_1B, "rope_scaling": None, "sliding_window": 4096, "layer_types": None,
               "sliding_window_pattern": "LLLG"})


ERNIE_45_03B = {  # baidu/ERNIE-4.5-0.3B-PT (the transformers-format release)
    "architectures": ["Ernie4_5ForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072, "max_position_embeddings": 131072,
    "model_type": "ernie4_5", "num_attention_heads": 16, "num_hidden_layers": 18, "num_key_value_heads": 2,
    "pad_token_id": 0, "rms_norm_eps": 1e-05, "rope_theta": 500000, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "use_bias": False, "use_cache": False, "vocab_size": 103424}


def test_ernie45_and_helium_are_read_with_rotary_pairs_of_adjacent_dims_and_written_back():
    config = parse(ERNIE_45_03B)
    assert config.rope_interleaved and config.tie_word_embeddings and config.rope_theta == 500000
    assert not (config.qkv_bias or config.o_bias or config.mlp_bias) and parse(config.to_hf_dict()) == config
    assert round(config.parameters / 1e9, 2) == 0.36
    biased = parse({**ERNIE_45_03B, "use_bias": True})
    assert (biased.qkv_bias, biased.o_bias, biased.mlp_bias) == (True, True, True)
    assert parse(biased.to_hf_dict()) == biased
    helium = dataclasses.replace(biased, o_bias=False, mlp_bias=False)
    assert helium.to_hf_dict()["model_type"] == "helium" and parse(helium.to_hf_dict()) == helium
    for data, message in (({**ERNIE_45_03B, "attention_bias": True}, "ERNIE 4.5 reads use_bias (true or false) alone"),
                          ({**SMALL, "use_bias": True}, "use_bias = true is an ERNIE 4.5 field, not implemented for "
                                                        "model_type 'llama'")):
        with pytest.raises(ValueError, match=re.escape(message)):
            parse(data)
    with pytest.raises(ValueError, match="rotary pairs of adjacent dims .* have no config.json"):
        dataclasses.replace(config, sliding_window=8).to_hf_dict()


GLM4_9B = {  # THUDM/GLM-4-9B-0414
    "architectures": ["Glm4ForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 13696, "max_position_embeddings": 32768, "model_type": "glm4",
    "num_attention_heads": 32, "num_hidden_layers": 40, "num_key_value_heads": 2, "pad_token_id": 151329,
    "partial_rotary_factor": 0.5, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.52.0.dev0", "use_cache": True, "vocab_size": 151552}


def test_glm4_is_read_with_half_rotated_heads_in_adjacent_pairs_and_norms_after_its_sublayers():
    config = parse(GLM4_9B)
    assert (config.rope_interleaved, config.partial_rotary_factor, config.rotary_dim) == (True, 0.5, 64)
    assert (config.pre_norms, config.post_norms, config.offset_norms) == (True, True, False)
    assert (config.qkv_bias, config.o_bias, config.mlp_bias) == (True, False, False)
    assert round(config.parameters / 1e9, 2) == 9.4 and parse(config.to_hf_dict()) == config
    assert parse({k: v for k, v in GLM4_9B.items() if k != "partial_rotary_factor"}) == config  # 0.5 where absent
    with pytest.raises(ValueError, match=re.escape("GLM-4 reads attention_bias (true or false) alone")):
        parse({**GLM4_9B, "mlp_bias": True})


QWEN25_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct (vision_config shortened): the language model's fields at the top
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656, "hidden_act": "silu", "hidden_size": 3584,
    "initializer_range": 0.02, "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28,
    "model_type": "qwen2_5_vl", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.41.2", "use_cache": True, "use_sliding_window": False,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "out_hidden_size": 3584,
                      "model_type": "qwen2_5_vl", "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]},
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "vocab_size": 152064}


def test_qwen25_vl_is_read_as_its_language_model_with_the_plain_rope_of_text_prompts():
    config = parse(QWEN25_VL_7B)
    assert (config.multimodal, config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (
        "qwen2_5_vl", 3584, 28, 4)
    assert (config.rope_type, config.rope_theta, config.qkv_bias, config.sliding_window) == ("default", 1e6, True, None)
    assert round(config.parameters / 1e9, 2) == 7.62 and not config.tie_word_embeddings
    assert config.to_hf_dict()["text_config"]["model_type"] == "qwen2_5_vl_text" and parse(config.to_hf_dict()) == config
    with pytest.raises(ValueError, match="mrope with another rope scaling is not implemented"):
        parse({**QWEN25_VL_7B, "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24], "factor": 4.0}})
    # transformers 5's layout: the language model's fields in text_config, nothing of it beside
    outer = ("architectures", "model_type", "vision_config", "image_token_id", "video_token_id", "vision_token_id",
             "vision_start_token_id", "vision_end_token_id", "tie_word_embeddings")
    nested = {**{k: QWEN25_VL_7B[k] for k in outer},
              "text_config": {k: v for k, v in QWEN25_VL_7B.items() if k not in outer}}
    assert parse(nested) == config
    with pytest.raises(ValueError, match="unknown field hidden_act = 'silu' of Qwen2_5_VLForConditionalGeneration"):
        parse({**nested, "hidden_act": "silu"})


QWEN3_VL_8B = {  # Qwen/Qwen3-VL-8B-Instruct (vision_config shortened)
    "architectures": ["Qwen3VLForConditionalGeneration"], "image_token_id": 151655, "model_type": "qwen3_vl",
    "text_config": {"attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643, "dtype": "bfloat16",
                    "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
                    "initializer_range": 0.02, "intermediate_size": 12288, "max_position_embeddings": 262144,
                    "model_type": "qwen3_vl_text", "num_attention_heads": 32, "num_hidden_layers": 36,
                    "num_key_value_heads": 8, "rms_norm_eps": 1e-06,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "use_cache": True, "vocab_size": 151936},
    "tie_word_embeddings": False, "transformers_version": "4.57.0.dev0", "video_token_id": 151656,
    "vision_config": {"deepstack_visual_indexes": [8, 16, 24], "depth": 27, "hidden_size": 1152,
                      "model_type": "qwen3_vl", "out_hidden_size": 4096},
    "vision_end_token_id": 151653, "vision_start_token_id": 151652}


def test_qwen3_vl_is_read_as_its_language_model():
    config = parse(QWEN3_VL_8B)
    assert (config.multimodal, config.qk_norm, config.rope_type, config.rope_theta) == ("qwen3_vl", True, "default", 5e6)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (4096, 36, 128)
    assert round(config.parameters / 1e9, 2) == 8.19 and not config.tie_word_embeddings
    assert parse(config.to_hf_dict()) == config


def test_gemma2_is_read_written_back_and_planned_with_capped_attention():
    config = parse(GEMMA2_2B)
    assert (config.attn_softcap, config.final_softcap, config.post_norms, config.qk_norm) == (50.0, 30.0, True, False)
    assert config.local_layers == tuple(range(0, 26, 2)) and not config.split_rope
    assert parse(config.to_hf_dict()) == config and config.to_hf_dict()["model_type"] == "gemma2"
    for calls in (prefill_calls(config, 16), decode_calls(config, 1, 8192), decode_calls(config, 2, 64, resident=True)):
        attention = [c.spec for c in calls if c.role.startswith("attention")]
        assert attention and all(spec.attr["softcap"] == 50.0 for spec in attention)
    windows = {c.role: c.spec.attr.get("window", 0) for c in decode_calls(config, 1, 8192) if c.role.startswith("att")}
    assert windows == {"attention": 0, "attention_local": 4096}
    bare = parse({k: v for k, v in GEMMA2_2B.items() if not k.endswith("softcapping")})
    assert (bare.attn_softcap, bare.final_softcap) == (50.0, 30.0)  # Gemma2Config's where left out


def test_the_gemma_3_1b_preset_is_the_checkpoints_config():
    assert dataclasses.replace(parse(GEMMA3_1B), name="gemma-3-1b") == PRESETS["gemma-3-1b"]


def test_a_switched_on_qwen_window_applies_from_max_window_layers_on():
    """As Qwen2Config and Qwen3Config compute layer_types: the layers from max_window_layers on
    (or those layer_types names) are windowed, the others attend to everything."""
    config = parse({**QWEN2, "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 20})
    assert config.sliding_window == 16 and config.local_layers == tuple(range(20, 24)) and not config.split_rope
    assert [config.layer_window(i) for i in (19, 20)] == [0, 16]
    assert parse(config.to_hf_dict()) == config
    named = parse({**QWEN3, "use_sliding_window": True, "sliding_window": 16,
                   "layer_types": ["sliding_attention"] * 2 + ["full_attention"] * 26})
    assert named.local_layers == (0, 1) and parse(named.to_hf_dict()) == named
    assert parse({**QWEN2, "use_sliding_window": True, "sliding_window": None}).sliding_window is None


def test_a_qwen2_window_is_ignored_while_use_sliding_window_is_false():
    """As transformers does: Qwen2 and Qwen2.5 ship a sliding_window (131072) with the switch off."""
    config = parse({**QWEN2, "sliding_window": 16, "max_window_layers": 0})
    assert config.sliding_window is None and config.layer_window(0) == 0


def test_load_model_config_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(DYNAMIC_5X))
    with pytest.raises(ValueError, match=r"^.*config\.json: rope scaling 'dynamic' \(rope_parameters.rope_type\)"):
        load_model_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_5X))
    assert load_model_config(tmp_path).rope_theta == 500000.0
    import os

    os.mkfifo(tmp_path / "fifo.json")  # reading it would block until someone writes
    with pytest.raises(ValueError, match=r"fifo\.json is not a regular file"):
        load_model_config(tmp_path / "fifo.json")


class _NoKernels:
    """A provider that must not be reached: the window check comes first."""

    kind = "cpu"

    def specs(self):
        raise AssertionError("kernels asked for")

    def get(self, *args, **kwargs):
        raise AssertionError("kernels asked for")


def test_a_window_reaches_the_attention_kernels_of_the_passes_that_exceed_it():
    """Mistral's window on every layer, Gemma 3's on its sliding layers only; a pass that cannot
    see past the window runs the plain kernels (those of libraries tuned before windows)."""
    config = parse({**SMALL, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 8})
    assert [config.layer_window(i) for i in range(2)] == [8, 8]

    def windows(calls):
        return {c.role: (c.spec.op, c.spec.attr.get("window", 0), c.count) for c in calls
                if c.role.startswith("attention")}

    assert windows(prefill_calls(config, 8)) == {"attention": ("attention_prefill", 0, 2)}
    assert windows(prefill_calls(config, 9)) == {"attention": ("attention_prefill", 8, 2)}
    assert windows(decode_calls(config, 1, 64)) == {"attention": ("attention_decode", 8, 2)}
    fused = windows(decode_calls(config, 1, 64, resident=True))
    assert fused == {"attention": ("rope_append_attention", 8, 2)}
    gemma3 = parse(GEMMA3_1B)
    assert windows(decode_calls(gemma3, 1, 512)) == {"attention": ("attention_decode", 0, 26)}
    assert windows(decode_calls(gemma3, 1, 513)) == {"attention": ("attention_decode", 0, 4),
                                                     "attention_local": ("attention_decode", 512, 22)}
    # token ids: numpy would take -5 for the fifth word from the end of the table
    model = LlamaModel(config, ModelWeights.random(config), _NoKernels())
    reference = ReferenceModel(config, ModelWeights.random(config))
    for run in (lambda ids: model.prefill(ids, []), lambda ids: reference.forward(ids, 0, []),
                lambda ids: reference.generate(ids, 2)):
        for bad in ([[5, -5, 3]], [[config.vocab_size]]):
            with pytest.raises(ValueError, match=f"token ids must lie in 0..{config.vocab_size - 1}"):
                run(np.array(bad))


# ----------------------------------------------------------------------------- checkpoints

def _save(folder, tensors: dict, name: str = "model.safetensors"):
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / name))


def test_a_checkpoint_with_tensors_the_model_does_not_use_is_refused(tmp_path):
    config = parse(SMALL)
    tensors = dict(ModelWeights.random(config).tensors)
    biases = {f"model.layers.{i}.self_attn.{p}_proj.bias": np.zeros(8, np.float32) for i in range(2) for p in "qkv"}
    _save(tmp_path, {**tensors, **biases})
    with pytest.raises(ValueError, match=r"holds 6 tensors m does not use: model\.layers\.0\.self_attn\.k_proj\.bias"
                                         r", .* \(and 2 more\)"):
        ModelWeights.load(config, tmp_path)


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_a_multimodal_checkpoint_loads_its_language_model_and_leaves_the_image_side(prefix, tmp_path):
    """Both layouts transformers has saved Gemma3ForConditionalGeneration in; the vision tower and
    projector are not read, any other tensor is refused as in a text checkpoint."""
    config = dataclasses.replace(PRESETS["tiny"], multimodal="gemma3", qk_norm=True, post_norms=True,
                                 offset_norms=True, activation="gelu_tanh", embedding_multiplier=128 ** 0.5,
                                 tie_word_embeddings=True)
    weights = ModelWeights.random(config, seed=2)
    stored = {(prefix + n[len("model."):]) if n.startswith("model.") else n: t for n, t in weights.tensors.items()}
    image = "model.vision_tower." if prefix.startswith("model.") else "vision_tower."
    _save(tmp_path, {**stored, image + "encoder.weight": np.ones((4, 4), np.float32),
                     image.replace("vision_tower", "multi_modal_projector") + "norm.weight": np.ones(4, np.float32)})
    loaded = ModelWeights.load(config, tmp_path)
    assert loaded.tensors.keys() == weights.tensors.keys()
    assert all(np.array_equal(loaded[n], weights[n]) for n in weights.tensors)
    _save(tmp_path, {**stored, prefix + "layers.0.extra.weight": np.ones(4, np.float32)})
    with pytest.raises(ValueError, match=r"holds 1 tensors m does not use: model\.layers\.0\.extra\.weight"):
        ModelWeights.load(dataclasses.replace(config, name="m"), tmp_path)


def test_stacked_projections_load_as_their_parts_and_are_checked(tmp_path):
    """Phi-3 stores Q/K/V and gate/up stacked: each loads as the rows of its parts (no copy); one
    stored both ways, or stacked in another shape, is refused by name."""
    config = parse(SMALL)
    weights = ModelWeights.random(config)
    tensors = dict(weights.tensors)
    for layer in range(2):
        for fused, parts in (("self_attn.qkv_proj", "qkv"), ("mlp.gate_up_proj", ("gate", "up"))):
            kind = "self_attn" if fused.startswith("self_attn") else "mlp"
            tensors[f"model.layers.{layer}.{fused}.weight"] = np.concatenate(
                [tensors.pop(f"model.layers.{layer}.{kind}.{p}_proj.weight") for p in parts])
    _save(tmp_path / "stacked", tensors)
    loaded = ModelWeights.load(config, tmp_path / "stacked")
    assert loaded.tensors.keys() == weights.tensors.keys()
    for name, tensor in weights.tensors.items():
        np.testing.assert_array_equal(loaded.tensors[name], tensor)
    _save(tmp_path / "both", {**tensors, "model.layers.1.self_attn.k_proj.weight": weights.tensors[
        "model.layers.1.self_attn.k_proj.weight"]})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight is in the checkpoint both "
                                         r"alone and stacked in model\.layers\.1\.self_attn\.qkv_proj\.weight"):
        ModelWeights.load(config, tmp_path / "both")
    short = {**tensors, "model.layers.0.mlp.gate_up_proj.weight": tensors["model.layers.0.mlp.gate_up_proj.weight"][1:]}
    _save(tmp_path / "short", short)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_up_proj\.weight has shape \(255, 64\), "
                                         r"expected \(256, 64\) \(its parts stacked\)"):
        ModelWeights.load(config, tmp_path / "short")


def test_a_biased_model_needs_its_biases(tmp_path):
    config = parse({**SMALL, "attention_bias": True})
    weights = ModelWeights.random(config)
    _save(tmp_path, weights.tensors)
    assert set(ModelWeights.load(config, tmp_path).tensors) == set(weights.tensors)
    _save(tmp_path, {n: t for n, t in weights.tensors.items() if n != "model.layers.1.self_attn.o_proj.bias"})
    with pytest.raises(ValueError, match=r"weights do not fit m: model\.layers\.1\.self_attn\.o_proj\.bias is missing"):
        ModelWeights.load(config, tmp_path)


def test_rotary_inv_freq_buffers_are_ignored(tmp_path):
    config = parse(SMALL)
    weights = ModelWeights.random(config)
    inv_freq = {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32) for i in range(2)}
    _save(tmp_path, {**weights.tensors, **inv_freq})
    loaded = ModelWeights.load(config, tmp_path)
    assert set(loaded.tensors) == set(weights.tensors)


def test_a_tied_head_may_only_repeat_the_embedding(tmp_path):
    config = parse({**SMALL, "tie_word_embeddings": True})
    weights = ModelWeights.random(config)
    embed = weights["model.embed_tokens.weight"]
    _save(tmp_path / "same", {**weights.tensors, "lm_head.weight": embed.copy()})
    assert "lm_head.weight" not in ModelWeights.load(config, tmp_path / "same").tensors
    _save(tmp_path / "other", {**weights.tensors, "lm_head.weight": embed + 1})
    with pytest.raises(ValueError, match="tie_word_embeddings is true but lm_head.weight differs"):
        ModelWeights.load(config, tmp_path / "other")
    # the one table stored under the head's name only: transformers ties it to the embedding
    only_head = {n: t for n, t in weights.tensors.items() if n != "model.embed_tokens.weight"}
    _save(tmp_path / "head", {**only_head, "lm_head.weight": embed})
    loaded = ModelWeights.load(config, tmp_path / "head")
    assert np.array_equal(loaded["model.embed_tokens.weight"], embed) and "lm_head.weight" not in loaded.tensors


def _sharded(folder, weights: ModelWeights) -> dict:
    names = sorted(weights.tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        _save(folder, {n: weights.tensors[n] for n in part}, file)
    index = {"metadata": {"total_size": 0}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return index


def test_a_sharded_checkpoint_loads_through_its_index(tmp_path):
    config = parse(SMALL)
    weights = ModelWeights.random(config, seed=4)
    index = _sharded(tmp_path, weights)
    # Mistral's repositories also hold consolidated.safetensors (other names): not read beside an index
    _save(tmp_path, {"layers.0.attention.wq.weight": np.zeros((2, 2), np.float32)}, "consolidated.safetensors")
    loaded = ModelWeights.load(config, tmp_path)
    for name, tensor in weights.tensors.items():
        np.testing.assert_array_equal(loaded[name], tensor)
    index["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors"
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="weight_map names model-00003-of-00002.safetensors, not in"):
        ModelWeights.load(config, tmp_path)
    index = _sharded(tmp_path, weights)  # the index right again, then wrong about one tensor's shard
    shard = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(f for f in index["weight_map"].values() if f != shard)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"tensor model\.norm\.weight is in model-0000\d-of-00002\.safetensors, "
                                         r"not in"):
        ModelWeights.load(config, tmp_path)


# ----------------------------------------------------------------------------- the command line

CLI = [sys.executable, "-m", "autotune.cli"]


def _cli(tmp_path, *args):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=300, cwd=tmp_path)


@pytest.mark.parametrize("data, message", [
    (DYNAMIC_5X, "rope scaling 'dynamic' (rope_parameters.rope_type) is not implemented"),
    ({**LLAMA2_4X, "hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh' is not implemented"),
    ({**SMOLLM3_3B, "use_sliding_window": True, "sliding_window": 4096}, "use_sliding_window = true"),
    ({**MISTRAL_V01, "attention_bias": True}, "attention_bias = true"),
    ({**SMALL, "rope_theta": float("inf")}, "rope_theta = Infinity is not a positive finite number"),
], ids=["dynamic", "gelu", "smollm3-window", "mistral-bias", "theta-infinite"])
def test_run_with_a_refused_config_is_one_line_and_exit_2(data, message, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(data))
    (tmp_path / "empty.jsonl").write_text("")
    proc = _cli(tmp_path, "run", "--model", str(tmp_path / "config.json"), "--prompt-tokens", "4",
                "--new-tokens", "2", "--log", "empty.jsonl")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("autotune: error: ") and message in lines[0], lines
    assert str(tmp_path / "config.json") in lines[0]


def test_run_past_a_sliding_window_runs_windowed_attention(tmp_path):
    small = {**MISTRAL_V01, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 64, "sliding_window": 4}
    (tmp_path / "config.json").write_text(json.dumps(small))
    (tmp_path / "empty.jsonl").write_text("")
    proc = _cli(tmp_path, "run", "--model", str(tmp_path / "config.json"), "--prompt-tokens", "6",
                "--new-tokens", "3", "--log", "empty.jsonl", "--compare", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["reference"]["logits"]["same_tokens"], out["reference"]


def test_run_with_zero_kv_heads_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**SMALL, "num_key_value_heads": 0}))
    (tmp_path / "empty.jsonl").write_text("")
    proc = _cli(tmp_path, "run", "--model", str(tmp_path / "config.json"), "--prompt-tokens", "4",
                "--new-tokens", "2", "--log", "empty.jsonl")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].endswith(": num_key_value_heads must be a positive integer, got 0"), lines


def test_run_refuses_a_ministral3_generation_past_its_original_context_on_cuda_kernels(tmp_path):
    """The CUDA kernels scale no query by position: said in one line before anything is built (the
    CPU runtime scales them: test_transformers_parity)."""
    small = {**SMALL, "architectures": ["Ministral3ForCausalLM"], "model_type": "ministral3", "head_dim": 16,
             "rope_parameters": {**MINISTRAL_3_8B["text_config"]["rope_parameters"],
                                 "original_max_position_embeddings": 8}}
    (tmp_path / "config.json").write_text(json.dumps(small))
    (tmp_path / "empty.jsonl").write_text("")
    proc = _cli(tmp_path, "run", "--model", "config.json", "--log", "empty.jsonl", "--target", "cuda",
                "--prompt-tokens", "4", "--new-tokens", "6")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "scales its queries by position past its first 8 positions" in lines[0] and "takes 9 positions" in lines[0]
    assert "which the CUDA kernels do not implement" in lines[0]


def test_run_refuses_an_empty_prompt_and_a_generation_that_cannot_fit(tmp_path):
    small = {**SMALL, "num_hidden_layers": 1, "vocab_size": 64}
    (tmp_path / "config.json").write_text(json.dumps(small))
    (tmp_path / "empty.jsonl").write_text("")
    for args, message in ((["--prompt-ids", ""], "malformed --prompt-ids ''"),
                          (["--new-tokens", str(10 ** 18)], "is more than the kernels take"),
                          (["--new-tokens", str(2 * 10 ** 9)], "the KV cache of 1 x 2000000064 positions")):
        proc = _cli(tmp_path, "run", "--model", "config.json", "--log", "empty.jsonl", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], (args, proc.stderr)


def test_tune_model_tunes_windowed_attention_for_sizes_past_the_sliding_window(tmp_path):
    small = {**MISTRAL_V01, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2,
             "num_key_value_heads": 1, "num_hidden_layers": 1, "vocab_size": 64, "sliding_window": 64}
    (tmp_path / "config.json").write_text(json.dumps(small))
    proc = _cli(tmp_path, "tune-model", "--model", "config.json", "--list-tasks", "--kv-len", "32,512", "--json")
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr
    attention = sorted(row["task"] for row in json.loads(proc.stdout) if "attention" in row["op"])
    assert any("L~=512" in key and "window=64" in key for key in attention), attention
    assert any("L~=32" in key and "window" not in key for key in attention), attention


# ----------------------------------------------------------------------------- longrope (Phi-3)

def test_phi35s_longrope_is_read_planned_and_written_back():
    config = parse(PHI35_MINI)
    assert (config.rope_type, config.head_dim, config.rope_original_max_position_embeddings) == ("longrope", 96, 4096)
    assert config.rope_short_factor == tuple(PHI35_SHORT) and config.rope_long_factor == tuple(PHI35_LONG)
    # transformers' default: sqrt(1 + ln(131072 / 4096) / ln 4096)
    assert config.rope_attention_factor == math.sqrt(1 + math.log(32) / math.log(4096))
    assert config.rope_scaling == {"short_factor": tuple(PHI35_SHORT), "attention_factor": config.rope_attention_factor}
    assert parse(config.to_hf_dict()) == config == parse(json.loads(json.dumps(config.to_hf_dict())))
    assert config.to_hf_dict()["model_type"] == "phi3"
    # a tune-model job's copy (asdict through JSON: tuples become lists)
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    # every rope kernel takes the short factors and the attention factor, the long ones none
    want = {"rope_type": "longrope", "short_factor": tuple(PHI35_SHORT),
            "attention_factor": config.rope_attention_factor}
    for calls in (prefill_calls(config, 16), decode_calls(config, 1, 64), decode_calls(config, 1, 64, resident=True)):
        ropes = [c.spec for c in calls if c.spec.op.startswith("rope")]
        assert ropes and all({k: spec.attr[k] for k in want} == want and "long_factor" not in spec.attr
                             for spec in ropes)


def test_transformers_reads_phi35_and_the_written_config_as_the_runtime_does():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = parse(PHI35_MINI)
    ours = inverse_frequencies(config.head_dim, config.rope_theta, config.rope_type, **config.rope_scaling)
    for data in (PHI35_MINI, config.to_hf_dict()):
        theirs = transformers.Phi3Config.from_dict(json.loads(json.dumps(data)))  # a copy: it edits the dicts
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu")
        np.testing.assert_allclose(ours, inv_freq.double().numpy(), rtol=1e-6)
        assert attention_factor == pytest.approx(config.rope_attention_factor, rel=1e-12)
        assert theirs.rope_parameters["original_max_position_embeddings"] == 4096
        assert theirs.rope_parameters["long_factor"] == list(config.rope_long_factor)


_PHI35_5X = {**{k: v for k, v in PHI35_MINI.items() if k not in ("rope_scaling", "rope_theta")},
             "rope_parameters": {"type": "su", "rope_type": "longrope", "short_factor": PHI35_SHORT,
                                 "long_factor": PHI35_LONG, "rope_theta": 10000.0, "partial_rotary_factor": 1.0,
                                 "original_max_position_embeddings": 4096}}


@pytest.mark.parametrize("data", [
    {**PHI35_MINI, "rope_scaling": {**PHI35_MINI["rope_scaling"], "type": "su"}},
    {**PHI35_MINI, "rope_scaling": {**PHI35_MINI["rope_scaling"], "original_max_position_embeddings": 4096}},
    {**PHI35_MINI, "rope_scaling": {**PHI35_MINI["rope_scaling"], "factor": 32}},
    _PHI35_5X,
], ids=["su", "inner-context", "factor", "5.x"])
def test_longropes_names_and_layouts_read_alike(data):
    """Phi-3-mini-128k's old name su, the original context inside the scaling too, the factor
    given (Phi-3's default is max_position_embeddings over the original context), and the 5.x
    layout transformers 5 saves (keeping the name su beside rope_type longrope)."""
    assert parse(data) == parse(PHI35_MINI)


_PHI35_SCALING = PHI35_MINI["rope_scaling"]


@pytest.mark.parametrize("data, message", [
    ({**PHI4, "rope_scaling": {"type": "yarn", "factor": 4.0}},  # Phi3Config reads yarn as longrope
     "rope_scaling.short_factor is missing: rope type 'longrope' needs short_factor and long_factor"),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "long_factor": PHI35_LONG[1:]}},
     "rope_scaling.long_factor has length 47; 96 rotary dims make 48 rotary pairs, one factor each"),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "short_factor": [1.0] * 47 + ["2"]}},
     "rope_scaling.short_factor = [1.0, 1.0, "),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "long_factor": None}},
     "rope_scaling.long_factor is missing: rope type 'longrope' needs short_factor and long_factor"),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "original_max_position_embeddings": 8192}},
     "rope_scaling.original_max_position_embeddings = 8192 and the top-level original_max_position_embeddings = "
     "4096 disagree: transformers reads the top-level one"),
    ({**{k: v for k, v in PHI35_MINI.items() if k != "original_max_position_embeddings"},
      "rope_scaling": {**_PHI35_SCALING, "original_max_position_embeddings": 8192}},
     "original_max_position_embeddings = 4096 (Phi3Config's where the field is absent) disagree"),
    ({**PHI35_MINI, "original_max_position_embeddings": None},
     "rope_scaling (longrope) reads the top-level original_max_position_embeddings, which is null"),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "attention_factor": 0}},
     "rope_scaling.attention_factor = 0.0 is not a positive number"),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "factor": "32"}},
     "rope_scaling.factor = '32' is not a positive"),
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "beta_fast": 32}},
     "rope_scaling.beta_fast = 32 is not implemented for rope type 'longrope'"),
    # Phi-4-mini's factor on Phi-3.5's head of 96: 72 rotary dims, its 48 factors too many
    ({**PHI35_MINI, "rope_scaling": {**_PHI35_SCALING, "partial_rotary_factor": 0.75}},
     "rope_scaling.short_factor has length 48; 72 rotary dims make 36 rotary pairs, one factor each"),
    ({**LLAMA3_4X, "rope_scaling": {**_PHI35_SCALING, "short_factor": [1.0] * 64, "long_factor": [1.0] * 64}},
     "rope scaling 'longrope' (rope_scaling.type) is implemented for Phi-3 (model_type 'phi3') only"),
    ({**LLAMA3_4X, "rope_scaling": {**_PHI35_SCALING, "type": "su"}}, "rope scaling 'su' (rope_scaling.type) is not "
                                                                      "implemented"),
], ids=["phi3-yarn", "long-length", "short-string", "long-missing", "contexts-disagree", "context-absent",
        "context-null", "attention-zero", "factor-string", "yarn-key", "partial-rotary", "llama", "su-in-llama"])
def test_a_longrope_this_runtime_does_not_compute_is_refused(data, message):
    with pytest.raises(ValueError) as caught:
        parse(data)
    text = str(caught.value)
    assert text.startswith("config.json: ") and message in text and "\n" not in text, text


def test_a_longrope_model_config_checks_its_factors_and_refuses_what_is_no_phi3s():
    config = parse(PHI35_MINI)
    for fields, message in [
        (dict(rope_long_factor=config.rope_long_factor[:3]), "rope long_factor has length 3; 96 rotary dims"),
        (dict(rope_short_factor=(1.0,) * 47 + (0.0,)), "rope short_factor = (1.0, 1.0, "),
        (dict(rope_original_max_position_embeddings=None), "rope original_max_position_embeddings = None is not"),
        (dict(rope_type="yarn"), "rope_short_factor = (1.0, 1.0199"),
    ]:
        with pytest.raises(ValueError, match=r"^model m: " + message.replace("(", r"\(").replace(")", r"\)")):
            dataclasses.replace(config, **fields)
    with pytest.raises(ValueError, match="longrope or a partial rotary .Phi-3's. with biases"):
        dataclasses.replace(config, qkv_bias=True, o_bias=True).to_hf_dict()


SMALL_LONGROPE = {**SMALL, "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_hidden_layers": 1,
                  "vocab_size": 64, "original_max_position_embeddings": 16,
                  "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 16.0],
                                   "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]}}


def test_past_longropes_original_context_a_pass_rotates_by_the_long_factors(default_kernels):
    """A pass whose largest position is past the original context (16) rotates by long_factor, as
    transformers picks the factors per forward pass: a 10-token prompt and 12 new tokens switch at
    position 16 (the sequence so far run again as a long prompt), a 17-token prompt is long from the
    start. The runtime runs the long passes on rope kernels whose short_factor holds the long
    factors, and generates the reference's tokens; with the long factors the short ones the logits
    differ."""
    config = parse(SMALL_LONGROPE)
    assert not config.rope_is_long(16) and config.rope_is_long(17)
    assert config.rope_attrs_for(True)["short_factor"] == (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
    weights = ModelWeights.random(config, seed=0)
    rng = np.random.default_rng(1)
    short_only = dataclasses.replace(config, rope_long_factor=config.rope_short_factor)
    for prompt, new in ((10, 12), (17, 4)):
        prompts = rng.integers(0, config.vocab_size, (2, prompt))
        model = LlamaModel(config, weights, default_kernels)
        ours = model.generate(prompts, new)
        reference = ReferenceModel(config, weights).generate(prompts, new)
        np.testing.assert_array_equal(ours.tokens, reference.tokens)
        assert np.abs(ours.logits - reference.logits).max() < 1e-4 * np.abs(reference.logits).max()
        factors = {kernel.spec.attr["short_factor"] for kernel in model.used.values() if "short_factor" in kernel.spec.attr}
        assert factors == ({config.rope_short_factor, config.rope_long_factor} if prompt <= 16
                           else {config.rope_long_factor})
        other = ReferenceModel(short_only, weights).generate(prompts, new)
        assert np.abs(other.logits - reference.logits)[:, 16 - prompt if prompt <= 16 else 0:].max() > 1e-3


def test_run_and_tune_model_go_past_longropes_original_context(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(SMALL_LONGROPE))
    (tmp_path / "empty.jsonl").write_text("")
    proc = _cli(tmp_path, "run", "--model", "config.json", "--log", "empty.jsonl", "--prompt-tokens", "6", "--json",
                "--new-tokens", "14", "--compare")  # positions 0 to 18: past the context of 16
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["reference"]["logits"]["same_tokens"]
    # tune-model: a decode step at KV length 17 and a prompt of 17 tokens rotate by the long factors
    proc = _cli(tmp_path, "tune-model", "--model", "config.json", "--list-tasks", "--kv-len", "8,17",
                "--prefill-tokens", "8,17")
    assert proc.returncode == 0, proc.stderr
    ropes = [line for line in proc.stdout.splitlines() if " rope/" in line]
    long = [line for line in ropes if "128.0" in line]
    assert long and all("L=17" in line or "T=17" in line for line in long), ropes
    assert all("L=17" not in line and "T=17" not in line for line in set(ropes) - set(long)), ropes


# microsoft/Phi-4-mini-instruct's shape (auto_map left out, factors made up): a head of 128 of
# which partial_rotary_factor 0.75 rotates 96, longrope with 48 factors each
PHI4_MINI = {
    "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "hidden_size": 3072,
    "intermediate_size": 8192, "num_attention_heads": 24, "num_key_value_heads": 8, "num_hidden_layers": 32,
    "vocab_size": 200064, "max_position_embeddings": 131072, "original_max_position_embeddings": 4096,
    "partial_rotary_factor": 0.75, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "sliding_window": 262144,
    "tie_word_embeddings": True, "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 40 for i in range(48)],
                                                  "long_factor": [1.0 + i for i in range(48)]}}


def test_phi4_mini_rotates_its_first_96_dims_and_its_config_reads_back_equal():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = parse(PHI4_MINI)
    assert (config.head_dim, config.partial_rotary_factor, config.rotary_dim) == (128, 0.75, 96)
    assert parse(config.to_hf_dict()) == config == parse(json.loads(json.dumps(config.to_hf_dict())))
    assert ModelConfig(**json.loads(json.dumps(dataclasses.asdict(config)))) == config
    # the 5.x layout transformers saves: the factor inside rope_parameters too
    nested = {**{k: v for k, v in PHI4_MINI.items() if k not in ("rope_scaling", "rope_theta")},
              "rope_parameters": {**PHI4_MINI["rope_scaling"], "rope_type": "longrope", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.75}}
    assert parse(nested) == config
    ours = inverse_frequencies(config.rotary_dim, config.rope_theta, config.rope_type, **config.rope_scaling)
    for data in (PHI4_MINI, config.to_hf_dict()):
        theirs = transformers.Phi3Config.from_dict(json.loads(json.dumps(data)))
        assert theirs.rope_parameters["partial_rotary_factor"] == 0.75
        np.testing.assert_allclose(ours, ROPE_INIT_FUNCTIONS["longrope"](theirs, "cpu")[0].double().numpy(), rtol=1e-6)
    # every rope kernel rotates the 96 dims; a whole-head rope's attributes name no rotary_dim
    for calls in (prefill_calls(config, 16), decode_calls(config, 1, 64), decode_calls(config, 1, 64, resident=True)):
        ropes = [c.spec for c in calls if c.spec.op.startswith("rope")]
        assert ropes and all(spec.attr["rotary_dim"] == 96 for spec in ropes)
    assert "rotary_dim" not in parse(PHI35_MINI).rope_attrs
    plain = parse({k: v for k, v in PHI4_MINI.items() if k not in ("rope_scaling", "original_max_position_embeddings")})
    assert plain.rope_attrs == {"theta": 10000.0, "rotary_dim": 96} and parse(plain.to_hf_dict()) == plain


@pytest.mark.parametrize("data, message", [
    ({**PHI4_MINI, "partial_rotary_factor": 0.7}, "partial_rotary_factor = 0.7 gives a rotary dim of int(128 x 0.7) = "
                                                 "89, not an even number in 2 .. head_dim = 128"),
    ({**PHI4_MINI, "partial_rotary_factor": 1.5}, "int(128 x 1.5) = 192, not an even number"),
    ({**PHI4_MINI, "partial_rotary_factor": 0}, "partial_rotary_factor = 0 is not a positive number"),
    ({**PHI4_MINI, "partial_rotary_factor": None}, "partial_rotary_factor = null is not a positive number"),
    ({**PHI4_MINI, "rope_scaling": {**PHI4_MINI["rope_scaling"], "partial_rotary_factor": 0.5}},
     "rope_scaling.partial_rotary_factor = 0.5 and partial_rotary_factor = 0.75 disagree"),
    ({**PHI4_MINI, "partial_rotary_factor": 1.0}, "short_factor has length 48; 128 rotary dims make 64 rotary pairs"),
    ({**LLAMA3_5X, "partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5 is implemented for Phi-3"),
], ids=["odd", "over", "zero", "null", "disagree", "factors-of-a-whole-head", "llama"])
def test_a_partial_rotary_factor_this_runtime_does_not_compute_is_refused(data, message):
    with pytest.raises(ValueError) as caught:
        parse(data)
    assert message in str(caught.value), str(caught.value)
    with pytest.raises(ValueError, match=r"partial_rotary_factor = 0.7 does not give an even rotary dim"):
        dataclasses.replace(parse(PHI4_MINI), partial_rotary_factor=0.7)


MIXTRAL_8X7B = {  # mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 32768, "model_type": "mixtral", "num_attention_heads": 32, "num_experts_per_tok": 2,
    "num_hidden_layers": 32, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.36.0.dev0",
    "use_cache": True, "vocab_size": 32000}
QWEN3_30B_A3B = {  # Qwen/Qwen3-30B-A3B
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 151643, "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
    "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768,
    "norm_topk_prob": True, "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 48, "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001, "sliding_window": None,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
    "use_sliding_window": False, "vocab_size": 151936}
QWEN15_MOE = {  # Qwen/Qwen1.5-MoE-A2.7B
    "architectures": ["Qwen2MoeForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "decoder_sparse_step": 1, "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 5632, "max_position_embeddings": 8192, "max_window_layers": 21,
    "model_type": "qwen2_moe", "moe_intermediate_size": 1408, "norm_topk_prob": False, "num_attention_heads": 16,
    "num_experts": 60, "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "output_router_logits": False, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.40.0.dev0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}
GRANITE_MOE_1B = {  # ibm-granite/granite-3.1-1b-a400m-instruct
    "architectures": ["GraniteMoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.1,
    "attention_multiplier": 0.015625, "bos_token_id": 0, "embedding_multiplier": 12.0, "eos_token_id": 0,
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 512,
    "logits_scaling": 6.0, "max_position_embeddings": 131072, "model_type": "granitemoe", "num_attention_heads": 16,
    "num_experts_per_tok": 8, "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32,
    "output_router_logits": False, "pad_token_id": 0, "residual_multiplier": 0.22, "rms_norm_eps": 1e-06,
    "rope_scaling": None, "rope_theta": 10000000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": True,
    "torch_dtype": "bfloat16", "transformers_version": "4.46.0.dev0", "use_cache": True, "vocab_size": 49155}
GLM_45_AIR = {  # zai-org/GLM-4.5-Air
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "pad_token_id": 151329,
    "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu", "hidden_size": 4096,
    "partial_rotary_factor": 0.5, "initializer_range": 0.02, "intermediate_size": 10944,
    "max_position_embeddings": 131072, "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": True,
    "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128, "n_shared_experts": 1,
    "routed_scaling_factor": 1.0, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "num_hidden_layers": 46,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False, "vocab_size": 151552}
OLMOE_1B_7B = {  # allenai/OLMoE-1B-7B-0924
    "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
    "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe", "norm_topk_prob": False,
    "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
    "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 10000.0, "router_aux_loss_coef": 0.01, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304}


@pytest.mark.parametrize("data, experts, per_token, size, parameters", [
    (MIXTRAL_8X7B, 8, 2, 14336, 46.7e9), (QWEN3_30B_A3B, 128, 8, 768, 30.5e9), (QWEN15_MOE, 60, 4, 1408, 14.3e9),
    (OLMOE_1B_7B, 64, 8, 1024, 6.9e9), (GRANITE_MOE_1B, 32, 8, 512, 1.33e9), (GLM_45_AIR, 128, 8, 1408, 106.9e9)],
    ids=["mixtral-8x7b", "qwen3-30b-a3b", "qwen1.5-moe-a2.7b", "olmoe-1b-7b", "granite-3.1-1b-a400m", "glm-4.5-air"])
def test_mixtures_of_experts_read_as_their_model_cards_count_them(data, experts, per_token, size, parameters):
    config = parse(data)
    assert (config.num_experts, config.experts_per_token, config.intermediate_size) == (experts, per_token, size)
    assert abs(config.parameters / parameters - 1) < 0.01, config.parameters
    family = data["model_type"]
    assert config.norm_topk_prob == (family in ("mixtral", "qwen3_moe", "granitemoe", "glm4_moe"))
    assert (config.embedding_multiplier, config.residual_multiplier) == (
        (12.0, 0.22) if data["model_type"] == "granitemoe" else (1.0, 1.0))
    assert config.qk_norm == (data["model_type"] in ("qwen3_moe", "olmoe"))
    assert config.qkv_bias == (family in ("qwen2_moe", "glm4_moe")) and config.sliding_window is None
    assert config.shared_expert_intermediate_size == {"qwen2_moe": 5632, "glm4_moe": 1408}.get(family, 0)
    if family == "glm4_moe":  # half of each head rotated, the first layer dense, sigmoid scores with a bias
        assert (config.rotary_dim, config.dense_layers, config.dense_intermediate_size) == (64, (0,), 10944)
        assert config.router_scoring == "sigmoid" and config.expert_selection_bias and not config.shared_expert_gated
    assert parse(config.to_hf_dict()) == config  # written as its family, read back equal
    if data["model_type"] in ("qwen2_moe", "qwen3_moe"):  # dense layers among the experts', read and written
        sparse = parse({**data, "decoder_sparse_step": 2, "mlp_only_layers": [3]})
        assert sparse.dense_layers == (0, 2, 3, *range(4, data["num_hidden_layers"], 2))
        assert sparse.dense_intermediate_size == data["intermediate_size"] and sparse.intermediate_size == size
        assert parse(sparse.to_hf_dict()) == sparse
        h, shared = config.hidden_size, config.shared_expert_intermediate_size
        moe = config.num_experts * (3 * h * size + h) + (3 * h * shared + h if shared else 0)
        dense = 3 * h * data["intermediate_size"]  # in place of the experts in each dense layer
        assert config.parameters - sparse.parameters == len(sparse.dense_layers) * (moe - dense)
    # and as GPTQ's int4 checkpoint of it (Qwen3-30B-A3B-GPTQ-Int4's quantization_config); Granite MoE's
    # experts, stacked three-dimensional tensors, are no GPTQ layers
    gptq = {**data, "quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                                            "desc_act": False}}
    if data["model_type"] == "granitemoe":
        with pytest.raises(ValueError, match="int4 checkpoints of Granite MoE .every expert of a layer in one "
                                             "tensor. are not implemented"):
            parse(gptq)
    else:
        assert (parse(gptq).int4_format, parse(gptq).num_experts) == ("gptq", experts)


@pytest.mark.parametrize("change, message", [
    (dict(mlp_only_layers=list(range(48))), r"mlp_only_layers = \[0, 1, .* leave no layer with the experts"),
    (dict(mlp_only_layers=[48]), r"mlp_only_layers = \[48\] is not a list of indices of its layers"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step = 0 is not a positive integer"),
    (dict(num_local_experts=64), "num_experts = 128 and num_local_experts = 64 name different counts of experts"),
    (dict(num_experts_per_tok=129), "num_experts_per_tok = 129 is more than the 128 experts"),
    (dict(num_experts=0), "num_experts = 0 is not a positive integer"),
    (dict(norm_topk_prob="yes"), "norm_topk_prob = 'yes' is not true or false"),
    (dict(shared_expert_intermediate_size=64), "shared_expert_intermediate_size = 64 is not read by transformers "
                                               "for model_type 'qwen3_moe'"),
    (dict(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True,
                               "desc_act": True}), "act-order int4 checkpoints .desc_act. of a mixture of experts "
                                                    "are not implemented"),
])
def test_mixture_of_experts_settings_not_implemented_are_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        parse({**QWEN3_30B_A3B, **change})


def test_expert_fields_in_a_dense_family_and_olmoes_clipping_are_refused():
    with pytest.raises(ValueError, match=r"num_experts = 8 is a mixture of experts' field, not read for model_type "
                                         "'llama' .supported: mixtral, qwen2_moe, qwen3_moe, olmoe."):
        parse({**LLAMA3_4X, "num_experts": 8})
    with pytest.raises(ValueError, match="qkv_bias = true is a Qwen2-MoE field, not implemented for model_type "
                                         "'llama'"):
        parse({**LLAMA3_4X, "qkv_bias": True})
    with pytest.raises(ValueError, match=r"clip_qkv = 8.0 \(q, k and v clamped\) is not implemented"):
        parse({**OLMOE_1B_7B, "clip_qkv": 8.0})
    # Qwen2-MoE's q/k/v biases switched off (transformers 5's qkv_bias), and the 0 window transformers 5
    # writes beside use_sliding_window false
    config = parse({**QWEN15_MOE, "qkv_bias": False, "sliding_window": 0})
    assert not config.qkv_bias and config.sliding_window is None
    with pytest.raises(ValueError, match="experts_per_token = 3 must be in 1 .. num_experts = 2"):
        dataclasses.replace(PRESETS["tiny-moe"], num_experts=2, experts_per_token=3)
    for field, value in (("experts_per_token", 2), ("router_scoring", "sigmoid"), ("expert_groups", 2)):
        with pytest.raises(ValueError, match="experts_per_token, shared_expert_intermediate_size, norm_topk_prob, "
                                             "dense_layers and the routing fields describe a mixture of experts"):
            dataclasses.replace(PRESETS["tiny"], **{field: value})
    with pytest.raises(ValueError, match="expert_groups = 3 must divide the 8 experts"):
        dataclasses.replace(PRESETS["tiny-moe"], expert_groups=3)
    with pytest.raises(ValueError, match="1 of 4 expert groups hold fewer than the 3 experts a token picks"):
        dataclasses.replace(PRESETS["tiny-moe"], expert_groups=4, experts_per_token=3)
    with pytest.raises(ValueError, match="dense_intermediate_size is the MLP size of dense_layers"):
        dataclasses.replace(PRESETS["tiny-moe"], dense_layers=(0,))
    with pytest.raises(ValueError, match="every layer is in dense_layers: no layer has the experts"):
        dataclasses.replace(PRESETS["tiny-moe"], dense_layers=(0, 1), dense_intermediate_size=256)
