"""Turn a callable into per-call times: warm up, calibrate an inner count, repeat."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time a candidate.

    Each timed sample runs the kernel ``inner`` times, with ``inner`` grown until a sample
    lasts at least ``min_sample_s``; ``repeats`` samples are taken, fewer (never under
    ``min_repeats``) when a single call is so slow that they would exceed ``max_total_s``.

    ``cold_bytes`` > 0 times the kernel as a model runs it: each layer's weights come from
    memory, not from a cache that the previous call warmed. The CPU runner then gives the
    kernel enough copies of its inputs to fill this many bytes (at most ``MAX_COPIES``) and
    cycles through them, so a call's inputs have left the caches since their last use.
    """

    warmup: int = 1
    min_sample_s: float = 0.005
    repeats: int = 7
    min_repeats: int = 3
    max_total_s: float = 2.0
    cold_bytes: int = 0


MAX_COPIES = 64  # inputs smaller than cold_bytes / 64 stay in cache, as a model's activations do


def cold_policy(target, policy: TimingPolicy | None = None) -> TimingPolicy:
    """``policy`` (default: the tuning default) timing inputs out of ``target``'s caches:
    copies filling twice its last-level cache."""
    from dataclasses import replace

    cold = 2 * (target.l3_bytes or target.l2_bytes or 32 << 20)
    return replace(policy or TimingPolicy(), cold_bytes=cold)


def time_calls(run_n: Callable[[int], None], policy: TimingPolicy, first_call_s: float | None = None) -> dict:
    """Time ``run_n(n)`` (which runs the kernel n times). Returns costs and summary stats."""
    for _ in range(policy.warmup):
        run_n(1)
    if first_call_s is None:
        start = time.perf_counter()
        run_n(1)
        first_call_s = time.perf_counter() - start
    one = max(first_call_s, 1e-9)
    inner = 1
    if one < policy.min_sample_s:
        # calibrate on a measured sample rather than trusting one cold call
        inner = max(1, int(policy.min_sample_s / one))
        while True:
            start = time.perf_counter()
            run_n(inner)
            elapsed = time.perf_counter() - start
            if elapsed >= policy.min_sample_s or inner >= 1 << 30:
                break
            inner = max(inner * 2, int(inner * policy.min_sample_s / max(elapsed, 1e-9) * 1.2))
        one = elapsed / inner
    budget_repeats = int(policy.max_total_s / max(one * inner, 1e-9))
    repeats = max(policy.min_repeats, min(policy.repeats, budget_repeats))
    costs = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_n(inner)
        costs.append((time.perf_counter() - start) / inner)
    return {"costs": costs, **summarize(costs), "inner": inner, "repeats": repeats}


def summarize(costs) -> dict:
    values = np.asarray(costs, dtype=np.float64)
    return {
        "median": float(np.median(values)),
        "p20": float(np.percentile(values, 20)),
        "p80": float(np.percentile(values, 80)),
        "min": float(values.min()),
    }
