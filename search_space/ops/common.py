"""Shared helpers of operator definitions: dtypes, random inputs, float64 views."""
from __future__ import annotations

import numpy as np

from runtime.kernel import numpy_dtype  # noqa: F401
from runtime.precision import (ITEMSIZE, bfloat16_to_float32, float32_to_bfloat16,  # noqa: F401
                               from_float, to_float32)

FLOAT_DTYPES = ("float32", "bfloat16", "float16")


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    return bfloat16_to_float32(array).astype(np.float64) if dtype == "bfloat16" else array.astype(np.float64)


def random_uniform(rng: np.random.Generator, shape, dtype: str, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return from_float(rng.uniform(low, high, size=shape).astype(np.float32), dtype)


def random_normal(rng: np.random.Generator, shape, dtype: str, scale: float = 1.0) -> np.ndarray:
    return from_float((rng.standard_normal(size=shape) * scale).astype(np.float32), dtype)
