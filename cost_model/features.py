"""Feature vectors for the cost model: raw knob values plus features shared across tasks.

Analytic features carry the same names and meaning across operators and targets, so one
model can learn from many tasks; templates fill the ones that apply and the rest stay NaN
(XGBoost treats NaN as missing). Three more groups are derived here, the same way for
every template: target-relative features (a tile's bytes as a share of the cache level
it is meant for, threads per core), build features (for CUDA, the registers, spills and
shared memory that ptxas reported and the occupancy they give, which replace the template's
estimates for candidates already built), and task context (log FLOPs, log bytes), which lets a model trained on
several shapes tell them apart.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

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
    "occupancy",          # CUDA: resident threads per SM / 2048 (ptxas's registers once built)
    "bytes_per_flop",     # bytes moved per FLOP (derived from bytes_moved when not given)
)
# the same for every template, derived from the analytic features and the target's limits
TARGET_FEATURES: tuple[str, ...] = ("l1_fill", "l2_fill", "l3_fill", "threads_per_core")
CONTEXT_FEATURES: tuple[str, ...] = ("log2_flops", "log2_min_bytes", "log2_cache_bytes")
SHARED_FEATURES: tuple[str, ...] = ANALYTIC_FEATURES + TARGET_FEATURES + CONTEXT_FEATURES
KNOB_PREFIX = "knob."


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


def target_features(analytic: Mapping[str, float], target: Target) -> dict[str, float]:
    """Features relative to the target's limits: the same numbers mean the same on any machine."""
    out: dict[str, float] = {}
    for level, capacity in (("l1", target.l1_bytes), ("l2", target.l2_bytes), ("l3", target.l3_bytes)):
        tile = analytic.get(f"tile_bytes_{level}")
        if tile is not None and capacity:
            out[f"{level}_fill"] = float(tile) / capacity
    if "threads" in analytic and target.uses_cpu_threads and target.cores:
        out["threads_per_core"] = float(analytic["threads"]) / target.cores
    return out


def build_features(stats: Mapping[str, Any] | None) -> dict[str, float]:
    """ptxas's resource report (kept in a record's stats) as the registers/spills/occupancy features."""
    if not stats or "registers" not in stats:
        return {}
    out = {"registers": float(stats["registers"])}
    if "spill_stores" in stats or "spill_loads" in stats:
        out["spills"] = float(stats.get("spill_stores", 0)) + float(stats.get("spill_loads", 0))
    if "smem_bytes" in stats:
        out["shared_bytes"] = float(stats["smem_bytes"])
    if "occupancy" in stats:
        out["occupancy"] = float(stats["occupancy"])
    return out


class FeatureExtractor:
    """Turns configs of one (task, target) into rows with stable column names.

    ``columns`` fixes the layout (a pre-trained model's feature names): knob columns this
    space lacks stay NaN and knobs the layout lacks are left out. By default the layout is
    this space's knobs followed by ``SHARED_FEATURES``.
    """

    def __init__(self, template: Template, task: Task, target: Target, space: ConfigSpace,
                 include_knobs: bool = True, columns: Sequence[str] | None = None):
        self.template, self.task, self.target, self.space = template, task, target, space
        self.include_knobs = include_knobs
        if columns is None:
            knobs = [f"{KNOB_PREFIX}{k.name}" for k in space.knobs] if include_knobs else []
            columns = knobs + list(SHARED_FEATURES)
        self.names: list[str] = list(columns)
        self._context = dict(zip(CONTEXT_FEATURES, task_context(task, target)))
        self._cache: dict[int, np.ndarray] = {}

    def values(self, config: Config, stats: Mapping[str, Any] | None = None) -> dict[str, float]:
        """Every feature of ``config`` by name (build ``stats`` of a built candidate optional)."""
        out: dict[str, float] = {}
        for knob, (name, value) in zip(self.space.knobs, config.values):
            out[f"{KNOB_PREFIX}{name}"] = knob_value(value) if knob.is_numeric else float(knob.values.index(value))
        analytic = {k: float(v) for k, v in self.template.features(self.task, config, self.target).items()}
        if "bytes_per_flop" not in analytic and "bytes_moved" in analytic and self.task.flops > 0:
            analytic["bytes_per_flop"] = analytic["bytes_moved"] / self.task.flops
        out.update(analytic)
        out.update(target_features(analytic, self.target))
        out.update(build_features(stats))
        out.update(self._context)
        return out

    def row(self, config: Config, stats: Mapping[str, Any] | None = None) -> np.ndarray:
        use_cache = not build_features(stats)
        if use_cache:
            cached = self._cache.get(config.index)
            if cached is not None:
                return cached
        values = self.values(config, stats)
        row = np.asarray([values.get(name, math.nan) for name in self.names], dtype=np.float32)
        if use_cache and len(self._cache) < 200_000:
            self._cache[config.index] = row
        return row

    def matrix(self, configs: Sequence[Config], stats: Sequence[Mapping[str, Any] | None] | None = None) -> np.ndarray:
        if not configs:
            return np.zeros((0, len(self.names)), dtype=np.float32)
        stats = stats if stats is not None else [None] * len(configs)
        return np.stack([self.row(c, s) for c, s in zip(configs, stats)])
