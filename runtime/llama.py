"""A Llama-style decoder whose every operator runs on tuned kernels.

Embedding (a gather on the host), then per layer: RMSNorm, Q/K/V projections, rotary
embedding, attention (flash-style over the prompt in prefill; split-KV against the cache in
decode), output projection, residual add fused into the next RMSNorm, SwiGLU MLP; a final
norm, the LM head and greedy decoding. The kernels and their shapes are those of
``runtime.plan``, from any ``KernelProvider`` (an exported library, tuning logs, or the
template defaults); activations, weights and the KV cache live where the kernels run
(``runtime.arrays``: numpy for CPU kernels, device memory for CUDA ones).

Granite's scalars are folded into the weights as they are copied to where the kernels run
(``LlamaModel._factor``): the embedding table times ``embedding_multiplier``, the output and
down projections (weights and biases) times ``residual_multiplier``, the LM head over
``logits_scaling``; its ``attention_multiplier`` is the attention kernels' ``scale``. So are
Gemma's: its embedding scale (``embedding_multiplier``, rounded to a 16-bit model's precision
as transformers rounds it) and its norms' 1 + weight (``ModelConfig.offset_norms``: the gains
uploaded are 1 + weight). Gemma 3 normalises each sublayer's output before its residual add
(``post_norm`` into ``post``, which the residual norm then adds).

Ministral 3's queries past its original context are scaled by position after their rotary
embedding (``ModelConfig.query_scales``): on CPU kernels the step multiplies the rows of q in place
(numpy reaches them); on CUDA kernels, which do not, such a generation is refused.

A bfloat16 or float16 model on CPU kernels is weight-only (``runtime.plan.precisions``): its
linear layers read 16-bit words (half the bytes of a decode step), and everything else computes
and is stored in float32, holding the 16-bit values of the weights it came from. An int4
checkpoint (GPTQ, AWQ) keeps its LM head in floats: there it is the one weight-only layer.

Prompts are padded up to the nearest token count the prefill GEMMs were tuned at (their
M is compiled in): causal attention keeps the real tokens blind to the padding, and the
cache is only read up to the real length. Decode steps bind every buffer once, so a step
costs the kernels plus one foreign call (or launch) each.
"""
from __future__ import annotations

import functools
import time

import numpy as np

from .abi import KernelSpec
from .arrays import arrays_for
from .experts import route, rows_by_expert
from .generation import Generation, checked_generation, checked_tokens
from .kernel import BoundCall, Kernel, KernelProvider, buckets, numpy_dtype, select
from .model_config import ModelConfig
from .plan import (ACT_ORDER_GATHERS, FUSED_ATTRS, GATED_ACTS, GEMV_MAX_M, PREFILL_DYNAMIC_ROWS, KernelCall,
                   attention_suffix, bias_role, biased_projections, can_fuse_norms, decode_calls, precisions,
                   prefill_calls, rope_suffix, unfused)
from .precision import check_dtype, from_float, rounded, stored_as, to_float32, widened
from .sampling import NextTokens, Sampling
from .weights import (QK_NORMS, DeviceWeights, ModelWeights, bias_name, fused_parts, is_norm_gain, layer_name,
                      router_part, selection_bias_name)


# the buffer each projection of a layer writes, by role
_OUTPUTS = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "mlp"}


class _Buffers:
    """Activations of one pass over ``rows`` token rows, ``[rows, width]`` each.

    The fused projections write ``qkv`` and ``gate_up``; q, k, v, gate and up are their column
    blocks: views with one row, else arrays that ``split_qkv`` / ``split_gate_up`` fill. With
    one row the rotary embedding reads q and k as one block ``qk`` and writes ``qkr``, whose
    column blocks ``qr`` and ``kr`` are; with more, ``qr`` and ``kr`` are arrays of their own.
    A projection with a bias writes ``raw[its output]`` instead, which ``bias_add`` reads (its
    input and output never alias). A model with norms of its query and key heads (Qwen3) has
    the Q/K/V projection (and its bias) write ``qkv_pre``, which ``qk_norm`` turns into ``qkv``."""

    def __init__(self, arrays, rows: int, config: ModelConfig, dtype: str = "float32"):
        c = config
        self.rows = rows
        widths = {"res_a": c.hidden_size, "res_b": c.hidden_size, "h": c.hidden_size,
                  "qkv": c.q_size + 2 * c.kv_size, "attn": c.q_size,
                  "o": c.hidden_size, "gate_up": 2 * c.dense_size, "act": c.dense_size,
                  "mlp": c.hidden_size}
        if c.qk_norm:
            widths["qkv_pre"] = widths["qkv"]
        if c.post_norms:  # a sublayer's normalised output, which the residual norm adds
            widths["post"] = c.hidden_size
        if c.int4_act_order:  # a projection's input gathered into its weights' order (ACT_ORDER_GATHERS)
            widths.update(gather_hidden=c.hidden_size, gather_attn=c.q_size)
        if c.moe:  # the router's logits, and the rows one expert call reads and writes (_MixtureOfExperts)
            shared = c.shared_expert_intermediate_size
            widths.update(router=c.num_experts + (1 if shared and c.shared_expert_gated else 0), expert_x=c.hidden_size,
                          expert_gate=c.intermediate_size, expert_up=c.intermediate_size,
                          expert_act=c.intermediate_size, expert_y=c.hidden_size)
            if shared:
                widths.update(shared_gate_up=2 * shared, shared_act=shared, shared_y=c.hidden_size)
        self.names = {name: arrays.empty((rows, width), numpy_dtype(dtype)) for name, width in widths.items()}
        biased = biased_projections(c)
        self.raw = {out: arrays.empty((rows, widths[out]), numpy_dtype(dtype)) for role, out in _OUTPUTS.items()
                    if biased[role]}
        self.__dict__.update(self.names)  # plain attributes: buf.h is read often, __getattr__ costs 0.4 us
        (self.q, self.k, self.v), self.split_qkv = arrays.split_columns(self.qkv, (c.q_size, c.kv_size, c.kv_size))
        (self.gate, self.up), self.split_gate_up = arrays.split_columns(
            self.gate_up, (c.dense_size, c.dense_size))
        if c.shared_expert_intermediate_size:
            (self.shared_gate, self.shared_up), self.split_shared = arrays.split_columns(
                self.shared_gate_up, (c.shared_expert_intermediate_size,) * 2)
        if rows == 1:  # one rope call over q and k side by side (runtime.plan._ropes)
            (self.qk, _), _ = arrays.split_columns(self.qkv, (c.q_size + c.kv_size, c.kv_size))
            self.qkr = arrays.empty((rows, c.q_size + c.kv_size), numpy_dtype(dtype))
            (self.qr, self.kr), _ = arrays.split_columns(self.qkr, (c.q_size, c.kv_size))
        else:
            self.qr = arrays.empty((rows, c.q_size), numpy_dtype(dtype))
            self.kr = arrays.empty((rows, c.kv_size), numpy_dtype(dtype))
        self.positions = arrays.zeros((rows,), np.int32)


class _HostCall:
    """A call in a layer's list that is not a kernel (the copies of a fused projection's
    column blocks), run the way the step runs bound calls: ``.run()``."""

    kernel = None  # no kernel: nothing a programmatic edge could join

    def __init__(self, run):
        self.run = run

    def __call__(self) -> None:
        self.run()


def _host_calls(run) -> list:
    return [] if run is None else [_HostCall(run)]


def _fuses_norms(kernels: dict[str, Kernel]) -> bool:
    """Whether a pass's kernels (by role) run the norms inside the GEMVs (``runtime.plan.FUSED_NORMS``):
    the LM head then normalises the residual stream itself."""
    return kernels["lm_head"].spec.attr.get("norm", "none") != "none"


class _WidenedTable:
    """An embedding table kept as 16-bit words (``storage``: bfloat16 or float16) whose gathered
    rows come out as float32 (a weight-only model's: no float32 copy of the table, which is also
    the LM head when tied)."""

    def __init__(self, words: np.ndarray, storage: str, factor: float = 1.0):
        self.words, self.storage, self.factor = words, storage, np.float32(factor)

    def __getitem__(self, ids) -> np.ndarray:
        rows = to_float32(self.words[ids], self.storage)
        return rows * self.factor if self.factor != 1 else rows


