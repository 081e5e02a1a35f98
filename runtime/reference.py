"""A Llama-style decoder in plain numpy (float32, OpenBLAS matmuls): the reference the tuned
runtime is checked against and the speed it is compared with.

The same computation as ``runtime.llama``: RMSNorm, Q/K/V projections, rotary embedding
(rotate-half, scaled as the config's rope type says), causal grouped-query attention over a
KV cache, output projection, residual, SwiGLU MLP, final norm, LM head, greedy decoding; each
projection plus its bias where the config has one, and Qwen3's RMSNorm of each query and key
head before the rotary embedding where the config has it (``qk_norm``), and Granite's scalars
where set (embeddings, residual branches, softmax scale, logits). Gemma's way: GeGLU, every
norm by 1 + its weight, embeddings times sqrt(hidden_size); Gemma 3's too: each sublayer's
output normalised before its residual add, the sliding layers rotated with their own base;
SmolLM3's layers without a rotary embedding; OLMo 2's norms of the sublayers' outputs alone and
of the whole query and key projections; a mixture of experts' routed MLP (``runtime.experts``);
Ministral 3's queries scaled by position past its original context (``ModelConfig.query_scales``).
Quantised weights enter as the float32 weights their int4 codes stand for.
"""
from __future__ import annotations

import time

import numpy as np

from .generation import Generation, checked_generation, checked_tokens
from .model_config import ModelConfig
from .rope_frequencies import inverse_frequencies, rotation_scale_of
from .sampling import NextTokens, Sampling
from .experts import route, rows_by_expert
from .weights import ROUTER, SHARED_GATE, ModelWeights, bias_name, biased_parts, layer_name, selection_bias_name


def rms_norm(x: np.ndarray, gain: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gain


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GeLU's tanh form (PyTorch's approximate="tanh"), Gemma's gate."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x * x * x)))


def rotate(x: np.ndarray, positions: np.ndarray, theta: float, rope_type: str = "default",
           rotary_dim: int | None = None, **scaling: float | int) -> np.ndarray:
    """Rotary embedding of x[..., T, heads, D] at ``positions`` [T] (angles in float64);
    ``rope_type`` and ``scaling`` as ``runtime.rope_frequencies.inverse_frequencies`` takes them.
    ``rotary_dim`` (partial rotary): only the first that many dims turn, the rest pass through."""
    if rotary_dim is not None and rotary_dim < x.shape[-1]:
        turned = rotate(x[..., :rotary_dim], positions, theta, rope_type, **scaling)
        return np.concatenate([turned, x[..., rotary_dim:]], axis=-1)
    dim = x.shape[-1]
    half = dim // 2
    freqs = inverse_frequencies(dim, theta, rope_type, **scaling)
    angle = positions.astype(np.float64)[:, None] * freqs[None, :]
    scale = rotation_scale_of(rope_type, scaling)  # the attention factor of yarn and longrope (else 1)
    cos = (np.cos(angle) * scale).astype(np.float32)[:, None, :]
    sin = (np.sin(angle) * scale).astype(np.float32)[:, None, :]
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)


