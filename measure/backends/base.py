"""The interface every target's backend implements.

A backend is what differs between targets; everything else is shared. It is used in three
places:

- building (build workers): ``compile`` a candidate's source into an artifact, named by
  ``artifact_suffix`` in the kernel cache and keyed by ``flags``; ``build_problems`` turns
  away what compiled but can never launch on the target;
- running: the parent names each worker's environment (``worker_env``) and classifies the
  messages of exceptions that escaped a worker (``classify``); a worker opens one
  ``Session`` on its device, in which it loads each candidate on the task's kept inputs,
  runs it once on poisoned outputs and times it (``Candidate``). The order of these steps,
  the verification and the mapping of every failure to an error are the runner's
  (``measure.runner``), the same for every target;
- exporting a library: ``library_object`` (the artifact a library ships for one kernel),
  ``library_symbol``, ``linked_library`` and ``cannot_check_here``.

A fault the backend recognises while a candidate is loaded or runs is raised as a
``KernelFault`` carrying its error; a sticky one leaves the device unusable in that process,
and the runner replaces the worker.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from ..types import MeasureError

if TYPE_CHECKING:
    import numpy as np

    from pathlib import Path

    from runtime.kernel import Kernel
    from search_space import KernelSource, Target, Task

    from ..task_data import TaskData
    from ..timing import TimingPolicy


class KernelFault(Exception):
    """A candidate failed in a way its backend recognises; ``sticky``: the worker must go."""

    def __init__(self, error: MeasureError, message: str, sticky: bool = False):
        super().__init__(message)
        self.error = error
        self.message = message
        self.sticky = sticky

    def reply(self) -> dict[str, Any]:
        return {"error": self.error.name, "message": self.message, "sticky": self.sticky}


class Candidate(ABC):
    """One candidate loaded in a worker, bound to its task's inputs and fresh outputs."""

    @abstractmethod
    def run(self) -> float:
        """Call the kernel once on outputs poisoned first (NaN); the seconds it took."""

    @abstractmethod
    def outputs(self) -> tuple[dict[str, np.ndarray], list[str]]:
        """What that call wrote: every output as a host array, and the names of the outputs
        it wrote past the end of."""

    @abstractmethod
    def modified_inputs(self) -> list[str]:
        """Names of the inputs whose bytes are no longer those they were made with."""

    @abstractmethod
    def time(self, policy: TimingPolicy, first_s: float) -> dict[str, Any]:
        """Time the kernel as ``policy`` says: ``{"costs": [seconds per call, ...], **stats}``."""

    def close(self) -> None:
        """Free what the candidate holds (not the task's inputs)."""


class Session(ABC):
    """A worker's hold on its device, opened once per worker process."""

    device_name: str = ""
    # the kernel runs on the kept host inputs themselves (no device copy): inputs it wrote to
    # are damaged for good and must be made again, not copied again
    runs_on_kept_inputs: ClassVar[bool] = False

    @abstractmethod
    def load(self, artifact: bytes, source: KernelSource, target: Target, task: Task, data: TaskData) -> Candidate:
        """The candidate ready to run: its code loaded, the task's inputs on the device."""

    def forget_inputs(self) -> None:
        """A candidate wrote to the inputs: copies of them on the device are made again."""


class InProcessKernels(ABC):
    """Built kernels opened in this process as the runtime calls them (``runtime.kernel.Kernel``):
    what ``export.TunedKernels`` hands a model. Holds what they share (a device context)."""

    @abstractmethod
    def kernel(self, artifact: Path, source: KernelSource, task: Task, target: Target,
               meta: Mapping[str, Any]) -> Kernel:
        """The kernel built at ``artifact``; ``meta``: tuned, seconds, config (kept on the Kernel)."""

    def close(self) -> None:
        """Free what the kernels share; kernels handed out stop working."""


class Backend(ABC):
    kind: ClassVar[str]                # the Target.kind it serves
    artifact_suffix: ClassVar[str]     # of compiled artifacts in the kernel cache
    default_policy: ClassVar[TimingPolicy]
    linked_library: ClassVar[bool]     # an exported library links its kernels into one shared object
    # timing picks a cold or a warm cache per job (a CPU's caches outlive a kernel call); False
    # where every timed call starts cold anyway (the CUDA runner flushes L2 before each launch)
    cache_conditions: ClassVar[bool] = False
    # builds report registers, shared memory and spills (``tune --compile-only`` prints them)
    resource_report: ClassVar[bool] = False
    prepare_timeout_s: ClassVar[float] = 600.0  # making and uploading one task's inputs
    # a model's decode step runs on device memory as one replayable graph (runtime.llama)
    resident_decode: ClassVar[bool] = False
    gpu_devices: ClassVar[bool] = False  # a device is a GPU: a cluster places a runner per GPU

    # ------------------------------------------------------------------ building

    @abstractmethod
    def flags(self, target: Target) -> str:
        """Everything besides the source that decides the artifact: part of the cache key."""

    def compiler(self) -> str:
        """The compiler and its version that ``compile`` uses here ("" when unknown): kept in
        each record and beside each cached artifact, part of the code identity."""
        return ""

    @abstractmethod
    def compile(self, source: KernelSource, target: Target) -> tuple[bytes, dict[str, Any]]:
        """Source -> artifact bytes and build stats. Runs in a build worker: it may abort."""

    def build_problems(self, source: KernelSource, stats: Mapping[str, Any], target: Target,
                       dims: Mapping[str, int]) -> list[str]:
        """Why a compiled candidate can never launch on ``target`` (from its build stats)."""
        return []

    def launch_stats(self, source: KernelSource, stats: Mapping[str, Any], target: Target,
                     dims: Mapping[str, int]) -> dict[str, Any]:
        """Build stats that depend on the launch as well as on the compiled code (added to a
        built candidate's stats)."""
        return {}

    def toolchain_problem(self) -> str | None:
        """Why this machine cannot compile for the target, or None."""
        return None

    # ------------------------------------------------------------------ running

    def worker_env(self, device: int) -> dict[str, str | None]:
        """Environment of the worker that measures on ``device`` (None removes a variable)."""
        return {}

    def classify(self, message: str) -> tuple[MeasureError, bool]:
        """(error, sticky) for the message of an exception that escaped a worker's job."""
        return MeasureError.RUNTIME_ERROR, False

    @abstractmethod
    def device_target(self, device: int, cores: Sequence[int]) -> Target:
        """The target a runner measures on: its ``device`` (a GPU), or the CPU ``cores`` it is pinned to."""

    @abstractmethod
    def open_session(self) -> Session:
        """This worker process's session (opened on first use, then the same one)."""

    @abstractmethod
    def in_process_kernels(self) -> InProcessKernels:
        """A loader of built kernels into this process, for the runtime (``export.TunedKernels``)."""

    # ------------------------------------------------------------------ exporting

    @abstractmethod
    def library_object(self, source: KernelSource, symbol: str, target: Target) -> bytes:
        """The artifact an exported library ships for this kernel (runs in a worker)."""

    def library_symbol(self, source: KernelSource, symbol: str) -> str:
        """The name a deployment calls the kernel by in its library artifact."""
        return symbol

    def cannot_check_here(self, target: Target) -> str | None:
        """Why an exported library for ``target`` cannot be run on this machine to check it, or None."""
        return None
