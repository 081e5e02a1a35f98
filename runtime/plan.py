"""Which kernels one forward pass of a Llama-style decoder calls, and how often.

The decoder (``runtime.llama``) asks for exactly these kernels, and ``autotune tune-model``
tunes exactly these tasks, so the two can never disagree. A prefill pass runs ``tokens``
tokens of one sequence; a decode pass runs one new token for each of ``batch`` sequences
against a KV cache holding ``kv_len`` positions. Token counts and KV lengths are dynamic
dims of the row-wise and attention kernels (one kernel serves every count, tuned at the
given size). The linear layers compile their M in, except a CPU prefill's
(``dynamic_rows``, ``PREFILL_DYNAMIC_ROWS``): there every linear layer but the LM head is a
``gemm`` with a dynamic M, so a prompt runs at its own length rather than padded to a tuned one
(``runtime.llama`` still runs a prefill on GEMVs where some are tuned at exactly its rows).

Residual adds are fused into the RMSNorm that follows them (``rmsnorm`` with
``residual=true`` writes the new residual stream too), so a layer calls no ``add``; the Q, K
and V projections are one matrix, and so are gate and up (``runtime.weights.FUSED``).
With one token row (decode at batch 1) Q and K sit side by side in that projection's output,
so one ``rope`` call (role ``rope_qk``, H + HKV heads) rotates both; with more rows they are
column blocks of it and each has its call (``rope_q``, ``rope_k``).
A projection with a bias (``ModelConfig.qkv_bias``, ``o_bias``, ``mlp_bias``) is followed by
a ``bias_add`` (role ``qkv_bias`` after ``qkv_proj``, and so on); a model without biases calls
none. The LM head has no bias. A model that normalises its query and key heads (Qwen3,
``ModelConfig.qk_norm``) runs ``qk_norm`` on the Q/K/V projection's rows (after its bias), and
everything after reads those normalised rows as it would the projection's.
Gemma gates with ``geglu`` where Llama has ``swiglu`` (role as the op); Gemma 3 normalises
each sublayer's output (role ``post_norm``) before its residual add, and rotates its
sliding layers with kernels of their own (roles with the suffix ``_local``, ``rope_suffix``).
OLMo 2 normalises no sublayer's input: each output's norm (``post_norm``) is added to the
residual stream by an ``add`` (role ``residual_add``), and the last layer's output is normalised
by ``final_norm`` (``_norms``); its ``qk_norm`` normalises whole projections (``span``).
With ``quantize="q4"`` every linear layer, the LM head included, uses int4 weights
(``gemm_q4``/``gemv_q4``, symmetric codes, one scale per ``group_size`` weights). An int4
checkpoint (GPTQ, AWQ: ``ModelConfig.int4_format``) keeps its LM head in floats, and where its
codes have zero points (AWQ, GPTQ without ``sym``) its layers' kernels take them (``zero_point``).

A mixture of experts (``ModelConfig.num_experts``) calls, in place of gate/up, the activation and
down: the router (role ``router``: a linear layer to the experts' logits, with Qwen2-MoE's shared
gate as one more column), and for each expert a row picks, ``expert_gate`` and ``expert_up`` (one
task: the two are not stacked), the activation (role ``expert_`` + the op) and ``expert_down``: where the pass's GEMMs read M at run time each picked
expert runs once on the rows routed to it (tuned at the rows an expert gets on average), otherwise
each row runs through its experts alone on GEMVs of one row (``expert_rows``); Qwen2-MoE's shared
expert runs on every row (roles ``shared_gate_up``, ``shared_`` + the op, ``shared_down``). The
routing itself is the host's (``runtime.experts``), so these models run on CPU kernels only.

The resident CUDA decode step (``decode_calls(..., resident=True)``) also fuses each RMSNorm
into the GEMV that reads its output, each residual add into the GEMV whose output it adds and
SwiGLU into the gate/up GEMV (``norm=rmsnorm``, ``residual`` and ``act=swiglu`` on
``gemv``/``gemv_q4``, ``search_space/ops/matmul.py``), and attention takes over ``rope_append``
(``rope_append_attention``, ``search_space/ops/device_step.py``): a layer is then the Q/K/V
projection, attention, the output projection, the gate/up projection (writing the activation)
and the down projection, five kernels where there were nine. The residual stream goes back and
forth between two buffers; the LM head normalises the last one.
Where the GEMVs cannot take them (more than ``GEMV_MAX_M`` rows, a bias after the output or
MLP projections) or a library predates them, the step keeps its norms (``fused_norms=False``).

``dtype`` is the precision the kernels of a pass run in (activations, the KV cache and the
logits are stored in it; the kernels accumulate in float32), the int4 codes' scales too.
``weights`` is how the linear layers (the LM head included) store W: ``dtype`` unless said
otherwise; a float32 pass with bfloat16 weights is weight-only (``weight=bfloat16`` on its
gemv/gemm tasks). ``precisions`` says which a model in a given precision runs on which kernels.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .abi import KernelSpec
from .model_config import ModelConfig
from .precision import check_dtype

QUANTIZE = ("none", "q4")
GEMV_MAX_M = 16  # above this the decode step uses the gemm kernels
# whether a prefill's linear layers take the token rows at run time, by target kind (the
# CPU's gemm templates take a dynamic M; the CUDA ones compile M in)
PREFILL_DYNAMIC_ROWS = {"cpu": True, "cuda": False}


@dataclass(frozen=True)
class KernelCall:
    """One kernel of a forward pass: its role, what it computes, and calls per pass."""

    role: str
    spec: KernelSpec
    count: int


def check_quantize(config: ModelConfig, quantize: str, group_size: int = 128) -> None:
    """Raise ValueError when ``config`` cannot run with ``quantize``."""
    if quantize not in QUANTIZE:
        raise ValueError(f"unknown quantization {quantize!r}: use one of {', '.join(QUANTIZE)}")
    group = config.int4_group_size
    if group is not None and (quantize, group_size) != ("q4", group):
        grouped = (f"one scale per output row, run as groups of {group}" if config.int4_channelwise
                   else f"group size {group}")
        raise ValueError(f"{config.name} is a{'n' if config.int4_name == 'AWQ' else ''} {config.int4_name} checkpoint "
                         f"(int4, {grouped}): it runs with --quantize q4 --group-size {group}, not "
                         f"--quantize {quantize}" + (f" --group-size {group_size}" if quantize == "q4" else ""))
    if quantize == "q4":
        if group_size not in (32, 64, 128):
            raise ValueError(f"q4 group size must be 32, 64 or 128, got {group_size}")
        sizes = [("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                 ("num_attention_heads * head_dim", config.q_size)]
        if config.dense_layers:  # a mixture of experts' dense layers
            sizes.append(("dense_intermediate_size", config.dense_intermediate_size))
        if config.shared_expert_intermediate_size:
            sizes.append(("shared_expert_intermediate_size", config.shared_expert_intermediate_size))
        for name, k in sizes:
            if k % group_size:
                raise ValueError(f"--quantize q4: {name} = {k} of {config.name} is not a multiple of the "
                                 f"group size {group_size}")


# the precisions each target kind's kernels compute in, and those its linear layers can keep
# their weights in while computing in float32 (weight-only: the kernels widen them as they load)
KERNEL_PRECISIONS = {"cpu": ("float32",), "cuda": ("float32", "float16", "bfloat16")}
WEIGHT_ONLY = {"cpu": ("bfloat16", "float16"), "cuda": ()}


def precisions(dtype: str, kind: str, quantize: str = "none", float_head: bool = False) -> tuple[str, str]:
    """(the precision kernels run in, the linear layers' weights) of a model in ``dtype`` on
    ``kind`` ("cpu" or "cuda") kernels; ValueError for one that cannot run there.

    CUDA kernels run in the model's precision throughout. CPU kernels compute in float32: a
    bfloat16 or float16 model there keeps its linear layers' weights so (weight-only, half the
    bytes a decode step reads) and holds every other tensor's values in float32. A q4 model's
    int4 codes are its weights, so only its float LM head can be weight-only (``float_head``: an
    int4 checkpoint's, ``head_quantize``)."""
    check_dtype(dtype)
    if dtype in KERNEL_PRECISIONS[kind]:
        return dtype, dtype
    if dtype not in WEIGHT_ONLY[kind]:
        raise ValueError(f"the CPU kernels have no {dtype}: use float32, or bfloat16 or float16 (weights in it, "
                         "float32 arithmetic), or the CUDA target")
    if quantize != "none" and not float_head:
        raise ValueError(f"{quantize} on the CPU runs in float32 (its int4 codes are the weights): "
                         f"drop the {dtype} or the quantization")
    return "float32", dtype


def _linear(role: str, m: int, n: int, k: int, count: int, quantize: str, group_size: int,
            attrs: dict | None = None, dynamic_rows: bool = False, zero_points: bool = False) -> KernelCall:
    """``dynamic_rows``: a gemm that reads M at run time, whatever ``m`` (the rows it is tuned at);
    ``zero_points``: int4 codes with a zero point per group (an asymmetric checkpoint's)."""
    op = "gemv" if m <= GEMV_MAX_M and not dynamic_rows else "gemm"
    attrs = dict(attrs or {})
    if quantize == "q4":
        op += "_q4"
        attrs = {"group_size": group_size, "zero_point": zero_points}
    return KernelCall(role, KernelSpec.make(op, {"M": m, "N": n, "K": k}, attrs=attrs,
                                            dynamic=("M",) if dynamic_rows else ()), count)


def head_quantize(config: ModelConfig, quantize: str) -> str:
    """How the LM head is stored in a model of ``quantize``: as the other linear layers, except in an
    int4 checkpoint (GPTQ, AWQ), which leaves it unquantised."""
    return "none" if config.int4_format is not None else quantize


def _rows(role: str, op: str, rows: int, n: int, count: int, attrs: dict | None = None) -> KernelCall:
    return KernelCall(role, KernelSpec.make(op, {"M": rows, "N": n}, attrs=attrs, dynamic=("M",)), count)


def _norm(config: ModelConfig, role: str, rows: int, residual: bool, count: int) -> KernelCall:
    return _rows(role, "rmsnorm", rows, config.hidden_size, count,
                 {"eps": config.rms_norm_eps, "residual": residual})


# the gated MLP's kernel (and role) by ModelConfig.activation
GATED_ACTS = {"silu": "swiglu", "gelu_tanh": "geglu"}
LOCAL = "_local"  # the role suffix of the kernels of Gemma 3's sliding layers that rotate otherwise


def rope_suffix(config: ModelConfig, layer: int) -> str | None:
    """The suffix of the roles of ``layer``'s rope kernels: ``LOCAL`` in a layer whose rotary
    embedding differs from the model's (``ModelConfig.split_rope``), none in the others; None in
    a layer without one (SmolLM3's NoPE layers: attention reads q and k as projected)."""
    if layer in config.nope_layers:
        return None
    return LOCAL if config.split_rope and layer in config.local_layers else ""


def _windows(config: ModelConfig, positions: int) -> dict[str, tuple[int, int]]:
    """{role suffix: (window, layers)} of the attention kernels of a pass whose queries see up to
    ``positions`` keys: a window only where it can narrow that (a pass within it runs the
    plain kernels, those of every library tuned before windows), and Gemma 3's sliding layers
    (``LOCAL``) apart from its global ones where the two differ."""
    c = config
    windows = [c.layer_window(layer) if c.layer_window(layer) < positions else 0 for layer in range(c.num_hidden_layers)]
    if len(set(windows)) == 1:
        return {"": (windows[0], c.num_hidden_layers)}
    local = sum(1 for w in windows if w)
    return {"": (0, c.num_hidden_layers - local), LOCAL: (c.sliding_window, local)}


def attention_suffix(config: ModelConfig, layer: int, positions: int) -> str:
    """The suffix of the role of ``layer``'s attention kernel in a pass over up to ``positions``
    keys (``_windows``)."""
    windowed = config.layer_window(layer) and config.layer_window(layer) < positions
    return LOCAL if windowed and len(_windows(config, positions)) > 1 else ""


def _attentions(config: ModelConfig, op: str, dims: dict, attrs: dict, positions: int,
                dynamic: tuple[str, ...]) -> list[KernelCall]:
    """The attention calls of a pass, one per window group (``_windows``)."""
    return [KernelCall("attention" + suffix, KernelSpec.make(op, dims, attrs={**attrs, **({"window": w} if w else {})},
                                                             dynamic=dynamic), count)
            for suffix, (w, count) in _windows(config, positions).items()]


def _rope_groups(config: ModelConfig, long_rope: bool = False) -> list[tuple[str, dict, int]]:
    """(role suffix, rope attributes, layers) of each group of layers that rotate alike (none
    for layers that do not rotate); ``long_rope``: in a pass past longrope's original context
    (``ModelConfig.rope_is_long``), whose kernels divide by long_factor."""
    c = config
    local = len(c.local_layers) if c.split_rope else 0
    rest = c.num_hidden_layers - local - len(c.nope_layers)
    return (([("", c.rope_attrs_for(long_rope), rest)] if rest else [])
            + ([(LOCAL, c.layer_rope_attrs(c.local_layers[0]), local)] if local else []))


def _ropes(config: ModelConfig, rows: int, long_rope: bool = False) -> list[KernelCall]:
    """The rotary embedding calls of a layer over ``rows`` token rows: Q and K in one call when
    they are contiguous (one row), else one each; per group of layers that rotate alike."""
    c = config
    calls = []
    for suffix, attrs, count in _rope_groups(c, long_rope):
        if rows == 1:
            calls.append(_rope(c, "rope_qk" + suffix, 1, c.num_attention_heads + c.num_key_value_heads, count, attrs))
        else:
            calls += _rope_pair(c, rows, count, attrs, suffix)
    return calls


def _rope_pair(config: ModelConfig, rows: int, count: int, attrs: dict, suffix: str = "") -> list[KernelCall]:
    """Q's and K's rotary embedding as a call each."""
    return [_rope(config, "rope_q" + suffix, rows, config.num_attention_heads, count, attrs),
            _rope(config, "rope_k" + suffix, rows, config.num_key_value_heads, count, attrs)]


def _rope(config: ModelConfig, role: str, tokens: int, heads: int, count: int, attrs: dict) -> KernelCall:
    # {"theta": ...} alone for a default rope, plus rope_type and its parameters for a scaled one
    # (KernelSpec.make leaves out theta 10000.0 and rope_type "default": their defaults)
    spec = KernelSpec.make("rope", {"T": tokens, "H": heads, "D": config.head_dim}, attrs=attrs, dynamic=("T",))
    return KernelCall(role, spec, count)


def _norms(config: ModelConfig, rows: int) -> list[KernelCall]:
    """The RMSNorms of a pass (and the residual adds they take): the first layer's input norm,
    then each residual add fused into the norm after it (the next sublayer's input, or the final
    norm), and where the model has them the sublayers' output norms (Gemma 2 and 3). A model
    without input norms (OLMo 2) normalises each sublayer's output, adds it to the residual stream
    (``add``, role ``residual_add``) and normalises the last layer's output (``final_norm``)."""
    c, layers = config, config.num_hidden_layers
    post = [_norm(c, "post_norm", rows, False, 2 * layers)] if c.post_norms else []
    if not c.pre_norms:
        return [*post, _rows("residual_add", "add", rows, c.hidden_size, 2 * layers),
                _norm(c, "final_norm", rows, False, 1)]
    return [_norm(c, "first_norm", rows, False, 1), _norm(c, "residual_norm", rows, True, 2 * layers), *post]


def _qk_norms(config: ModelConfig, rows: int) -> list[KernelCall]:
    """Qwen3's norm of each query and key head (OLMo 2's: of the whole query and of the whole key
    projection, ``span`` projection), over the Q/K/V projection's ``rows`` rows."""
    c = config
    if not c.qk_norm:
        return []
    # span "head" is the default, which KernelSpec.make leaves out: Qwen3's kernels keep their keys
    spec = KernelSpec.make("qk_norm", {"T": rows, "H": c.num_attention_heads, "HKV": c.num_key_value_heads,
                                       "D": c.head_dim}, attrs={"eps": c.rms_norm_eps, "span": c.qk_norm_span},
                           dynamic=("T",))
    return [KernelCall("qk_norm", spec, c.num_hidden_layers)]


def biased_projections(config: ModelConfig) -> dict[str, bool]:
    """Whether each projection of a layer (by role) has a bias; its ``bias_add`` has the role
    ``bias_role(role)``."""
    return {"qkv_proj": config.qkv_bias, "o_proj": config.o_bias, "gate_up_proj": config.mlp_bias,
            "down_proj": config.mlp_bias}


# what the linear layers of a resident decode step take over from the kernels around them
_NORM = {"norm": "rmsnorm"}  # and the model's eps
FUSED_NORMS = {"qkv_proj": _NORM, "gate_up_proj": {**_NORM, "act": "swiglu"}, "lm_head": _NORM,
               "o_proj": {"residual": True}, "down_proj": {"residual": True}}
FUSED_ATTRS = {name for extra in FUSED_NORMS.values() for name in extra}  # a GEMV spec with any: a fused one


def can_fuse_norms(config: ModelConfig, batch: int) -> bool:
    """Whether a decode step of ``batch`` sequences can run its norms and residual adds inside
    its GEMVs: every linear layer is a GEMV, none adds a bias after the GEMV that would take
    the residual add, and the layer is Llama's (no norm between a projection and its residual
    add, SwiGLU as the gate, one rotary embedding for every layer: the fused attention rotates),
    and no gather of an act-order checkpoint sits between a norm and the GEMV that would take it."""
    c = config
    return (batch <= GEMV_MAX_M and not (c.o_bias or c.mlp_bias or c.post_norms or c.split_rope or c.nope_layers
                                         or c.local_layers or c.int4_act_order) and c.activation == "silu")


def _fuse_norms(config: ModelConfig, calls: list[KernelCall]) -> list[KernelCall]:
    """``calls`` with the RMSNorms folded into the GEMVs that read them, the residual adds into
    those whose outputs they add and SwiGLU into the gate/up GEMV (``FUSED_NORMS``)."""
    fused = []
    for call in calls:
        if call.spec.op in ("rmsnorm", "swiglu"):
            continue
        extra = FUSED_NORMS.get(call.role)
        if extra is not None:
            if "norm" in extra:
                extra = {**extra, "eps": config.rms_norm_eps}
            call = _with_attrs(call, {**call.spec.attr, **extra})
        fused.append(call)
    return fused


def _with_attrs(call: KernelCall, attrs: dict) -> KernelCall:
    """``call`` with its kernel's attributes replaced by ``attrs``."""
    spec = call.spec
    return KernelCall(call.role, KernelSpec.make(spec.op, spec.dims, spec.dtype, attrs, spec.dynamic), call.count)


def _scale(config: ModelConfig) -> dict:
    """The attention kernels' ``scale`` attribute (Granite's attention_multiplier, Gemma's
    query_pre_attn_scalar; else none: their default, 1/sqrt(D)) and ``softcap`` (Gemma 2's)."""
    return {**({} if config.attention_multiplier is None else {"scale": config.attention_multiplier}),
            **({"softcap": config.attn_softcap} if config.attn_softcap else {})}


# what rope_append_attention takes over from attention_decode (the rest of its attributes are rope's)
ATTENTION_ATTRS = ("scale", "window", "softcap")


def _rope_into_attention(calls: list[KernelCall]) -> list[KernelCall]:
    """``calls`` with ``rope_append`` and attention as one ``rope_append_attention`` (role attention)."""
    append = next(call for call in calls if call.role == "rope_append")
    attention = next(call for call in calls if call.role == "attention")
    scale = {k: v for k, v in attention.spec.attr.items() if k in ATTENTION_ATTRS}
    fused = KernelSpec.make("rope_append_attention", attention.spec.dims, attention.spec.dtype,
                            {**append.spec.attr, **scale}, dynamic=("S", "L"))
    return [KernelCall("attention", fused, attention.count) if call is attention else call
            for call in calls if call is not append]


def unfused(config: ModelConfig, call: KernelCall) -> list[KernelCall]:
    """The calls a fused kernel stands for, for a library exported before it existed (one holding
    rope_q, rope_k and kv_append where this plan asks for rope_qk or rope_append, rope_append and
    attention where it asks for rope_append_attention, or attention without the programmatic
    launch); [] for any other call."""
    c, spec = config, call.spec
    if spec.op == "rope_append_attention":  # rope_append, then the programmatic attention_decode
        d, attrs = spec.dims, spec.attr
        append = KernelSpec.make("rope_append", {n: d[n] for n in ("B", "H", "HKV", "D", "S")}, spec.dtype,
                                 {k: v for k, v in attrs.items() if k not in ATTENTION_ATTRS}, dynamic=("S",))
        scale = {k: v for k, v in attrs.items() if k in ATTENTION_ATTRS}
        attention = KernelSpec.make("attention_decode", d, spec.dtype,
                                    {"lengths": "per_sequence", "programmatic": True, **scale}, dynamic=("S", "L"))
        return [KernelCall("rope_append", append, call.count), KernelCall("attention", attention, call.count)]
    if call.role == "attention" and spec.attr.get("programmatic"):
        return [_with_attrs(call, {k: v for k, v in spec.attr.items() if k != "programmatic"})]
    suffix = LOCAL if call.role.endswith(LOCAL) else ""
    role = call.role[: len(call.role) - len(suffix)]
    if role not in ("rope_qk", "rope_append"):
        return []
    rows = spec.dims["B"] if role == "rope_append" else spec.dims["T"]
    ropes = [KernelCall(r.role, replace(r.spec, dtype=spec.dtype), r.count)
             for r in _rope_pair(c, rows, call.count, dict(spec.attr), suffix)]
    if role == "rope_qk":
        return ropes
    return ropes + [KernelCall("kv_append", _kv_append(c, rows, spec.dims["S"], spec.dtype), call.count)]


def _kv_append(config: ModelConfig, batch: int, kv_len: int, dtype: str) -> KernelSpec:
    """The kernel that writes each sequence's new K and V rows into the caches."""
    c = config
    return KernelSpec.make("kv_append", {"B": batch, "HKV": c.num_key_value_heads, "D": c.head_dim, "S": kv_len},
                           dtype, dynamic=("S",))


def bias_role(role: str) -> str:
    return role.replace("_proj", "_bias")


# The projections (by role) whose input an act-order GPTQ checkpoint (``ModelConfig.int4_act_order``)
# gathers into its weights' row order first, and the gather's role; down_proj needs none (its order
# is in gate/up's rows: ``runtime.weights``)
ACT_ORDER_GATHERS = {"qkv_proj": "gather_hidden", "o_proj": "gather_attn", "gate_up_proj": "gather_hidden"}


def _layer_linears(config: ModelConfig, m: int, quantize: str, group_size: int, attrs: dict,
                   dynamic_rows: bool = False) -> list[KernelCall]:
    c, layers = config, config.num_hidden_layers
    gathers = ([_rows("gather_hidden", "gather_columns", m, c.hidden_size, 2 * layers),
                _rows("gather_attn", "gather_columns", m, c.q_size, layers)] if c.int4_act_order else [])
    q, d = (quantize, group_size, attrs), {"dynamic_rows": dynamic_rows, "zero_points": c.int4_zero_points}
    # Q, K, V as one projection and gate, up as another (runtime.weights.FUSED)
    linears = [_linear("qkv_proj", m, c.q_size + 2 * c.kv_size, c.hidden_size, layers, *q, **d),
               _linear("o_proj", m, c.hidden_size, c.q_size, layers, *q, **d)]
    if c.moe:
        linears += _expert_linears(c, m, q, d)
    dense = layers - c.moe_layers  # the layers with a dense MLP: all of a dense model's
    if dense:
        linears += [_linear("gate_up_proj", m, 2 * c.dense_size, c.hidden_size, dense, *q, **d),
                    _linear("down_proj", m, c.hidden_size, c.dense_size, dense, *q, **d)]
    biased = biased_projections(c)
    return linears + gathers + [_rows(bias_role(call.role), "bias_add", m, call.spec.dims["N"], layers)
                                for call in linears if biased.get(call.role, False)]


def expert_rows(config: ModelConfig, rows: int, dynamic_rows: bool = False) -> tuple[int, int]:
    """(the rows an expert's kernels are tuned at, how many times a layer calls each) in a pass over
    ``rows`` token rows of a mixture of experts. With ``dynamic_rows`` each expert takes the rows
    routed to it at once (a gemm reading M at run time, tuned at the rows an expert gets on average);
    otherwise each row goes through its experts alone (GEMVs of one row: a decode step's)."""
    picks = rows * config.experts_per_token
    if dynamic_rows:
        return max(1, -(-picks // config.num_experts)), min(config.num_experts, picks)
    return 1, picks


def _expert_linears(config: ModelConfig, rows: int, q: tuple, d: dict) -> list[KernelCall]:
    """A mixture of experts' linear layers in a pass over ``rows`` rows: the router (with Qwen2-MoE's
    shared gate as one more row: ``runtime.weights.router_part``), each expert's gate/up and down,
    and the shared expert's (``expert_rows``)."""
    c, layers, h = config, config.moe_layers, config.hidden_size
    shared = c.shared_expert_intermediate_size
    m, calls = expert_rows(c, rows, d["dynamic_rows"])
    quantize, group_size, attrs = q
    # the router stays in floats where the LM head does (an int4 checkpoint's)
    gated = shared and c.shared_expert_gated
    router = _linear("router", rows, c.num_experts + (1 if gated else 0), h, layers, head_quantize(c, quantize),
                     group_size, attrs, **d)
    # an expert's gate and up apart (one task): its weights are read where they lie, not stacked in a
    # copy, which for a model of experts would be most of its bytes again
    linears = [router, *(_linear(role, m, c.intermediate_size, h, layers * calls, *q, **d)
                         for role in ("expert_gate", "expert_up")),
               _linear("expert_down", m, h, c.intermediate_size, layers * calls, *q, **d)]
    if shared:
        linears += [_linear("shared_gate_up", rows, 2 * shared, h, layers, *q, **d),
                    _linear("shared_down", rows, h, shared, layers, *q, **d)]
    return linears


def _acts(config: ModelConfig, rows: int, dynamic_rows: bool) -> list[KernelCall]:
    """The gated MLPs' activations: one per dense layer, and a mixture of experts' per expert call
    and its shared expert's."""
    c, layers, dense = config, config.moe_layers, config.num_hidden_layers - config.moe_layers
    act = GATED_ACTS[c.activation]
    acts = [_rows(act, act, rows, c.dense_size, dense)] if dense else []
    if not c.moe:
        return acts
    m, calls = expert_rows(c, rows, dynamic_rows)
    acts.append(_rows("expert_" + act, act, m, c.intermediate_size, layers * calls))
    if c.shared_expert_intermediate_size:
        acts.append(_rows("shared_" + act, act, rows, c.shared_expert_intermediate_size, layers))
    return acts


def _linear_attrs(dtype: str, weights: str | None, quantize: str) -> dict:
    """The attributes that make a float linear layer weight-only, or none when W is in ``dtype``.
    ``quantize``: the LM head's (``head_quantize``), the one float layer a q4 model may have."""
    check_dtype(dtype)
    if weights is None or check_dtype(weights) == dtype:
        return {}
    if dtype != "float32" or weights not in WEIGHT_ONLY["cpu"] or quantize != "none":
        raise ValueError(f"{weights} weights on {dtype} kernels (quantize {quantize}): weight-only is bfloat16 "
                         "or float16 weights on float32, unquantised")
    return {"weight": weights}


def _pass_calls(config: ModelConfig, rows: int, sequences: int, attention: list[KernelCall], quantize: str,
                group_size: int, dtype: str, weights: str | None = None,
                dynamic_rows: bool = False, long_rope: bool = False) -> list[KernelCall]:
    """The kernels of a pass over ``rows`` token rows of ``sequences`` sequences."""
    c = config
    attrs = _linear_attrs(dtype, weights, head_quantize(c, quantize))  # q4 layers take no weight attrs
    calls = (_norms(c, rows)
            + _layer_linears(c, rows, quantize, group_size, attrs, dynamic_rows)
            + _qk_norms(c, rows)
            + _ropes(c, rows, long_rope)
            + attention
            + _acts(c, rows, dynamic_rows)
            + [_linear("lm_head", sequences, c.vocab_size, c.hidden_size, 1, head_quantize(c, quantize), group_size,
                       attrs)])
    return [KernelCall(call.role, replace(call.spec, dtype=dtype), call.count) for call in calls]


def prefill_calls(config: ModelConfig, tokens: int, quantize: str = "none", group_size: int = 128,
                  batch: int = 1, dtype: str = "float32", weights: str | None = None,
                  dynamic_rows: bool = False, long_rope: bool = False) -> list[KernelCall]:
    """Kernels of one prefill pass over ``batch`` prompts of ``tokens`` tokens (logits of the last).
    ``dynamic_rows``: the layers' linear layers are gemms with a dynamic M (``PREFILL_DYNAMIC_ROWS``);
    ``long_rope``: a prompt past longrope's original context (``ModelConfig.rope_is_long`` of its
    own length, which padding does not change), rotated by long_factor."""
    check_quantize(config, quantize, group_size)
    c = config
    attention = _attentions(c, "attention_prefill", {"B": batch, "T": tokens, "H": c.num_attention_heads,
                                                     "HKV": c.num_key_value_heads, "D": c.head_dim},
                            {"causal": True, **_scale(c)}, tokens, ("T",))
    return _pass_calls(c, batch * tokens, batch, attention, quantize, group_size, dtype, weights, dynamic_rows,
                       long_rope)


def decode_calls(config: ModelConfig, batch: int, kv_len: int, quantize: str = "none",
                 group_size: int = 128, dtype: str = "float32", resident: bool = False,
                 weights: str | None = None, fused_norms: bool | None = None,
                 long_rope: bool = False) -> list[KernelCall]:
    """Kernels of one decode step: one new token per sequence, ``kv_len`` cached positions;
    ``long_rope``: a step at a position past longrope's original context, rotated by long_factor
    (a generation that crosses it runs the sequence so far again as a long prompt, then these).

    ``resident``: the step a CUDA model captures once as a graph and replays for every token,
    so nothing in it may depend on the step: attention reads each sequence's length from
    device memory (``lengths=per_sequence``), ``rope_append`` rotates q and k straight from
    the Q/K/V projection's rows and writes the new K/V rows at each sequence's position (read
    there too; one kernel where ``rope`` and a cache write were two or three), ``argmax``
    picks the next tokens on the device, and the GEMVs take over the norms and residual adds
    where they can (``fused_norms``: None for wherever ``can_fuse_norms``; resident steps only).
    That fused step's attention is ``rope_append_attention``, rope_append and attention in one
    kernel (role ``attention``), and takes a programmatic launch as the GEMVs do: in the captured
    graph every kernel of a layer then starts as the one before it ends."""
    check_quantize(config, quantize, group_size)
    c = config
    attention = _attentions(c, "attention_decode", {"B": batch, "H": c.num_attention_heads,
                                                    "HKV": c.num_key_value_heads, "D": c.head_dim,
                                                    "S": kv_len, "L": kv_len},
                            {**({"lengths": "per_sequence"} if resident else {}), **_scale(c)}, kv_len, ("S", "L"))
    calls = _pass_calls(c, batch, batch, attention, quantize, group_size, dtype, weights, long_rope=long_rope)
    if resident:
        dims = {"B": batch, "H": c.num_attention_heads, "HKV": c.num_key_value_heads, "D": c.head_dim, "S": kv_len}
        argmax = KernelSpec.make("argmax", {"M": batch, "N": c.vocab_size}, dtype)
        calls = [call for call in calls if call.spec.op != "rope"]
        calls += [KernelCall("rope_append" + suffix, KernelSpec.make("rope_append", dims, dtype, attrs, dynamic=("S",)),
                             count) for suffix, attrs, count in _rope_groups(c, long_rope)]
        if c.nope_layers:  # their K and V rows written to the caches as projected
            calls.append(KernelCall("kv_append", _kv_append(c, batch, kv_len, dtype), len(c.nope_layers)))
        calls.append(KernelCall("argmax", argmax, 1))
        if fused_norms is None:
            fused_norms = can_fuse_norms(c, batch)
        if fused_norms:
            if not can_fuse_norms(c, batch):
                raise ValueError(f"a decode step of {batch} sequences of {c.name} cannot fuse its norms into GEMVs")
            calls = _fuse_norms(c, calls)
            # the step whose kernels overlap (programmatic launches): rope, the cache write and attention
            # in one kernel that joins the GEMVs
            calls = _rope_into_attention(calls)
    elif fused_norms:
        raise ValueError("only the resident decode step fuses its norms into GEMVs")
    return calls
