"""Measure built candidates in isolated worker processes, the same way on every target.

``LocalRunner`` keeps one worker process per device (one for the CPU, one per GPU for CUDA)
and measures each worker's share of a batch one candidate at a time, so that candidates do
not disturb each other's timing. What differs between targets is the backend's
(``measure.backends``); what follows is the same for all of them.

In a worker, ``prepare_task`` makes the task's inputs and float64 reference once
(``measure.task_data``) and opens the device session; ``measure_candidate`` then loads a
candidate, runs it once on poisoned outputs, verifies, and times it. Verification: inputs
first, always (a kernel that wrote to them would hand its damage to every later candidate,
so they are made or copied again), then nothing written past the end of an output, then
every output against the reference.

Failures are values, and the same fault gets the same error on every target:

- a wrong output, an output written past its end, or an input written to: WRONG_ANSWER;
- no answer within the timeout: RUN_TIMEOUT (the watchdog kills the worker);
- the worker died (a segfault, an abort): WORKER_CRASH;
- memory that cannot be had, a launch the device refuses: OUT_OF_RESOURCES;
- a fault the backend recognises carries its own error; a sticky one (a poisoned CUDA
  context) replaces the worker;
- any other exception in the worker: the backend classifies its message (RUNTIME_ERROR
  unless it knows better).

Preparing a task fails the same way, its message starting with "preparing inputs". A killed
worker is replaced on the next call, which prepares its task again; the job goes on.
"""
from __future__ import annotations

import importlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from search_space import KernelSource, Target, Task, get_template, template_module

from .backends import KernelFault, get_backend
from .backends.base import Candidate, Session
from .task_data import TaskData, drop_task_data, task_data
from .timing import TimingPolicy
from .types import BuildResult, MeasureError, MeasureInput, MeasureResult
from .verify import output_problems
from .worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout, close_all

# ----------------------------------------------------------------------------- worker side


def prepare_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Make the task's inputs and reference (kept) and open the device session."""
    importlib.import_module(payload["module"])
    backend = get_backend(payload["kind"])
    try:
        task_data(Task.from_dict(payload["task"]), payload["kind"], payload["seed"])
        session = backend.open_session()
    except MemoryError as exc:
        return _out_of_memory(exc)
    return {"error": "NO_ERROR", "device": session.device_name}


def measure_candidate(payload: dict[str, Any]) -> dict[str, Any]:
    """Load one candidate, verify it on poisoned outputs, then time it; a plain dict back."""
    importlib.import_module(payload["module"])
    kind = payload["kind"]
    task = Task.from_dict(payload["task"])
    template = get_template(task.op, kind)
    source = KernelSource.from_dict(payload["source"])
    try:
        data = task_data(task, kind, payload["seed"])
        session = get_backend(kind).open_session()
        candidate = session.load(Path(payload["artifact"]).read_bytes(), source, Target.from_dict(payload["target"]),
                                 task, data)
        try:
            return _verify_and_time(session, candidate, source, data, template.tolerance(task),
                                    TimingPolicy(**payload["policy"]), payload["check"])
        finally:
            candidate.close()
    except KernelFault as fault:
        return fault.reply()
    except MemoryError as exc:
        return _out_of_memory(exc)


def _verify_and_time(session: Session, candidate: Candidate, source: KernelSource, data: TaskData, tol: float,
                     policy: TimingPolicy, check: bool) -> dict[str, Any]:
    first_s = candidate.run()
    damaged = _inputs_damaged(session, candidate, "during the verification run")
    if damaged:
        return damaged
    outputs, overrun = candidate.outputs()
    if overrun:
        return _reply(MeasureError.WRONG_ANSWER, f"wrote past the end of its output {', '.join(overrun)}")
    if check:
        dtypes = {a.name: a.dtype for a in source.args if a.role == "out"}
        problems = output_problems(outputs, data.reference, dtypes, tol)
        if problems:
            return _reply(MeasureError.WRONG_ANSWER, problems[0])
    timing = candidate.time(policy, first_s)
    damaged = _inputs_damaged(session, candidate, "while timed")
    if damaged:
        return damaged
    return {"error": "NO_ERROR", "costs": timing.pop("costs"), "stats": timing}


def _inputs_damaged(session: Session, candidate: Candidate, when: str) -> dict[str, Any] | None:
    """A WRONG_ANSWER reply when the candidate wrote to its inputs (they are made again), else None."""
    names = candidate.modified_inputs()
    if not names:
        return None
    session.forget_inputs()
    reply = _reply(MeasureError.WRONG_ANSWER, f"modified its input {', '.join(names)} {when}")
    if session.runs_on_kept_inputs:
        drop_task_data()
        reply["inputs_dropped"] = True  # the parent prepares the task again
    return reply


def _reply(error: MeasureError, message: str) -> dict[str, Any]:
    return {"error": error.name, "message": message}


def _out_of_memory(exc: MemoryError) -> dict[str, Any]:
    return _reply(MeasureError.OUT_OF_RESOURCES, f"out of memory: {exc}")


# ----------------------------------------------------------------------------- parent side

Failure = tuple[MeasureError, str]  # how a worker's job failed: the error and its message


