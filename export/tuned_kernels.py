"""Run operators on the best kernels recorded in tuning logs.

``TunedKernels.from_logs(["tune.jsonl"])`` picks, for each call's (op, shape, dtype, attrs),
the fastest verified config in the logs (static dims exactly, dynamic dims at the nearest
tuned bucket) whose record is not stale (``records.freshness``: a StaleRecordsWarning per
task says how many were skipped; ``allow_stale=True`` uses them), compiles it once (in a
worker process, through the on-disk artifact cache) and keeps it loaded. A shape nobody tuned runs the template's default config, with a
warning. This path needs the compile stack (llvmlite); an exported library
(``runtime.library``) does not. Nothing here imports xgboost, optuna or mlflow.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.backends import get_backend
from records import Record, load_records, select_best, stale_warnings
from runtime.abi import KernelSpec
from runtime.kernel import Kernel, UntunedShapeWarning, select
from search_space import Config, Target, Task, get_template


class TunedKernels:
    """Best-recorded kernels by task, compiled on first use and cached.

    ``warn_untuned=False`` runs template defaults silently: the untuned baseline a tuned
    model is compared with. ``allow_stale=True`` uses stale records (with a warning) where
    they are the fastest."""

    def __init__(self, records: Iterable[Record] = (), target: Target | None = None, warn_untuned: bool = True,
                 allow_stale: bool = False):
        self.target = target or Target.host()
        choices = select_best((r for r in records if r.target.key == self.target.key), allow_stale)
        for warning in stale_warnings(choices):
            warnings.warn(warning, stacklevel=2)
        self._best = [c.record for c in choices if c.record is not None]
        self._loaded: dict[str, Kernel] = {}
        self._builder: LocalBuilder | None = None
        self._kernels = None  # the backend's loader into this process (a CUDA context)
        self.warn_untuned = warn_untuned
        self._closed = False

    @classmethod
    def from_logs(cls, paths: Iterable[str | os.PathLike] | str | os.PathLike, target: Target | None = None,
                  allow_stale: bool = False) -> "TunedKernels":
        """The best kernels recorded in the logs ``paths`` (one path, or several) for ``target``
        (default: this CPU). FileNotFoundError when a log does not exist; records of other
        targets are ignored; stale records are skipped (a StaleRecordsWarning) unless
        ``allow_stale``."""
        return cls(load_records(paths), target, allow_stale=allow_stale)

    @classmethod
    def defaults(cls, target: Target | None = None) -> "TunedKernels":
        """Every kernel at its template default: what running untuned means."""
        return cls((), target, warn_untuned=False)

    @property
    def kind(self) -> str:
        return self.target.kind

    def specs(self) -> list[KernelSpec]:
        return [r.task for r in self._best]

    def record_for(self, task: Task) -> Record | None:
        return select(self._best, lambda r: r.task, task)

    def get(self, op: str, shape: Mapping[str, int], dtype: str = "float32", attrs: Mapping | None = None,
            dynamic: Sequence[str] = ()) -> Kernel:
        """The kernel for ``op`` at ``shape`` (dims by name), ``dtype``, ``attrs`` and the
        ``dynamic`` dims taken at run time: the fastest recorded config (dynamic dims at the
        nearest tuned bucket), else the template default with an UntunedShapeWarning. Compiled
        on first use, then cached. Raises ValueError for a task the operator does not take,
        RuntimeError when the kernel cannot be built or after ``close``."""
        if self._closed:  # as a closed KernelLibrary: compiling again would undo close()
            raise RuntimeError("these TunedKernels are closed: make new ones to use them")
        task = Task.make(op, dict(shape), dtype, dict(attrs or {}), tuple(dynamic))
        template = get_template(op, self.target.kind)
        template.check(task)
        record = self.record_for(task)
        if record is not None:
            task = record.task  # the bucket it was tuned at
        cached = self._loaded.get(task.key)
        if cached is not None:
            return cached
        space = template.space(task, self.target)
        if record is not None:
            config, seconds = record.to_config(space), record.seconds
        else:
            config, seconds = template.default(task, self.target), None
            # the same default compiled at other values of the dims taken at run time is this
            # call's kernel already (a decode step's KV length changes every token: one compile)
            same = select((k for k in self._loaded.values() if not k.tuned and k.config == config.as_dict()),
                          lambda k: k.spec, task)
            if same is not None:
                return same
            if self.warn_untuned:
                warnings.warn(f"{task.key} was never tuned on {self.target.key}: running the template default",
                              UntunedShapeWarning, stacklevel=2)
        kernel = self._compile(task, config, record is not None, seconds)
        self._loaded[task.key] = kernel
        return kernel

    def _compile(self, task: Task, config: Config, tuned: bool, seconds: float | None) -> Kernel:
        if self._builder is None:
            self._builder = LocalBuilder(n_parallel=1)
        build = self._builder.build([MeasureInput(task, config, self.target)])[0]
        if build.error != MeasureError.NO_ERROR or build.artifact is None or build.source is None:
            raise RuntimeError(f"could not build {task.key} with {config}: {build.error.name}: {build.message}")
        if self._kernels is None:
            self._kernels = get_backend(self.target.kind).in_process_kernels()
        meta = {"tuned": tuned, "seconds": seconds, "config": config.as_dict()}
        return self._kernels.kernel(Path(build.artifact), build.source, task, self.target, meta)

    def close(self) -> None:
        self._closed = True
        if self._kernels is not None:
            self._kernels.close()
            self._kernels = None
        if self._builder is not None:
            self._builder.close()
            self._builder = None

    def __enter__(self) -> "TunedKernels":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
