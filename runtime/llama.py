"""A Llama-style decoder whose every operator runs on tuned kernels.

Embedding (a numpy gather), then per layer: RMSNorm, Q/K/V projections, rotary embedding,
attention (flash-style over the prompt in prefill; split-KV against the cache in decode),
output projection, residual add fused into the next RMSNorm, SwiGLU MLP; a final norm,
the LM head and greedy decoding. The kernels and their shapes are those of
``runtime.plan``, from any ``KernelProvider`` (an exported library, tuning logs, or the
template defaults).

Prompts are padded up to the nearest token count the prefill GEMMs were tuned at (their
M is compiled in): causal attention keeps the real tokens blind to the padding, and the
cache is only read up to the real length. Decode steps bind every buffer once, so a step
costs the kernels plus one foreign call each.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .generation import Generation
from .kernel import BoundCall, Kernel, KernelProvider, buckets
from .model_config import ModelConfig
from .plan import KernelCall, decode_calls, prefill_calls
from .weights import ModelWeights, layer_name


def _empty(*shape: int) -> np.ndarray:
    return np.empty(shape, dtype=np.float32)


@dataclass
class _Buffers:
    """Activations of one pass over ``rows`` token rows."""

    rows: int
    config: ModelConfig
    names: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        c, r = self.config, self.rows
        for name, width in (("res_a", c.hidden_size), ("res_b", c.hidden_size), ("h", c.hidden_size),
                            ("q", c.q_size), ("k", c.kv_size), ("v", c.kv_size), ("qr", c.q_size),
                            ("kr", c.kv_size), ("attn", c.q_size), ("o", c.hidden_size),
                            ("gate", c.intermediate_size), ("up", c.intermediate_size),
                            ("act", c.intermediate_size), ("mlp", c.hidden_size)):
            self.names[name] = _empty(r, width)
        self.positions = np.zeros(r, dtype=np.int32)

    def __getattr__(self, name: str) -> np.ndarray:
        try:
            return self.__dict__["names"][name]
        except KeyError:
            raise AttributeError(name) from None


class LlamaModel:
    """``generate(prompts, new_tokens)`` on kernels from ``kernels``."""

    def __init__(self, config: ModelConfig, weights: ModelWeights, kernels: KernelProvider,
                 prefill_sizes: list[int] | None = None):
        """``prefill_sizes``: the token counts to pad prompts up to, instead of the sizes the
        provider's prefill GEMMs were tuned at (to run two providers at the same shapes)."""
        if weights.config != config:
            raise ValueError("the weights were made for another model config")
        self.config = config
        self.w = weights
        self.kernels = kernels
        self.quantize = "q4" if weights.quantized else "none"
        self.group_size = weights.group_size or 128
        self.lm_head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self.used: dict[str, Kernel] = {}  # every kernel handed out, by what it was tuned for
        self.prefill_sizes = prefill_sizes
        self._memo: dict[tuple, Kernel] = {}  # the provider's answer per call shape

    # -- kernels ---------------------------------------------------------------------
    def _kernel(self, call: KernelCall, **dims: int) -> Kernel:
        spec = call.spec
        shape = spec.shape
        shape.update(dims)
        key = (spec.op, tuple(shape.items()), spec.dtype, spec.attrs, spec.dynamic)
        kernel = self._memo.get(key)
        if kernel is None:
            kernel = self._memo[key] = self.kernels.get(spec.op, shape, spec.dtype, spec.attr, spec.dynamic)
            self.used[kernel.spec.describe()] = kernel
        return kernel

    def _plan(self, calls: list[KernelCall]) -> dict[str, Kernel]:
        return {call.role: self._kernel(call) for call in calls}

    def padded_tokens(self, batch: int, tokens: int) -> int:
        """The prompt length a prefill runs at: the smallest tuned GEMM M >= batch * tokens
        that is a multiple of the batch, else the prompt's own length."""
        if self.prefill_sizes is not None:
            return min((t for t in self.prefill_sizes if t >= tokens), default=tokens)
        probe = prefill_calls(self.config, tokens, self.quantize, self.group_size, batch)
        q_proj = next(c for c in probe if c.role == "q_proj").spec
        shape = q_proj.shape
        sizes = buckets(self.kernels.specs(), q_proj.op, "M", N=shape["N"], K=shape["K"])
        for m in sizes:
            if m >= batch * tokens and m % batch == 0:
                return m // batch
        return tokens

    def _linear(self, kernel: Kernel, name: str, x: np.ndarray, y: np.ndarray) -> BoundCall:
        q = self.w.quantized.get(name)
        if q is not None:
            return kernel.bind({"X": x, "WQ": q.wq, "SCALES": q.scales, "Y": y})
        return kernel.bind({"X": x, "W": self.w.tensors[name], "Y": y})

    def _norm(self, kernel: Kernel, gain: str, x: np.ndarray, out: np.ndarray,
              residual: np.ndarray | None = None, new_residual: np.ndarray | None = None) -> BoundCall:
        arrays = {"X": x, "G": self.w[gain], "Y": out}
        if residual is not None:
            arrays.update(R=residual, S=new_residual)
        return kernel.bind(arrays)

    # -- one pass ----------------------------------------------------------------------
    def _layer_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int) -> tuple[list, list]:
        """Bound calls of one layer before and after attention (the cache write and the
        attention itself sit between them), the residual stream ending in ``res_a``."""
        c, lay = self.config, layer
        before = [self._linear(k["q_proj"], layer_name(lay, "self_attn.q_proj"), buf.h, buf.q),
                  self._linear(k["kv_proj"], layer_name(lay, "self_attn.k_proj"), buf.h, buf.k),
                  self._linear(k["kv_proj"], layer_name(lay, "self_attn.v_proj"), buf.h, buf.v),
                  k["rope_q"].bind({"X": buf.q, "P": buf.positions, "Y": buf.qr}, {"T": buf.rows}),
                  k["rope_k"].bind({"X": buf.k, "P": buf.positions, "Y": buf.kr}, {"T": buf.rows})]
        last = lay == c.num_hidden_layers - 1
        next_gain = "model.norm.weight" if last else layer_name(lay + 1, "input_layernorm")
        after = [self._linear(k["o_proj"], layer_name(lay, "self_attn.o_proj"), buf.attn, buf.o),
                 self._norm(k["residual_norm"], layer_name(lay, "post_attention_layernorm"), buf.o, buf.h,
                            buf.res_a, buf.res_b),
                 self._linear(k["gate_up_proj"], layer_name(lay, "mlp.gate_proj"), buf.h, buf.gate),
                 self._linear(k["gate_up_proj"], layer_name(lay, "mlp.up_proj"), buf.h, buf.up),
                 k["swiglu"].bind({"G": buf.gate, "U": buf.up, "Y": buf.act}),
                 self._linear(k["down_proj"], layer_name(lay, "mlp.down_proj"), buf.act, buf.mlp),
                 self._norm(k["residual_norm"], next_gain, buf.mlp, buf.h, buf.res_b, buf.res_a)]
        return before, after

    def prefill(self, prompts: np.ndarray, caches: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, int]:
        """Run the prompts [B, T] through the model, filling ``caches``; logits [B, V] of the
        last prompt token and the padded length the pass ran at."""
        c = self.config
        batch, tokens = prompts.shape
        padded = self.padded_tokens(batch, tokens)
        k = self._plan(prefill_calls(c, padded, self.quantize, self.group_size, batch))
        buf = _Buffers(batch * padded, c)
        ids = np.zeros((batch, padded), dtype=np.int64)
        ids[:, :tokens] = prompts
        np.take(self.w["model.embed_tokens.weight"], ids.reshape(-1), axis=0, out=buf.res_a)
        buf.positions[:] = np.tile(np.arange(padded, dtype=np.int32), batch)
        self._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h)()
        attention = k["attention"]
        group_shape = (batch, padded, c.num_key_value_heads, c.head_dim)
        for layer in range(c.num_hidden_layers):
            before, after = self._layer_calls(k, buf, layer)
            for call in before:
                call()
            attention.bind({"Q": buf.qr, "K": buf.kr, "V": buf.v, "O": buf.attn}, {"T": padded})()
            k_cache, v_cache = caches[layer]
            k_cache[:, :, :padded] = buf.kr.reshape(group_shape).transpose(0, 2, 1, 3)
            v_cache[:, :, :padded] = buf.v.reshape(group_shape).transpose(0, 2, 1, 3)
            for call in after:
                call()
        last = np.ascontiguousarray(buf.h.reshape(batch, padded, c.hidden_size)[:, tokens - 1])
        logits = _empty(batch, c.vocab_size)
        self._linear(k["lm_head"], self.lm_head_name, last, logits)()
        return logits, padded

    def new_caches(self, batch: int, capacity: int) -> list[tuple[np.ndarray, np.ndarray]]:
        c = self.config
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        return [(np.zeros(shape, np.float32), np.zeros(shape, np.float32)) for _ in range(c.num_hidden_layers)]

    def prepare(self, batch: int, tokens: int, new_tokens: int) -> None:
        """Load every kernel a generation of this size uses, so that timing it measures only
        the run (kernels from a tuning log are compiled on first use)."""
        padded = self.padded_tokens(batch, tokens)
        self._plan(prefill_calls(self.config, padded, self.quantize, self.group_size, batch))
        capacity = padded + new_tokens
        calls = decode_calls(self.config, batch, capacity, self.quantize, self.group_size)
        self._plan(calls)
        attention = next(c for c in calls if c.role == "attention")
        for length in range(tokens + 1, tokens + new_tokens):
            self._kernel(attention, S=capacity, L=length)

    def generate(self, prompts: np.ndarray, new_tokens: int) -> Generation:
        """Greedy decoding of ``new_tokens`` tokens after ``prompts`` [B, T]."""
        prompts = np.asarray(prompts, dtype=np.int64)
        if prompts.ndim != 2 or prompts.shape[1] < 1 or new_tokens < 1:
            raise ValueError("prompts must be [batch, tokens] with tokens >= 1, and new_tokens >= 1")
        if prompts.min() < 0 or prompts.max() >= self.config.vocab_size:
            raise ValueError(f"token ids must lie in 0..{self.config.vocab_size - 1}")
        batch, tokens = prompts.shape
        padded = self.padded_tokens(batch, tokens)
        capacity = padded + new_tokens
        caches = self.new_caches(batch, capacity)
        begin = time.perf_counter()
        first, _ = self.prefill(prompts, caches)
        prefill_s = time.perf_counter() - begin
        logits, ids = [first.copy()], [np.argmax(first, axis=-1)]
        step = _DecodeStep(self, batch, capacity, caches)
        begin = time.perf_counter()
        for position in range(tokens, tokens + new_tokens - 1):
            out = step(ids[-1], position)
            logits.append(out.copy())
            ids.append(np.argmax(out, axis=-1))
        decode_s = time.perf_counter() - begin
        return Generation(np.stack(ids, axis=1), np.stack(logits, axis=1), prefill_s, decode_s, batch * tokens,
                          batch * (new_tokens - 1))


