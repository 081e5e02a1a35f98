"""Run LLM operators and whole models on tuned kernels: the part a deployment copies.

``runtime.load(DIR)`` opens an exported library with numpy and ctypes only (pycuda for a
CUDA library); the Llama decoder, its numpy reference, model configs and weights run on any
``KernelProvider``. This package imports nothing else of the project: kernels compiled from
tuning logs (``export.TunedKernels``) belong to the tuning side. Attributes are loaded on
first use, so ``import runtime`` alone pulls in nothing heavy.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "Kernel": "runtime.kernel", "KernelSpec": "runtime.abi", "ArgSpec": "runtime.abi",
    "KernelProvider": "runtime.kernel", "UntunedShapeWarning": "runtime.kernel",
    "load": "runtime.library", "KernelLibrary": "runtime.library",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
