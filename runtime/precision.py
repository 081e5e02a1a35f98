"""Floating-point storage formats a model can run in: float32, float16 and bfloat16.

numpy has no bfloat16, so bfloat16 values travel as raw uint16 words (the high half of a
float32), rounded to nearest even as the kernels round. Every conversion between a format
and float32 lives here, for the runtime, the operators' references and the tests alike.
"""
from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "int32": 4, "int64": 8}


class Bfloat16Words(np.ndarray):
    """bfloat16 values as their raw uint16 words, marked so that nothing takes them for integers
    (a bfloat16 checkpoint keeps its size in memory: half of float32)."""


def precision_of(array: np.ndarray) -> str:
    """The format a weight array is stored in: float32, float16, or bfloat16 (``Bfloat16Words``)."""
    if isinstance(array, Bfloat16Words):
        return "bfloat16"
    if array.dtype in (np.float16, np.float32):
        return str(array.dtype)
    raise ValueError(f"weights must be float32, float16 or bfloat16 words, not {array.dtype}")


def widened(array: np.ndarray) -> np.ndarray:
    """A stored weight array as float32 (itself when it is float32)."""
    kind = precision_of(array)
    return np.asarray(array) if kind == "float32" else to_float32(np.asarray(array), kind)


def stored_as(array: np.ndarray, dtype: str) -> np.ndarray:
    """A stored weight array in the storage of ``dtype`` (bfloat16: raw words), rounded to
    nearest even when it narrows; no copy when it is stored so already."""
    if precision_of(array) == dtype:
        return np.asarray(array)
    return from_float(widened(array), dtype)


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ValueError(f"unknown precision {dtype!r}: use one of {', '.join(DTYPES)}")
    return dtype


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as raw uint16 words."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """Values stored as ``dtype`` (bfloat16: raw words) as float32."""
    return bfloat16_to_float32(array) if dtype == "bfloat16" else np.asarray(array).astype(np.float32)


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """Float values stored as ``dtype`` (bfloat16: raw words), rounded to nearest even."""
    if dtype == "bfloat16":
        return float32_to_bfloat16(np.asarray(values, dtype=np.float32))
    return np.ascontiguousarray(np.asarray(values).astype(dtype))


def rounded(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values after a round trip through ``dtype``: what a model in that precision
    actually holds, for a float32 reference computed from the same rounded weights."""
    return to_float32(from_float(values, dtype), dtype) if dtype != "float32" else np.asarray(values, np.float32)
