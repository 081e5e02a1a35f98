"""Feature vectors for the cost model: raw knob values plus analytic features.

Analytic features carry the same names and meaning across operators and targets, so one
model can learn from many tasks; templates fill the ones that apply and the rest stay NaN
(XGBoost treats NaN as missing). Task context (log FLOPs, log bytes) lets a model trained
on several shapes tell them apart.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from search_space import Config, ConfigSpace, Target, Task, Template

ANALYTIC_FEATURES: tuple[str, ...] = (
    "threads",            # CPU threads (or warps per block on CUDA)
    "vector_lanes",       # elements per vector load / FMA
    "unroll",             # innermost unroll factor
    "accumulators",       # vector registers holding partial results
    "loads_per_fma",      # register-tile reuse: lower is better
    "parallel_chunks",    # independent units of work (blocks, row blocks)
    "chunks_per_thread",  # load balance: chunks per thread or waves per SM
    "tile_bytes_l1",      # working set of the innermost tile
    "tile_bytes_l2",      # working set of a cache block
    "tile_bytes_l3",
    "bytes_moved",        # memory traffic the schedule implies
    "arith_intensity",    # FLOPs per byte moved
    "reduction_share",    # share of work spent in final reductions
    "k_tail_fraction",    # share of work in remainder code
    "m_tail_fraction",
    "n_tail_fraction",
    "packed",             # operands copied into contiguous scratch
    "registers",          # CUDA: ptxas registers per thread
    "spills",             # CUDA: spill bytes
    "shared_bytes",       # CUDA: shared memory per block
    "waves",              # CUDA: blocks / (SMs x blocks per SM)
)
CONTEXT_FEATURES: tuple[str, ...] = ("log2_flops", "log2_min_bytes", "log2_cache_bytes")


def task_context(task: Task, target: Target) -> list[float]:
    cache = target.l2_bytes or 1
    return [math.log2(max(task.flops, 1.0)), math.log2(max(task.min_bytes, 1.0)), math.log2(cache)]


def knob_value(value) -> float:
    """Numbers stay numbers (trees split on thresholds); strings become their value index."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    return float("nan")


class FeatureExtractor:
    """Turns configs of one (task, target) into rows with stable column names."""

    def __init__(self, template: Template, task: Task, target: Target, space: ConfigSpace,
                 include_knobs: bool = True):
        self.template, self.task, self.target, self.space = template, task, target, space
        self.include_knobs = include_knobs
        self.knob_names = [k.name for k in space.knobs] if include_knobs else []
        self.names = [f"knob.{n}" for n in self.knob_names] + list(ANALYTIC_FEATURES) + list(CONTEXT_FEATURES)
        self._context = task_context(task, target)
        self._cache: dict[int, np.ndarray] = {}

    def row(self, config: Config) -> np.ndarray:
        cached = self._cache.get(config.index)
        if cached is not None:
            return cached
        values: list[float] = []
        if self.include_knobs:
            for knob, (_, value) in zip(self.space.knobs, config.values):
                values.append(knob_value(value) if knob.is_numeric else float(knob.values.index(value)))
        analytic = self.template.features(self.task, config, self.target)
        values.extend(float(analytic.get(name, math.nan)) for name in ANALYTIC_FEATURES)
        values.extend(self._context)
        row = np.asarray(values, dtype=np.float32)
        if len(self._cache) < 200_000:
            self._cache[config.index] = row
        return row

    def matrix(self, configs: Sequence[Config]) -> np.ndarray:
        if not configs:
            return np.zeros((0, len(self.names)), dtype=np.float32)
        return np.stack([self.row(c) for c in configs])
