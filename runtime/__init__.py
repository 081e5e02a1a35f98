"""Run LLM operators and whole models on tuned kernels.

Two sources of kernels share one interface (``runtime.kernel.Kernel``): an exported library
(``runtime.load(DIR)``: numpy and ctypes only, nothing else of the project) and tuning logs
(``TunedKernels.from_logs``: compiles with the project's LLVM stack). Attributes are loaded
on first use, so ``import runtime`` alone pulls in nothing heavy, and the tuner's
dependencies (xgboost, optuna, mlflow) are never imported.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Kernel": "runtime.kernel", "KernelSpec": "runtime.kernel", "ArgInfo": "runtime.kernel",
    "UntunedShapeWarning": "runtime.kernel", "TunedKernels": "runtime.from_log",
    "load": "runtime.library", "KernelLibrary": "runtime.library",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
