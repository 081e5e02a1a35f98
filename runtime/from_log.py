"""Run operators on the best kernels recorded in tuning logs.

``TunedKernels.from_logs(["tune.jsonl"])`` picks, for each call's (op, shape, dtype), the
fastest verified config in the logs, compiles it once (in a worker process, through the
on-disk artifact cache) and keeps it loaded. A shape nobody tuned runs the template's
default config, with a warning. Nothing here imports xgboost, optuna or mlflow.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import numpy as np

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.cpu_kernel import LoadedKernel, allocate_workspace, load_object
from records import Record, best_records, load_records
from search_space import Config, Target, Task, get_template
from search_space.ops.common import numpy_dtype


class UntunedShapeWarning(UserWarning):
    """A call ran the template default because no log held a record for its shape."""


@dataclass
class BoundKernel:
    """A loaded kernel for one task: call it with the input arrays, get the outputs."""

    task: Task
    config: Config
    kernel: LoadedKernel
    tuned: bool
    seconds: float | None = None  # measured time from the log, when tuned

    def __post_init__(self) -> None:
        args = self.kernel.source.args
        self.input_names = [a.name for a in args if a.role == "in"]
        self.output_names = [a.name for a in args if a.role == "out"]
        self._workspace = {a.name: allocate_workspace(a.nbytes) for a in args if a.role == "workspace"}

    def __call__(self, *arrays: np.ndarray, out: Mapping[str, np.ndarray] | None = None, **named: np.ndarray):
        inputs = dict(zip(self.input_names, arrays))
        inputs.update(named)
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise TypeError(f"{self.task.op} needs inputs {self.input_names}; missing {missing}")
        dims = self.task.dims
        buffers: dict[str, np.ndarray] = {}
        for arg in self.kernel.source.args:
            if arg.role == "in":
                array = np.ascontiguousarray(inputs[arg.name])
                want = arg.resolve_shape(dims)
                if array.size != int(np.prod(want)) or array.dtype != numpy_dtype(arg.dtype):
                    raise ValueError(f"{self.task.op} input {arg.name}: expected {want} {arg.dtype}, "
                                     f"got {array.shape} {array.dtype}")
                buffers[arg.name] = array
            elif arg.role == "out":
                given = (out or {}).get(arg.name)
                buffers[arg.name] = given if given is not None else np.empty(arg.resolve_shape(dims),
                                                                              numpy_dtype(arg.dtype))
            elif arg.role == "workspace":
                buffers[arg.name] = self._workspace[arg.name]
        self.kernel(buffers, dims)
        outputs = tuple(buffers[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


class TunedKernels:
    """Best-recorded kernels by task, compiled on first use and cached."""

    def __init__(self, records: Iterable[Record] = (), target: Target | None = None):
        self.target = target or Target.host()
        self._best = {key: rec for key, rec in best_records(records).items() if key[1] == self.target.key}
        self._loaded: dict[str, BoundKernel] = {}
        self._builder: LocalBuilder | None = None

    @classmethod
    def from_logs(cls, paths: Iterable[str], target: Target | None = None) -> "TunedKernels":
        return cls(load_records(paths), target)

    def record_for(self, task: Task) -> Record | None:
        return self._best.get((task.key, self.target.key))

    def get(self, op: str, shape: Mapping[str, int], dtype: str = "float32",
            attrs: Mapping | None = None) -> BoundKernel:
        task = Task.make(op, dict(shape), dtype, dict(attrs or {}))
        cached = self._loaded.get(task.key)
        if cached is not None:
            return cached
        template = get_template(op, self.target.kind)
        template.check(task)
        space = template.space(task, self.target)
        record = self.record_for(task)
        if record is not None:
            config, seconds = record.to_config(space), record.seconds
        else:
            warnings.warn(f"{task.key} was never tuned on {self.target.key}: running the template default",
                          UntunedShapeWarning, stacklevel=2)
            config, seconds = template.default(task, self.target), None
        bound = BoundKernel(task, config, self._compile(task, config), record is not None, seconds)
        self._loaded[task.key] = bound
        return bound

    def __call__(self, op: str, shape: Mapping[str, int], dtype: str = "float32") -> BoundKernel:
        return self.get(op, shape, dtype)

    def _compile(self, task: Task, config: Config) -> LoadedKernel:
        if self._builder is None:
            self._builder = LocalBuilder(n_parallel=1)
        build = self._builder.build([MeasureInput(task, config, self.target)])[0]
        if build.error != MeasureError.NO_ERROR or build.artifact is None or build.source is None:
            raise RuntimeError(f"could not build {task.key} with {config}: {build.error.name}: {build.message}")
        with open(build.artifact, "rb") as f:
            return load_object(f.read(), build.source, self.target)

    def close(self) -> None:
        if self._builder is not None:
            self._builder.close()
            self._builder = None

    def __enter__(self) -> "TunedKernels":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
