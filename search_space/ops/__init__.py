"""Operator definitions: what each LLM operator computes, independent of any target.

Importing this package registers every operator. Templates (``search_space.templates``)
subclass these definitions and add how one target computes them.
"""
from __future__ import annotations

from . import attention, device_step, elementwise, matmul  # noqa: F401
