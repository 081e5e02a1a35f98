"""Shared helpers of operator definitions: dtypes, random inputs, float64 views."""
from __future__ import annotations

import numpy as np

ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "uint8": 1, "int32": 4, "int64": 8}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def numpy_dtype(dtype: str) -> np.dtype:
    """The numpy dtype an array of ``dtype`` is stored as (bfloat16 travels as raw uint16)."""
    return np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as raw uint16 words."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    return (np.asarray(raw, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    return bfloat16_to_float32(array).astype(np.float64) if dtype == "bfloat16" else array.astype(np.float64)


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    return bfloat16_to_float32(array) if dtype == "bfloat16" else array.astype(np.float32)


def from_float(values: np.ndarray, dtype: str) -> np.ndarray:
    """float values stored as ``dtype``."""
    if dtype == "bfloat16":
        return float32_to_bfloat16(np.asarray(values, dtype=np.float32))
    return np.asarray(values).astype(dtype)


def random_uniform(rng: np.random.Generator, shape, dtype: str, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return from_float(rng.uniform(low, high, size=shape).astype(np.float32), dtype)


def random_normal(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    return from_float((rng.standard_normal(size=shape) * scale).astype(np.float32), dtype)
