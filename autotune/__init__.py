"""llm-autotune: schedule templates, learned cost models and measured kernels for LLM operators."""
from __future__ import annotations

__version__ = "0.1.0"
