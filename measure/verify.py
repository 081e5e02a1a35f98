"""Compare kernel outputs with the numpy reference. NaN never passes."""
from __future__ import annotations

import numpy as np

from search_space.ops.common import to_float64


def check_output(name: str, got: np.ndarray, want: np.ndarray, tol: float, dtype: str = "float32") -> str | None:
    """None when ``got`` matches ``want``, else a one-line reason.

    Two checks: the normwise relative error ||got - want|| / ||want|| <= tol, and every
    element within 20 * tol of the largest reference magnitude, so a single wrong element
    in a large output cannot hide in the norm.
    """
    got64 = to_float64(np.asarray(got), dtype).reshape(-1)
    want64 = np.asarray(want, dtype=np.float64).reshape(-1)
    if got64.shape != want64.shape:
        return f"{name}: {got64.size} elements, expected {want64.size}"
    bad = ~np.isfinite(got64) & np.isfinite(want64)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        return f"{name}: {int(bad.sum())} elements are NaN/inf or never written (first at flat index {first})"
    scale = float(np.max(np.abs(want64))) if want64.size else 0.0
    diff = np.abs(got64 - want64)
    norm_ref = float(np.linalg.norm(want64))
    rel = float(np.linalg.norm(diff)) / norm_ref if norm_ref > 0 else float(np.linalg.norm(diff))
    if rel > tol:
        return f"{name}: relative error {rel:.3g} > {tol:.1g}"
    worst = int(np.argmax(diff)) if diff.size else 0
    if diff.size and diff[worst] > 20 * tol * max(scale, 1e-30):
        return (f"{name}: element {worst} is {got64[worst]:.6g}, expected {want64[worst]:.6g} "
                f"(error {diff[worst]:.3g} > {20 * tol:.1g} x max |ref| {scale:.3g})")
    return None