class _DecodeStep:
    """One decode step for ``batch`` sequences with every buffer bound once."""

    def __init__(self, model: LlamaModel, batch: int, capacity: int, caches):
        c = model.config
        self.model, self.batch, self.capacity, self.caches = model, batch, capacity, caches
        self.calls = decode_calls(c, batch, capacity, model.quantize, model.group_size)
        self.attention_call = next(call for call in self.calls if call.role == "attention")
        k = model._plan(self.calls)
        self.buf = buf = _Buffers(batch, c)
        self.first_norm = model._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h)
        self.layers = [model._layer_calls(k, buf, layer) for layer in range(c.num_hidden_layers)]
        self.logits = _empty(batch, c.vocab_size)
        self.lm_head = model._linear(k["lm_head"], model.lm_head_name, buf.h, self.logits)
        self.embed = model.w["model.embed_tokens.weight"]
        self.kv_shape = (batch, c.num_key_value_heads, c.head_dim)
        self._attention: dict[int, list[BoundCall]] = {}  # by kernel identity: buckets may switch with L

    def _attention_calls(self, length: int) -> list[BoundCall]:
        kernel = self.model._kernel(self.attention_call, S=self.capacity, L=length)
        calls = self._attention.get(id(kernel))
        if calls is None:
            buf = self.buf
            calls = [kernel.bind({"Q": buf.qr, "K": k_cache, "V": v_cache, "O": buf.attn},
                                 {"S": self.capacity, "L": length}) for k_cache, v_cache in self.caches]
            self._attention[id(kernel)] = calls
        return calls

    def __call__(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """Logits [B, V] after feeding ``tokens`` [B] at ``position``."""
        buf = self.buf
        np.take(self.embed, tokens, axis=0, out=buf.res_a)
        buf.positions[:] = position
        length = position + 1
        attention = self._attention_calls(length)
        self.first_norm()
        kr, v = buf.kr.reshape(self.kv_shape), buf.v.reshape(self.kv_shape)
        for (before, after), attend, (k_cache, v_cache) in zip(self.layers, attention, self.caches):
            for call in before:
                call()
            k_cache[:, :, position] = kr
            v_cache[:, :, position] = v
            attend(L=length)
            for call in after:
                call()
        self.lm_head()
        return self.logits

