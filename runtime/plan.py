"""Which kernels one forward pass of a Llama-style decoder calls, and how often.

The decoder (``runtime.llama``) asks for exactly these kernels, and ``autotune tune-model``
tunes exactly these tasks, so the two can never disagree. A prefill pass runs ``tokens``
tokens of one sequence; a decode pass runs one new token for each of ``batch`` sequences
against a KV cache holding ``kv_len`` positions. Token counts and KV lengths are dynamic
dims of the row-wise and attention kernels (one kernel serves every count, tuned at the
given size); the linear layers compile their M in.

Residual adds are fused into the RMSNorm that follows them (``rmsnorm`` with
``residual=true`` writes the new residual stream too), so a layer calls no ``add``; the Q, K
and V projections are one matrix, and so are gate and up (``runtime.weights.FUSED``).
A projection with a bias (``ModelConfig.qkv_bias``, ``o_bias``, ``mlp_bias``) is followed by
a ``bias_add`` (role ``qkv_bias`` after ``qkv_proj``, and so on); a model without biases calls
none. The LM head has no bias.
With ``quantize="q4"`` every linear layer, the LM head included, uses int4 weights
(``gemm_q4``/``gemv_q4``, symmetric codes, one scale per ``group_size`` weights).

``dtype`` is the model's precision: every kernel of a pass runs in it (weights, activations,
the KV cache and the logits are stored in it; the kernels accumulate in float32), the int4
codes' scales too.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .abi import KernelSpec
from .model_config import ModelConfig
from .precision import check_dtype

QUANTIZE = ("none", "q4")
GEMV_MAX_M = 16  # above this the decode step uses the gemm kernels


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
    if quantize == "q4":
        if group_size not in (32, 64, 128):
            raise ValueError(f"q4 group size must be 32, 64 or 128, got {group_size}")
        for name, k in (("hidden_size", config.hidden_size), ("intermediate_size", config.intermediate_size),
                        ("num_attention_heads * head_dim", config.q_size)):
            if k % group_size:
                raise ValueError(f"--quantize q4: {name} = {k} of {config.name} is not a multiple of the "
                                 f"group size {group_size}")


def _linear(role: str, m: int, n: int, k: int, count: int, quantize: str, group_size: int) -> KernelCall:
    op = "gemv" if m <= GEMV_MAX_M else "gemm"
    attrs = {}
    if quantize == "q4":
        op += "_q4"
        attrs = {"group_size": group_size, "zero_point": False}
    return KernelCall(role, KernelSpec.make(op, {"M": m, "N": n, "K": k}, attrs=attrs), count)


def _rows(role: str, op: str, rows: int, n: int, count: int, attrs: dict | None = None) -> KernelCall:
    return KernelCall(role, KernelSpec.make(op, {"M": rows, "N": n}, attrs=attrs, dynamic=("M",)), count)


def _norm(config: ModelConfig, role: str, rows: int, residual: bool, count: int) -> KernelCall:
    return _rows(role, "rmsnorm", rows, config.hidden_size, count,
                 {"eps": config.rms_norm_eps, "residual": residual})


def _rope(config: ModelConfig, role: str, tokens: int, heads: int, count: int) -> KernelCall:
    # {"theta": ...} alone for a default rope (the attrs tuning records have always had), plus
    # rope_type and its parameters for a scaled one
    spec = KernelSpec.make("rope", {"T": tokens, "H": heads, "D": config.head_dim},
                           attrs=config.rope_attrs, dynamic=("T",))
    return KernelCall(role, spec, count)


def biased_projections(config: ModelConfig) -> dict[str, bool]:
    """Whether each projection of a layer (by role) has a bias; its ``bias_add`` has the role
    ``bias_role(role)``."""
    return {"qkv_proj": config.qkv_bias, "o_proj": config.o_bias, "gate_up_proj": config.mlp_bias,
            "down_proj": config.mlp_bias}


def bias_role(role: str) -> str:
    return role.replace("_proj", "_bias")


def _layer_linears(config: ModelConfig, m: int, quantize: str, group_size: int) -> list[KernelCall]:
    c, layers = config, config.num_hidden_layers
    # Q, K, V as one projection and gate, up as another (runtime.weights.FUSED)
    linears = [_linear("qkv_proj", m, c.q_size + 2 * c.kv_size, c.hidden_size, layers, quantize, group_size),
               _linear("o_proj", m, c.hidden_size, c.q_size, layers, quantize, group_size),
               _linear("gate_up_proj", m, 2 * c.intermediate_size, c.hidden_size, layers, quantize, group_size),
               _linear("down_proj", m, c.hidden_size, c.intermediate_size, layers, quantize, group_size)]
    biased = biased_projections(c)
    return linears + [_rows(bias_role(call.role), "bias_add", m, call.spec.dims["N"], layers)
                      for call in linears if biased[call.role]]


def _pass_calls(config: ModelConfig, rows: int, sequences: int, attention: KernelSpec, quantize: str,
                group_size: int, dtype: str) -> list[KernelCall]:
    """The kernels of a pass over ``rows`` token rows of ``sequences`` sequences."""
    c, layers = config, config.num_hidden_layers
    calls = ([_norm(c, "first_norm", rows, False, 1), _norm(c, "residual_norm", rows, True, 2 * layers)]
            + _layer_linears(c, rows, quantize, group_size)
            + [_rope(c, "rope_q", rows, c.num_attention_heads, layers),
               _rope(c, "rope_k", rows, c.num_key_value_heads, layers),
               KernelCall("attention", attention, layers),
               _rows("swiglu", "swiglu", rows, c.intermediate_size, layers),
               _linear("lm_head", sequences, c.vocab_size, c.hidden_size, 1, quantize, group_size)])
    check_dtype(dtype)
    return [KernelCall(call.role, replace(call.spec, dtype=dtype), call.count) for call in calls]


def prefill_calls(config: ModelConfig, tokens: int, quantize: str = "none", group_size: int = 128,
                  batch: int = 1, dtype: str = "float32") -> list[KernelCall]:
    """Kernels of one prefill pass over ``batch`` prompts of ``tokens`` tokens (logits of the last)."""
    check_quantize(config, quantize, group_size)
    c = config
    attention = KernelSpec.make("attention_prefill", {"B": batch, "T": tokens, "H": c.num_attention_heads,
                                                      "HKV": c.num_key_value_heads, "D": c.head_dim},
                                attrs={"causal": True}, dynamic=("T",))
    return _pass_calls(c, batch * tokens, batch, attention, quantize, group_size, dtype)


def decode_calls(config: ModelConfig, batch: int, kv_len: int, quantize: str = "none",
                 group_size: int = 128, dtype: str = "float32", resident: bool = False) -> list[KernelCall]:
    """Kernels of one decode step: one new token per sequence, ``kv_len`` cached positions.

    ``resident``: the step a CUDA model captures once as a graph and replays for every token,
    so nothing in it may depend on the step: attention reads each sequence's length from
    device memory (``lengths=per_sequence``), ``kv_append`` writes the new K/V rows at each
    sequence's position (read there too), and ``argmax`` picks the next tokens on the device."""
    check_quantize(config, quantize, group_size)
    c = config
    attention = KernelSpec.make("attention_decode", {"B": batch, "H": c.num_attention_heads,
                                                     "HKV": c.num_key_value_heads, "D": c.head_dim,
                                                     "S": kv_len, "L": kv_len}, dynamic=("S", "L"),
                                attrs={"lengths": "per_sequence"} if resident else None)
    calls = _pass_calls(c, batch, batch, attention, quantize, group_size, dtype)
    if resident:
        append = KernelSpec.make("kv_append", {"B": batch, "HKV": c.num_key_value_heads, "D": c.head_dim,
                                               "S": kv_len}, dtype, dynamic=("S",))
        argmax = KernelSpec.make("argmax", {"M": batch, "N": c.vocab_size}, dtype)
        calls += [KernelCall("kv_append", append, c.num_hidden_layers), KernelCall("argmax", argmax, 1)]
    return calls
