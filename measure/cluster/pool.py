"""The driver's side of a Ray cluster: connect, place the runners, dispatch candidates.

``RayCluster`` is a ``Builder`` (builds fan out as Ray tasks over every CPU of the cluster)
and a ``Runner`` (each runner actor measures one candidate at a time), and for a driver that
keeps several batches in flight it offers the two as one pipeline: ``submit`` candidates,
``wait`` for whichever are measured. The driver alone holds the results; nothing here
writes a log.

A runner (or its node) that dies loses only the candidate it was measuring: that candidate
goes back to the front of the queue and another runner of the same target measures it, so
it is measured and returned once. A candidate that lost two runners is returned as a
WORKER_CRASH rather than offered to a third. When every runner of a target is gone, ``wait``
raises ``ClusterError``.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from search_space import Target, template_module

from ..backends import get_backend
from ..builder import _one_line
from ..timing import TimingPolicy
from ..types import BuildResult, MeasureError, MeasureInput, MeasureResult
from .address import ClusterAddress, ClusterError, check_reachable
from .local_token import use_a_process_token
from .remote import MeasureRunner, build_on_node

PLACEMENT_TIMEOUT_S = 120.0  # for the runners to be placed and start; longer means the devices are taken
MAX_RUNNER_LOSSES = 2        # runners that may die measuring one candidate before it is given up
# candidates handed to a runner at once: it measures one while the next waits in its queue (an
# actor runs its calls one at a time), so it never idles for a round trip to the driver
RUNNER_DEPTH = 2
# ray.wait runs this process's signal handlers while it waits, but an exception one raises
# (SIGTERM's, Ctrl-C's) surfaces only when the wait returns: with no timeout, never while nothing
# on the cluster finishes (its builds queued behind another job's, say). So the driver waits in
# slices of this long.
WAIT_SLICE_S = 0.5
# Nothing back from the cluster for this long: say so, once per stall (another job's work may
# hold every CPU, and the job would otherwise wait without a word).
STALL_NOTE_S = 60.0


def wait_in_slices(refs: list, num_returns: int = 1, timeout: float | None = None) -> tuple[list, list]:
    """``ray.wait``, ended within about WAIT_SLICE_S by an exception a signal handler raises."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        left = WAIT_SLICE_S if deadline is None else max(0.0, min(WAIT_SLICE_S, deadline - time.monotonic()))
        try:
            ready, rest = ray.wait(refs, num_returns=num_returns, timeout=left)
        except SystemError as exc:  # "returned a result with an exception set": the handler's
            if isinstance(exc.__cause__, BaseException):
                raise exc.__cause__ from None
            raise
        if len(ready) >= num_returns or (deadline is not None and time.monotonic() >= deadline):
            return ready, rest


@dataclass
class RunnerHandle:
    actor: Any
    name: str
    node: str
    target: Target
    cores: list[int]
    last_task: str = ""  # a runner keeps one task's inputs: candidates of that task go to it first


@dataclass
class _Candidate:
    ticket: int
    input: MeasureInput
    build: BuildResult | None = None
    artifact: Any = None  # the ObjectRef of the artifact's bytes
    losses: int = 0
    started: float = field(default_factory=time.perf_counter)


