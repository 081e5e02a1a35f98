"""Build candidates into artifacts and measure them in isolated worker processes."""
from __future__ import annotations

from .builder import LocalBuilder, default_cache_dir
from .protocols import Builder, Runner
from .runner import CudaRunner, LocalRunner
from .timing import TimingPolicy, cold_policy
from .types import BuildResult, MeasureError, MeasureInput, MeasureResult

__all__ = [
    "BuildResult", "Builder", "CudaRunner", "LocalBuilder", "LocalRunner", "MeasureError", "MeasureInput",
    "MeasureResult", "Runner", "TimingPolicy", "cold_policy", "default_cache_dir",
]
