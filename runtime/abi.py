"""The kernel ABI: what a kernel is and how it is called, shared by the templates that render
kernels, the exporter that ships them and the runtime that calls them.

- ``KernelSpec``: what a kernel computes (operator, dims, dtype, attributes, which dims are
  dynamic) and its one identity, ``key``. A tuning ``Task`` is a ``KernelSpec``.
- ``ATTR_DEFAULTS``: what each operator computes with where a spec leaves an attribute out; a
  spec that spells one out at that value is the same kernel, with the same key.
- ``ArgSpec``: one argument, in call order: TMA descriptors of arrays first (``tensor_map``,
  128-byte by-value parameters, at the front so each falls on a 64-byte aligned offset), then
  arrays (``in``/``out``/``workspace``), then one int64 ``scalar`` per dynamic dim.
- dtypes as stored in numpy (``numpy_dtype``; bfloat16 as raw uint16 words).
- the library manifest's format name and schema version.
- launch expressions of CUDA kernels (``runtime.launch.evaluate``) and the int4 weight layout
  (``runtime.q4``) live in their own modules, re-exported here.

Only numpy and the standard library: a deployment copies ``runtime`` alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .launch import evaluate  # noqa: F401  (re-exported: part of the ABI)
from .q4 import quantize_q4  # noqa: F401  (re-exported: part of the ABI)

# --------------------------------------------------------------------------- dtypes

NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "uint8": np.uint8,
                "int32": np.int32, "int64": np.int64}


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an array of ``dtype`` is stored as (bfloat16 as raw uint16 words)."""
    return np.dtype(NUMPY_DTYPES[dtype])


# --------------------------------------------------------------------------- arguments

ROLES = ("tensor_map", "in", "out", "workspace", "scalar")
TENSOR_MAP_SWIZZLES = (0, 32, 64, 128)  # bytes; 0: none


def tma_box_fits(box: Sequence[int], itemsize: int, swizzle: int) -> bool:
    """A box TMA copies (innermost dim last): 1 to 5 dims of 1 to 256 elements, and with a
    swizzle an innermost row no wider than the swizzle span."""
    return (1 <= len(box) <= 5 and all(1 <= b <= 256 for b in box) and swizzle in TENSOR_MAP_SWIZZLES
            and (not swizzle or box[-1] * itemsize <= swizzle))


@dataclass(frozen=True)
class ArgSpec:
    """One kernel argument, in call order: an array (``in``/``out``) of ``shape`` (dim names or
    ints) and ``dtype``, a ``workspace`` of ``nbytes`` scratch bytes, a ``scalar``: the int64
    value of the dynamic dim it is named after, or a ``tensor_map``: the TMA descriptor of the
    array ``of``, copied in boxes of ``shape`` (a size per dim of the array, outermost first)
    with ``swizzle`` bytes (0: none), zeros past its edges. The caller encodes the descriptor
    from the array's address (``runtime.tensor_map``)."""

    name: str
    role: str
    dtype: str = "float32"
    shape: tuple[str | int, ...] = ()
    nbytes: int = 0
    of: str = ""
    swizzle: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"arg {self.name}: role {self.role!r} not in {ROLES}")
        if self.role == "tensor_map" and (not self.of or self.swizzle not in TENSOR_MAP_SWIZZLES
                                          or not 1 <= len(self.shape) <= 5):
            raise ValueError(f"arg {self.name}: a tensor map needs the array it is of, a box of 1 to 5 dims "
                             f"and a swizzle in {TENSOR_MAP_SWIZZLES}")

    def resolve_shape(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else int(dims[d]) for d in self.shape)

    def to_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "role": self.role, "dtype": self.dtype, "shape": list(self.shape),
                "nbytes": self.nbytes}
        if self.role == "tensor_map":
            data.update(of=self.of, swizzle=self.swizzle)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ArgSpec":
        return cls(data["name"], data["role"], data.get("dtype", "float32"), tuple(data.get("shape", ())),
                   int(data.get("nbytes", 0)), str(data.get("of", "")), int(data.get("swizzle", 0)))


# --------------------------------------------------------------------------- identity

