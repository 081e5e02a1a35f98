"""Run LLM operators on tuned kernels. Never imports the tuner's heavy dependencies."""
from __future__ import annotations

from .from_log import BoundKernel, TunedKernels, UntunedShapeWarning

__all__ = ["BoundKernel", "TunedKernels", "UntunedShapeWarning"]
