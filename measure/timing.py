"""Turn a callable into per-call times: warm up, calibrate an inner count, repeat."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time a candidate, and in which cache condition.

    Each timed sample runs the kernel ``inner`` times, with ``inner`` grown until a sample
    lasts at least ``min_sample_s``; ``repeats`` samples are taken, fewer (never under
    ``min_repeats``) when a single call is so slow that they would exceed ``max_total_s``.

    ``cold_bytes`` > 0 times the kernel as a model runs it: between two calls of a layer's
    kernel on the same weights the rest of the pass runs. The CPU runner gives the kernel
    enough copies of its weights (of every input, at most ``MAX_COPIES`` times, for an
    operator without weights) to fill this many bytes and cycles through them, so each call
    finds its weights where a working set of ``cold_bytes`` lives: one pass of a model larger
    than the cache (``cold_policy``) puts them as far back as the model does; the bytes one pass
    of a smaller model touches (``warm_policy``) put them in the cache level that holds the
    model (L3, say, when a pass does not fit one core's L2).
    ``cache`` names the condition ("cold" or "warm") for the records; empty, it is "cold"
    when ``cold_bytes`` > 0. ``activations_in_cache`` (a model's timing: ``policy_for`` with a
    pass) copies no input but the weights: an operator without weights (a norm, attention over a
    prompt) is timed on one set of inputs, which in a model the kernel before has just written.

    ``best_of`` > 1 makes each sample the fastest of that many back-to-back runs of ``inner``
    calls. Other work on the machine only ever adds time, and on a shared machine it comes in
    episodes of tens of milliseconds that can cover most of a candidate's samples: the median of
    plain samples then ranks a config by the episode it met, while the median of best-of-3
    samples still measures the kernel.
    """

    warmup: int = 1
    min_sample_s: float = 0.005
    repeats: int = 7
    min_repeats: int = 3
    max_total_s: float = 2.0
    cold_bytes: int = 0
    best_of: int = 1
    cache: str = ""
    activations_in_cache: bool = False


MAX_COPIES = 64  # inputs smaller than cold_bytes / 64 stay in cache, as a model's activations do
# A model's weights are copied as often as the cycle needs (see measure.backends.cpu.cold_copies),
# up to this many copies: a table of pointers, not a cap any real weight reaches
MAX_RESIDENT_COPIES = 4096
# The longest cycle cold timing makes: past a gigabyte a kernel's weights come from memory, out
# of every cache and TLB reach, however much longer the cycle is, while each candidate pays for
# the copies (a 1.1B-parameter float32 pass is 4.4 GB)
MAX_COLD_CYCLE = 1 << 30

# The most last-level cache a decision may assume. A CPU's L3 is read from sysfs as reported;
# some virtual machines report the host's (or a made-up) figure, e.g. 480 MiB on a 2-core VM,
# which no real part has per socket (the largest are a few hundred MiB of stacked cache). Taking
# such a figure at face value would call a 400 MB model "in cache", so decisions that rest on
# the cache size (cold or warm timing, the roofline level) use at most this much.
MAX_LAST_LEVEL_CACHE = 256 << 20

CACHE_CONDITIONS = ("cold", "warm")


def cold_policy(target, policy: TimingPolicy | None = None, pass_bytes: int = 0) -> TimingPolicy:
    """``policy`` (default: the tuning default) timing inputs out of ``target``'s caches. For a
    model (``pass_bytes``: what one pass touches) the cycle is one pass, at least the last-level
    cache: each call finds its weights as far back as in the model, which on a host with a large
    L3 is not all the way out of it. With no model, twice the last-level cache. At most
    ``MAX_COLD_CYCLE`` either way."""
    cache = last_level_cache_bytes(target) or 32 << 20
    cycle = max(int(pass_bytes), cache) if pass_bytes > 0 else 2 * cache
    return replace(policy or TimingPolicy(), cold_bytes=min(cycle, MAX_COLD_CYCLE), cache="cold")


def warm_policy(policy: TimingPolicy | None = None, pass_bytes: int = 0) -> TimingPolicy:
    """``policy`` (default: the tuning default) timing inputs in cache, as in a model whose
    passes fit in the last-level cache: cycled through copies filling ``pass_bytes`` (what one
    pass touches between two calls of a kernel on the same weights), so each call finds them in
    the cache level that holds a pass; with ``pass_bytes`` 0, the same buffers every call."""
    return replace(policy or TimingPolicy(), cold_bytes=max(int(pass_bytes), 0), cache="warm")


def condition_of(policy: TimingPolicy) -> str:
    """"cold" or "warm": the cache condition ``policy`` times kernels in (kept in each record's stats)."""
    return policy.cache or ("cold" if policy.cold_bytes > 0 else "warm")


def last_level_cache_bytes(target) -> int:
    """The last-level cache a decision may count on: L3 as reported (L2 of every core where
    there is no L3), at most ``MAX_LAST_LEVEL_CACHE``."""
    reported = target.l3_bytes or (target.l2_bytes or 0) * max(target.cores or 1, 1)
    return min(reported, MAX_LAST_LEVEL_CACHE)


def cache_condition(working_set_bytes: float, target) -> str:
    """"cold" when ``working_set_bytes`` (what one forward pass of a model touches) exceeds
    ``target``'s last-level cache, so a kernel's weights come from memory every call; else
    "warm": the model stays in cache from one pass to the next."""
    return "cold" if working_set_bytes > last_level_cache_bytes(target) else "warm"


def policy_for(condition: str, target, policy: TimingPolicy | None = None, pass_bytes: int = 0) -> TimingPolicy:
    """``policy`` timing in ``condition`` ("cold" or "warm") on ``target``; ``pass_bytes``:
    what one pass of the model touches (see ``cold_policy`` and ``warm_policy``). Warm counts
    it at most half the last-level cache, so that warm stays in cache when a caller asks for it
    on a larger model."""
    if condition not in CACHE_CONDITIONS:
        raise ValueError(f"unknown cache condition {condition!r}: use cold or warm")
    if condition == "cold":
        timed = cold_policy(target, policy, pass_bytes)
    else:
        timed = warm_policy(policy, min(pass_bytes, last_level_cache_bytes(target) // 2))
    return replace(timed, activations_in_cache=pass_bytes > 0)


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
    best_of = max(1, policy.best_of)
    budget_repeats = int(policy.max_total_s / max(one * inner * best_of, 1e-9))
    repeats = max(policy.min_repeats, min(policy.repeats, budget_repeats))
    costs = []
    for _ in range(repeats):
        fastest = math.inf
        for _ in range(best_of):
            start = time.perf_counter()
            run_n(inner)
            fastest = min(fastest, time.perf_counter() - start)
        costs.append(fastest / inner)
    extra = {"best_of": best_of} if best_of > 1 else {}
    return {"costs": costs, **summarize(costs), "inner": inner, "repeats": repeats, **extra}


def summarize(costs) -> dict:
    values = np.asarray(costs, dtype=np.float64)
    return {
        "median": float(np.median(values)),
        "p20": float(np.percentile(values, 20)),
        "p80": float(np.percentile(values, 80)),
        "min": float(values.min()),
    }
