"""The linear-layer product Y[M,N] = X[M,K] @ W[N,K]^T shared by ``gemm`` and ``gemv``.

W is stored out-features by in-features, as in Hugging Face checkpoints, so both operands
are contiguous along K.
"""
from __future__ import annotations

import numpy as np

from ..task import Task
from ..template import Operator


def random_uniform(rng: np.random.Generator, shape, dtype: str) -> np.ndarray:
    """Uniform(-1, 1) values; bfloat16 arrives as raw uint16 words (round to nearest even)."""
    values = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
    if dtype == "bfloat16":
        return float32_to_bfloat16(values)
    return values.astype(dtype)


def float32_to_bfloat16(values: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bfloat16_to_float64(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def to_float64(array: np.ndarray, dtype: str) -> np.ndarray:
    return bfloat16_to_float64(array) if dtype == "bfloat16" else array.astype(np.float64)


ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


class Matmul(Operator):
    dims = ("M", "N", "K")
    dtypes = ("float32",)

    def flops(self, task: Task) -> float:
        d = task.dims
        return 2.0 * d["M"] * d["N"] * d["K"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        size = ITEMSIZE[task.dtype]
        return size * (d["M"] * d["K"] + d["N"] * d["K"]) + 4 * d["M"] * d["N"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        return {"X": random_uniform(rng, (d["M"], d["K"]), task.dtype),
                "W": random_uniform(rng, (d["N"], d["K"]), task.dtype)}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = to_float64(inputs["X"], task.dtype)
        w = to_float64(inputs["W"], task.dtype)
        return {"Y": x @ w.T}

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        x = to_float64(inputs["X"], task.dtype).astype(np.float32)
        w = to_float64(inputs["W"], task.dtype).astype(np.float32)
        y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        return "numpy matmul X @ W.T (float32 BLAS)", lambda: np.matmul(x, w.T, out=y)
