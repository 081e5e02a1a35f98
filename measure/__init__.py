"""Build candidates into artifacts and measure them in isolated worker processes."""
from __future__ import annotations

from .builder import LocalBuilder, default_cache_dir
from .cuda_runner import CudaRunner
from .runner import LocalRunner
from .timing import TimingPolicy, cold_policy
from .types import BuildResult, MeasureError, MeasureInput, MeasureResult

__all__ = [
    "BuildResult", "CudaRunner", "LocalBuilder", "LocalRunner", "MeasureError", "MeasureInput", "MeasureResult",
    "TimingPolicy", "cold_policy", "default_cache_dir",
]