# the projections whose outputs Granite's residual_multiplier scales: attention's and the MLP's, an
# expert's or a shared expert's (a mixture's weighted sum of them is scaled so)
_RESIDUAL_BRANCH_ENDS = tuple(f".{part}.{kind}" for part in ("self_attn.o_proj", "down_proj")
                              for kind in ("weight", "bias"))


def _times(array: np.ndarray, factor: float, storage: str, offset: float = 0.0) -> np.ndarray:
    """A tensor stored in ``storage`` (bfloat16: raw words) times ``factor`` plus ``offset``
    (computed in float32), stored so again (itself for a factor of 1 and no offset)."""
    if factor == 1.0 and offset == 0.0:
        return array
    return from_float(to_float32(np.asarray(array), storage) * np.float32(factor) + np.float32(offset), storage)


def _all_tuned(specs: list[KernelSpec], calls: list[KernelCall]) -> bool:
    """Whether a tuned kernel among ``specs`` serves every one of ``calls``."""
    return all(select(specs, lambda spec: spec, call.spec) is not None for call in calls)


class LlamaModel:
    """``generate(prompts, new_tokens)`` on kernels from ``kernels``."""

    def __init__(self, config: ModelConfig, weights: ModelWeights | DeviceWeights, kernels: KernelProvider,
                 prefill_sizes: list[int] | None = None, dtype: str = "float32"):
        """``prefill_sizes``: the token counts to pad prompts up to, instead of the sizes the
        provider's prefill GEMMs were tuned at (to run two providers at the same shapes).
        ``dtype``: the precision the model runs in (``runtime.plan``); weights are rounded to
        it as they are copied to where the kernels run, the logits come back as float32. On CPU
        kernels bfloat16 is weight-only (``runtime.plan.precisions``: the kernels run in
        ``activations``, the linear layers read ``weights_dtype``) and float16 is refused.
        ``DeviceWeights`` are used where they lie, and must be in that precision already."""
        if weights.config != config:
            raise ValueError("the weights were made for another model config")
        self.config = config
        self.w = weights
        self.kernels = kernels
        if config.moe and getattr(kernels, "kind", "cpu") != "cpu":
            raise ValueError(f"{config.name} is a mixture of experts, which runs on CPU kernels only: its router picks "
                             "each token's experts on the host")
        self.arrays = arrays_for(getattr(kernels, "kind", "cpu"))
        # Ministral 3's queries past its original context are scaled on the host (ModelConfig.query_scales):
        # on CPU kernels, whose buffers numpy reaches
        self.scales_queries = self.arrays.kind == "cpu"
        self.dtype = check_dtype(dtype)
        self.quantize = "q4" if weights.quantized else "none"
        self.group_size = weights.group_size or 128
        self.activations, self.weights_dtype = precisions(dtype, self.arrays.kind, self.quantize,
                                                          float_head=config.int4_format is not None)
        self.lm_head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        self._device: dict[str, object] = {}  # weights where the kernels read them, by name
        if isinstance(weights, DeviceWeights):
            if not self.arrays.resident:
                raise ValueError("device weights need a provider of CUDA kernels")
            if (config.scaled or config.rope_interleaved) and not weights.folded:
                raise ValueError(f"{config.name}: Granite's embedding_multiplier, residual_multiplier and "
                                 "logits_scaling, and Gemma's embedding scale and norms by 1 + weight, are folded "
                                 "into the weights as they are uploaded, and ERNIE 4.5's and Helium's q and k rows "
                                 "are loaded with each head's rotary pairs as halves (runtime.weights.halves_order); "
                                 "device weights are used as they lie, so pass host weights (ModelWeights), or "
                                 "device weights that carry them (DeviceWeights(..., folded=True))")
            self.embed = weights.embedding
            if self.embed.dtype != numpy_dtype(dtype):
                raise ValueError(f"the embedding table is {self.embed.dtype}; a {dtype} model needs "
                                 f"{numpy_dtype(dtype)}")
        elif self.activations != self.weights_dtype:  # weight-only: rows widened as they are gathered
            words = stored_as(weights.tensors["model.embed_tokens.weight"], self.weights_dtype)
            self.embed = _WidenedTable(words, self.weights_dtype, config.embedding_multiplier)
            if config.tie_word_embeddings:  # the LM head reads the same words
                self._device[f"{self.lm_head_name}#"] = self.arrays.upload(
                    _times(words, self._factor(self.lm_head_name), self.weights_dtype))
        else:  # gathered on the host, rows already in the model's precision
            # the scale in that precision, as transformers' Gemma multiplies by it (Granite's are exact)
            scale = float(rounded(np.array([config.embedding_multiplier], np.float32), dtype)[0])
            self.embed = _times(stored_as(weights.tensors["model.embed_tokens.weight"], dtype), scale, dtype)
        self.used: dict[str, Kernel] = {}  # every kernel handed out, by what it was tuned for
        self.prefill_sizes = prefill_sizes
        self._memo: dict[tuple, Kernel] = {}  # the provider's answer per call shape
        self._padded: dict[tuple[int, int], int] = {}  # padded_tokens per (batch, prompt length)
        self._on_gemvs: dict[tuple[int, int], bool] = {}  # per (batch, tokens): a short prefill on tuned GEMVs
        self._last_prefill: tuple | None = None  # the last prefill shape's kernels, buffers and bound calls
        # how the last generation decoded: "host" (a call per kernel), "graph" (a captured CUDA
        # graph per step) or "resident" (the graph's kernels, issued one by one: no capture here)
        self.decode_mode: str | None = None
        self.capture_error: str | None = None
        # a captured step joins the kernels built for it by programmatic edges (runtime.cuda_graph):
        # each starts as the one before it ends; False captures plain graphs (to compare)
        self.programmatic_launch = True
        self.programmatic_edges = 0  # in the last generation's graph
        self.step_kernels = 0  # kernels in the last generation's resident step (its graph's kernel nodes)
        self.programmatic_error: str | None = None  # why its graph has none, where the driver refused them
        self._edges_refused: str | None = None  # the driver's refusal, so later steps do not ask again

    # -- kernels and weights ---------------------------------------------------------
    def _kernel(self, call: KernelCall, **dims: int) -> Kernel:
        spec = call.spec
        shape = spec.dims
        shape.update(dims)
        key = (spec.op, tuple(shape.items()), spec.dtype, spec.attrs, spec.dynamic)
        kernel = self._memo.get(key)
        if kernel is None:
            kernel = self._memo[key] = self.kernels.get(spec.op, shape, spec.dtype, spec.attr, spec.dynamic)
            self.used[kernel.spec.key] = kernel
        return kernel

    def _plan(self, calls: list[KernelCall]) -> dict[str, Kernel]:
        """The kernels of ``calls`` by role; a fused kernel the provider lacks (a library exported
        before it existed) is replaced by the kernels it fuses, where the provider has those."""
        kernels = {}
        for call in calls:
            try:
                kernels[call.role] = self._kernel(call)
            except LookupError:
                parts = unfused(self.config, call)
                if not parts:
                    raise
                kernels.update(self._plan(parts))
        return kernels

    def _host_tensor(self, array: np.ndarray, linear: bool) -> np.ndarray:
        """A host tensor as the kernels take it: a linear layer's weights in ``weights_dtype``;
        any other tensor in ``activations``, holding its values in the model's precision."""
        if linear or self.activations == self.dtype:
            return stored_as(array, self.weights_dtype if linear else self.activations)
        return rounded(widened(array), self.dtype)  # weight-only: bfloat16 values in float32

    def _weight(self, name: str, part: str = "", linear: bool = False) -> object:
        """A weight tensor (or part of a quantised one: "wq", "scales", "zeros", "order") where the kernels run;
        ``linear``: the weights of a linear layer."""
        key = f"{name}#{part}"
        if key not in self._device and isinstance(self.w, DeviceWeights):
            array = self.w.device(name, part)
            want = {"wq": np.uint8, "order": np.int32}.get(part, numpy_dtype(self.dtype))
            if np.dtype(array.dtype) != want:
                raise ValueError(f"device weight {key.rstrip('#')} is {array.dtype}; a {self.dtype} model needs {want}")
            self._device[key] = array
        if key not in self._device and part == "order":  # act-order: one for a fused projection's parts
            self._device[key] = self.arrays.upload(self.w.quantized[fused_parts(name)[0]].order)
        if key not in self._device:
            parts = fused_parts(name)  # a fused projection: its tensors stacked along N
            if part == "wq":  # the int4 codes are bytes
                pieces = [self.w.quantized[p].wq for p in parts]
            else:  # floats in the model's precision, converted one tensor at a time
                pieces = [self._host_tensor(getattr(self.w.quantized[p], part) if part else self.w.tensors[p],
                                            linear and not part) for p in parts]
            down_order = self._down_order(name)
            if down_order is not None:  # gate and up write their rows in the order down_proj reads them
                pieces = [piece[down_order] for piece in pieces]
            host = pieces[0] if len(pieces) == 1 else np.concatenate(pieces)
            if part not in ("wq", "zeros"):  # int4 codes and zero points keep their values; scales take the factor
                offset = 1.0 if self.config.offset_norms and is_norm_gain(name) else 0.0  # Gemma's 1 + weight
                host = _times(host, self._factor(name), self.weights_dtype if linear and not part else self.activations,
                              offset)
            self._device[key] = self.arrays.upload(host)
        return self._device[key]

    def _down_order(self, name: str) -> np.ndarray | None:
        """For a tensor of gate/up (weights, scales, zero points, biases) of an act-order checkpoint:
        the order down_proj's stored rows read their input in. SwiGLU's output then comes in that
        order, and down_proj needs no gather (``runtime.plan.ACT_ORDER_GATHERS``)."""
        if not self.config.int4_act_order or ".mlp.gate_up_proj." not in name:
            return None
        return self.w.quantized[name.split(".mlp.")[0] + ".mlp.down_proj.weight"].order

    def _factor(self, name: str) -> float:
        """Granite's scalar folded into weight (or bias) ``name``: the output and down projections
        produce what ``residual_multiplier`` scales before its residual add, the LM head the
        logits ``logits_scaling`` divides; 1 for any other tensor and any other model."""
        c = self.config
        if name == self.lm_head_name:
            return 1.0 / c.logits_scaling
        if name.endswith(_RESIDUAL_BRANCH_ENDS):
            return c.residual_multiplier
        return 1.0

    def padded_tokens(self, batch: int, tokens: int) -> int:
        """The prompt length a prefill runs at: the smallest length >= the prompt's at which
        every kernel of the pass is tuned. Candidates are the prompt's own length and the
        token counts the prefill linear layers of its dtype and attributes were tuned at (GEMMs,
        and GEMVs for short prompts); without a fully tuned one, the prompt's own length where
        the GEMMs read M at run time (``dynamic_rows``), else the smallest tuned linear size that
        fits. Causal attention keeps the real tokens blind to the padding."""
        if self.prefill_sizes is not None:
            return min((t for t in self.prefill_sizes if t >= tokens), default=tokens)
        key = (batch, tokens)
        if key not in self._padded:  # the search costs a third of a millisecond: once per prompt shape
            self._padded[key] = self._search_padded(batch, tokens)
        return self._padded[key]

    def _search_padded(self, batch: int, tokens: int) -> int:
        specs = self.kernels.specs()
        long_rope = self.config.rope_is_long(tokens)  # the prompt's own length picks its factors, not the padding
        probe = next(c for c in self._prefill(tokens, batch, long_rope) if c.role == "qkv_proj").spec
        # sizes of the kernels this pass would run: of its dtype and attributes (another
        # precision's, or another int4 group's, would pad the prompt to run untuned kernels)
        own = [s for s in specs if s.dtype == probe.dtype and s.attrs == probe.attrs]
        tuned_sizes = sorted({m // batch for op in ("gemm", "gemv", "gemm_q4", "gemv_q4")
                              for m in buckets(own, op, "M", N=probe.dims["N"], K=probe.dims["K"])
                              if m % batch == 0 and m // batch >= tokens})
        for length in sorted({tokens, *tuned_sizes}):
            if _all_tuned(specs, self._prefill(length, batch, long_rope)):
                return length
        # no length runs every kernel tuned: GEMMs that compile M in still run best at a size
        # they were tuned at; ones that read M at run time gain nothing but rows from padding
        return tuned_sizes[0] if tuned_sizes and not self.dynamic_rows else tokens

    def _prefill(self, tokens: int, batch: int, long_rope: bool = False) -> list[KernelCall]:
        dynamic = self.dynamic_rows and not self._short_on_gemvs(batch, tokens)
        return prefill_calls(self.config, tokens, self.quantize, self.group_size, batch, self.activations,
                             self.weights_dtype, dynamic, long_rope)

    def _short_on_gemvs(self, batch: int, tokens: int) -> bool:
        """Whether a prefill of ``batch * tokens`` rows runs its linear layers on GEMVs tuned at
        exactly that many rows (a one-token prompt on the decode step's): they stream W at the
        full rate, where a GEMM tuned for many rows, run at a few, does not."""
        key = (batch, tokens)
        if key not in self._on_gemvs:
            fits = batch * tokens <= GEMV_MAX_M
            if fits:
                calls = prefill_calls(self.config, tokens, self.quantize, self.group_size, batch, self.activations,
                                      self.weights_dtype)
                fits = _all_tuned(self.kernels.specs(), [call for call in calls if call.spec.op in ("gemv", "gemv_q4")])
            self._on_gemvs[key] = fits
        return self._on_gemvs[key]

    @functools.cached_property
    def dynamic_rows(self) -> bool:
        """Whether a prefill's linear layers read their M at run time, so that a prompt runs at
        its own length (``runtime.plan.PREFILL_DYNAMIC_ROWS``): on the CPU, unless every gemm the
        provider was tuned with compiles M in (a library from before dynamic rows: it keeps
        padding prompts to the sizes it was tuned at)."""
        if not PREFILL_DYNAMIC_ROWS[self.arrays.kind]:
            return False
        linear = [spec for spec in self.kernels.specs() if spec.op in ("gemm", "gemm_q4")]
        return not linear or any("M" in spec.dynamic for spec in linear)

    def _decode(self, batch: int, capacity: int, resident: bool = False,
                fused_norms: bool | None = None, long_rope: bool = False) -> list[KernelCall]:
        return decode_calls(self.config, batch, capacity, self.quantize, self.group_size, self.activations,
                            resident, self.weights_dtype, fused_norms, long_rope)

    def logits_of(self, buffer) -> np.ndarray:
        """Logits on the host, as float32 (a CPU model's buffer itself: no copy per step)."""
        host = self.arrays.get(buffer)
        return self.capped(host if self.activations == "float32" else to_float32(host, self.activations))

    def capped(self, logits: np.ndarray) -> np.ndarray:
        """Gemma 2's logits, final_softcap * tanh(logits / final_softcap), on the host (monotonic:
        the greedy pick, on the device too, is the uncapped one's); others as they are."""
        cap = self.config.final_softcap
        return np.float32(cap) * np.tanh(logits / np.float32(cap)) if cap else logits

    def _is_q4(self, name: str) -> bool:
        if isinstance(self.w, DeviceWeights):  # named as the decoder runs them
            return name in self.w.quantized
        return fused_parts(name)[0] in self.w.quantized

    def _linear(self, kernel: Kernel, name: str, x, y, gain: str | None = None, residual=None) -> BoundCall:
        """A linear layer ``name`` from ``x`` into ``y``; a GEMV fusing the norm before it reads
        the norm weight ``gain``, one fusing the residual add after it reads ``residual``."""
        fused = {}
        if gain is not None:
            fused["G"] = self._weight(gain)
        if residual is not None:
            fused["R"] = residual
        if self._is_q4(name):
            if self.config.int4_zero_points:  # an asymmetric int4 checkpoint's
                fused["ZEROS"] = self._weight(name, "zeros")
            return kernel.bind({"X": x, "WQ": self._weight(name, "wq"), "SCALES": self._weight(name, "scales"),
                                "Y": y, **fused})
        return kernel.bind({"X": x, "W": self._weight(name, linear=True), "Y": y, **fused})

    def _projection(self, k: dict[str, Kernel], buf: _Buffers, layer: int, role: str, part: str, x,
                    gain: str | None = None, residual=None, out=None) -> list:
        """The bound calls of one projection of a layer from ``x`` into its output buffer (or
        ``out``): the linear layer, and where it has a bias, the linear into the raw buffer then
        ``bias_add``. ``gain`` and ``residual``: what a fused GEMV also reads (``_linear``)."""
        out = buf.names[_OUTPUTS[role]] if out is None else out
        raw = buf.raw.get(_OUTPUTS[role])
        gather = []
        if self.config.int4_act_order and role in ACT_ORDER_GATHERS:  # the input in the weights' row order
            gathered = buf.names[ACT_ORDER_GATHERS[role]]
            gather = [k[ACT_ORDER_GATHERS[role]].bind({"X": x, "P": self._weight(layer_name(layer, part), "order"),
                                                       "Y": gathered}, {"M": buf.rows})]
            x = gathered
        if raw is None:
            return [*gather, self._linear(k[role], layer_name(layer, part), x, out, gain, residual)]
        if residual is not None:
            raise ValueError(f"{role} has a bias: its residual add cannot be fused into the GEMV")
        return [*gather, self._linear(k[role], layer_name(layer, part), x, raw, gain),
                k[bias_role(role)].bind({"X": raw, "B": self._weight(bias_name(layer, part)), "Y": out},
                                        {"M": buf.rows})]

    def _norm(self, kernel: Kernel, gain: str, x, out, rows: int, residual=None, new_residual=None) -> BoundCall:
        arrays = {"X": x, "G": self._weight(gain), "Y": out}
        if residual is not None:
            arrays.update(R=residual, S=new_residual)
        return kernel.bind(arrays, {"M": rows})

    def _qkv_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int, x, gain: str | None = None) -> list:
        """The bound calls that fill ``buf.qkv`` from ``x``: the Q/K/V projection (``gain``: the
        norm a fused GEMV applies first), and where the model has them, the norms of the query and
        key heads, which read the projection's rows from ``qkv_pre``."""
        c, part = self.config, "self_attn.qkv_proj"
        if not c.qk_norm:
            return self._projection(k, buf, layer, "qkv_proj", part, x, gain=gain)
        heads = (buf.rows, c.num_attention_heads + 2 * c.num_key_value_heads, c.head_dim)  # the kernel's X and Y
        q_gain, k_gain = (self._weight(layer_name(layer, norm)) for norm in QK_NORMS)
        norm = k["qk_norm"].bind({"X": buf.qkv_pre.reshape(heads), "GQ": q_gain, "GK": k_gain,
                                  "Y": buf.qkv.reshape(heads)}, {"T": buf.rows})
        return [*self._projection(k, buf, layer, "qkv_proj", part, x, gain=gain, out=buf.qkv_pre), norm]

    # -- one pass ----------------------------------------------------------------------
    def _qk(self, buf: _Buffers, layer: int) -> tuple:
        """Where attention reads q and k in ``layer`` (and the cache takes k from): the rotated
        rows, or in a layer without a rotary embedding (SmolLM3's NoPE) the projected ones."""
        return (buf.q, buf.k) if layer in self.config.nope_layers else (buf.qr, buf.kr)

    @staticmethod
    def _ropes(k: dict[str, Kernel], buf: _Buffers, suffix: str | None = "") -> list:
        """The calls after the Q/K/V projection that rotate q and k (none where ``rope_append`` or
        ``rope_append_attention`` does it, reading q, k and v from the projection's rows), with the
        column copies first; ``suffix``: the layer's (``runtime.plan.rope_suffix``; None: the
        layer does not rotate, only the column copies run)."""
        rows = buf.rows
        if suffix is None:
            return _host_calls(buf.split_qkv)
        if "rope_append" + suffix in k or k["attention"].spec.op == "rope_append_attention":
            return []
        if "rope_qk" + suffix in k:  # one row: q and k rotated in one call
            return [k["rope_qk" + suffix].bind({"X": buf.qk, "P": buf.positions, "Y": buf.qkr}, {"T": rows})]
        return [*_host_calls(buf.split_qkv),
                k["rope_q" + suffix].bind({"X": buf.q, "P": buf.positions, "Y": buf.qr}, {"T": rows}),
                k["rope_k" + suffix].bind({"X": buf.k, "P": buf.positions, "Y": buf.kr}, {"T": rows})]

    def _layer_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int) -> tuple[list, list]:
        """Bound calls of one layer before and after attention (the rotary embedding and cache
        write of a resident step, or the cache write, and the attention itself sit between
        them), the residual stream ending in ``res_a``."""
        if _fuses_norms(k):  # the GEMVs do the norms (runtime.plan.FUSED_NORMS)
            return self._fused_layer_calls(k, buf, layer)
        c, lay, rows = self.config, layer, buf.rows
        # OLMo 2 (no input norms): attention reads the residual stream itself
        before = [*self._qkv_calls(k, buf, lay, buf.h if c.pre_norms else buf.res_a),
                  *self._ropes(k, buf, rope_suffix(c, lay))]
        if not c.pre_norms:
            return before, self._post_normed_calls(k, buf, layer)
        last = lay == c.num_hidden_layers - 1
        next_gain = "model.norm.weight" if last else layer_name(lay + 1, "input_layernorm")
        if c.post_norms:  # Gemma 3: each sublayer's output normalised into ``post``, which is added
            attention_out, mlp_out, mlp_gain = buf.post, buf.post, layer_name(lay, "pre_feedforward_layernorm")
            post_attention = [self._norm(k["post_norm"], layer_name(lay, "post_attention_layernorm"), buf.o, buf.post,
                                         rows)]
            post_mlp = [self._norm(k["post_norm"], layer_name(lay, "post_feedforward_layernorm"), buf.mlp, buf.post,
                                   rows)]
        else:
            attention_out, mlp_out, mlp_gain = buf.o, buf.mlp, layer_name(lay, "post_attention_layernorm")
            post_attention = post_mlp = []
        after = [*self._projection(k, buf, lay, "o_proj", "self_attn.o_proj", buf.attn),
                 *post_attention,
                 self._norm(k["residual_norm"], mlp_gain, attention_out, buf.h, rows, buf.res_a, buf.res_b),
                 *self._mlp_calls(k, buf, lay, buf.h),
                 *post_mlp,
                 self._norm(k["residual_norm"], next_gain, mlp_out, buf.h, rows, buf.res_b, buf.res_a)]
        return before, after

    def _mlp_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int, x) -> list:
        """The calls of a layer's MLP from ``x`` into ``buf.mlp``: the gated MLP (gate/up, the
        activation, down), or a mixture of experts (``_MixtureOfExperts``)."""
        if self.config.moe_layer(layer):
            return [_HostCall(_MixtureOfExperts(self, k, buf, layer, x))]
        act = GATED_ACTS[self.config.activation]
        return [*self._projection(k, buf, layer, "gate_up_proj", "mlp.gate_up_proj", x),
                *_host_calls(buf.split_gate_up),
                k[act].bind({"G": buf.gate, "U": buf.up, "Y": buf.act}, {"M": buf.rows}),
                *self._projection(k, buf, layer, "down_proj", "mlp.down_proj", buf.act)]

    def _post_normed_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int) -> list:
        """The calls after attention of a layer that normalises its sublayers' outputs only (OLMo 2):
        each output normalised into ``post`` and added to the residual stream, which goes from
        ``res_a`` to ``res_b`` and back; after the last layer the final norm writes ``h``."""
        c, lay, rows = self.config, layer, buf.rows

        def add_normed(out, gain: str, residual, new_residual) -> list:
            return [self._norm(k["post_norm"], layer_name(lay, gain), out, buf.post, rows),
                    k["residual_add"].bind({"A": buf.post, "B": residual, "Y": new_residual}, {"M": rows})]

        final = ([self._norm(k["final_norm"], "model.norm.weight", buf.res_a, buf.h, rows)]
                 if lay == c.num_hidden_layers - 1 else [])
        return [*self._projection(k, buf, lay, "o_proj", "self_attn.o_proj", buf.attn),
                *add_normed(buf.o, "post_attention_layernorm", buf.res_a, buf.res_b),
                *self._mlp_calls(k, buf, lay, buf.res_b),
                *add_normed(buf.mlp, "post_feedforward_layernorm", buf.res_b, buf.res_a),
                *final]

    def _fused_layer_calls(self, k: dict[str, Kernel], buf: _Buffers, layer: int) -> tuple[list, list]:
        """``_layer_calls`` where the GEMVs fuse the norms before them and the residual adds
        after them, and the gate/up GEMV writes SwiGLU's activation: the residual stream comes in
        ``res_a``, is ``res_b`` after attention and ``res_a`` again after the MLP; the next
        layer's Q/K/V projection (or the LM head) norms it."""
        lay = layer
        before = [*self._qkv_calls(k, buf, lay, buf.res_a, gain=layer_name(lay, "input_layernorm")),
                  *self._ropes(k, buf, rope_suffix(self.config, lay))]
        after = [*self._projection(k, buf, lay, "o_proj", "self_attn.o_proj", buf.attn, residual=buf.res_a,
                                   out=buf.res_b),
                 *self._projection(k, buf, lay, "gate_up_proj", "mlp.gate_up_proj", buf.res_b,
                                   gain=layer_name(lay, "post_attention_layernorm"), out=buf.act),
                 *self._projection(k, buf, lay, "down_proj", "mlp.down_proj", buf.act, residual=buf.res_b,
                                   out=buf.res_a)]
        return before, after

    def prefill(self, prompts: np.ndarray, caches: list) -> tuple[np.ndarray, int]:
        """Run the prompts [B, T] through the model, filling ``caches``; logits [B, V] of the
        last prompt token (on the host) and the padded length the pass ran at."""
        c, arrays = self.config, self.arrays
        prompts = checked_tokens(c, prompts, self.scales_queries)
        batch, tokens = prompts.shape
        padded = self.padded_tokens(batch, tokens)
        k, buf, layers = self._prefill_pass(batch, padded, c.rope_is_long(tokens))
        ids = np.zeros((batch, padded), dtype=np.int64)
        ids[:, :tokens] = prompts
        arrays.set(buf.res_a, self.embed[ids.reshape(-1)])
        positions = np.tile(np.arange(padded, dtype=np.int32), batch)
        arrays.set(buf.positions, positions)
        query_scales = c.query_scales(positions)  # Ministral 3's past its original context, else None
        if c.pre_norms:
            self._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h, buf.rows)()
        for layer, (before, after) in enumerate(layers):
            attention = k["attention" + attention_suffix(c, layer, padded)]
            for call in before:
                call()
            q, k_rows = self._qk(buf, layer)
            if query_scales is not None:
                np.multiply(q, query_scales[:, None], out=q)
            attention.bind({"Q": q, "K": k_rows, "V": buf.v, "O": buf.attn}, {"T": padded})()
            k_cache, v_cache = caches[layer]
            arrays.write_prompt(k_cache, k_rows, padded)
            arrays.write_prompt(v_cache, buf.v, padded)
            for call in after:
                call()
        storage = numpy_dtype(self.activations)
        last = arrays.rows_at(buf.h, batch, tokens - 1, arrays.empty((batch, c.hidden_size), storage))
        logits = arrays.empty((batch, c.vocab_size), storage)
        self._linear(k["lm_head"], self.lm_head_name, last, logits)()
        return self.logits_of(logits), padded

    def _prefill_pass(self, batch: int, padded: int, long_rope: bool) -> tuple[dict, _Buffers, list]:
        """(the kernels by role, the buffers, each layer's bound calls before and after attention)
        of a prefill of ``batch`` prompts run at ``padded`` tokens; the last shape's are kept, so
        that prompts of one length bind their calls once (a mixture of experts binds three per
        expert and layer)."""
        key = (batch, padded, long_rope)
        if self._last_prefill is None or self._last_prefill[0] != key:
            self._last_prefill = None  # its buffers freed before the new ones are made
            k = self._plan(self._prefill(padded, batch, long_rope))
            buf = _Buffers(self.arrays, batch * padded, self.config, self.activations)
            layers = [self._layer_calls(k, buf, layer) for layer in range(self.config.num_hidden_layers)]
            self._last_prefill = (key, k, buf, layers)
        return self._last_prefill[1:]

    def new_caches(self, batch: int, capacity: int) -> list:
        c = self.config
        shape = (batch, c.num_key_value_heads, capacity, c.head_dim)
        storage = numpy_dtype(self.activations)
        return [(self.arrays.zeros(shape, storage), self.arrays.zeros(shape, storage))
                for _ in range(c.num_hidden_layers)]

    def prepare(self, batch: int, tokens: int, new_tokens: int) -> None:
        """Load every kernel a generation of this size uses, so that timing it measures only
        the run (kernels from a tuning log are compiled on first use)."""
        self._plan(self._prefill(self.padded_tokens(batch, tokens), batch, self.config.rope_is_long(tokens)))
        again = self._rerun_length(tokens, new_tokens)
        if again is not None:  # the sequence run again past longrope's original context (generate)
            self._plan(self._prefill(self.padded_tokens(batch, again), batch, True))
        capacity = self._capacity(batch, tokens, new_tokens)
        for long_rope, lengths in self._decode_phases(tokens, new_tokens).items():
            if self.arrays.resident:
                try:  # the resident step: one attention kernel, at the longest length
                    self._resident_kernels(batch, capacity, long_rope)
                    continue
                except LookupError:  # a library without them: the host-driven step below
                    pass
            calls = self._decode(batch, capacity, long_rope=long_rope)
            self._plan(calls)
            for attention in (c for c in calls if c.role.startswith("attention")):
                for length in lengths:
                    self._kernel(attention, S=capacity, L=length)

    def _capacity(self, batch: int, tokens: int, new_tokens: int) -> int:
        """The KV cache length of a generation: the padded prompt and the new tokens, or more where
        it crosses longrope's original context and runs the sequence so far again as a prompt
        (``generate``), padded in its turn."""
        capacity = self.padded_tokens(batch, tokens) + new_tokens
        again = self._rerun_length(tokens, new_tokens)
        return capacity if again is None else max(capacity, self.padded_tokens(batch, again))

    def _rerun_length(self, tokens: int, new_tokens: int) -> int | None:
        """The length of the sequence a generation runs again as a prompt where it crosses
        longrope's original context (a prompt within it, steps past it); None where it does not."""
        # the last step runs at position tokens + new_tokens - 2: tokens + new_tokens - 1 positions
        crosses = self.config.rope_is_long(tokens + new_tokens - 1) and not self.config.rope_is_long(tokens)
        return self.config.rope_original_max_position_embeddings + 1 if crosses else None

    def _decode_phases(self, tokens: int, new_tokens: int) -> dict[bool, list[int]]:
        """{whether the steps rotate by longrope's long_factor: the KV lengths they run at} of the
        decode steps after a prompt of ``tokens`` (a step at position p runs p + 1 positions)."""
        phases: dict[bool, list[int]] = {}
        for position in range(tokens, tokens + new_tokens - 1):
            phases.setdefault(self.config.rope_is_long(position + 1), []).append(position + 1)
        return phases

    def _fuses_norms(self, batch: int) -> bool:
        """Whether the resident step of ``batch`` sequences tries GEMVs that fuse the norms: where
        they can, unless the provider's tuned decode GEMVs are all unfused ones (tuning logs from
        before the fusions: their tuned step beats untuned fused kernels)."""
        if not can_fuse_norms(self.config, batch):
            return False
        gemvs = [spec for spec in self.kernels.specs() if spec.op in ("gemv", "gemv_q4") and spec.dims["M"] == batch]
        return not gemvs or any(FUSED_ATTRS & set(spec.attr) for spec in gemvs)

    def _resident_kernels(self, batch: int, capacity: int, long_rope: bool = False) -> dict[str, Kernel]:
        """The kernels of the resident decode step by role (LookupError: the provider lacks one);
        attention is the one for the longest length: a recorded launch cannot switch kernels.
        The GEMVs fuse the norms where they can and the provider has them (a library exported
        before they existed has the norms on their own)."""
        for fused in (True, False) if self._fuses_norms(batch) else (False,):
            calls = self._decode(batch, capacity, resident=True, fused_norms=fused, long_rope=long_rope)
            used = dict(self.used)
            try:
                kernels = self._plan([call for call in calls if not call.role.startswith("attention")])
            except LookupError:
                if not fused:
                    raise
                self.used = used  # the fused kernels it found are not the ones that run
                continue
            for attention in (call for call in calls if call.role.startswith("attention")):
                kernels.update(self._attention_kernels(attention, capacity))
            return kernels
        raise AssertionError("unreachable: the unfused plan either returns or raises")

    def _tuned_before_rope_attention(self, batch: int) -> bool:
        """Whether the provider has tuned, for a resident step of ``batch`` sequences, the two
        kernels rope_append_attention stands for (rope_append and the programmatic attention) but
        not it: a tuning log from before it, whose tuned pair beats an untuned fused kernel (one
        untuned kernel beats two)."""
        ops = {spec.op for spec in self.kernels.specs() if spec.dims.get("B") == batch
               and (spec.op != "attention_decode" or spec.attr.get("programmatic"))}
        return ops >= {"rope_append", "attention_decode"} and "rope_append_attention" not in ops

    def _attention_kernels(self, call: KernelCall, capacity: int) -> dict[str, Kernel]:
        """The resident step's attention kernel by role, the one for the longest length (a
        recorded launch cannot switch kernels); where the provider lacks it (a library from
        before attention took over rope_append, or took a programmatic launch) or has only
        tuned the kernels it stands for, those kernels."""
        parts = unfused(self.config, call)
        if not (parts and call.spec.op == "rope_append_attention"
                and self._tuned_before_rope_attention(call.spec.dims["B"])):
            try:
                return {call.role: self._kernel(call, S=capacity, L=capacity)}
            except LookupError:
                if not parts:
                    raise
        kernels: dict[str, Kernel] = {}
        for part in parts:
            kernels.update(self._attention_kernels(part, capacity) if part.role == "attention"
                           else self._plan([part]))
        return kernels

    def _decode_step(self, batch: int, capacity: int, caches, lengths,
                     keep_logits: bool, long_rope: bool = False) -> "_DecodeStep | _ResidentStep":
        """The decode step: on CUDA the resident one, captured as a graph, when the kernels
        provider has its kernels (a library exported before they existed has not); ``long_rope``:
        its rope kernels divide by longrope's long_factor."""
        step: _DecodeStep | _ResidentStep
        if self.arrays.resident:
            try:
                step = _ResidentStep(self, batch, capacity, caches, keep_logits, long_rope)
            except LookupError:
                step = _DecodeStep(self, batch, capacity, caches, lengths, long_rope)
        else:
            step = _DecodeStep(self, batch, capacity, caches, lengths, long_rope)
        self.decode_mode = step.mode
        self.capture_error = getattr(step, "capture_error", None)
        self.programmatic_edges = getattr(step, "programmatic_edges", 0) if step.mode == "graph" else 0
        self.programmatic_error = getattr(step, "programmatic_error", None)
        self.step_kernels = (sum(1 for call in step.bound if call.kernel is not None)
                             if isinstance(step, _ResidentStep) else 0)
        return step

    def generate(self, prompts: np.ndarray, new_tokens: int, keep_logits: bool = True,
                 sampling: Sampling | None = None, stop_ids=(), pad_id: int | None = None) -> Generation:
        """Up to ``new_tokens`` tokens after ``prompts`` [B, T]: the most likely ones, or drawn by
        ``sampling``; a sequence ends at its first of ``stop_ids``, padded with ``pad_id`` from then
        on, and the generation once every one has (``runtime.sampling``). ``keep_logits=False``
        keeps only the tokens (a resident CUDA step of greedy decoding then copies nothing else
        to the host)."""
        prompts, new_tokens = checked_generation(self.config, prompts, new_tokens, self.scales_queries)
        batch, tokens = prompts.shape
        chooser = NextTokens(batch, sampling, stop_ids, pad_id, self.config.vocab_size)
        step_logits = keep_logits or chooser.needs_logits
        capacity = self._capacity(batch, tokens, new_tokens)
        caches = self.new_caches(batch, capacity)
        begin = time.perf_counter()
        first, _ = self.prefill(prompts, caches)
        prefill_s = time.perf_counter() - begin
        logits, ids = [first.copy()], [chooser(first)]
        # bound (and on CUDA captured) here, not in the timed steps: for the host-driven step
        # the attention calls of every KV length to come. A generation that crosses longrope's
        # original context has a step of each kind, the second from that position on.
        steps = {long_rope: self._decode_step(batch, capacity, caches, lengths, step_logits, long_rope)
                 for long_rope, lengths in self._decode_phases(tokens, new_tokens).items()}
        long_from = self.config.rope_original_max_position_embeddings if True in steps else capacity
        rerun_at = long_from if self._rerun_length(tokens, new_tokens) else -1
        begin = time.perf_counter()
        for position in range(tokens, tokens + new_tokens - 1):
            if chooser.all_ended:
                break
            if position == rerun_at:
                # crossing longrope's original context, transformers' Phi-3 runs the whole sequence
                # again (its cache dropped), every position rotated by long_factor: so here
                sequence = np.concatenate([prompts, np.stack(ids, axis=1)], axis=1)
                out, _ = self.prefill(sequence, caches)
                next_ids = chooser(out)
            else:
                most_likely, out = steps[position >= long_from].advance(ids[-1], position, step_logits)
                next_ids = chooser(out, most_likely)
            if keep_logits:
                logits.append(out)
            ids.append(next_ids)
        decode_s = time.perf_counter() - begin
        for step in steps.values():
            step.close()
        return Generation(np.stack(ids, axis=1), np.stack(logits, axis=1) if keep_logits else None, prefill_s,
                          decode_s, batch * tokens, batch * (len(ids) - 1))


