"""A Llama-style decoder whose every operator runs on tuned kernels.

Embedding (a gather on the host), then per layer: RMSNorm, Q/K/V projections, rotary
embedding, attention (flash-style over the prompt in prefill; split-KV against the cache in
decode), output projection, residual add fused into the next RMSNorm, SwiGLU MLP; a final
norm, the LM head and greedy decoding. The kernels and their shapes are those of
``runtime.plan``, from any ``KernelProvider`` (an exported library, tuning logs, or the
template defaults); activations, weights and the KV cache live where the kernels run
(``runtime.arrays``: numpy for CPU kernels, device memory for CUDA ones).

Prompts are padded up to the nearest token count the prefill GEMMs were tuned at (their
M is compiled in): causal attention keeps the real tokens blind to the padding, and the
cache is only read up to the real length. Decode steps bind every buffer once, so a step
costs the kernels plus one foreign call (or launch) each.
"""
from __future__ import annotations

import time

import numpy as np

from .arrays import arrays_for
from .generation import Generation
from .kernel import BoundCall, Kernel, KernelProvider, buckets, select
from .model_config import ModelConfig
from .plan import KernelCall, decode_calls, prefill_calls
from .weights import ModelWeights, layer_name


class _Buffers:
    """Activations of one pass over ``rows`` token rows, ``[rows, width]`` each."""

    def __init__(self, arrays, rows: int, config: ModelConfig):
        c = config
        self.rows = rows
        self.names = {name: arrays.empty((rows, width)) for name, width in (
            ("res_a", c.hidden_size), ("res_b", c.hidden_size), ("h", c.hidden_size), ("q", c.q_size),
            ("k", c.kv_size), ("v", c.kv_size), ("qr", c.q_size), ("kr", c.kv_size), ("attn", c.q_size),
            ("o", c.hidden_size), ("gate", c.intermediate_size), ("up", c.intermediate_size),
            ("act", c.intermediate_size), ("mlp", c.hidden_size))}
        self.__dict__.update(self.names)  # plain attributes: buf.h is read often, __getattr__ costs 0.4 us
        self.positions = arrays.zeros((rows,), np.int32)


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
        self.arrays = arrays_for(getattr(kernels, "kind", "cpu"))
        self.quantize = "q4" if weights.quantized else "none"
        self.group_size = weights.group_size or 128
        self.lm_head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self.embed = weights["model.embed_tokens.weight"]  # gathered on the host
        self.used: dict[str, Kernel] = {}  # every kernel handed out, by what it was tuned for
        self.prefill_sizes = prefill_sizes
        self._memo: dict[tuple, Kernel] = {}  # the provider's answer per call shape
        self._padded: dict[tuple[int, int], int] = {}  # padded_tokens per (batch, prompt length)
        self._device: dict[str, object] = {}  # weights where the kernels read them, by name

    # -- kernels and weights ---------------------------------------------------------
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

    def _weight(self, name: str, part: str = "") -> object:
        """A weight tensor (or part of a quantised one: "wq", "scales") where the kernels run."""
        key = f"{name}#{part}"
        if key not in self._device:
            host = getattr(self.w.quantized[name], part) if part else self.w.tensors[name]
            self._device[key] = self.arrays.upload(host)
        return self._device[key]

    def padded_tokens(self, batch: int, tokens: int) -> int:
        """The prompt length a prefill runs at: the smallest length >= the prompt's at which
        every kernel of the pass is tuned. Candidates are the prompt's own length and the
        token counts the prefill linear layers were tuned at (GEMMs, and GEMVs for short
        prompts); without a fully tuned one, the smallest tuned linear size that fits, else
        the prompt's own length. Causal attention keeps the real tokens blind to the padding."""
        if self.prefill_sizes is not None:
            return min((t for t in self.prefill_sizes if t >= tokens), default=tokens)
        key = (batch, tokens)
        if key not in self._padded:  # the search costs a third of a millisecond: once per prompt shape
            self._padded[key] = self._search_padded(batch, tokens)
        return self._padded[key]

    def _search_padded(self, batch: int, tokens: int) -> int:
        specs = self.kernels.specs()
        probe = next(c for c in self._prefill(tokens, batch) if c.role == "q_proj").spec.shape
        tuned_sizes = sorted({m // batch for op in ("gemm", "gemv", "gemm_q4", "gemv_q4")
                              for m in buckets(specs, op, "M", N=probe["N"], K=probe["K"])
                              if m % batch == 0 and m // batch >= tokens})
        for length in sorted({tokens, *tuned_sizes}):
            if all(select(specs, lambda spec: spec, call.spec) is not None for call in self._prefill(length, batch)):
                return length
        return tuned_sizes[0] if tuned_sizes else tokens

    def _prefill(self, tokens: int, batch: int) -> list[KernelCall]:
        return prefill_calls(self.config, tokens, self.quantize, self.group_size, batch)

    def _linear(self, kernel: Kernel, name: str, x, y) -> BoundCall:
        if name in self.w.quantized:
            return kernel.bind({"X": x, "WQ": self._weight(name, "wq"), "SCALES": self._weight(name, "scales"),
                                "Y": y})
        return kernel.bind({"X": x, "W": self._weight(name), "Y": y})

    def _norm(self, kernel: Kernel, gain: str, x, out, rows: int, residual=None, new_residual=None) -> BoundCall:
        arrays = {"X": x, "G": self._weight(gain), "Y": out}
        if residual is not None:
            arrays.update(R=residual, S=new_residual)
        return kernel.bind(arrays, {"M": rows})

    # -- one pass ----------------------------------------------------------------------
    def _layer_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int) -> tuple[list, list]:
        """Bound calls of one layer before and after attention (the cache write and the
        attention itself sit between them), the residual stream ending in ``res_a``."""
        c, lay, rows = self.config, layer, buf.rows
        before = [self._linear(k["q_proj"], layer_name(lay, "self_attn.q_proj"), buf.h, buf.q),
                  self._linear(k["kv_proj"], layer_name(lay, "self_attn.k_proj"), buf.h, buf.k),
                  self._linear(k["kv_proj"], layer_name(lay, "self_attn.v_proj"), buf.h, buf.v),
                  k["rope_q"].bind({"X": buf.q, "P": buf.positions, "Y": buf.qr}, {"T": rows}),
                  k["rope_k"].bind({"X": buf.k, "P": buf.positions, "Y": buf.kr}, {"T": rows})]
        last = lay == c.num_hidden_layers - 1
        next_gain = "model.norm.weight" if last else layer_name(lay + 1, "input_layernorm")
        after = [self._linear(k["o_proj"], layer_name(lay, "self_attn.o_proj"), buf.attn, buf.o),
                 self._norm(k["residual_norm"], layer_name(lay, "post_attention_layernorm"), buf.o, buf.h, rows,
                            buf.res_a, buf.res_b),
                 self._linear(k["gate_up_proj"], layer_name(lay, "mlp.gate_proj"), buf.h, buf.gate),
                 self._linear(k["gate_up_proj"], layer_name(lay, "mlp.up_proj"), buf.h, buf.up),
                 k["swiglu"].bind({"G": buf.gate, "U": buf.up, "Y": buf.act}, {"M": rows}),
                 self._linear(k["down_proj"], layer_name(lay, "mlp.down_proj"), buf.act, buf.mlp),
                 self._norm(k["residual_norm"], next_gain, buf.mlp, buf.h, rows, buf.res_b, buf.res_a)]
        return before, after

    def prefill(self, prompts: np.ndarray, caches: list) -> tuple[np.ndarray, int]:
        """Run the prompts [B, T] through the model, filling ``caches``; logits [B, V] of the
        last prompt token (on the host) and the padded length the pass ran at."""
        c, arrays = self.config, self.arrays
        batch, tokens = prompts.shape
        padded = self.padded_tokens(batch, tokens)
        k = self._plan(prefill_calls(c, padded, self.quantize, self.group_size, batch))
        buf = _Buffers(arrays, batch * padded, c)
        ids = np.zeros((batch, padded), dtype=np.int64)
        ids[:, :tokens] = prompts
        arrays.set(buf.res_a, np.take(self.embed, ids.reshape(-1), axis=0))
        arrays.set(buf.positions, np.tile(np.arange(padded, dtype=np.int32), batch))
        self._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h, buf.rows)()
        attention = k["attention"]
        for layer in range(c.num_hidden_layers):
            before, after = self._layer_calls(k, buf, layer)
            for call in before:
                call()
            attention.bind({"Q": buf.qr, "K": buf.kr, "V": buf.v, "O": buf.attn}, {"T": padded})()
            k_cache, v_cache = caches[layer]
            arrays.write_prompt(k_cache, buf.kr, padded)
            arrays.write_prompt(v_cache, buf.v, padded)
            for call in after:
                call()
        last = arrays.rows_at(buf.h, batch, tokens - 1, arrays.empty((batch, c.hidden_size)))
        logits = arrays.empty((batch, c.vocab_size))
        self._linear(k["lm_head"], self.lm_head_name, last, logits)()
        return arrays.get(logits), padded

    def new_caches(self, batch: int, capacity: int) -> list:
        c = self.config
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        return [(self.arrays.zeros(shape), self.arrays.zeros(shape)) for _ in range(c.num_hidden_layers)]

    def prepare(self, batch: int, tokens: int, new_tokens: int) -> None:
        """Load every kernel a generation of this size uses, so that timing it measures only
        the run (kernels from a tuning log are compiled on first use)."""
        self.config.check_sequence(tokens + new_tokens)  # a Mistral sliding window: refused past it
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
        # attention here sees the whole cache: a sequence past a sliding window is refused
        self.config.check_sequence(tokens + new_tokens)
        padded = self.padded_tokens(batch, tokens)
        capacity = padded + new_tokens
        caches = self.new_caches(batch, capacity)
        begin = time.perf_counter()
        first, _ = self.prefill(prompts, caches)
        prefill_s = time.perf_counter() - begin
        # ndarray.argmax: np.argmax's dispatch costs 0.6 us more, per decode step
        logits, ids = [first.copy()], [first.argmax(axis=-1)]
        # the attention calls of every KV length to come are bound here, not in the timed steps
        step = _DecodeStep(self, batch, capacity, caches, range(tokens + 1, tokens + new_tokens))
        begin = time.perf_counter()
        for position in range(tokens, tokens + new_tokens - 1):
            out = step(ids[-1], position)
            logits.append(out.copy())
            ids.append(out.argmax(axis=-1))
        decode_s = time.perf_counter() - begin
        return Generation(np.stack(ids, axis=1), np.stack(logits, axis=1), prefill_s, decode_s, batch * tokens,
                          batch * (new_tokens - 1))


