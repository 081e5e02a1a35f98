"""Run built candidates in an isolated worker: verify against numpy, then time.

The worker keeps each task's random inputs and float64 reference between candidates; a
candidate that hangs or crashes costs one trial: the worker is killed, a new one starts,
and the next candidate prepares its task again. Kernels run on those kept inputs, so each
candidate's inputs are checked against their digests after it ran: one that wrote to them
is a wrong answer, and the worker makes fresh inputs for the next.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from search_space import KernelSource, Target, Task, get_template, template_module

from .timing import TimingPolicy
from .types import BuildResult, MeasureError, MeasureInput, MeasureResult
from .worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout

# ----------------------------------------------------------------------------- worker side

_PREPARED: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
_INPUT_DIGESTS: dict[str, dict[str, bytes]] = {}  # per prepared key: what each input held at first


def _prepared(task: Task, target_kind: str, seed: int):
    key = f"{task.key}#{seed}"
    if key not in _PREPARED:
        drop_prepared()  # one task at a time: inputs can be hundreds of MB
        template = get_template(task.op, target_kind)
        made = template.make_inputs(task, np.random.default_rng(seed))
        inputs = {name: np.ascontiguousarray(array) for name, array in made.items()}
        _PREPARED[key] = (inputs, template.reference(task, inputs))
        _INPUT_DIGESTS[key] = {name: input_digest(array) for name, array in inputs.items()}
    return _PREPARED[key]


def drop_prepared() -> None:
    """Forget the kept inputs (the next candidate makes them again)."""
    _PREPARED.clear()
    _INPUT_DIGESTS.clear()


def input_digest(array: np.ndarray) -> bytes:
    """A digest of the array's bytes (NaN-safe, unlike comparing values); ~1.5 GB/s."""
    return hashlib.sha1(np.ascontiguousarray(array).reshape(-1).view(np.uint8)).digest()


def modified_inputs(task: Task, seed: int, buffers: dict[str, np.ndarray]) -> list[str]:
    """Names of the kept inputs of ``task`` whose bytes in ``buffers`` changed since they were made."""
    digests = _INPUT_DIGESTS.get(f"{task.key}#{seed}", {})
    return [name for name, digest in digests.items() if name in buffers and input_digest(buffers[name]) != digest]


def prepare_task(payload: dict[str, Any]) -> bool:
    import importlib

    importlib.import_module(payload["module"])
    _prepared(Task.from_dict(payload["task"]), payload["kind"], payload["seed"])
    return True