class _MixtureOfExperts:
    """A layer's mixture of experts on CPU kernels, called as one host call of the layer's list.

    The router's GEMV (or GEMM) writes the logits ``buf.router``; the experts are picked on the host
    (``runtime.experts.route``). Where the expert kernels read M at run time (a CPU prefill's
    gemms) each picked expert runs once on the rows routed to it, gathered into ``expert_x``;
    otherwise (a decode step's GEMVs of one row) each row runs through its experts one by one. Their
    outputs, weighted, are summed into ``buf.mlp``, after the shared expert's (Qwen2-MoE's gated by
    the router's last column, ERNIE 4.5's as it is). An expert's calls are bound on its first use."""

    def __init__(self, model: LlamaModel, k: dict[str, Kernel], buf: _Buffers, layer: int, x):
        c = model.config
        self.model, self.k, self.buf, self.layer, self.x = model, k, buf, layer, x
        self.experts, self.per_token, self.normalise = c.num_experts, c.experts_per_token, c.norm_topk_prob
        self.gated = c.shared_expert_gated
        # ERNIE 4.5's and GLM-4.5's bias of each expert's selection, on the host where the experts are picked
        self.selection_bias = (widened(model.w.tensors[selection_bias_name(c, layer)]).reshape(-1)
                               if c.expert_selection_bias else None)
        self.routing = dict(scoring=c.router_scoring, groups=c.expert_groups, groups_per_token=c.expert_groups_per_token,
                            scale=c.routed_scaling_factor)
        self.act = "expert_" + GATED_ACTS[c.activation]
        self.grouped = "M" in k["expert_gate"].spec.dynamic
        self._calls: dict[int, tuple] = {}  # expert -> its bound calls
        self._bound: list = []  # the bound calls whose runs are kept (they own their workspaces)
        router = model._linear(k["router"], layer_name(layer, router_part(c)), x, buf.router)
        self.router, self.shared = router.run, None
        self._bound.append(router)
        if c.shared_expert_intermediate_size:
            shared = [model._linear(k["shared_gate_up"], layer_name(layer, "mlp.shared_expert.gate_up_proj"), x,
                                    buf.shared_gate_up),
                      *_host_calls(buf.split_shared),
                      k["shared_" + GATED_ACTS[c.activation]].bind(
                          {"G": buf.shared_gate, "U": buf.shared_up, "Y": buf.shared_act}, {"M": buf.rows}),
                      model._linear(k["shared_down"], layer_name(layer, "mlp.shared_expert.down_proj"), buf.shared_act,
                                    buf.shared_y)]
            self._bound += shared
            self.shared = [call.run for call in shared]

    def _expert(self, expert: int) -> tuple:
        """``expert``'s bound calls (gate, up, the activation, down), bound on its first use: on every
        row of the expert buffers where it takes the rows routed to it (called with their count as M),
        else on their first row."""
        calls = self._calls.get(expert)
        if calls is None:
            m, k, buf = self.model, self.k, self.buf
            rows = buf.rows if self.grouped else 1
            x, gate, up, act = buf.expert_x[:rows], buf.expert_gate[:rows], buf.expert_up[:rows], buf.expert_act[:rows]
            name = functools.partial(self._name, expert)
            calls = self._calls[expert] = (
                m._linear(k["expert_gate"], name("gate_proj"), x, gate),
                m._linear(k["expert_up"], name("up_proj"), x, up),
                k[self.act].bind({"G": gate, "U": up, "Y": act}, {"M": rows}),
                m._linear(k["expert_down"], name("down_proj"), act, buf.expert_y[:rows]))
        return calls

    def _name(self, expert: int, projection: str) -> str:
        return layer_name(self.layer, f"mlp.experts.{expert}.{projection}")

    def __call__(self) -> None:
        buf, x, out = self.buf, self.x, self.buf.mlp
        self.router()
        experts, weights = route(buf.router[:, :self.experts], self.per_token, self.normalise, self.selection_bias,
                                 **self.routing)
        if self.shared is None:
            out.fill(0.0)
        else:
            for run in self.shared:
                run()
            if self.gated:  # Qwen2-MoE's sigmoid gate: the router's last column
                np.multiply(buf.shared_y, 1.0 / (1.0 + np.exp(-buf.router[:, self.experts:])), out=out)
            else:
                np.copyto(out, buf.shared_y)
        if self.grouped:
            for expert, (rows, weight) in rows_by_expert(experts, weights).items():
                count = len(rows)
                np.take(x, rows, axis=0, out=buf.expert_x[:count])
                for call in self._expert(expert):
                    call(M=count)
                out[rows] += weight[:, None] * buf.expert_y[:count]
            return
        for row in range(buf.rows):
            buf.expert_x[0] = x[row]
            for expert, weight in zip(experts[row].tolist(), weights[row].tolist()):
                for call in self._expert(expert):
                    call.run()
                out[row] += np.float32(weight) * buf.expert_y[0]


