"""What runs on the nodes of a Ray cluster: the build task and the runner actor.

Both reuse the local machinery as it is: a build runs ``LocalBuilder`` (a compiler that
aborts or hangs takes only its worker process with it, and the kernel cache is the node's),
a runner actor owns a ``LocalRunner`` (every candidate in a worker process of its own under
the watchdog). What a cluster adds is moving the artifact bytes (no shared file system is
assumed: a build returns them, the runner writes them into its node's kernel cache) and
keeping builds off the cores a runner times on.

Cores: Ray counts CPUs but pins nothing, so both sides pin themselves. On a node, the runners
take cores from the end of the node's list (runner ``slot`` s with k cores each takes the
k cores before the last s*k), the builds every core before them. Ray's CPU accounting
(``num_cpus`` of the actor) keeps the number of builds on the node to the cores left.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path
from typing import Any

from ..backends import get_backend
from ..builder import LocalBuilder, _atomic_write, artifact_path, default_cache_dir
from ..runner import LocalRunner
from ..timing import TimingPolicy
from ..types import BuildResult, MeasureInput, MeasureResult


def node_cores() -> list[int]:
    """Every core of this node that Ray's processes may use (the raylet's, this worker's parent:
    a worker reused from an earlier pinned task would see only its own)."""
    for pid in (os.getppid(), 0):
        try:
            return sorted(os.sched_getaffinity(pid))
        except OSError:
            continue
    return list(range(os.cpu_count() or 1))


def runner_cores(cores: list[int], slot: int, per_runner: int) -> list[int]:
    """The cores runner ``slot`` of a node times on (from the end of the node's list)."""
    end = len(cores) - slot * per_runner
    start = end - per_runner
    if start < 0:  # more runners than cores (GPU hosts with few CPUs): share, round the list
        return [cores[(start + i) % len(cores)] for i in range(per_runner)]
    return cores[start:end]


def build_cores(cores: list[int], reserved: int) -> list[int]:
    """The cores builds may use on a node whose runners reserve ``reserved`` cores."""
    return cores[:len(cores) - reserved] or cores


def pin_process(cores: list[int]) -> None:
    """Pin every thread of this process (threads and processes started later inherit it)."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except OSError:  # a thread that ended meanwhile
            pass


def node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


# ----------------------------------------------------------------------------- building

_builder: tuple[tuple[float, int], LocalBuilder] | None = None  # one per Ray worker process


def _local_builder(timeout_s: float, reserved: int) -> LocalBuilder:
    """This Ray worker's builder, pinned to the node's build cores before its worker starts."""
    global _builder
    if _builder is None or _builder[0] != (timeout_s, reserved):
        if _builder is not None:
            _builder[1].close()
        pin_process(build_cores(node_cores(), reserved))
        _builder = ((timeout_s, reserved), LocalBuilder(n_parallel=1, timeout_s=timeout_s))
    return _builder[1]


def build_on_node(inp: MeasureInput, module: str, timeout_s: float,
                  reserved: dict[str, int]) -> tuple[dict[str, Any], bytes | None]:
    """A Ray task (two returns): ({"build": BuildResult, "node", "cores"}, the artifact's bytes).

    ``module`` is the template's module (plugins included), imported before the space is
    read; ``reserved``: the cores the runners hold per node id."""
    importlib.import_module(module)
    node = node_id()
    builder = _local_builder(timeout_s, reserved.get(node, 0))
    build = builder.build([inp])[0]
    data = Path(build.artifact).read_bytes() if build.artifact else None
    return {"build": build, "node": node, "cores": sorted(os.sched_getaffinity(0))}, data


# ----------------------------------------------------------------------------- measuring


def _holds(path: Path, data: bytes) -> bool:
    try:
        return path.read_bytes() == data
    except OSError:
        return False


class MeasureRunner:
    """A Ray actor that measures one candidate at a time on one device of its node: the CPU
    cores it is pinned to, or the GPU Ray gave it (``num_gpus=1``: its device 0)."""

    def __init__(self, kind: str, slot: int, cores_per_runner: int, timeout_s: float, seed: int,
                 check: bool = True, prepare_timeout_s: float | None = None):
        self.kind = kind
        self.cores = runner_cores(node_cores(), slot, cores_per_runner)
        pin_process(self.cores)  # before the runner's worker process is started
        # no prepare timeout given: the runner's own for this target
        prepare = {"prepare_timeout_s": prepare_timeout_s} if prepare_timeout_s is not None else {}
        self.runner = LocalRunner(timeout_s=timeout_s, seed=seed, check=check, kind=kind, devices=(0,), **prepare)
        self.cache_dir = default_cache_dir()

    def describe(self) -> dict[str, Any]:
        """What this runner measures on: its target (the CPU as its cores see it, or the GPU)."""
        target = get_backend(self.kind).device_target(0, self.cores)
        return {"target": target, "node": node_id(), "cores": self.cores, "pid": os.getpid()}

    def set_policy(self, policy: TimingPolicy | None) -> None:
        if policy is not None:
            self.runner.policy = policy

    def measure(self, inp: MeasureInput, build: BuildResult, artifact: bytes, module: str) -> MeasureResult:
        importlib.import_module(module)  # the template (a plugin's too) is known here before it is run
        path = artifact_path(self.cache_dir, build.digest, inp.target)
        if not _holds(path, artifact):  # content-addressed, but a file there may be damaged
            path.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(path, artifact)
        return self.runner.run([inp], [dataclasses.replace(build, artifact=str(path))])[0]

    def close(self) -> None:
        self.runner.close()
