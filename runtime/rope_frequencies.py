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

A rope is described by flat, JSON-able attributes (they are kernel attributes and go into
tuning records): ``theta``, and for a scaled rope ``rope_type`` plus the parameters its type
takes (``PARAMETERS``). A default rope is ``{"theta": ...}`` alone.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np

ROPE_TYPES = ("default", "linear", "llama3")
# the parameters each rope type takes, all required (as transformers requires them)
PARAMETERS: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _positive_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value > 0)


def rope_problem(rope_type: Any, params: Mapping[str, Any]) -> str | None:
    """Why ``rope_type`` with ``params`` (scaling parameters only, no theta) is not a rope this
    module computes, in a few words that begin with the offending key; None when it is."""
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
        elif not _positive_number(value):
            return f"{key} = {value!r} is not a positive number"
    if rope_type == "llama3" and not params["low_freq_factor"] < params["high_freq_factor"]:
        return (f"low_freq_factor = {params['low_freq_factor']!r} is not below high_freq_factor = "
                f"{params['high_freq_factor']!r}")
    return None


def inverse_frequencies(head_dim: int, theta: float, rope_type: str = "default",
                        **params: float | int) -> np.ndarray:
    """f_i for i < head_dim / 2, float64; ``params`` are those ``PARAMETERS[rope_type]`` names."""
    problem = rope_problem(rope_type, params)
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
    return freqs


def rope_attrs(theta: float, rope_type: str = "default", **params: float | int) -> dict[str, Any]:
    """The kernel attributes of a rope: ``{"theta": ...}`` for the default one (as tuning
    records have always named it), plus ``rope_type`` and its parameters for a scaled one."""
    problem = rope_problem(rope_type, params)
    if problem:
        raise ValueError(f"rope: {problem}")
    attrs: dict[str, Any] = {"theta": float(theta)}
    if rope_type != "default":
        attrs["rope_type"] = rope_type
        # floats as floats (8 and 8.0 name the same kernel), the context length as an integer
        attrs.update((key, params[key] if key == "original_max_position_embeddings" else float(params[key]))
                     for key in PARAMETERS[rope_type])
    return attrs


def frequencies_of_attrs(head_dim: int, attrs: Mapping[str, Any]) -> np.ndarray:
    """``inverse_frequencies`` of a rope kernel's attributes (with the operator's defaults
    filled in: only the parameters of its rope type are read)."""
    rope_type = attrs.get("rope_type", "default")
    params = {key: attrs[key] for key in PARAMETERS.get(rope_type, ()) if key in attrs}
    return inverse_frequencies(head_dim, attrs["theta"], rope_type, **params)