class _DecodeStep:
    """One decode step for ``batch`` sequences with every buffer bound once.

    A step of the tiny model is 28 kernel calls of 1-2 us each, so whatever Python does
    between them shows: everything a step can look up is looked up here, once. The calls
    whose dims never change are kept as their ``BoundCall.run`` (the foreign call and nothing
    else); attention takes the new KV length through its bound call, which checks it."""

    def __init__(self, model: LlamaModel, batch: int, capacity: int, caches, lengths=()):
        """``lengths``: the KV lengths the steps will run at, whose attention calls are bound
        now (any other is bound on first use)."""
        c = model.config
        self.model, self.batch, self.capacity, self.caches = model, batch, capacity, caches
        self.arrays = arrays = model.arrays
        self.embed = model.embed
        self.calls = decode_calls(c, batch, capacity, model.quantize, model.group_size)
        self.attention_call = next(call for call in self.calls if call.role == "attention")
        k = model._plan(self.calls)
        self.buf = buf = _Buffers(arrays, batch, c)
        self.logits = arrays.empty((batch, c.vocab_size))
        # the bound calls own the checks and keep their buffers alive; the step runs their ``run``
        self.bound = [model._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h, batch)]
        self.layers = []  # per layer: (runs before attention, K and V cache writers, runs after)
        for layer, (k_cache, v_cache) in enumerate(caches):
            before, after = model._layer_calls(k, buf, layer)
            self.bound += before + after
            self.layers.append((tuple(call.run for call in before), arrays.position_writer(k_cache, buf.kr),
                                arrays.position_writer(v_cache, buf.v), tuple(call.run for call in after)))
        self.bound.append(model._linear(k["lm_head"], model.lm_head_name, buf.h, self.logits))
        self.first_norm, self.lm_head = self.bound[0].run, self.bound[-1].run
        self._attention: dict[int, list[BoundCall]] = {}  # by kernel identity: buckets may switch with L
        self._by_length: dict[int, list[BoundCall]] = {}  # the same lists by KV length: one lookup a step
        for length in lengths:
            self._attention_calls(length)

    def _attention_calls(self, length: int) -> list[BoundCall]:
        calls = self._by_length.get(length)
        if calls is not None:
            return calls
        kernel = self.model._kernel(self.attention_call, S=self.capacity, L=length)
        calls = self._attention.get(id(kernel))
        if calls is None:
            buf = self.buf
            calls = [kernel.bind({"Q": buf.qr, "K": k_cache, "V": v_cache, "O": buf.attn},
                                 {"S": self.capacity, "L": length}) for k_cache, v_cache in self.caches]
            self._attention[id(kernel)] = calls
        self._by_length[length] = calls
        return calls

    def __call__(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """Logits [B, V] (on the host) after feeding ``tokens`` [B] at ``position``."""
        arrays, buf = self.arrays, self.buf
        arrays.gather_rows(buf.res_a, self.embed, tokens)
        arrays.fill(buf.positions, position)
        length = position + 1
        attention = self._attention_calls(length)
        self.first_norm()
        for (before, write_k, write_v, after), attend in zip(self.layers, attention):
            for run in before:
                run()
            write_k(position)
            write_v(position)
            attend(L=length)  # checked: at most the cache's S rows
            for run in after:
                run()
        self.lm_head()
        return arrays.get(self.logits)
