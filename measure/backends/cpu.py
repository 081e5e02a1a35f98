"""The CPU backend: LLVM IR -> object code (llvmlite), linked in memory by MCJIT, called
through ctypes on numpy arrays.

Kernels run on the task's kept input arrays themselves (no copy of hundreds of MB per
candidate), so inputs a kernel wrote to are made again. Each output is followed by guard
bytes, so a write a little past its end is seen. Timing calls the kernel through a compiled
repeat harness (``measure.cpu_kernel``), cycling over copies of the inputs when the policy
times a cold cache (``TimingPolicy.cold_bytes``).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from search_space import KernelSource, Target, Task
from search_space.registry import op_definition

from .. import compile_llvm
from ..task_data import TaskData, input_digest
from ..timing import MAX_COPIES, MAX_RESIDENT_COPIES, TimingPolicy, condition_of, time_calls
from .base import Backend, Candidate, InProcessKernels, Session


class CpuCandidate(Candidate):
    def __init__(self, kernel, source: KernelSource, task: Task, data: TaskData, buffers: dict[str, np.ndarray]):
        self.kernel = kernel
        self.source = source
        self.dims = task.dims
        self.data = data
        self.buffers = buffers  # the kept input arrays, guarded outputs, workspaces
        op = op_definition(task.op)
        self.resident = op.resident_inputs(task)  # what cold timing cycles
        self.read_share = op.resident_read_share(task)  # of their bytes, what a call reads

    def run(self) -> float:
        start = time.perf_counter()
        self.kernel(self.buffers, self.dims)
        return time.perf_counter() - start

    def outputs(self) -> tuple[dict[str, np.ndarray], list[str]]:
        from ..cpu_kernel import overran

        names = [a.name for a in self.source.args if a.role == "out"]
        return {name: self.buffers[name] for name in names}, [name for name in names if overran(self.buffers[name])]

    def modified_inputs(self) -> list[str]:
        return [name for name, digest in self.data.digests.items()
                if name in self.buffers and input_digest(self.buffers[name]) != digest]

    def time(self, policy: TimingPolicy, first_s: float) -> dict[str, Any]:
        sets = cold_copies(self.source, self.buffers, policy.cold_bytes, self.resident, policy.activations_in_cache,
                           self.read_share)
        timing = time_calls(self.kernel.rotation(sets, self.dims), policy, first_call_s=first_s)
        if len(sets) > 1:
            timing["input_copies"] = len(sets)
            # what one cycle reads; also marks a record whose samples go on through the cycle
            # (before, each one started again at the first copy: autotune.tune_model warns of those)
            copied = sum(a.nbytes for name, a in sets[0].items() if sets[1][name] is not a)
            timing["cycle_bytes"] = int(len(sets) * copied * self.read_share)
        timing["cache"] = condition_of(policy)  # kept in the record: what situation the time is for
        return timing


def cold_copies(source: KernelSource, buffers: dict[str, np.ndarray], cold_bytes: int,
                resident: Sequence[str] = (), activations_in_cache: bool = False,
                read_share: float = 1.0) -> list[dict]:
    """``buffers`` and enough copies of its inputs to fill ``cold_bytes`` (see TimingPolicy).

    With ``resident`` inputs (a model's weights or KV cache: ``Operator.resident_inputs``) only
    those are copied, as many times as it takes (at most ``MAX_RESIDENT_COPIES``): each call then
    finds its weights as far back as in the model, whatever their size, while the activations
    stay where the kernel before left them. Without, every input is copied, at most
    ``MAX_COPIES`` times, so that small inputs stay in cache; none with
    ``activations_in_cache`` (in a model they were just written). ``read_share``: the share of
    the resident inputs' bytes a call reads (``Operator.resident_read_share``); the copies are
    counted by those bytes."""
    inputs = [a.name for a in source.args if a.role == "in"]
    weights = [name for name in inputs if name in resident]
    copied = weights or ([] if activations_in_cache else inputs)
    if not copied:
        return [buffers]
    copied_bytes = sum(buffers[name].nbytes for name in copied)
    if weights:
        copied_bytes = int(copied_bytes * read_share)
    cap = MAX_RESIDENT_COPIES if weights else MAX_COPIES
    copies = min(cap, -(-cold_bytes // max(copied_bytes, 1))) if cold_bytes > copied_bytes else 1
    return [buffers] + [dict(buffers, **{name: buffers[name].copy() for name in copied}) for _ in range(copies - 1)]


class CpuSession(Session):
    runs_on_kept_inputs = True

    def load(self, artifact: bytes, source: KernelSource, target: Target, task: Task, data: TaskData) -> Candidate:
        from ..cpu_kernel import allocate_args, load_object

        buffers = allocate_args(source, task.dims, data.inputs, poison=True)  # first: it may not fit
        return CpuCandidate(load_object(artifact, source, target), source, task, data, buffers)


class CpuKernels(InProcessKernels):
    """Object code linked into this process by MCJIT, each kernel called through ctypes."""

    def kernel(self, artifact: Path, source: KernelSource, task: Task, target: Target,
               meta: Mapping[str, Any]):
        from runtime.kernel import Kernel

        from ..cpu_kernel import load_object

        loaded = load_object(Path(artifact).read_bytes(), source, target)
        return Kernel(task, source.args, loaded.entry, meta["tuned"], meta["seconds"], dict(meta["config"]),
                      source.entry, keepalive=loaded)


class CpuBackend(Backend):
    kind = "cpu"
    artifact_suffix = ".o"
    default_policy = TimingPolicy()
    linked_library = True
    cache_conditions = True

    def flags(self, target: Target) -> str:
        return compile_llvm.compile_flags(target)

    def compiler(self) -> str:
        return compile_llvm.compiler_version()

    def compile(self, source: KernelSource, target: Target) -> tuple[bytes, dict[str, Any]]:
        obj = compile_llvm.compile_to_object(source.code, target)
        return obj, {"artifact_bytes": len(obj)}

    def device_target(self, device: int, cores: Sequence[int]) -> Target:
        import dataclasses

        return dataclasses.replace(Target.host(), cores=len(cores))  # host() of a reused process may predate pinning

    def open_session(self) -> Session:
        return _SESSION

    def in_process_kernels(self) -> InProcessKernels:
        return CpuKernels()

    def library_object(self, source: KernelSource, symbol: str, target: Target) -> bytes:
        # the entry renamed to a name unique in the library, everything else internal
        return compile_llvm.compile_library_object(source.code, source.entry, symbol, target)

    def cannot_check_here(self, target: Target) -> str | None:
        host = Target.host()
        if target.key != host.key:  # its kernels may use instructions this CPU lacks
            return f"compiled for {target.key}, not this CPU ({host.key}): not checked here"
        return None


_SESSION = CpuSession()  # the CPU needs no per-process setup
BACKEND = CpuBackend()