class ReferenceModel:
    """``generate(prompts, new_tokens)`` with numpy only; the KV cache is [B, HKV, S, D] per layer."""

    def __init__(self, config: ModelConfig, weights: ModelWeights):
        self.config = config
        self.w = weights.widened()  # it computes in float32: the weights too, once
        self.biased = set(biased_parts(config))

    def _matmul(self, x: np.ndarray, name: str) -> np.ndarray:
        return x @ self.w.linear(name).T

    def _project(self, x: np.ndarray, layer: int, part: str) -> np.ndarray:
        """A projection of a layer, plus its bias where it has one."""
        y = self._matmul(x, layer_name(layer, part))
        return y + self.w[bias_name(layer, part)] if part in self.biased else y

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        """RMSNorm by the gain ``name`` (Gemma's: by 1 + that weight)."""
        gain = self.w[name]
        return rms_norm(x, gain + np.float32(1.0) if self.config.offset_norms else gain, self.config.rms_norm_eps)

    def _lm_head(self, x: np.ndarray) -> np.ndarray:
        c = self.config
        logits = self._matmul(x, "model.embed_tokens.weight" if c.tie_word_embeddings else "lm_head.weight")
        if c.final_softcap:  # Gemma 2
            logits = np.float32(c.final_softcap) * np.tanh(logits / np.float32(c.final_softcap))
        return logits / np.float32(c.logits_scaling) if c.logits_scaling != 1.0 else logits

    def _attention(self, q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, start: int,
                   window: int = 0) -> np.ndarray:
        """q[B, T, H, D] at positions start..start+T-1 against cache positions 0..start+T-1
        (``window``: only the last ``window`` of them up to each query's own)."""
        c = self.config
        b, t = q.shape[:2]
        group = c.num_attention_heads // c.num_key_value_heads
        length = start + t
        qg = q.reshape(b, t, c.num_key_value_heads, group, c.head_dim).transpose(0, 2, 3, 1, 4)  # B,HKV,G,T,D
        keys, values = k_cache[:, :, :length], v_cache[:, :, :length]                            # B,HKV,L,D
        scores = np.matmul(qg, keys[:, :, None].transpose(0, 1, 2, 4, 3)) * np.float32(c.attention_scale)
        if c.attn_softcap:  # Gemma 2
            scores = np.float32(c.attn_softcap) * np.tanh(scores / np.float32(c.attn_softcap))
        queries = (start + np.arange(t))[:, None]
        mask = np.arange(length)[None, :] > queries  # causal: query i (at start + i) sees keys 0..start + i
        if window:
            mask |= np.arange(length)[None, :] <= queries - window
        if mask.any():
            scores = np.where(mask, np.float32(-np.inf), scores)
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        scores /= scores.sum(axis=-1, keepdims=True)
        out = np.matmul(scores, values[:, :, None])                                             # B,HKV,G,T,D
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.q_size)

    def _mlp(self, h: np.ndarray, layer: int, owner: str) -> np.ndarray:
        """The gated MLP ``owner`` of a layer ("mlp", or an expert's "mlp.experts.E", "mlp.shared_expert")."""
        gate = self._project(h, layer, f"{owner}.gate_proj")
        up = self._project(h, layer, f"{owner}.up_proj")
        act = gelu_tanh(gate) if self.config.activation == "gelu_tanh" else gate / (1.0 + np.exp(-gate))
        return self._project(act * up, layer, f"{owner}.down_proj")

    def _experts(self, h: np.ndarray, layer: int) -> np.ndarray:
        """A mixture of experts' MLP: each row through the experts the router picks for it
        (``runtime.experts.route``), their outputs weighted and summed; Qwen2-MoE's shared expert,
        gated by a sigmoid, added."""
        c = self.config
        rows = h.reshape(-1, c.hidden_size)
        bias = self.w[selection_bias_name(c, layer)].reshape(-1) if c.expert_selection_bias else None
        experts, weights = route(self._matmul(rows, layer_name(layer, ROUTER)), c.experts_per_token, c.norm_topk_prob,
                                 bias, c.router_scoring, c.expert_groups, c.expert_groups_per_token,
                                 c.routed_scaling_factor)
        out = np.zeros_like(rows)
        for expert, (picked, weight) in rows_by_expert(experts, weights).items():
            out[picked] += weight[:, None] * self._mlp(rows[picked], layer, f"mlp.experts.{expert}")
        if c.shared_expert_intermediate_size:
            shared = self._mlp(rows, layer, "mlp.shared_expert")
            if c.shared_expert_gated:  # Qwen2-MoE's sigmoid gate; ERNIE 4.5's shared experts are added as they are
                shared = shared / (1.0 + np.exp(-self._matmul(rows, layer_name(layer, SHARED_GATE))))
            out += shared
        return out.reshape(h.shape)

    def forward(self, ids: np.ndarray, start: int, caches: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """Logits [B, V] of the last of the tokens ``ids`` [B, T] placed at ``start``."""
        c, w = self.config, self.w
        ids = checked_tokens(c, ids, scales_queries=True)
        b, t = ids.shape
        x = w["model.embed_tokens.weight"][ids]                                                   # B,T,h
        residual = np.float32(c.residual_multiplier)  # Granite's scalars: 1 elsewhere
        if c.embedding_multiplier != 1.0:
            x = x * np.float32(c.embedding_multiplier)
        positions = np.arange(start, start + t)
        scaling = c.rope_scaling_for(start + t)  # past longrope's original context the pass turns by long_factor
        query_scales = c.query_scales(positions)
        for layer in range(c.num_hidden_layers):
            h = self._norm(x, layer_name(layer, "input_layernorm")) if c.pre_norms else x  # OLMo 2: no pre-norm
            q = self._project(h, layer, "self_attn.q_proj")
            k = self._project(h, layer, "self_attn.k_proj")
            v = self._project(h, layer, "self_attn.v_proj").reshape(b, t, c.num_key_value_heads, c.head_dim)
            if c.qk_norm and c.qk_norm_span == "projection":  # OLMo 2: the whole projection is one row
                q = self._norm(q, layer_name(layer, "self_attn.q_norm"))
                k = self._norm(k, layer_name(layer, "self_attn.k_norm"))
            q = q.reshape(b, t, c.num_attention_heads, c.head_dim)
            k = k.reshape(b, t, c.num_key_value_heads, c.head_dim)
            if c.qk_norm and c.qk_norm_span == "head":
                q = self._norm(q, layer_name(layer, "self_attn.q_norm"))
                k = self._norm(k, layer_name(layer, "self_attn.k_norm"))
            if layer in c.nope_layers:  # SmolLM3's layers without a rotary embedding
                pass
            elif layer in c.local_layers and c.local_rope_theta is not None:  # Gemma 3's sliding layers: the
                # default rope of their own base
                q, k = (rotate(t, positions, c.local_rope_theta) for t in (q, k))
            else:
                q, k = (rotate(t, positions, c.rope_theta, c.rope_type, c.rotary_dim, **scaling) for t in (q, k))
            if query_scales is not None:  # Ministral 3's past its original context
                q = q * query_scales[:, None, None]
            k_cache, v_cache = caches[layer]
            k_cache[:, :, start:start + t] = k.transpose(0, 2, 1, 3)
            v_cache[:, :, start:start + t] = v.transpose(0, 2, 1, 3)
            attn = self._attention(q, k_cache, v_cache, start, c.layer_window(layer))
            out = self._project(attn, layer, "self_attn.o_proj")
            if c.post_norms:  # Gemma 3, OLMo 2: post_attention_layernorm normalises attention's output
                x = x + self._norm(out, layer_name(layer, "post_attention_layernorm"))
                h = self._norm(x, layer_name(layer, "pre_feedforward_layernorm")) if c.pre_norms else x
            else:
                x = x + out * residual
                h = self._norm(x, layer_name(layer, "post_attention_layernorm"))
            out = self._experts(h, layer) if c.moe_layer(layer) else self._mlp(h, layer, "mlp")
            x = x + (self._norm(out, layer_name(layer, "post_feedforward_layernorm")) if c.post_norms
                     else out * residual)
        h = self._norm(x[:, -1], "model.norm.weight")
        return self._lm_head(h)

    def generate(self, prompts: np.ndarray, new_tokens: int, sampling: Sampling | None = None, stop_ids=(),
                 pad_id: int | None = None) -> Generation:
        """Up to ``new_tokens`` tokens after ``prompts`` [B, T], chosen and ended as
        ``LlamaModel.generate`` chooses and ends them."""
        c = self.config
        prompts, new_tokens = checked_generation(c, prompts, new_tokens, scales_queries=True)
        b, t = prompts.shape
        chooser = NextTokens(b, sampling, stop_ids, pad_id, c.vocab_size)
        capacity = t + new_tokens
        caches = [(np.zeros((b, c.num_key_value_heads, capacity, c.head_dim), np.float32),
                   np.zeros((b, c.num_key_value_heads, capacity, c.head_dim), np.float32))
                  for _ in range(c.num_hidden_layers)]
        begin = time.perf_counter()
        logits = [self.forward(prompts, 0, caches)]
        prefill_s = time.perf_counter() - begin
        tokens = [chooser(logits[0])]
        begin = time.perf_counter()
        for step in range(1, new_tokens):
            if chooser.all_ended:
                break
            position = t + step - 1
            if c.rope_is_long(position + 1) and not c.rope_is_long(position):
                # crossing longrope's original context, transformers' Phi-3 runs the whole sequence
                # again (its cache dropped), every position rotated by long_factor
                sequence = np.concatenate([prompts, np.stack(tokens, axis=1)], axis=1)
                logits.append(self.forward(sequence, 0, caches))
            else:
                logits.append(self.forward(tokens[-1][:, None], position, caches))
            tokens.append(chooser(logits[-1]))
        decode_s = time.perf_counter() - begin
        return Generation(np.stack(tokens, axis=1), np.stack(logits, axis=1), prefill_s, decode_s, b * t,
                          b * (len(tokens) - 1))