class _DecodeStep:
    """One decode step for ``batch`` sequences with every buffer bound once.

    A step of the tiny model is 28 kernel calls of 1-2 us each, so whatever Python does
    between them shows: everything a step can look up is looked up here, once. The calls
    whose dims never change are kept as their ``BoundCall.run`` (the foreign call and nothing
    else); attention takes the new KV length through its bound call, which checks it."""

    def __init__(self, model: LlamaModel, batch: int, capacity: int, caches, lengths=(), long_rope: bool = False):
        """``lengths``: the KV lengths the steps will run at, whose attention calls are bound
        now (any other is bound on first use); ``long_rope``: rotated by longrope's long_factor."""
        c = model.config
        self.model, self.batch, self.capacity, self.caches = model, batch, capacity, caches
        self.arrays = arrays = model.arrays
        self.embed = model.embed
        self.calls = model._decode(batch, capacity, long_rope=long_rope)
        # the attention call of each layer (Gemma 3's sliding layers have their own: runtime.plan._windows)
        attention = {call.role: call for call in self.calls if call.role.startswith("attention")}
        self.attention_of = [attention["attention" + attention_suffix(c, layer, capacity)]
                             for layer in range(c.num_hidden_layers)]
        k = model._plan(self.calls)
        self.buf = buf = _Buffers(arrays, batch, c, model.activations)
        self.logits = arrays.empty((batch, c.vocab_size), numpy_dtype(model.activations))
        # the bound calls own the checks and keep their buffers alive; the step runs their ``run``
        # the first layer's input norm (none in OLMo 2: the first call is a no-op then)
        self.bound = ([model._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h, batch)]
                      if c.pre_norms else [_HostCall(lambda: None)])
        self.layers = []  # per layer: (runs before attention, K and V cache writers, runs after, its queries)
        for layer, (k_cache, v_cache) in enumerate(caches):
            before, after = model._layer_calls(k, buf, layer)
            self.bound += before + after
            query, keys = model._qk(buf, layer)
            self.layers.append((tuple(call.run for call in before), arrays.position_writer(k_cache, keys),
                                arrays.position_writer(v_cache, buf.v), tuple(call.run for call in after), query))
        self.bound.append(model._linear(k["lm_head"], model.lm_head_name, buf.h, self.logits))
        self.first_norm, self.lm_head = self.bound[0].run, self.bound[-1].run
        self._attention: dict[tuple, list[BoundCall]] = {}  # by kernel identities: buckets may switch with L
        self._by_length: dict[int, list[BoundCall]] = {}  # the same lists by KV length: one lookup a step
        for length in lengths:
            self._attention_calls(length)

    def _attention_calls(self, length: int) -> list[BoundCall]:
        calls = self._by_length.get(length)
        if calls is not None:
            return calls
        kernels = [self.model._kernel(call, S=self.capacity, L=length) for call in self.attention_of]
        calls = self._attention.get(tuple(map(id, kernels)))
        if calls is None:
            buf = self.buf
            calls = [kernel.bind({"Q": self.model._qk(buf, layer)[0], "K": k_cache, "V": v_cache, "O": buf.attn},
                                 {"S": self.capacity, "L": length})
                     for layer, (kernel, (k_cache, v_cache)) in enumerate(zip(kernels, self.caches))]
            self._attention[tuple(map(id, kernels))] = calls
        self._by_length[length] = calls
        return calls

    mode = "host"

    def advance(self, tokens: np.ndarray, position: int, keep_logits: bool = True):
        """(next token ids [B], logits [B, V] as float32 or None) after ``tokens`` at ``position``."""
        out = self(tokens, position)
        return out.argmax(axis=-1), (out.copy() if keep_logits else None)

    def close(self) -> None:
        pass

    def __call__(self, tokens: np.ndarray, position: int) -> np.ndarray:
        """Logits [B, V] (on the host) after feeding ``tokens`` [B] at ``position``."""
        arrays, buf = self.arrays, self.buf
        arrays.gather_rows(buf.res_a, self.embed, tokens)
        arrays.fill(buf.positions, position)
        length = position + 1
        attention = self._attention_calls(length)
        scales = self.model.config.query_scales(position) if self.model.config.query_scale_beta else None
        self.first_norm()
        for (before, write_k, write_v, after, query), attend in zip(self.layers, attention):
            for run in before:
                run()
            if scales is not None:  # Ministral 3's queries past its original context
                np.multiply(query, scales, out=query)
            write_k(position)
            write_v(position)
            attend(L=length)  # checked: at most the cache's S rows
            for run in after:
                run()
        self.lm_head()
        return self.model.logits_of(self.logits)


