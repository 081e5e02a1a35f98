"""llm-autotune: schedule templates, learned cost models and measured kernels for LLM operators.

The tuning side's entry point: describe a job with ``TuningJob`` and run it with ``run_job``
(what the ``autotune`` CLI does). Both are loaded on first use, so importing a submodule
(``autotune.tuners``, ``autotune.cli``) pulls in only what it needs.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {"TuningJob": "autotune.job", "JobError": "autotune.job", "run_job": "autotune.job",
         "ModelWorkload": "autotune.tune_model", "compile_only_report": "autotune.compile_only"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'autotune' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
