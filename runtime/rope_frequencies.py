"""Rotary embedding frequencies: the one place they are computed.

Pair i of a head (i < D/2) turns by ``position * f_i``. The rope kernels (CPU and CUDA,
baked in at render time), the numpy operator and the reference decoder all take their
f_i from ``inverse_frequencies``, in float64, so every implementation rotates by the
same numbers. The rope types are those of transformers' ``rope_type``:

- ``default``: f_i = theta^(-2i/D).
- ``linear``: the default frequencies divided by ``factor`` (positions interpolated).
- ``llama3`` (Llama 3.1 / 3.2): with wavelength w_i = 2 pi / f_i and the original context
  L = ``original_max_position_embeddings``, frequencies whose wavelength is longer than
  L / ``low_freq_factor`` are divided by ``factor``, those shorter than L / ``high_freq_factor``
  are kept, and those in between are blended: f_i ((1 - s) / factor + s) with
  s = (L / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor).
- ``yarn`` (YaRN: Qwen, OLMo 3, gpt-oss, ...): with D the rotary dim and L =
  ``original_max_position_embeddings``, pair i blends the default f_i (extrapolated) and
  f_i / ``factor`` (interpolated) by a ramp r_i = clip((i - lo) / (hi - lo), 0, 1):
  f_i (1 - r_i) + f_i r_i / factor, where lo and hi are the pairs that turn ``beta_fast`` and
  ``beta_slow`` times over L: d(b) = D ln(L / (2 pi b)) / (2 ln theta), lo = max(floor(d(beta_fast)),
  0), hi = min(ceil(d(beta_slow)), D - 1) (no floor and ceil when ``truncate`` is false; hi gains
  0.001 when lo = hi). YaRN also multiplies cos and sin by an attention factor (transformers'
  ``attention_scaling``), a kernel attribute here (``attention_factor``, resolved from a config by
  ``yarn_attention_factor``): the rope kernels multiply cos and sin by it as transformers' rotary
  embedding does, so the rotated q and k both come out scaled by it (q.k by its square).
  ``rotation_scale`` is that factor for a kernel's attributes (1 for the types without one).
- ``longrope`` (Phi-3.5, Phi-3-mini-128k, Phi-3-medium-128k; transformers' old name ``su``):
  f_i = theta^(-2i/D) / ext_i, with ext the list ``short_factor`` (D/2 positive numbers), and cos
  and sin multiplied by ``attention_factor`` as yarn's (resolved from a config by
  ``longrope_attention_factor``). transformers rotates by ``long_factor`` instead in a forward pass
  whose largest position is past the original context (and its Phi-3 runs a generation's whole
  sequence again where it crosses it, so that every cached key turns so); that switch is no kernel's: the runtime runs such a pass on kernels whose
  ``short_factor`` attribute holds the long factors (``ModelConfig.rope_is_long``, ``rope_attrs_for``).

Partial rotary (transformers' ``partial_rotary_factor``: Phi-4-mini's 0.75): only the first
R = int(head_dim * factor) dims of a head are rotated, as a head of R dims (D above is R: R/2
frequencies, pairs (i, i + R/2), longrope's factors R/2 long); dims R .. head_dim pass through.
Kernels take R as the attribute ``rotary_dim`` (0, the default, for all of the head).

A rope is described by flat, JSON-able attributes (they are kernel attributes and go into
tuning records): ``theta``, and for a scaled rope ``rope_type`` plus the parameters its type
takes (``PARAMETERS``): numbers, a bool, and longrope's ``short_factor``, a tuple of numbers (a
JSON list, read back as a tuple: ``runtime.abi.canonical_attrs``). A default rope is
``{"theta": ...}`` alone.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
# the parameters each rope type takes, all required (as transformers requires them)
PARAMETERS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    # transformers' defaults (beta_fast 32, beta_slow 1, truncate true) and the attention factor
    # (``yarn_attention_factor``) are the config parser's to fill in; truncate is the one bool.
    # attention_factor does not change the frequencies: it scales cos and sin (``rotation_scale``)
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate",
             "attention_factor"),
    # the factors in force (short_factor within the original context, long_factor's values past
    # it: ModelConfig.rope_attrs_for), and yarn's kind of attention factor
    "longrope": ("short_factor", "attention_factor"),
}
# every parameter of every rope type
SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
                "beta_fast", "beta_slow", "truncate", "attention_factor", "short_factor")


def _positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def factors_problem(key: str, value: Any, head_dim: int | None = None) -> str | None:
    """Why ``value`` is not a list (or tuple) of positive numbers, one per rotary pair of
    ``head_dim`` rotary dims (a head's, or the rotated part of it) where that is known (longrope's ``short_factor`` and ``long_factor``), in a
    few words that begin with ``key``; None when it is."""
    if not isinstance(value, (list, tuple)) or not value or not all(map(_positive_number, value)):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return f"{key} = {shown} is not a list of positive numbers"
    if head_dim is not None and len(value) != head_dim // 2:
        return (f"{key} has length {len(value)}; {head_dim} rotary dims make {head_dim // 2} rotary pairs, "
                "one factor each")
    return None


def rope_problem(rope_type: Any, params: Mapping[str, Any], head_dim: int | None = None) -> str | None:
    """Why ``rope_type`` with ``params`` (scaling parameters only, no theta) is not a rope this
    module computes, in a few words that begin with the offending key; None when it is.
    ``head_dim``, where known, checks the length of longrope's factors."""
    if rope_type not in ROPE_TYPES:
        shown = repr(rope_type) if isinstance(rope_type, str) else str(rope_type)
        return f"rope_type = {shown} is not implemented; supported: {', '.join(ROPE_TYPES)}"
    takes = PARAMETERS[rope_type]
    for key in params:
        if key not in takes:
            return (f"{key} = {params[key]!r} does not apply to rope type {rope_type!r}"
                    f" (it takes {', '.join(takes) or 'no parameters'})")
    for key in takes:
        if key not in params or params[key] is None:
            return f"{key} is missing: rope type {rope_type!r} needs {', '.join(takes)}"
        value = params[key]
        if key == "original_max_position_embeddings":
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                return f"{key} = {value!r} is not a positive integer"
        elif key == "truncate":
            if not isinstance(value, bool):
                return f"{key} = {value!r} is not a bool"
        elif key == "short_factor":
            problem = factors_problem(key, value, head_dim)
            if problem:
                return problem
        elif not _positive_number(value):
            return f"{key} = {value!r} is not a positive number"
    if rope_type == "llama3" and not params["low_freq_factor"] < params["high_freq_factor"]:
        return (f"low_freq_factor = {params['low_freq_factor']!r} is not below high_freq_factor = "
                f"{params['high_freq_factor']!r}")
    # transformers warns only where beta_fast < beta_slow: equal ones make a (nearly) sharp step
    if rope_type == "yarn" and params["beta_fast"] < params["beta_slow"]:
        return (f"beta_fast = {params['beta_fast']!r} is below beta_slow = {params['beta_slow']!r}"
                f" (the pair turning beta_fast times starts the ramp, beta_slow ends it)")
    return None


def inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                        **params: float | int) -> np.ndarray:
    """f_i for i < head_dim / 2, float64; ``params`` are those ``PARAMETERS[rope_type]`` names
    (the ``attention_factor`` of yarn and longrope is checked but scales cos and sin, not the
    frequencies)."""
    problem = rope_problem(rope_type, params, head_dim)
    if problem:
        raise ValueError(f"rope: {problem}")
    if not _positive_number(theta):
        raise ValueError(f"rope: theta = {theta!r} is not a positive number")
    half = head_dim // 2
    freqs = float(theta) ** (-np.arange(half, dtype=np.float64) * 2.0 / head_dim)
    if rope_type == "linear":
        return freqs / float(params["factor"])
    if rope_type == "llama3":
        factor = float(params["factor"])
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        context = float(params["original_max_position_embeddings"])
        wavelength = 2.0 * math.pi / freqs
        # the long wavelengths (beyond context / low) are slowed down by the full factor, the
        # short ones (below context / high) kept; the band between blends the two linearly in
        # context / wavelength
        blend = (context / wavelength - low) / (high - low)
        scaled = np.where(wavelength > context / low, freqs / factor, freqs)
        middle = (wavelength >= context / high) & (wavelength <= context / low)
        return np.where(middle, freqs * ((1.0 - blend) / factor + blend), scaled)
    if rope_type == "yarn":
        return _yarn_frequencies(freqs, head_dim, float(theta), **params)
    if rope_type == "longrope":  # transformers' _compute_longrope_parameters within the original context
        return freqs / np.asarray(params["short_factor"], dtype=np.float64)
    return freqs


