"""The CUDA backend: CUDA C -> cubin with nvcc, run through pycuda, one worker per GPU.

Each worker sees one GPU through ``CUDA_VISIBLE_DEVICES`` and owns its primary context
(``CudaSession``): a stream, a buffer twice the size of L2, and per task the device copies of
the inputs and the output buffers (each followed by guard bytes). A candidate's cubin is
loaded from memory (``module_from_buffer``); kernels using dynamic shared memory get the
opt-in attribute for what they ask (past 48 KB they need it). The verification launch runs on
outputs poisoned with NaN; timing uses CUDA events around each launch, each preceded by a
write over the L2 buffer so that no launch finds its operands cached by the previous one. The
SM clock is read through NVML when the library is there.

Driver errors become ``KernelFault``s classified by ``measure.cuda_errors``: a refused
launch is OUT_OF_RESOURCES, a fault while the kernel runs is a sticky RUNTIME_ERROR (the
worker is replaced). pycuda is imported only inside the workers, so this module imports on
machines without it.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from runtime import tensor_map
from search_space import KernelSource, Target, Task

from .. import compile_cuda
from ..cuda_errors import classify_cuda_error
from ..task_data import TaskData
from ..timing import TimingPolicy, summarize
from ..types import MeasureError
from ..verify import GUARD_BYTES, GUARD_PATTERN
from .base import Backend, Candidate, InProcessKernels, KernelFault, Session

# Each timed sample is one launch (events have ~0.5 us resolution): many samples, bounded time.
CUDA_POLICY = TimingPolicy(warmup=3, min_sample_s=0.0, repeats=50, min_repeats=10, max_total_s=1.0)
MIN_FLUSH_BYTES = 64 << 20
_POISON = {"float32": (4, 0x7FC00000), "float16": (2, 0x7E00), "bfloat16": (2, 0x7FC0), "uint8": (1, 0xFF),
           "int32": (4, 0x7FFFFFFF)}


def visible_device(device: int) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a worker only GPU ``device`` of this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device >= len(ids):
            raise ValueError(f"GPU {device} is not visible (CUDA_VISIBLE_DEVICES={visible})")
        return ids[device]
    return str(device)


def _fault(exc: Exception, what: str, during_launch: bool = False) -> KernelFault:
    error, sticky = classify_cuda_error(str(exc), during_launch)
    return KernelFault(error, f"{what}: {exc}" if what else str(exc), sticky)


class _Output:
    """A device output buffer followed by GUARD_BYTES."""

    def __init__(self, drv, shape: tuple[int, ...], dtype: str):
        from search_space.ops.common import numpy_dtype

        self.shape, self.dtype = shape, dtype
        self.nbytes = int(np.prod(shape)) * numpy_dtype(dtype).itemsize
        self.alloc = drv.mem_alloc(self.nbytes + GUARD_BYTES)


class CudaSession(Session):
    """This worker's GPU: the primary context, a stream, the L2 flush buffer, the task's buffers."""

    def __init__(self) -> None:
        if "torch" in sys.modules:  # let torch create the primary context first; share it
            import torch

            if torch.cuda.is_available():
                torch.cuda.init()
                torch.cuda.current_device()
        import pycuda.driver as drv

        import pycuda.autoprimaryctx as primary  # noqa: F401 - retains and pushes the primary context

        from ..nvml import SmClock

        self.drv = drv
        self.device = primary.device
        self.device_name = self.device.name()
        self.stream = drv.Stream()
        l2 = self.device.get_attribute(drv.device_attribute.L2_CACHE_SIZE)
        self.flush_bytes = max(2 * l2, MIN_FLUSH_BYTES) // 4 * 4
        self.flush = drv.mem_alloc(self.flush_bytes)
        self.clock = SmClock(self.device.pci_bus_id())
        self.task_key: str | None = None
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, _Output] = {}

    def load(self, artifact: bytes, source: KernelSource, target: Target, task: Task, data: TaskData) -> Candidate:
        self._upload(data, source, task.dims)
        return CudaCandidate(self, artifact, source, task, data)

    def _upload(self, data: TaskData, source: KernelSource, dims: dict[str, int]) -> None:
        """Device copies of the task's inputs and its output buffers (kept while the task lasts)."""
        if self.task_key == data.key:
            return
        self.forget_inputs()
        try:
            for arg in source.args:
                if arg.role == "in":
                    host = data.inputs[arg.name]
                    alloc = self.drv.mem_alloc(max(host.nbytes, 1))
                    self.drv.memcpy_htod(alloc, host)
                    self.inputs[arg.name] = alloc
                elif arg.role == "out":
                    self.outputs[arg.name] = _Output(self.drv, arg.resolve_shape(dims), arg.dtype)
        except self.drv.Error as exc:
            self.forget_inputs()
            raise _fault(exc, "copying the inputs to the GPU") from None
        self.task_key = data.key

    def forget_inputs(self) -> None:
        for alloc in [*self.inputs.values(), *(o.alloc for o in self.outputs.values())]:
            alloc.free()
        self.inputs, self.outputs, self.task_key = {}, {}, None

    def poison(self) -> None:
        """Outputs NaN (so what a kernel never wrote shows), their guards the known pattern."""
        drv = self.drv
        for out in self.outputs.values():
            drv.memset_d8_async(out.alloc, GUARD_PATTERN, out.nbytes + GUARD_BYTES, self.stream)
            width, pattern = _POISON[out.dtype]
            count = out.nbytes // width
            if width == 4:
                drv.memset_d32_async(out.alloc, pattern, count, self.stream)
            elif width == 2:
                drv.memset_d16_async(out.alloc, pattern, count, self.stream)
            else:
                drv.memset_d8_async(out.alloc, pattern, count, self.stream)

    def flush_l2(self, value: int) -> None:
        self.drv.memset_d32_async(self.flush, value, self.flush_bytes // 4, self.stream)


class CudaCandidate(Candidate):
    def __init__(self, session: CudaSession, cubin: bytes, source: KernelSource, task: Task, data: TaskData):
        self.session = session
        self.data = data
        self.module = None
        self.workspaces: dict[str, Any] = {}
        drv = session.drv
        try:
            try:
                for arg in source.args:
                    if arg.role == "workspace":
                        alloc = drv.mem_alloc(max(arg.nbytes, 4))
                        self.workspaces[arg.name] = alloc
                        drv.memset_d8(alloc, 0, max(arg.nbytes, 4))  # counters and partial sums start at zero
            except drv.Error as exc:
                raise _fault(exc, "allocating its workspace") from None
            try:
                self.launch = self._launcher(source, cubin, task.dims)
            except drv.Error as exc:
                raise _fault(exc, "launch refused", during_launch=True) from None
            except RuntimeError as exc:
                raise _fault(exc, "", during_launch=True) from None
        except BaseException:
            self.close()
            raise

    def _launcher(self, source: KernelSource, cubin: bytes, dims: dict[str, int]):
        """launch(), once the cubin is loaded; raises the driver's error when it refuses."""
        from search_space.codegen.cuda import resolve_launch

        gpu, drv = self.session, self.session.drv
        self.module = drv.module_from_buffer(cubin)
        func = self.module.get_function(source.entry)
        grid, block, smem = resolve_launch(source.launch_dims, dims)
        if smem > 0:
            # past 48 KB (static + dynamic) a kernel must opt in; static smem is not known here,
            # so any kernel with dynamic shared memory opts in for exactly what it asks
            func.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
        allowed = func.get_attribute(drv.function_attribute.MAX_THREADS_PER_BLOCK)
        threads = math.prod(block)
        if threads > allowed:
            raise RuntimeError(f"too many resources requested for launch: {threads} threads per block, "
                               f"the kernel allows {allowed}")
        pointers = {}
        for arg in source.args:
            if arg.name in gpu.inputs:
                pointers[arg.name] = int(gpu.inputs[arg.name])
            elif arg.name in self.workspaces:
                pointers[arg.name] = int(self.workspaces[arg.name])
            elif arg.role == "out":
                pointers[arg.name] = int(gpu.outputs[arg.name].alloc)
        values = tensor_map.bound_values(drv, source.args, pointers, dims)
        values += [np.int64(dims[a.name]) for a in source.args if a.role == "scalar"]
        func.prepare(tensor_map.prepared_types(source.args))

        def launch() -> None:
            func.prepared_async_call(grid, block, gpu.stream, *values, shared_size=smem)

        return launch

    def run(self) -> float:
        gpu, drv = self.session, self.session.drv
        try:
            gpu.poison()
            start, end = drv.Event(), drv.Event()
            start.record(gpu.stream)
            self.launch()
            end.record(gpu.stream)
        except drv.Error as exc:
            raise _fault(exc, "launch refused", during_launch=True) from None
        except RuntimeError as exc:
            raise _fault(exc, "", during_launch=True) from None
        try:
            end.synchronize()
        except drv.Error as exc:
            raise _fault(exc, "kernel failed") from None
        return end.time_since(start) * 1e-3

    def outputs(self) -> tuple[dict[str, np.ndarray], list[str]]:
        from search_space.ops.common import numpy_dtype

        got, overrun = {}, []
        try:
            for name, out in self.session.outputs.items():
                host = np.empty(out.nbytes + GUARD_BYTES, dtype=np.uint8)
                self.session.drv.memcpy_dtoh(host, out.alloc)
                got[name] = host[:out.nbytes].view(numpy_dtype(out.dtype)).reshape(out.shape)
                if (host[out.nbytes:] != GUARD_PATTERN).any():
                    overrun.append(name)
        except self.session.drv.Error as exc:
            raise _fault(exc, "kernel failed") from None
        return got, overrun

    def modified_inputs(self) -> list[str]:
        changed = []
        try:
            for name, alloc in self.session.inputs.items():
                host = self.data.inputs[name]
                back = np.empty_like(host)
                self.session.drv.memcpy_dtoh(back, alloc)
                if not np.array_equal(back.reshape(-1).view(np.uint8), host.reshape(-1).view(np.uint8)):
                    changed.append(name)
        except self.session.drv.Error as exc:
            raise _fault(exc, "kernel failed") from None
        return changed

    def time(self, policy: TimingPolicy, first_s: float) -> dict[str, Any]:
        gpu, drv = self.session, self.session.drv
        repeats = max(policy.min_repeats, min(policy.repeats, int(policy.max_total_s / max(first_s, 1e-7))))
        try:
            for _ in range(policy.warmup):
                self.launch()
            starts = [drv.Event() for _ in range(repeats)]
            ends = [drv.Event() for _ in range(repeats)]
            clock_before = gpu.clock.read()
            for i in range(repeats):
                gpu.flush_l2(i)
                starts[i].record(gpu.stream)
                self.launch()
                ends[i].record(gpu.stream)
            ends[-1].synchronize()
            clock_after = gpu.clock.read()
            costs = [e.time_since(s) * 1e-3 for s, e in zip(starts, ends)]
        except drv.Error as exc:
            raise _fault(exc, "kernel failed while timed") from None
        stats = {**summarize(costs), "costs": costs, "repeats": repeats, "first_s": first_s,
                 "l2_flush_bytes": gpu.flush_bytes, "device": gpu.device_name}
        clocks = [c for c in (clock_before, clock_after) if c]
        if clocks:
            stats["sm_clock_mhz"] = int(np.mean(clocks))
        return stats

    def close(self) -> None:
        for alloc in self.workspaces.values():
            try:
                alloc.free()
            except Exception:  # a poisoned context refuses even this; the worker is replaced anyway
                pass
        self.workspaces = {}
        self.module = None


class CudaKernels(InProcessKernels):
    """Cubins from the build cache, launched through pycuda as a library's kernels are (one
    context and stream for all of them, ``runtime.library_cuda``)."""

    def __init__(self) -> None:
        self._modules = None

    def kernel(self, artifact: Path, source: KernelSource, task: Task, target: Target,
               meta: Mapping[str, Any]):
        from runtime.library_cuda import CudaModules

        if self._modules is None:
            self._modules = CudaModules()
        artifact = Path(artifact)
        record = {"cubin": artifact.name, "symbol": source.entry, "entry": source.entry,
                  "launch": source.launch_dims, **meta}
        return self._modules.kernel(artifact.parent, record, task, source.args)

    def close(self) -> None:
        if self._modules is not None:
            self._modules.close()
            self._modules = None


class CudaBackend(Backend):
    kind = "cuda"
    artifact_suffix = ".cubin"
    default_policy = CUDA_POLICY
    linked_library = False
    resource_report = True
    prepare_timeout_s = 900.0
    resident_decode = True
    gpu_devices = True

    def flags(self, target: Target) -> str:
        return compile_cuda.compile_flags(target)

    def compiler(self) -> str:
        return compile_cuda.compiler_version()

    def compile(self, source: KernelSource, target: Target) -> tuple[bytes, dict[str, Any]]:
        return compile_cuda.compile_to_cubin(source, target)

    def build_problems(self, source: KernelSource, stats: Mapping[str, Any], target: Target,
                       dims: Mapping[str, int]) -> list[str]:
        from ..resources import cuda_resource_problems

        return cuda_resource_problems(source, stats, target, dims)

    def launch_stats(self, source: KernelSource, stats: Mapping[str, Any], target: Target,
                     dims: Mapping[str, int]) -> dict[str, Any]:
        from ..resources import cuda_occupancy

        if "registers" not in stats:
            return {}
        return {"occupancy": round(cuda_occupancy(source, stats, target, dims), 4)}

    def toolchain_problem(self) -> str | None:
        try:
            compile_cuda.nvcc_path()
        except compile_cuda.CudaCompileError as exc:
            return str(exc)
        return None

    def worker_env(self, device: int) -> dict[str, str | None]:
        return {"CUDA_VISIBLE_DEVICES": visible_device(device)}

    def classify(self, message: str) -> tuple[MeasureError, bool]:
        return classify_cuda_error(message)

    def device_target(self, device: int, cores: Sequence[int]) -> Target:
        return Target.cuda(device)

    def open_session(self) -> Session:
        global _SESSION
        if _SESSION is None:
            _SESSION = CudaSession()
        return _SESSION

    def in_process_kernels(self) -> InProcessKernels:
        return CudaKernels()

    def library_object(self, source: KernelSource, symbol: str, target: Target) -> bytes:
        """The cubin tuning built when the kernel cache still holds it (same source, same nvcc
        and flags), else nvcc's. A cubin keeps its entry's name: each is a module of its own."""
        from ..builder import cached_artifact, default_cache_dir

        cached = cached_artifact(default_cache_dir(), source, target)
        if cached is not None:
            return cached[0].read_bytes()
        return compile_cuda.compile_to_cubin(source, target)[0]

    def library_symbol(self, source: KernelSource, symbol: str) -> str:
        return source.entry

    def cannot_check_here(self, target: Target) -> str | None:
        return "CUDA kernels are checked when they run on a GPU, not at export"


_SESSION: CudaSession | None = None
BACKEND = CudaBackend()
