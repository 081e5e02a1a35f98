"""One measurement as one JSON line: the unit of everything the project keeps."""
from __future__ import annotations

import functools

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from measure import MeasureInput, MeasureResult
from search_space import Config, ConfigSpace, Target, Task, op_definition

SCHEMA_VERSION = 1


class NewerSchemaError(ValueError):
    """A record written by a newer llm-autotune, in a schema this version cannot read."""

    def __init__(self, schema: int):
        super().__init__(f"record schema {schema} is not supported (this version reads 1..{SCHEMA_VERSION})")
        self.schema = schema


@dataclass(frozen=True)
class CodeIdentity:
    """Which code a record measured: the digest of the rendered source with its compile flags
    (``KernelSource.digest``, the kernel cache's key) and the compiler that built it ("" when
    the record does not say)."""

    digest: str
    compiler: str = ""


@functools.lru_cache(maxsize=None)  # read per record otherwise: importlib.metadata costs ~1 ms a call
def package_version() -> str:
    try:
        from importlib.metadata import version

        return version("llm-autotune")
    except Exception:  # running from a source tree that was never installed
        return "0+unknown"


@dataclass(frozen=True)
class Record:
    """A measured candidate: task, target, config, result, and who measured it when.

    ``model`` holds what a model-based tuner predicted before measuring: ``score`` (its
    ranking score), ``batch`` (the trial number at which the batch started), and on the
    last record of each batch the batch's ``pairwise_accuracy`` and ``topk_recall`` (with
    its ``k``), comparing the predicted ranking with the measured one. Empty otherwise.
    """

    task: Task
    target: Target
    config: dict[str, Any]  # knob values; the index is kept beside them for convenience
    config_index: int
    result: MeasureResult
    tuner: str = ""
    version: str = field(default_factory=package_version)
    timestamp: float = field(default_factory=time.time)
    schema: int = SCHEMA_VERSION
    model: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_measure(cls, inp: MeasureInput, result: MeasureResult, tuner: str = "",
                     model: dict[str, Any] | None = None) -> "Record":
        return cls(inp.task, inp.target, inp.config.as_dict(), inp.config.index, result, tuner,
                   model=dict(model or {}))

    @property
    def ok(self) -> bool:
        """Verified, with times a kernel can take: a zero, negative, NaN or infinite time (a hand
        edit, a broken timer) would otherwise win every comparison it is in."""
        return self.result.ok and all(math.isfinite(c) and c > 0 for c in self.result.costs)

    @property
    def seconds(self) -> float:
        return self.result.median

    @property
    def gflops(self) -> float:
        t = self.seconds
        return self.task.flops / t / 1e9 if self.ok and t > 0 and math.isfinite(t) else 0.0

    @property
    def code(self) -> CodeIdentity | None:
        """The identity of the code measured, kept in the result's stats by the runner (digest)
        and the builder (compiler); None for a record that keeps none (see ``records.freshness``)."""
        digest = self.result.stats.get("digest")
        if not isinstance(digest, str) or not digest:
            return None
        compiler = self.result.stats.get("compiler")
        return CodeIdentity(digest, compiler if isinstance(compiler, str) else "")

    @property
    def config_key(self) -> str:
        """Identity of the config independent of the space's knob order."""
        return json.dumps(self.config, sort_keys=True)

    def to_config(self, space: ConfigSpace) -> Config:
        return space.from_values(self.config)

    def to_measure_input(self, space: ConfigSpace) -> MeasureInput:
        return MeasureInput(self.task, self.to_config(space), self.target)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema": self.schema,
            "task": self.task.to_dict(),
            "target": self.target.to_dict(),
            "config": {"index": self.config_index, "values": self.config},
            "result": self.result.to_dict(),
            "tuner": self.tuner,
            "version": self.version,
            "timestamp": self.timestamp,
        }
        if self.model:  # optional: readers that predate it ignore the key
            data["model"] = {k: v for k, v in self.model.items() if not (isinstance(v, float) and not math.isfinite(v))}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Record":
        """Raises ValueError (or KeyError, TypeError) for anything that is not a record."""
        if not isinstance(data, dict):
            raise ValueError(f"not a record: {repr(data)[:40]} is not a JSON object")
        for section in ("task", "target", "config", "result"):
            if not isinstance(data.get(section), dict):
                raise ValueError(f"not a record: no {section!r} object")
        schema = int(data.get("schema", 0))
        if schema > SCHEMA_VERSION:
            raise NewerSchemaError(schema)
        if schema < 1:
            raise ValueError(f"record schema {schema} is not supported (this version reads 1..{SCHEMA_VERSION})")
        config = data["config"]
        task = Task.from_dict(data["task"])
        op_definition(task.op)  # ValueError for an operator no template (of any target kind) knows
        return cls(
            task=task,
            target=Target.from_dict(data["target"]),
            config=dict(config["values"]),
            config_index=int(config.get("index", -1)),
            result=MeasureResult.from_dict(data["result"]),
            tuner=data.get("tuner", ""),
            version=data.get("version", ""),
            timestamp=float(data.get("timestamp", 0.0)),
            schema=schema,
            model=dict(data.get("model") or {}),
        )

    @classmethod
    def from_json(cls, line: str) -> "Record":
        return cls.from_dict(json.loads(line))
