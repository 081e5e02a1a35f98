"""The values that flow through the measure loop. Errors are values, never exceptions."""
from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

from search_space import Config, KernelSource, Target, Task


class MeasureError(enum.IntEnum):
    NO_ERROR = 0
    INVALID_CONFIG = 1
    COMPILE_ERROR = 2
    BUILD_TIMEOUT = 3
    RUNTIME_ERROR = 4
    RUN_TIMEOUT = 5
    WORKER_CRASH = 6
    WRONG_ANSWER = 7
    OUT_OF_RESOURCES = 8


@dataclass(frozen=True)
class MeasureInput:
    task: Task
    config: Config
    target: Target


@dataclass(frozen=True)
class BuildResult:
    """A compiled candidate: the artifact on disk and the source it came from, or an error."""

    artifact: str | None
    source: KernelSource | None
    digest: str = ""
    build_s: float = 0.0
    error: MeasureError = MeasureError.NO_ERROR
    message: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    cached: bool = False


@dataclass(frozen=True)
class MeasureResult:
    """What a measurement found. ``costs`` are seconds per call, one per timed repeat."""

    costs: tuple[float, ...]
    error: MeasureError = MeasureError.NO_ERROR
    message: str = ""
    build_s: float = 0.0
    run_s: float = 0.0
    timestamp: float = field(default_factory=time.time)
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error == MeasureError.NO_ERROR and bool(self.costs)

    @property
    def median(self) -> float:
        """Median seconds per call; infinity for a failed measurement."""
        if not self.ok:
            return math.inf
        ordered = sorted(self.costs)
        mid = len(ordered) // 2
        return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])

    def to_dict(self) -> dict[str, Any]:
        return {
            "costs": list(self.costs),
            "error": self.error.name,
            "message": self.message,
            "build_s": round(self.build_s, 6),
            "run_s": round(self.run_s, 6),
            "timestamp": self.timestamp,
            "stats": self.stats,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MeasureResult":
        error = data.get("error", "NO_ERROR")
        error = MeasureError[error] if isinstance(error, str) else MeasureError(int(error))
        return cls(
            costs=tuple(float(c) for c in data.get("costs", ())),
            error=error,
            message=data.get("message", ""),
            build_s=float(data.get("build_s", 0.0)),
            run_s=float(data.get("run_s", 0.0)),
            timestamp=float(data.get("timestamp", 0.0)),
            stats=dict(data.get("stats", {})),
        )

    @classmethod
    def failed(cls, error: MeasureError, message: str, build_s: float = 0.0, run_s: float = 0.0,
               stats: dict[str, Any] | None = None) -> "MeasureResult":
        return cls((), error, message[-2000:], build_s, run_s, stats=stats or {})
