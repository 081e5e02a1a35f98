"""Compare kernel outputs with the numpy reference. NaN never passes."""
from __future__ import annotations

import numpy as np

from search_space.ops.common import to_float64

# After each output buffer, GUARD_BYTES of GUARD_PATTERN: a kernel that writes a little past
# the end of an output is caught (the bytes changed) instead of silently hurting a neighbour.
GUARD_BYTES = 256
GUARD_PATTERN = 0xA5


def check_output(name: str, got: np.ndarray, want: np.ndarray, tol: float, dtype: str = "float32") -> str | None:
    """None when ``got`` matches ``want``, else a one-line reason.

    Float outputs: the normwise relative error ||got - want|| / ||want|| <= tol, and every
    element within 20 * tol of the largest reference magnitude, so a single wrong element
    in a large output cannot hide in the norm. Where the reference is NaN the kernel must not
    write (an operator that updates part of a buffer in place, like ``kv_append``): the NaN
    the output was poisoned with must still be there. Integer outputs must be equal.
    """
    got64 = to_float64(np.asarray(got), dtype).reshape(-1)
    want64 = np.asarray(want, dtype=np.float64).reshape(-1)
    if got64.shape != want64.shape:
        return f"{name}: {got64.size} elements, expected {want64.size}"
    if np.dtype(np.asarray(got).dtype).kind in "iu" and dtype != "bfloat16":
        wrong = np.flatnonzero(got64 != want64)
        if wrong.size:
            return (f"{name}: {wrong.size} elements differ (first at flat index {int(wrong[0])}: "
                    f"{got64[wrong[0]]:.0f}, expected {want64[wrong[0]]:.0f})")
        return None
    untouched = np.isnan(want64)
    if untouched.any():
        written = int((untouched & ~np.isnan(got64)).sum())
        if written:
            return f"{name}: {written} elements were written that the kernel must leave untouched"
        got64, want64 = got64[~untouched], want64[~untouched]
    bad = ~np.isfinite(got64) & np.isfinite(want64)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        return f"{name}: {int(bad.sum())} elements are NaN/inf or never written (first at flat index {first})"
    scale = float(np.max(np.abs(want64))) if want64.size else 0.0
    diff = np.abs(got64 - want64)
    norm_ref, norm_diff = _norm(want64), _norm(diff)
    rel = norm_diff / norm_ref if norm_ref > 0 else norm_diff
    if rel > tol:
        return f"{name}: relative error {rel:.3g} > {tol:.1g}"
    worst = int(np.argmax(diff)) if diff.size else 0
    if diff.size and diff[worst] > 20 * tol * max(scale, 1e-30):
        return (f"{name}: element {worst} is {got64[worst]:.6g}, expected {want64[worst]:.6g} "
                f"(error {diff[worst]:.3g} > {20 * tol:.1g} x max |ref| {scale:.3g})")
    return None


def _norm(values: np.ndarray) -> float:
    """The 2-norm without BLAS: ``np.linalg.norm`` takes a BLAS dot, which on a large output
    wakes OpenBLAS's threads, and they spin for about 0.1 s after it, on the cores that a
    parallel candidate is timed on next (a two-thread GEMM timed right after its check ran at
    one thread's speed on a two-core machine). float64 squares of float32 values cannot overflow."""
    return float(np.sqrt(np.sum(np.square(values))))


def output_problems(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray], dtypes: dict[str, str],
                    tol: float) -> list[str]:
    """One line per output of ``outputs`` that does not match ``reference`` (see ``check_output``)."""
    problems = []
    for name, got in outputs.items():
        problem = check_output(name, got, reference[name], tol, dtypes[name])
        if problem:
            problems.append(problem)
    return problems