class RayCluster:
    """Builds and measures candidates on a Ray cluster.

    ``runner_cpus``: the cores a CPU runner times on (the rest of its host compiles).
    ``runner_class`` and ``build_function`` replace what runs on the nodes (the dispatch
    benchmark uses runners that only sleep). ``note`` receives one-line remarks (a runner
    died, where the builds run).
    """

    def __init__(self, address: ClusterAddress, build_timeout: float = 60.0, runner_cpus: int = 1,
                 note: Callable[[str], None] = lambda text: None, runner_class: type = MeasureRunner,
                 build_function: Callable = build_on_node):
        if runner_cpus < 1:
            raise ClusterError(f"runner_cpus must be >= 1, got {runner_cpus}")
        self.address = address
        self.build_timeout = build_timeout
        self.runner_cpus = runner_cpus
        self.note = note
        self._owns_ray, self._put_back_token = _connect(address)
        self._runner_class = ray.remote(runner_class)
        self._build = ray.remote(build_function)
        self.runners: list[RunnerHandle] = []
        self.reserved: dict[str, int] = {}  # node id -> cores its runners hold
        self._tickets = itertools.count()
        self._building: dict[Any, _Candidate] = {}
        self._running: dict[Any, tuple[_Candidate, RunnerHandle]] = {}
        self._queued: dict[str, collections.deque[_Candidate]] = collections.defaultdict(collections.deque)
        self._free: dict[str, list[RunnerHandle]] = collections.defaultdict(list)
        self._finished: list[tuple[int, MeasureResult]] = []
        self._failure: ClusterError | None = None  # raised once what was measured is handed back
        self._artifacts: dict[str, Any] = {}  # digest -> ObjectRef, from ``build`` for ``run``
        self.lost_runners = 0
        self.measured_again = 0  # candidates a dead runner was measuring, measured by another
        self.build_nodes: collections.Counter[str] = collections.Counter()  # node id -> builds run there
        self.build_cores: dict[str, set[int]] = collections.defaultdict(set)  # node id -> cores builds ran on
        self._last_progress = time.monotonic()  # when something last came back, or work was given
        self._stall_noted = False

    # ------------------------------------------------------------------ the cluster

    @staticmethod
    def nodes() -> list[dict[str, Any]]:
        return [n for n in ray.nodes() if n.get("Alive")]

    @property
    def build_cpus(self) -> int:
        """Logical CPUs left for builds once the runners hold theirs."""
        total = sum(int(n["Resources"].get("CPU", 0)) for n in self.nodes())
        return total - sum(self.reserved.values())

    def start_runners(self, kind: str, run_timeout: float = 20.0, seed: int = 0, check: bool = True,
                      prepare_timeout_s: float | None = None) -> list[Target]:
        """One runner actor per GPU (cuda) or per CPU host with more than ``runner_cpus`` CPUs
        (cpu); returns the distinct targets they measure, most runners first."""
        if self.runners:
            raise ClusterError("the runners are already started")
        job = uuid.uuid4().hex[:6]
        pending = []
        for node in self.nodes():
            cpus, gpus = int(node["Resources"].get("CPU", 0)), int(node["Resources"].get("GPU", 0))
            if get_backend(kind).gpu_devices:
                slots, per_runner, options = min(gpus, cpus), 1, {"num_cpus": 1, "num_gpus": 1}
            else:
                slots, per_runner, options = (1 if cpus > self.runner_cpus else 0), self.runner_cpus, \
                    {"num_cpus": self.runner_cpus}
            for slot in range(slots):
                name = f"autotune-runner-{job}-{node['NodeID'][:8]}-{slot}"
                actor = self._runner_class.options(
                    name=name, max_restarts=0, max_concurrency=1,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False), **options,
                ).remote(kind, slot, per_runner, run_timeout, seed, check, prepare_timeout_s)
                pending.append((actor, name, node["NodeID"], per_runner))
                self.reserved[node["NodeID"]] = self.reserved.get(node["NodeID"], 0) + per_runner
        if not pending:
            need = "a GPU" if get_backend(kind).gpu_devices else \
                f"more than {self.runner_cpus} CPU(s) (a runner's cores and one to compile)"
            raise ClusterError(f"no node of the Ray cluster can measure {kind} kernels: each needs {need}")
        if self.build_cpus < 1:
            raise ClusterError("the Ray cluster has no CPU left to compile on once the runners hold theirs")
        self._describe(pending)
        counts = collections.Counter(r.target.key for r in self.runners)
        targets = {r.target.key: r.target for r in self.runners}
        return [targets[key] for key, _ in counts.most_common()]

    def _describe(self, pending: list[tuple[Any, str, str, int]]) -> None:
        """Wait for the runners to start and say what they measure; a runner that cannot start
        is left out with a warning (its cores go back to the builds)."""
        refs = [actor.describe.remote() for actor, *_ in pending]
        ready, _ = wait_in_slices(refs, num_returns=len(refs), timeout=PLACEMENT_TIMEOUT_S)
        ready, failed = set(ready), []
        for (actor, name, node, cores), ref in zip(pending, refs):
            try:
                if ref not in ready:
                    ray.kill(actor)
                    raise ClusterError(f"not placed within {PLACEMENT_TIMEOUT_S:.0f} s (its CPUs/GPUs are taken?)")
                info = ray.get(ref)
            except (ray.exceptions.RayError, ClusterError) as exc:
                failed.append(f"{name}: {_first_line(exc)}")
                self.reserved[node] -= cores
                continue
            runner = RunnerHandle(actor, name, info["node"], info["target"], list(info["cores"]))
            self.runners.append(runner)
            self._free[runner.target.key].extend([runner] * RUNNER_DEPTH)
        for line in failed:
            self.note(f"autotune: warning: runner {line}")
        if not self.runners:
            raise ClusterError(f"no runner could start on the Ray cluster ({failed[0]})")

    def runners_of(self, target_key: str) -> list[RunnerHandle]:
        return [r for r in self.runners if r.target.key == target_key]

    def capacity(self, target_key: str) -> int:
        """Candidates of a target in flight that keep each of its runners' queues and every
        build CPU busy: a driver that keeps this many in flight leaves nothing idle."""
        return RUNNER_DEPTH * len(self.runners_of(target_key)) + max(self.build_cpus, 1)

    def set_policy(self, target_key: str, policy: TimingPolicy | None) -> None:
        """How the runners of one target time (a cold cache depends on the target's caches)."""
        ray.get([r.actor.set_policy.remote(policy) for r in self.runners_of(target_key)])

    # ------------------------------------------------------------------ the pipeline

    def submit(self, inputs: Sequence[MeasureInput], builds: Sequence[BuildResult] | None = None) -> list[int]:
        """Build (unless ``builds`` are given) and measure ``inputs``; returns one ticket each.
        Their results come from ``wait``, in the order they are measured."""
        for inp in inputs:
            if not self.runners_of(inp.target.key):
                raise ClusterError(f"no runner of the Ray cluster measures {inp.target.key}")
        if not self._building and not self._running:
            self._last_progress = time.monotonic()
        tickets = []
        for i, inp in enumerate(inputs):
            candidate = _Candidate(next(self._tickets), inp)
            tickets.append(candidate.ticket)
            if builds is None:
                meta, data = self._build.options(num_returns=2, num_cpus=1).remote(
                    inp, template_module(inp.task.op, inp.target.kind), self.build_timeout, self.reserved)
                candidate.artifact = data
                self._building[meta] = candidate
            else:
                candidate.build = builds[i]
                candidate.artifact = self._artifact_of(builds[i])
                self._built(candidate)
        return tickets

    def wait(self, timeout: float | None = None) -> list[tuple[int, MeasureResult]]:
        """The (ticket, result) pairs measured since the last call; waits for at least one
        while any is in flight (up to ``timeout`` seconds). When the cluster can measure no
        more (every runner of a target gone), what was measured is handed back first and
        the ClusterError comes at the next call: the caller logs every result it was given."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished and self._failure is None:
            pending = [*self._building, *self._running]
            if not pending:
                queued = sum(len(q) for q in self._queued.values())
                if queued:  # never expected: a queue no runner will take would wait forever
                    raise ClusterError(f"{queued} candidate(s) queued with no runner to measure them")
                break
            note_at = None if self._stall_noted else self._last_progress + STALL_NOTE_S
            until = min((t for t in (deadline, note_at) if t is not None), default=None)
            ready, _ = wait_in_slices(pending, num_returns=1,
                                      timeout=None if until is None else max(0.0, until - time.monotonic()))
            if not ready:
                if note_at is not None and time.monotonic() >= note_at:
                    self._note_stall()
                if deadline is not None and time.monotonic() >= deadline:
                    break
                continue
            self._last_progress, self._stall_noted = time.monotonic(), False
            ready, _ = ray.wait(pending, num_returns=len(pending), timeout=0)
            for ref in ready:  # every result that came back, even after a failure among them
                try:
                    if ref in self._building:
                        self._collect_build(ref)
                    else:
                        self._collect_run(ref)
                except ClusterError as exc:
                    self._failure = self._failure or exc
        done, self._finished = self._finished, []
        if not done and self._failure is not None:
            raise self._failure
        return done

    def _note_stall(self) -> None:
        self._stall_noted = True
        try:
            free, total = ray.available_resources().get("CPU", 0.0), ray.cluster_resources().get("CPU", 0.0)
            cpus = f"; {free:g} of the cluster's {total:g} CPUs are free"
        except Exception:  # a remark: never what ends the wait
            cpus = ""
        self.note(f"autotune: nothing has come back from the cluster for {time.monotonic() - self._last_progress:.0f} s "
                  f"({len(self._building)} build(s), {len(self._running)} measurement(s) in flight{cpus}); "
                  "another job may hold its CPUs (`ray status` shows its load). Still waiting.")

    @property
    def in_flight(self) -> int:
        return len(self._building) + len(self._running) + sum(len(q) for q in self._queued.values())

    def in_flight_for(self, target_key: str) -> int:
        building = sum(1 for c in self._building.values() if c.input.target.key == target_key)
        running = sum(1 for _, r in self._running.values() if r.target.key == target_key)
        return building + running + len(self._queued.get(target_key, ()))

    def _collect_build(self, ref) -> None:
        candidate = self._building.pop(ref)
        try:
            info = ray.get(ref)
            candidate.build = info["build"]
            self._count_build(info)
        except ray.exceptions.RayError as exc:  # Ray retried it already (a node lost mid-build)
            candidate.build = BuildResult(None, None, error=MeasureError.COMPILE_ERROR,
                                          message=f"build failed on the cluster: {_first_line(exc)}")
        self._built(candidate)

    def _built(self, candidate: _Candidate) -> None:
        build = candidate.build
        if build.error != MeasureError.NO_ERROR or build.source is None or candidate.artifact is None:
            # as LocalRunner records a failed build: no runner needed
            self._finish(candidate, MeasureResult.failed(build.error or MeasureError.COMPILE_ERROR, build.message,
                                                         build_s=build.build_s, stats=dict(build.stats)))
            return
        self._queued[candidate.input.target.key].append(candidate)
        self._dispatch(candidate.input.target.key)

    def _dispatch(self, target_key: str) -> None:
        queue, free = self._queued[target_key], self._free[target_key]
        while queue and free:
            runner = free.pop(0)  # the runners in turn, each up to RUNNER_DEPTH candidates
            # a candidate of the task the runner holds inputs for, else the oldest
            candidate = next((c for c in queue if c.input.task.key == runner.last_task), queue[0])
            queue.remove(candidate)
            runner.last_task = candidate.input.task.key
            ref = runner.actor.measure.remote(candidate.input, candidate.build, candidate.artifact,
                                              template_module(candidate.input.task.op, candidate.input.target.kind))
            self._running[ref] = (candidate, runner)

    def _collect_run(self, ref) -> None:
        candidate, runner = self._running.pop(ref)
        key = runner.target.key
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as exc:  # the runner or its node died
            self._lose(runner, candidate, exc)
            return
        except ray.exceptions.RayError as exc:  # our code failed inside the actor: a value, as any failure
            result = MeasureResult.failed(MeasureError.RUNTIME_ERROR, f"runner {runner.name} failed: "
                                          f"{_first_line(exc)}", build_s=candidate.build.build_s)
        self._free[key].append(runner)
        self._finish(candidate, result)
        self._dispatch(key)

    def _lose(self, runner: RunnerHandle, candidate: _Candidate, exc: Exception) -> None:
        key = runner.target.key
        if runner in self.runners:  # its other candidate in flight fails the same way
            self.runners.remove(runner)
            self._free[key] = [r for r in self._free[key] if r is not runner]
            self.lost_runners += 1
        candidate.losses += 1
        if candidate.losses >= MAX_RUNNER_LOSSES:
            self.note(f"autotune: warning: runner {runner.name} died measuring {candidate.input.config}, "
                      f"{candidate.losses} runners lost on it: recorded as a crash")
            self._finish(candidate, MeasureResult.failed(
                MeasureError.WORKER_CRASH, f"{candidate.losses} runners died measuring it ({_first_line(exc)})",
                build_s=candidate.build.build_s))
        else:
            self.measured_again += 1
            self.note(f"autotune: warning: runner {runner.name} died ({type(exc).__name__}); its candidate is "
                      f"measured again on another, {len(self.runners_of(key))} runner(s) of {key} left")
            self._queued[key].appendleft(candidate)
        if not self.runners_of(key):
            lost = self.in_flight_for(key)
            raise ClusterError(f"every runner of {key} on the Ray cluster is gone ({lost} candidate(s) unmeasured; "
                               "every measured record is in the log)")
        self._dispatch(key)

    def busy_runners(self) -> list[RunnerHandle]:
        """The runners measuring a candidate now (or holding one next)."""
        return list({id(runner): runner for _, runner in self._running.values()}.values())

    def _count_build(self, info: dict[str, Any]) -> None:
        self.build_nodes[info["node"]] += 1
        self.build_cores[info["node"]].update(info["cores"])

    def _finish(self, candidate: _Candidate, result: MeasureResult) -> None:
        candidate.artifact = None  # frees the bytes in the object store
        self._finished.append((candidate.ticket, result))

    # ------------------------------------------------------------------ Builder and Runner

    def build(self, inputs: list[MeasureInput]) -> list[BuildResult]:
        """The ``Builder`` protocol: every input compiled on the cluster at once."""
        metas, datas = [], []
        for inp in inputs:
            meta, data = self._build.options(num_returns=2, num_cpus=1).remote(
                inp, template_module(inp.task.op, inp.target.kind), self.build_timeout, self.reserved)
            metas.append(meta)
            datas.append(data)
        builds = []
        for meta, data in zip(metas, datas):
            try:
                info = ray.get(meta)
            except ray.exceptions.RayError as exc:
                builds.append(BuildResult(None, None, error=MeasureError.COMPILE_ERROR,
                                          message=f"build failed on the cluster: {_first_line(exc)}"))
                continue
            self._count_build(info)
            if info["build"].artifact:
                self._artifacts[info["build"].digest] = data
            builds.append(info["build"])
        return builds

    def run(self, inputs: list[MeasureInput], builds: list[BuildResult]) -> list[MeasureResult]:
        """The ``Runner`` protocol: the candidates measured on every runner of their target at once."""
        tickets = self.submit(inputs, builds)
        results: dict[int, MeasureResult] = {}
        while len(results) < len(tickets):
            for ticket, result in self.wait():
                results[ticket] = result
        return [results[t] for t in tickets]

    def _artifact_of(self, build: BuildResult):
        """The artifact's bytes in the object store: from ``build``, or read from a local path."""
        ref = self._artifacts.pop(build.digest, None) if build.digest else None
        if ref is None and build.artifact and Path(build.artifact).is_file():
            ref = ray.put(Path(build.artifact).read_bytes())
        return ref

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        for runner in self.runners:
            try:
                ray.kill(runner.actor)  # its worker processes die with it
            except Exception:
                pass
        self.runners = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False
        if self._put_back_token is not None:
            self._put_back_token()
            self._put_back_token = None

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _connect(address: ClusterAddress) -> tuple[bool, Callable[[], None] | None]:
    """Connect this process to the cluster. Returns whether it started Ray here (and so stops
    it), and what puts back the environment after, where a new local cluster was given a
    token there (``local_token``)."""
    if ray.is_initialized():
        return False, None
    check_reachable(address)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports unless the user asks for them
    put_back = use_a_process_token(address.ray_address)
    # ray.init puts its own SIGTERM handler (a native stack dump, exit 15) over the CLI's, which
    # ends the job as an interrupt does: keep the CLI's
    on_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        ray.init(address=address.ray_address, include_dashboard=False, log_to_driver=False,
                 logging_level=logging.WARNING)
    except Exception as exc:  # ConnectionError, RuntimeError, ValueError: all one line for the user
        if put_back is not None:
            put_back()
        raise ClusterError(f"cannot connect to the Ray cluster {address}: {_first_line(exc)}") from None
    finally:
        if on_sigterm is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, on_sigterm)
    return True, put_back


def _first_line(exc: BaseException) -> str:
    text = _one_line(str(exc)) or type(exc).__name__
    return text[:300]
