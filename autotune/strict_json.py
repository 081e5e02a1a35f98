"""JSON that every parser reads: Python writes NaN and Infinity, which are not JSON, so
non-finite floats (an undefined figure: a speed-up with no decode steps) become null."""
from __future__ import annotations

import json
import math
from typing import Any


def finite(value: Any) -> Any:
    """``value`` with every non-finite float inside it replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    return json.dumps(finite(value), indent=indent, allow_nan=False, default=_numpy_scalar)


def _numpy_scalar(value: Any):
    """numpy's ints and bools (its floats are Python floats already)."""
    item = getattr(value, "item", None)
    if item is not None and getattr(value, "shape", None) == ():
        return finite(item())
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