# What an operator computes with where a spec leaves an attribute out. A spec that gives one of
# these values computes the same, so ``KernelSpec.make`` leaves it out: one kernel, one key, however
# the caller spelled it. Only true defaults: rope's scaling parameters (factor, ...) have none, the
# rope types that take them need every one (``runtime.rope_frequencies``).
_FUSIONS = {"norm": "none", "eps": 1e-5, "residual": False, "act": "none"}
_ROPE = {"theta": 10000.0, "rope_type": "default", "rotary_dim": 0}  # rotary_dim 0: the whole head
ATTR_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType({op: MappingProxyType(attrs) for op, attrs in {
    "gemm": {"weight": "same"},
    "gemv": {"weight": "same", **_FUSIONS},
    "gemm_q4": {"group_size": 128, "zero_point": False},
    "gemv_q4": {"group_size": 128, "zero_point": False, **_FUSIONS},
    "rmsnorm": {"eps": 1e-5, "residual": False},
    "layernorm": {"eps": 1e-5},
    "qk_norm": {"eps": 1e-6, "span": "head"},
    "rope": _ROPE,
    "rope_append": _ROPE,
    "rope_append_attention": {"scale": 0.0, "window": 0, "softcap": 0.0, **_ROPE},
    "attention_prefill": {"causal": True, "scale": 0.0, "window": 0, "softcap": 0.0},
    "attention_decode": {"scale": 0.0, "lengths": "uniform", "programmatic": False, "window": 0, "softcap": 0.0},
}.items()})


def is_number(value: Any) -> bool:
    """An int or float (not a bool, though Python says it is an int)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def attr_value_fits(default: Any, value: Any) -> bool:
    """Whether ``value`` is of the kind of the attribute's ``default``: a bool for a bool, a
    finite number for a float, an int for an int, a string for a string (anything for None)."""
    if default is None:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        try:
            return is_number(value) and math.isfinite(value)
        except OverflowError:  # an int past any float
            return False
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, tuple):  # a list of values (longrope's factors): JSON gives a list
        return isinstance(value, (list, tuple))
    return isinstance(value, type(default))


def _plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds (a key is JSON: np.int64(128) is 128), a list
    or array as a tuple of such values (hashable; JSON gives it back as a list)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (list, tuple, np.ndarray)):
        return tuple(_plain(v) for v in value)
    return value


def attr_kind(default: Any) -> str:
    """What a message calls the kind of value ``attr_value_fits`` takes for ``default``."""
    return "list" if isinstance(default, tuple) else type(default).__name__


def canonical_attrs(op: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``attrs`` without those at ``op``'s default (``ATTR_DEFAULTS``), numpy scalars as the
    Python values they hold, lists as tuples, and a number given where the default is a float as
    a float (``theta=500000`` is ``theta=500000.0``). A value of another kind than the default's
    (``residual=0``) stays, for the operator's check to refuse."""
    defaults = ATTR_DEFAULTS.get(op, {})
    out: dict[str, Any] = {}
    for name, value in attrs.items():
        value = _plain(value)
        if name in defaults:
            default = defaults[name]
            if isinstance(default, float) and is_number(value):
                try:
                    value = float(value)
                except OverflowError:  # an int past any float: the operator's check refuses it
                    pass
            if type(value) is type(default) and value == default:
                continue
        out[str(name)] = value
    return out


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel computes. ``shape`` holds every dim by name in the operator's order (as
    pairs; ``dims`` is the same as a dict). Dims in ``dynamic`` are int64 arguments rather than
    compiled-in constants (token counts, KV lengths); their value in ``shape`` is the size the
    kernel was tuned at, its bucket. ``make`` leaves out the attributes given at their default
    (``canonical_attrs``), so a kernel has one key however its caller spelled it."""

    op: str
    shape: tuple[tuple[str, int], ...]
    dtype: str = "float32"
    attrs: tuple[tuple[str, Any], ...] = ()
    dynamic: tuple[str, ...] = ()

    @classmethod
    def make(cls, op: str, dims: Mapping[str, int], dtype: str = "float32", attrs: Mapping[str, Any] | None = None,
             dynamic: Iterable[str] = ()) -> "KernelSpec":
        dynamic = tuple(dynamic)
        return cls(op, tuple((str(k), int(v)) for k, v in dims.items()), dtype,
                   tuple(sorted(canonical_attrs(op, attrs or {}).items())), tuple(d for d in dict(dims) if d in dynamic))

    @property
    def dims(self) -> dict[str, int]:
        return dict(self.shape)

    @property
    def attr(self) -> dict[str, Any]:
        return dict(self.attrs)

    @property
    def key(self) -> str:
        """The identity, e.g. ``gemm/float32/M=256,N=256,K=256``; dynamic dims carry a ``~``."""
        dims = ",".join(f"{k}{'~' if k in self.dynamic else ''}={v}" for k, v in self.shape)
        key = f"{self.op}/{self.dtype}/{dims}"
        if self.attrs:
            key += "/" + ",".join(f"{k}={json.dumps(v)}" for k, v in self.attrs)
        return key

    def __str__(self) -> str:
        return self.key


# --------------------------------------------------------------------------- library manifest

MANIFEST_FORMAT = "llm-autotune-kernels"  # what export.library_writer writes and runtime.library reads
# 1: the first format; 2: every kernel's contract_sha256 seals the manifest's target as well
# (runtime.library.check_contracts). The runtime reads both.
MANIFEST_SCHEMA_VERSION = 2
