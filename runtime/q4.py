"""The int4 weight format shared by the q4 kernels and the runtime (numpy only).

``WQ[N, K/2]`` uint8 holds two 4-bit codes per byte along K (element ``k = 2j`` in the low
nibble of byte ``j``, ``k = 2j + 1`` in the high one); ``SCALES[N, K/G]`` and, with zero
points, ``ZEROS[N, K/G]`` hold one value per group of G consecutive k; a weight is
``(code - z) * scale`` with ``z`` the group's zero point, or 8 for symmetric codes.
"""
from __future__ import annotations

import numpy as np


def quantize_q4(w: np.ndarray, group_size: int, zero_point: bool) -> dict[str, np.ndarray]:
    """Quantise float weights W[N, K] group-wise to 4 bits: {"WQ", "SCALES"[, "ZEROS"]} (float32).

    Symmetric (no zero point): scale = max|w| / 7, code = round(w / scale) + 8 in [1, 15].
    Asymmetric: scale = (max - min) / 15, zero = round(-min / scale), code = round(w / scale) + zero.
    """
    n, k = w.shape
    if k % group_size or k % 2:
        raise ValueError(f"K = {k} must be a multiple of the group size {group_size} (and even)")
    groups = w.reshape(n, k // group_size, group_size).astype(np.float64)
    if zero_point:
        lo, hi = groups.min(axis=2), groups.max(axis=2)
        scale = np.maximum(hi - lo, 1e-8) / 15.0
        zero = np.clip(np.round(-lo / scale), 0, 15)
        codes = np.clip(np.round(groups / scale[..., None]) + zero[..., None], 0, 15)
    else:
        scale = np.maximum(np.abs(groups).max(axis=2), 1e-8) / 7.0
        zero = None
        codes = np.clip(np.round(groups / scale[..., None]) + 8, 0, 15)
    out = {"WQ": pack_codes(codes.reshape(n, k).astype(np.uint8)), "SCALES": scale.astype(np.float32)}
    if zero_point:
        out["ZEROS"] = zero.astype(np.float32)
    return out


def pack_codes(codes: np.ndarray) -> np.ndarray:
    """Codes [N, K] (uint8, 0..15) as ``WQ[N, K/2]``: k = 2j in the low nibble of byte j."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def dequantize_q4(wq: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group_size: int) -> np.ndarray:
    """The float64 weights W[N, K] that packed codes stand for."""
    n = wq.shape[0]
    codes = np.empty((n, wq.shape[1] * 2), dtype=np.float64)
    codes[:, 0::2] = wq & 0x0F
    codes[:, 1::2] = wq >> 4
    groups = codes.reshape(n, -1, group_size)
    z = 8.0 if zeros is None else np.asarray(zeros, dtype=np.float64)[..., None]
    return ((groups - z) * np.asarray(scales, dtype=np.float64)[..., None]).reshape(n, -1)
