"""One backend per target kind, behind one interface (``base.Backend``).

A new target is one module here defining ``BACKEND`` (an instance of a ``Backend`` subclass)
and its line in ``_MODULES``. A backend's module is imported the first time its kind is asked
for, so a CPU job never imports the CUDA side (nor pycuda).
"""
from __future__ import annotations

import importlib

from .base import Backend, Candidate, InProcessKernels, KernelFault, Session

_MODULES = {
    "cpu": "measure.backends.cpu",
    "cuda": "measure.backends.cuda",
}


def get_backend(kind: str) -> Backend:
    if kind not in _MODULES:
        raise ValueError(f"no backend for target kind {kind!r}; known: {', '.join(sorted(_MODULES))}")
    return importlib.import_module(_MODULES[kind]).BACKEND


__all__ = ["Backend", "Candidate", "InProcessKernels", "KernelFault", "Session", "get_backend"]