def run_cpu_candidate(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: load the object, check the answer on poisoned outputs, then time it."""
    import importlib

    from .cpu_kernel import allocate_args, load_object, overran
    from .timing import condition_of, time_calls
    from .verify import check_output

    importlib.import_module(payload["module"])
    task = Task.from_dict(payload["task"])
    target = Target.from_dict(payload["target"])
    source = KernelSource.from_dict(payload["source"])
    policy = TimingPolicy(**payload["policy"])
    template = get_template(task.op, target.kind)
    inputs, reference = _prepared(task, target.kind, payload["seed"])
    kernel = load_object(Path(payload["artifact"]).read_bytes(), source, target)
    dims = task.dims
    buffers = allocate_args(source, dims, inputs, poison=True)  # the kept input arrays themselves
    start = time.perf_counter()
    kernel(buffers, dims)
    first = time.perf_counter() - start
    # inputs first, always: a kernel that wrote to them would hand its damage to every later candidate
    scribbled = _scribbled(task, payload["seed"], buffers, "during the verification run")
    if scribbled:
        return scribbled
    for arg in source.args:
        if arg.role == "out" and overran(buffers[arg.name]):
            return {"error": "WRONG_ANSWER", "message": f"wrote past the end of its output {arg.name}"}
    if payload["check"]:
        for arg in source.args:
            if arg.role == "out":
                problem = check_output(arg.name, buffers[arg.name], reference[arg.name],
                                       template.tolerance(task), arg.dtype)
                if problem:
                    return {"error": "WRONG_ANSWER", "message": problem}
    sets = cold_copies(source, buffers, policy.cold_bytes)
    if len(sets) > 1:
        timing = time_calls(lambda n: kernel.rotate(sets, dims, n), policy, first_call_s=first)
        timing["input_copies"] = len(sets)
    else:
        timing = time_calls(lambda n: kernel.repeat(buffers, dims, n), policy, first_call_s=first)
    scribbled = _scribbled(task, payload["seed"], buffers, "while timed")
    if scribbled:
        return scribbled
    timing["cache"] = condition_of(policy)  # kept in the record: what situation the time is for
    return {"error": "NO_ERROR", "costs": timing.pop("costs"), "stats": timing}


def _scribbled(task: Task, seed: int, buffers: dict[str, np.ndarray], when: str) -> dict[str, Any] | None:
    """A WRONG_ANSWER reply when the candidate wrote to its inputs (they are dropped), else None."""
    names = modified_inputs(task, seed, buffers)
    if not names:
        return None
    drop_prepared()
    return {"error": "WRONG_ANSWER", "message": f"modified its input {', '.join(names)} {when}",
            "inputs_dropped": True}


def cold_copies(source: KernelSource, buffers: dict[str, np.ndarray], cold_bytes: int) -> list[dict]:
    """``buffers`` and enough copies of its inputs to fill ``cold_bytes`` (see TimingPolicy)."""
    from .timing import MAX_COPIES

    inputs = [a.name for a in source.args if a.role == "in"]
    in_bytes = sum(buffers[name].nbytes for name in inputs)
    copies = min(MAX_COPIES, -(-cold_bytes // max(in_bytes, 1))) if cold_bytes > in_bytes else 1
    return [buffers] + [dict(buffers, **{name: buffers[name].copy() for name in inputs}) for _ in range(copies - 1)]


# ----------------------------------------------------------------------------- parent side


class LocalRunner:
    """Measures CPU candidates one at a time (so they do not disturb each other's timing)."""

    def __init__(self, timeout_s: float = 20.0, policy: TimingPolicy | None = None, check: bool = True,
                 seed: int = 0, prepare_timeout_s: float = 600.0):
        self.timeout_s = timeout_s
        self.policy = policy or TimingPolicy()
        self.check = check
        self.seed = seed
        self.prepare_timeout_s = prepare_timeout_s
        self._worker = WorkerProcess(name="autotune-run")
        self._prepared: tuple[int, str] | None = None  # (worker generation, task key)

    def run(self, inputs: list[MeasureInput], builds: list[BuildResult]) -> list[MeasureResult]:
        return [self._run_one(inp, build) for inp, build in zip(inputs, builds)]

    def _prepare(self, inp: MeasureInput) -> MeasureResult | None:
        module = template_module(inp.task.op, inp.target.kind)
        want = (self._worker.generation, inp.task.key)
        if self._prepared == want and self._worker.alive:
            return None
        try:
            self._worker.call("measure.runner:prepare_task",
                              {"task": inp.task.to_dict(), "kind": inp.target.kind, "seed": self.seed,
                               "module": module}, self.prepare_timeout_s)
        except (WorkerTimeout, WorkerCrash, WorkerError) as exc:
            return MeasureResult.failed(MeasureError.RUNTIME_ERROR, f"preparing inputs failed: {exc}")
        self._prepared = (self._worker.generation, inp.task.key)
        return None

    def _run_one(self, inp: MeasureInput, build: BuildResult) -> MeasureResult:
        if build.error != MeasureError.NO_ERROR or build.artifact is None or build.source is None:
            return MeasureResult.failed(build.error or MeasureError.COMPILE_ERROR, build.message,
                                        build_s=build.build_s, stats=dict(build.stats))
        failed = self._prepare(inp)
        if failed is not None:
            return failed
        payload = {
            "task": inp.task.to_dict(),
            "target": inp.target.to_dict(),
            "source": build.source.to_dict(),
            "artifact": build.artifact,
            "module": template_module(inp.task.op, inp.target.kind),
            "policy": asdict(self.policy),
            "check": self.check,
            "seed": self.seed,
        }
        stats = dict(build.stats)
        stats["digest"] = build.digest
        start = time.perf_counter()
        try:
            out = self._worker.call("measure.runner:run_cpu_candidate", payload, self.timeout_s)
        except WorkerTimeout:
            return MeasureResult.failed(MeasureError.RUN_TIMEOUT, f"no result within {self.timeout_s:.0f} s",
                                        build.build_s, time.perf_counter() - start, stats)
        except WorkerCrash as exc:
            return MeasureResult.failed(MeasureError.WORKER_CRASH, str(exc), build.build_s,
                                        time.perf_counter() - start, stats)
        except WorkerError as exc:
            return MeasureResult.failed(MeasureError.RUNTIME_ERROR, str(exc),
                                        build.build_s, time.perf_counter() - start, stats)
        run_s = time.perf_counter() - start
        error = MeasureError[out["error"]]
        if error != MeasureError.NO_ERROR:
            if out.get("inputs_dropped"):
                self._prepared = None  # the candidate wrote to them: the worker makes them again
            return MeasureResult.failed(error, out.get("message", ""), build.build_s, run_s, stats)
        stats.update(out["stats"])
        return MeasureResult(tuple(out["costs"]), MeasureError.NO_ERROR, "", build.build_s, run_s, stats=stats)

    def close(self) -> None:
        self._worker.close()

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