class LocalRunner:
    """Measures candidates of one target kind on this machine, one worker process per device.

    ``run`` spreads a batch over the devices (each measures its share one candidate at a
    time) and returns the results in input order. ``worker_factory(device)`` replaces the
    worker processes (tests use it to script their answers).
    """

    def __init__(self, timeout_s: float = 20.0, policy: TimingPolicy | None = None, check: bool = True,
                 seed: int = 0, prepare_timeout_s: float | None = None, kind: str = "cpu", devices: Sequence[int] = (0,),
                 worker_factory: Callable[[int], Any] | None = None):
        if not devices:
            raise ValueError("a runner needs at least one device")
        self.kind = kind
        self.backend = get_backend(kind)
        self.devices = tuple(devices)
        self.timeout_s = timeout_s
        self.policy = policy or self.backend.default_policy
        self.check = check
        self.seed = seed
        self.prepare_timeout_s = prepare_timeout_s or self.backend.prepare_timeout_s
        self._workers = [(worker_factory or self._new_worker)(d) for d in self.devices]
        self._prepared: list[tuple[int, str] | None] = [None] * len(self._workers)  # (generation, task key)
        self.device_names: list[str] = [""] * len(self._workers)

    def _new_worker(self, device: int) -> WorkerProcess:
        return WorkerProcess(env=self.backend.worker_env(device), name=f"autotune-{self.kind}{device}")

    def run(self, inputs: list[MeasureInput], builds: list[BuildResult]) -> list[MeasureResult]:
        items = list(zip(inputs, builds))
        if len(self._workers) == 1 or len(items) <= 1:
            return [self._run_one(0, inp, build) for inp, build in items]
        results: list[MeasureResult | None] = [None] * len(items)

        def serve(w: int) -> None:
            for i in range(w, len(items), len(self._workers)):
                results[i] = self._run_one(w, *items[i])

        with ThreadPoolExecutor(max_workers=len(self._workers)) as pool:
            list(pool.map(serve, range(len(self._workers))))
        return [r for r in results if r is not None]

    def _run_one(self, w: int, inp: MeasureInput, build: BuildResult) -> MeasureResult:
        if build.error != MeasureError.NO_ERROR or build.artifact is None or build.source is None:
            return MeasureResult.failed(build.error or MeasureError.COMPILE_ERROR, build.message,
                                        build_s=build.build_s, stats=dict(build.stats))
        stats = dict(build.stats)
        stats["digest"] = build.digest
        module = template_module(inp.task.op, self.kind)
        failed = self._prepare(w, inp.task, module)
        if failed is not None:
            return MeasureResult.failed(*failed, build_s=build.build_s, stats=stats)
        payload = {"task": inp.task.to_dict(), "target": inp.target.to_dict(), "kind": self.kind,
                   "source": build.source.to_dict(), "artifact": build.artifact, "module": module,
                   "policy": asdict(self.policy), "check": self.check, "seed": self.seed}
        start = time.perf_counter()
        reply = self._call(w, "measure.runner:measure_candidate", payload, self.timeout_s)
        run_s = time.perf_counter() - start
        if isinstance(reply, tuple):
            return MeasureResult.failed(*reply, build_s=build.build_s, run_s=run_s, stats=stats)
        stats.update(reply["stats"])
        return MeasureResult(tuple(reply["costs"]), MeasureError.NO_ERROR, "", build.build_s, run_s, stats=stats)

    def _prepare(self, w: int, task: Task, module: str) -> Failure | None:
        """None once worker ``w`` holds the task's inputs, else (error, message)."""
        worker = self._workers[w]
        if self._prepared[w] == (worker.generation, task.key) and worker.alive:
            return None
        payload = {"task": task.to_dict(), "kind": self.kind, "seed": self.seed, "module": module}
        reply = self._call(w, "measure.runner:prepare_task", payload, self.prepare_timeout_s)
        if isinstance(reply, tuple):
            return reply[0], f"preparing inputs: {reply[1]}"
        self.device_names[w] = reply.get("device", "")
        self._prepared[w] = (worker.generation, task.key)
        return None

    def _call(self, w: int, path: str, payload: dict[str, Any], timeout: float) -> dict[str, Any] | Failure:
        """Worker ``w``'s reply, or (error, message) for every way the job can fail."""
        worker = self._workers[w]
        try:
            reply = worker.call(path, payload, timeout)
        except WorkerTimeout:  # the watchdog: the worker was killed, the next call starts another
            return MeasureError.RUN_TIMEOUT, f"no result within {timeout:.0f} s (the worker was killed)"
        except WorkerCrash as exc:
            return MeasureError.WORKER_CRASH, str(exc)
        except WorkerError as exc:
            error, sticky = self.backend.classify(str(exc))
            reply = {"error": error.name, "message": str(exc), "sticky": sticky}
        error = MeasureError[reply.get("error", "NO_ERROR")]
        if error == MeasureError.NO_ERROR:
            return reply
        message = reply.get("message", "")
        if reply.get("sticky"):
            worker.kill()  # the device is unusable in that process: the next call starts a fresh one
            message += " (worker replaced)"
        if reply.get("inputs_dropped"):
            self._prepared[w] = None
        return error, message

    def close(self) -> None:
        close_all(self._workers)

    def __enter__(self) -> "LocalRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CudaRunner(LocalRunner):
    """A ``LocalRunner`` for CUDA: one worker process per GPU in ``devices``, each owning its context."""

    def __init__(self, devices: Sequence[int] = (0,), timeout_s: float = 20.0, policy: TimingPolicy | None = None,
                 check: bool = True, seed: int = 0, prepare_timeout_s: float | None = None,
                 worker_factory: Callable[[int], Any] | None = None):
        super().__init__(timeout_s, policy, check, seed, prepare_timeout_s, kind="cuda", devices=devices,
                         worker_factory=worker_factory)
