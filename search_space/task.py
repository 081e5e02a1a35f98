"""One operator instance to tune: a ``KernelSpec`` (runtime.abi) that checks its dims and dtype."""
from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from runtime.abi import KernelSpec

SCHEMA_VERSION = 1
_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Task(KernelSpec):
    """An operator instance to tune: a ``KernelSpec`` (op, ``shape`` with every dim by name in
    the operator's order, dtype, attributes, dynamic dims at the size tuned) that checks what it
    is given and knows its operator's FLOPs and bytes."""

    version: int = field(default=SCHEMA_VERSION, compare=False)

    @classmethod
    def make(
        cls,
        op: str,
        shape: dict[str, int],
        dtype: str = "float32",
        attrs: dict[str, Any] | None = None,
        dynamic: tuple[str, ...] | list[str] | str = (),
    ) -> "Task":
        """The task ``op`` at ``shape`` (every dim by name, positive integers: numpy's too),
        ``dtype``, ``attrs`` (those at their default are left out of the key) and ``dynamic``,
        the dims the kernel takes at run time (names, or one string like "M" or "M,N").

        Raises TypeError when ``op`` is not a string or ``shape`` not a mapping, ValueError for
        a bad dtype, dim or dynamic dim. Whether the operator takes these dims and attributes
        is its template's to say (``get_template(op, kind).check(task)``)."""
        if not isinstance(op, str):
            raise TypeError(f"op must be an operator name (a str), got {op!r}")
        if not isinstance(shape, Mapping):
            raise TypeError(f"shape must map dim names to sizes, like {{'M': 256}}, got {shape!r}")
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}: expected one of {', '.join(_DTYPES)}")
        for name, value in shape.items():
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"dim {name} must be a positive integer, got {value!r}")
        if isinstance(dynamic, str):  # "M" is one dim, not its characters; "M,N" as the CLI's --dynamic
            dynamic = [d.strip() for d in dynamic.split(",") if d.strip()]
        unknown = [d for d in dynamic if d not in shape]
        if unknown:
            raise ValueError(f"dynamic dims {unknown} are not dims of the shape")
        return super().make(op, {name: int(value) for name, value in shape.items()}, dtype, attrs, dynamic)

    @property
    def flops(self) -> float:
        from .registry import op_definition

        return float(op_definition(self.op).flops(self))

    @property
    def min_bytes(self) -> float:
        from .registry import op_definition

        return float(op_definition(self.op).min_bytes(self))

    def with_dims(self, **dims: int) -> "Task":
        shape = self.dims
        shape.update(dims)
        return Task.make(self.op, shape, self.dtype, self.attr, self.dynamic)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op, "shape": dict(self.shape), "dtype": self.dtype}
        if self.attrs:
            out["attrs"] = dict(self.attrs)
        if self.dynamic:
            out["dynamic"] = list(self.dynamic)
        out["version"] = self.version
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Task":
        return cls.make(
            data["op"], dict(data["shape"]), data.get("dtype", "float32"),
            data.get("attrs"), data.get("dynamic", ()),
        )


_SHAPE_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(\d+)\s*$")


def parse_shape(text: str) -> dict[str, int]:
    """Parse ``M=256,N=256,K=256`` into a dict; raises ValueError with a readable message."""
    if not text or not text.strip():
        raise ValueError("empty shape: expected NAME=VALUE pairs like M=256,N=256,K=256")
    shape: dict[str, int] = {}
    for item in text.split(","):
        match = _SHAPE_ITEM.match(item)
        if not match:
            raise ValueError(f"malformed shape item {item.strip()!r}: expected NAME=POSITIVE_INT")
        name, value = match.group(1), int(match.group(2))
        if value < 1:
            raise ValueError(f"dim {name} must be >= 1, got {value}")
        if name in shape:
            raise ValueError(f"dim {name} given twice")
        shape[name] = value
    return shape


def format_shape(shape: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())
