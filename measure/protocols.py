"""What the tuning loop needs of a builder and a runner. ``LocalBuilder`` and ``LocalRunner``
(for any target, through its backend) are the ones here; replay and tests bring their own."""
from __future__ import annotations

from typing import Protocol

from .types import BuildResult, MeasureInput, MeasureResult


class Builder(Protocol):
    def build(self, inputs: list[MeasureInput]) -> list[BuildResult]: ...


class Runner(Protocol):
    def run(self, inputs: list[MeasureInput], builds: list[BuildResult]) -> list[MeasureResult]: ...