class _ResidentStep:
    """A CUDA decode step that stays on the device, captured once as a CUDA graph
    (``runtime.cuda_graph``) and replayed for every token.

    Its kernels are ``decode_calls(..., resident=True)``: attention reads each sequence's
    length and ``rope_append`` (the rotary embedding and the cache write in one) its position
    from device memory (``rope_append_attention``, all three in one, the position), ``argmax``
    picks the next ids there, so the recorded launches are right at every step. Per step the host writes the new tokens' embedding rows (gathered from its
    table) and the positions into page-locked memory, launches the graph (which copies them in first and the ids, and the logits when
    kept, out last), and waits once. Where the driver cannot capture, the same work is issued
    call by call."""

    def __init__(self, model: LlamaModel, batch: int, capacity: int, caches, keep_logits: bool = True,
                 long_rope: bool = False):
        c, arrays = model.config, model.arrays
        drv = arrays.drv
        self.model, self.arrays, self.stream = model, arrays, arrays.stream
        self.embed = model.embed
        # LookupError: the provider has no resident kernels
        k = model._resident_kernels(batch, capacity, long_rope)
        storage = numpy_dtype(model.dtype)
        self.buf = buf = _Buffers(arrays, batch, c, model.dtype)
        self.logits = arrays.empty((batch, c.vocab_size), storage)
        self.ids = arrays.empty((batch,), np.int32)
        steps = arrays.empty((2, batch), np.int32)   # positions, then lengths (positions + 1)
        self.lengths = steps.part(batch, (batch,))
        positions = steps.part(0, (batch,))
        # page-locked, so that the recorded copies read and write them at every replay
        self.host_rows = drv.pagelocked_empty((batch, c.hidden_size), storage)
        self.host_steps = drv.pagelocked_empty((2, batch), np.int32)
        self.host_ids = drv.pagelocked_empty((batch,), np.int32)
        self.host_logits = drv.pagelocked_empty((batch, c.vocab_size), storage)
        self.copies_in = [(buf.res_a, self.host_rows), (steps, self.host_steps)]
        # the norms on their own, or inside the GEMVs (runtime.plan.FUSED_NORMS)
        self.fused_norms = _fuses_norms(k)
        self.bound = [] if self.fused_norms or not c.pre_norms else [
            model._norm(k["first_norm"], layer_name(0, "input_layernorm"), buf.res_a, buf.h, batch)]
        buf.positions = positions  # a library without rope_append: its rope kernels read them here
        self.capacity = capacity
        for layer, (k_cache, v_cache) in enumerate(caches):
            before, after = model._layer_calls(k, buf, layer)
            attention = "attention" + attention_suffix(c, layer, capacity)
            self.bound += (before + self._attention_calls(k, k_cache, v_cache, positions, rope_suffix(c, layer), attention)
                           + after)
        if self.fused_norms:  # the LM head normalises the residual stream itself
            self.bound.append(model._linear(k["lm_head"], model.lm_head_name, buf.res_a, self.logits,
                                            gain="model.norm.weight"))
        else:
            self.bound.append(model._linear(k["lm_head"], model.lm_head_name, buf.h, self.logits))
        self.bound.append(k["argmax"].bind({"X": self.logits, "Y": self.ids}))
        self.runs = [call.run for call in self.bound]
        self.graphs: dict[bool, object] = {}  # captured per choice of keeping the logits
        self.capture_error: str | None = None   # why the driver could not capture, if it could not
        # programmatic edges in the graph (runtime.cuda_graph), and why there are none if they failed
        self.programmatic_edges = 0
        self.programmatic_error = model._edges_refused
        self.mode = "graph" if self._graph(keep_logits) is not None else "resident"  # captured here, untimed

    def _attention_calls(self, k: dict, k_cache, v_cache, positions, suffix: str | None = "",
                         attention: str = "attention") -> list:
        """A layer's calls from the Q/K/V projection's rows to attention's output: q and k rotated
        at the positions the graph copies in, k and v written to the caches there, attention;
        ``suffix``: the layer's rope kernels' (``runtime.plan.rope_suffix``; None: q and k as
        projected, k and v written by ``kv_append``); ``attention``: its attention kernel's role
        (``runtime.plan.attention_suffix``)."""
        buf, capacity = self.buf, self.capacity
        if suffix is None:  # a layer without a rotary embedding
            config = self.model.config
            rows = (buf.rows, config.num_key_value_heads, config.head_dim)
            append = k["kv_append"].bind({"K": buf.k.reshape(rows), "V": buf.v.reshape(rows), "P": positions,
                                          "KC": k_cache, "VC": v_cache}, {"S": capacity})
            attend = k[attention].bind({"Q": buf.q, "K": k_cache, "V": v_cache, "LENS": self.lengths,
                                        "O": buf.attn}, {"S": capacity, "L": capacity})
            return [append, attend]
        if k[attention].spec.op == "rope_append_attention":  # all in one kernel
            # K and KC are one cache: the kernel reads the rows before each position, writes the one there
            return [k[attention].bind({"QKV": buf.qkv, "P": positions, "K": k_cache, "V": v_cache, "O": buf.attn,
                                         "KC": k_cache, "VC": v_cache}, {"S": capacity, "L": capacity})]
        if "rope_append" + suffix in k:
            append = k["rope_append" + suffix].bind({"QKV": buf.qkv, "P": positions, "Q": buf.qr, "KC": k_cache,
                                            "VC": v_cache}, {"S": capacity})
        else:  # rotated by the rope calls before it
            rows = (buf.rows, self.model.config.num_key_value_heads, self.model.config.head_dim)
            append = k["kv_append"].bind({"K": buf.kr.reshape(rows), "V": buf.v.reshape(rows), "P": positions,
                                          "KC": k_cache, "VC": v_cache}, {"S": capacity})
        attend = k[attention].bind({"Q": buf.qr, "K": k_cache, "V": v_cache, "LENS": self.lengths,
                                    "O": buf.attn}, {"S": capacity, "L": capacity})
        return [append, attend]

    def _issue(self, keep_logits: bool, graph=None) -> None:
        """Queue the step on the stream; ``graph``: the graph capturing it, which then joins each
        kernel built for a programmatic launch to the kernel before it by a programmatic edge."""
        drv, stream = self.arrays.drv, self.stream
        for device, host in self.copies_in:
            drv.memcpy_htod_async(device.gpudata, host, stream)
        if graph is None:
            for run in self.runs:
                run()
        else:
            for call in self.bound:
                if call.kernel is not None and call.kernel.programmatic:
                    self.programmatic_edges += graph.programmatic_edge()
                call.run()
        drv.memcpy_dtoh_async(self.host_ids, self.ids.gpudata, stream)
        if keep_logits:
            drv.memcpy_dtoh_async(self.host_logits, self.logits.gpudata, stream)

    def _graph(self, keep_logits: bool):
        """The captured step, or None where the driver cannot capture (issued call by call). With
        programmatic edges where the model allows them and the driver takes them, else without."""
        if keep_logits not in self.graphs:
            from .cuda_graph import CudaGraph, CudaGraphError

            graph, refused = None, None
            attempts = (True, False) if self.model.programmatic_launch and not self.model._edges_refused else (False,)
            for programmatic in attempts:
                self.programmatic_edges = 0
                try:
                    graph = CudaGraph(self.arrays.drv, self.stream)
                    with graph.capture():
                        self._issue(keep_logits, graph if programmatic else None)
                    break
                except (CudaGraphError, self.arrays.drv.Error) as exc:  # without them, or call by call
                    graph, error = None, f"{type(exc).__name__}: {exc}"
                    if programmatic:
                        refused = error
                    else:
                        self.capture_error = error
            if graph is not None and refused is not None:  # the edges, not capture itself, were refused
                self.programmatic_error = self.model._edges_refused = refused
            self.graphs[keep_logits] = graph
        return self.graphs[keep_logits]

    def advance(self, tokens: np.ndarray, position: int, keep_logits: bool = True):
        """(next token ids [B], logits [B, V] as float32 or None) after ``tokens`` at ``position``."""
        np.take(self.embed, tokens, axis=0, out=self.host_rows)  # an id out of range raises IndexError
        self.host_steps[0] = position
        self.host_steps[1] = position + 1
        graph = self._graph(keep_logits)
        if graph is None:
            self._issue(keep_logits)
        else:
            graph.launch()
        self.stream.synchronize()
        logits = self.model.capped(to_float32(np.asarray(self.host_logits), self.model.dtype)) if keep_logits else None
        return np.array(self.host_ids, dtype=np.int64), logits

    def close(self) -> None:
        for graph in self.graphs.values():
            if graph is not None:
                graph.close()
        self.graphs.clear()