def _yarn_frequencies(freqs: np.ndarray, dim: int, theta: float, factor: float,
                      original_max_position_embeddings: int, beta_fast: float, beta_slow: float,
                      truncate: bool, attention_factor: float) -> np.ndarray:
    """transformers' ``_compute_yarn_parameters`` (its frequencies), in float64; the attention
    factor is no part of them (``rotation_scale``)."""
    if theta == 1.0:
        raise ValueError("rope: theta = 1.0 leaves yarn's correction range undefined (ln theta = 0)")
    context = float(original_max_position_embeddings)

    def correction_dim(rotations: float) -> float:
        # the (fractional) pair that turns ``rotations`` times over the original context
        return dim * math.log(context / (rotations * 2.0 * math.pi)) / (2.0 * math.log(theta))

    low, high = correction_dim(float(beta_fast)), correction_dim(float(beta_slow))
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: no division by zero
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation = 1.0 - ramp
    # in transformers' order: the interpolated (slowed) frequencies where the ramp is 1, the
    # pretrained ones where it is 0
    return (freqs / float(factor)) * (1.0 - extrapolation) + freqs * extrapolation


def _yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """transformers' ``yarn_get_mscale``: 0.1 mscale ln(scale) + 1, or 1 for scale <= 1."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, attention_factor: float | None = None, mscale: float | None = None,
                          mscale_all_dim: float | None = None) -> float:
    """The factor YaRN multiplies cos and sin by (transformers' ``attention_factor``, returned by
    ``_compute_yarn_parameters`` as the rotary embedding's ``attention_scaling``): the given
    ``attention_factor``; else, where ``mscale`` and ``mscale_all_dim`` are both set and non-zero,
    get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim); else get_mscale(factor) =
    0.1 ln(factor) + 1 (1 for factor <= 1). ``factor`` is the one the frequencies take (transformers
    uses max_position_embeddings / original_max_position_embeddings where the config's is None).
    It scales q.k by its square: a model folds that into the softmax scale."""
    if not _positive_number(factor):
        raise ValueError(f"rope: factor = {factor!r} is not a positive number")
    if attention_factor is not None:
        if not _positive_number(attention_factor):
            raise ValueError(f"rope: attention_factor = {attention_factor!r} is not a positive number")
        return float(attention_factor)
    for key, value in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            raise ValueError(f"rope: {key} = {value!r} is not a number")
    if mscale and mscale_all_dim:
        return float(_yarn_get_mscale(factor, mscale) / _yarn_get_mscale(factor, mscale_all_dim))
    return float(_yarn_get_mscale(factor))


def longrope_attention_factor(factor: float, original_max_position_embeddings: int,
                              attention_factor: float | None = None) -> float:
    """The factor longrope multiplies cos and sin by (transformers' ``_compute_longrope_parameters``):
    the given ``attention_factor``; else sqrt(1 + ln(factor) / ln(original_max_position_embeddings)),
    1 for factor <= 1. ``factor`` is the config's, else (Phi-3's) max_position_embeddings /
    original_max_position_embeddings."""
    if attention_factor is not None:
        if not _positive_number(attention_factor):
            raise ValueError(f"rope: attention_factor = {attention_factor!r} is not a positive number")
        return float(attention_factor)
    if not _positive_number(factor):
        raise ValueError(f"rope: factor = {factor!r} is not a positive number")
    if factor <= 1.0:
        return 1.0
    if original_max_position_embeddings < 2:  # ln 1 = 0: transformers divides by zero
        raise ValueError(f"rope: original_max_position_embeddings = {original_max_position_embeddings!r} leaves "
                         "longrope's attention factor undefined (ln of it is 0)")
    return math.sqrt(1.0 + math.log(factor) / math.log(original_max_position_embeddings))


def rope_attrs(theta: float, rope_type: str = "default", **params: float | int) -> dict[str, Any]:
    """The kernel attributes of a rope: ``{"theta": ...}`` for the default one (as tuning
    records have always named it), plus ``rope_type`` and its parameters for a scaled one."""
    problem = rope_problem(rope_type, params)
    if problem:
        raise ValueError(f"rope: {problem}")
    attrs: dict[str, Any] = {"theta": float(theta)}
    if rope_type != "default":
        attrs["rope_type"] = rope_type
        # floats as floats (8 and 8.0 name the same kernel), the context length as an integer,
        # truncate as a bool, a list of factors as a tuple of floats (hashable, as a key needs)
        attrs.update((key, params[key] if key in ("original_max_position_embeddings", "truncate")
                      else tuple(map(float, params[key])) if key == "short_factor"
                      else float(params[key])) for key in PARAMETERS[rope_type])
    return attrs


def rotary_dim_problem(rotary_dim: Any, head_dim: int) -> str | None:
    """Why ``rotary_dim`` (the leading dims of a head that are rotated) is not an even integer in
    2 .. ``head_dim``, in a few words that begin with ``rotary_dim``; None when it is."""
    if (not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim % 2
            or not 2 <= rotary_dim <= head_dim):
        return f"rotary_dim = {rotary_dim!r} is not an even integer in 2 .. {head_dim} (the head dim)"
    return None


def rotary_dim_of(head_dim: int, attrs: Mapping[str, Any]) -> int:
    """The dims a rope kernel rotates, the first of each head: its ``rotary_dim`` attribute, where
    0 (the default) means all ``head_dim`` (partial rotary: transformers' ``partial_rotary_factor``,
    Phi-4-mini's; the dims past it pass through unchanged)."""
    return attrs.get("rotary_dim") or head_dim


def frequencies_of_attrs(head_dim: int, attrs: Mapping[str, Any]) -> np.ndarray:
    """``inverse_frequencies`` of a rope kernel's attributes (with the operator's defaults
    filled in: only the parameters of its rope type are read), over its rotary dims
    (``rotary_dim_of``): rotary_dim / 2 of them."""
    rope_type = attrs.get("rope_type", "default")
    params = {key: attrs[key] for key in PARAMETERS.get(rope_type, ()) if key in attrs}
    return inverse_frequencies(rotary_dim_of(head_dim, attrs), attrs["theta"], rope_type, **params)


def rotation_scale_of(rope_type: str, params: Mapping[str, Any]) -> float:
    """The factor cos and sin are multiplied by for ``rope_type`` with ``params`` (as
    ``inverse_frequencies`` takes them): the ``attention_factor`` of yarn and longrope, 1.0 for
    the other types."""
    if "attention_factor" not in PARAMETERS.get(rope_type, ()):
        return 1.0
    value = params.get("attention_factor")
    if not _positive_number(value):
        raise ValueError(f"rope: attention_factor = {value!r} is not a positive number")
    return float(value)


def rotation_scale(attrs: Mapping[str, Any]) -> float:
    """``rotation_scale_of`` a rope kernel's attributes: the factor its kernel multiplies cos and
    sin by (transformers' ``attention_scaling``), so that it rotates q and k scaled by it."""
    return rotation_scale_of(attrs.get("rope_type", "default"), attrs)
