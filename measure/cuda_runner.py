"""Run built CUDA candidates on GPUs: one worker process per GPU owns its pycuda context.

Each worker (a fresh interpreter, ``measure.worker.WorkerProcess``) sees one GPU through
``CUDA_VISIBLE_DEVICES`` and keeps, per task, the random inputs, their float64 reference and
the device copies of both inputs and outputs. A candidate's cubin is loaded from memory
(``module_from_buffer``); kernels using dynamic shared memory get the opt-in attribute for
what they ask (past 48 KB they need it). Outputs are poisoned with NaN and workspaces
zeroed before the first launch, which is verified against the reference; then the kernel
is timed with CUDA events, each timed launch preceded by a write over a buffer twice the
size of L2 so that no launch finds its operands cached by the previous one. The SM clock is read through
NVML (ctypes) when the library is there.

Failures are values: a launch the driver refuses (too many resources) is
OUT_OF_RESOURCES; a fault while the kernel runs (illegal address, misaligned access, trap)
is RUNTIME_ERROR, and because such errors poison the CUDA context the worker is killed and
replaced; a kernel that never ends is RUN_TIMEOUT (the watchdog kills the worker); a dead
worker is WORKER_CRASH; a wrong result is WRONG_ANSWER, and so is a kernel that wrote to its
inputs (the device inputs are read back and compared with the host copies after the
verification launch and after timing; written ones are uploaded again). The job goes on in
every case.

pycuda is imported only inside the workers, so this module imports on machines without it.
"""
from __future__ import annotations

import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from search_space import KernelSource, Target, Task, get_template, template_module

from .timing import TimingPolicy, summarize
from .types import BuildResult, MeasureError, MeasureInput, MeasureResult
from .worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout, close_all

# Each timed sample is one launch (events have ~0.5 us resolution): many samples, bounded time.
CUDA_POLICY = TimingPolicy(warmup=3, min_sample_s=0.0, repeats=50, min_repeats=10, max_total_s=1.0)
MIN_FLUSH_BYTES = 64 << 20

# ----------------------------------------------------------------------------- error classes

# Errors that leave the CUDA context unusable: every later call in that process fails too.
_STICKY = ("illegal memory access", "illegal address", "misaligned address", "unspecified launch failure",
           "illegal instruction", "hardware stack error", "invalid program counter", "exception on device",
           "launch timed out", "launch failed", "mmu fault", "uncorrectable ecc", "invalid pc", "trap",
           "assert", "cooperative launch", "context is destroyed", "operation not permitted when stream is capturing",
           "cuda_error_launch_failed", "cuda_error_illegal")
_RESOURCES = ("too many resources requested", "out of resources", "out of memory", "uses too much shared data",
              "shared memory", "invalid argument", "invalid value", "too many threads", "block size")


def classify_cuda_error(message: str, during_launch: bool = False) -> tuple[MeasureError, bool]:
    """(error, sticky) for a CUDA driver error message.

    ``during_launch``: the error came from setting up or enqueuing the launch (the driver
    checks block size, shared memory and registers there), not from the kernel running.
    """
    text = message.lower()
    if any(s in text for s in _STICKY):
        return MeasureError.RUNTIME_ERROR, True
    if any(s in text for s in _RESOURCES) and (during_launch or "resources" in text or "memory" in text):
        return MeasureError.OUT_OF_RESOURCES, False
    return MeasureError.RUNTIME_ERROR, False


def visible_device(device: int) -> str:
    """The CUDA_VISIBLE_DEVICES value that shows a worker only GPU ``device`` of this process."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if device >= len(ids):
            raise ValueError(f"GPU {device} is not visible (CUDA_VISIBLE_DEVICES={visible})")
        return ids[device]
    return str(device)


# ----------------------------------------------------------------------------- worker side

_POISON = {"float32": (4, 0x7FC00000), "float16": (2, 0x7E00), "bfloat16": (2, 0x7FC0), "uint8": (1, 0xFF),
           "int32": (4, 0x7FFFFFFF)}


class _Gpu:
    """This worker's GPU: the primary context, a stream, the L2 flush buffer, device inputs."""

    def __init__(self) -> None:
        if "torch" in sys.modules:  # let torch create the primary context first; share it
            import torch

            if torch.cuda.is_available():
                torch.cuda.init()
                torch.cuda.current_device()
        import pycuda.driver as drv

        import pycuda.autoprimaryctx as primary  # noqa: F401 - retains and pushes the primary context

        self.drv = drv
        self.device = primary.device
        self.stream = drv.Stream()
        l2 = self.device.get_attribute(drv.device_attribute.L2_CACHE_SIZE)
        self.flush_bytes = max(2 * l2, MIN_FLUSH_BYTES) // 4 * 4
        self.flush = drv.mem_alloc(self.flush_bytes)
        self.task_key: str | None = None
        self.inputs: dict[str, Any] = {}
        self.outputs: dict[str, Any] = {}
        self.name = self.device.name()
        self.clock = _SmClock(self.device.pci_bus_id())

    def upload(self, key: str, source: KernelSource, dims: dict[str, int], inputs: dict[str, np.ndarray]) -> None:
        """Device copies of the task's inputs and output buffers (kept while the task lasts)."""
        if self.task_key == key:
            return
        self.drop()
        from search_space.ops.common import numpy_dtype

        for arg in source.args:
            if arg.role == "in":
                host = np.ascontiguousarray(inputs[arg.name])
                alloc = self.drv.mem_alloc(max(host.nbytes, 1))
                self.drv.memcpy_htod(alloc, host)
                self.inputs[arg.name] = alloc
            elif arg.role == "out":
                shape = arg.resolve_shape(dims)
                nbytes = int(np.prod(shape)) * numpy_dtype(arg.dtype).itemsize
                self.outputs[arg.name] = (self.drv.mem_alloc(max(nbytes, 1)), shape, arg.dtype)
        self.task_key = key

    def modified_inputs(self, inputs: dict[str, np.ndarray]) -> list[str]:
        """Names of the device inputs whose bytes no longer match the host copies they came from."""
        changed = []
        for name, alloc in self.inputs.items():
            host = np.ascontiguousarray(inputs[name])
            back = np.empty_like(host)
            self.drv.memcpy_dtoh(back, alloc)
            if not np.array_equal(back.reshape(-1).view(np.uint8), host.reshape(-1).view(np.uint8)):
                changed.append(name)
        return changed

    def drop(self) -> None:
        for alloc in self.inputs.values():
            alloc.free()
        for alloc, _, _ in self.outputs.values():
            alloc.free()
        self.inputs, self.outputs, self.task_key = {}, {}, None

    def poison(self) -> None:
        for alloc, shape, dtype in self.outputs.values():
            width, pattern = _POISON[dtype]
            count = int(np.prod(shape))
            if width == 4:
                self.drv.memset_d32_async(alloc, pattern, count, self.stream)
            elif width == 2:
                self.drv.memset_d16_async(alloc, pattern, count, self.stream)
            else:
                self.drv.memset_d8_async(alloc, pattern, count, self.stream)

    def flush_l2(self, value: int) -> None:
        self.drv.memset_d32_async(self.flush, value, self.flush_bytes // 4, self.stream)


class _SmClock:
    """The SM clock in MHz through NVML (ctypes); None when NVML is not there."""

    def __init__(self, pci_bus_id: str):
        self.lib = None
        self.handle = None
        try:
            import ctypes

            lib = ctypes.CDLL("libnvidia-ml.so.1")
            if lib.nvmlInit_v2() != 0:
                return
            handle = ctypes.c_void_p()
            if lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(handle)) != 0:
                # NVML counts GPUs physically, as CUDA_VISIBLE_DEVICES names them
                visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
                if not visible.isdigit() or lib.nvmlDeviceGetHandleByIndex_v2(int(visible), ctypes.byref(handle)):
                    return
            self.lib, self.handle = lib, handle
        except OSError:
            pass

    def read(self) -> int | None:
        if self.lib is None:
            return None
        import ctypes

        clock = ctypes.c_uint()
        return int(clock.value) if self.lib.nvmlDeviceGetClockInfo(self.handle, 1, ctypes.byref(clock)) == 0 else None


_GPU: _Gpu | None = None


def _gpu() -> _Gpu:
    global _GPU
    if _GPU is None:
        _GPU = _Gpu()
    return _GPU


def prepare_cuda_task(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: inputs and reference for the task (kept), the GPU context, its name."""
    import importlib

    from .runner import _prepared

    importlib.import_module(payload["module"])
    _prepared(Task.from_dict(payload["task"]), "cuda", payload["seed"])
    gpu = _gpu()
    return {"device": gpu.name}


def _launcher(gpu: _Gpu, source: KernelSource, cubin: bytes, dims: dict[str, int], workspaces: dict[str, Any]):
    """(launch(), module) for one candidate; raises the driver's error when it refuses."""
    from search_space.codegen.cuda import resolve_launch

    drv = gpu.drv
    module = drv.module_from_buffer(cubin)
    func = module.get_function(source.entry)
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
    types, values = [], []
    for arg in source.args:
        if arg.role == "scalar":
            types.append(np.int64)
            values.append(np.int64(dims[arg.name]))
        else:
            types.append(np.uintp)
            if arg.name in gpu.inputs:
                alloc = gpu.inputs[arg.name]
            elif arg.name in workspaces:
                alloc = workspaces[arg.name]
            else:
                alloc = gpu.outputs[arg.name][0]
            values.append(int(alloc))
    func.prepare(types)

    def launch() -> None:
        func.prepared_async_call(grid, block, gpu.stream, *values, shared_size=smem)

    return launch, module


def run_cuda_candidate(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: load, verify on poisoned outputs, then time one candidate."""
    import importlib

    from .runner import _prepared
    from .verify import check_output

    importlib.import_module(payload["module"])
    task = Task.from_dict(payload["task"])
    source = KernelSource.from_dict(payload["source"])
    policy = TimingPolicy(**payload["policy"])
    template = get_template(task.op, "cuda")
    inputs, reference = _prepared(task, "cuda", payload["seed"])
    dims = task.dims
    gpu = _gpu()
    drv = gpu.drv
    gpu.upload(f"{task.key}#{payload['seed']}", source, dims, inputs)
    workspaces: dict[str, Any] = {}
    try:
        for arg in source.args:
            if arg.role == "workspace":
                alloc = drv.mem_alloc(max(arg.nbytes, 4))
                drv.memset_d8(alloc, 0, max(arg.nbytes, 4))  # counters and partial sums start at zero
                workspaces[arg.name] = alloc
        try:
            launch, module = _launcher(gpu, source, Path(payload["artifact"]).read_bytes(), dims, workspaces)
            gpu.poison()
            start, end = drv.Event(), drv.Event()
            start.record(gpu.stream)
            launch()
            end.record(gpu.stream)
        except drv.Error as exc:
            error, sticky = classify_cuda_error(str(exc), during_launch=True)
            return {"error": error.name, "message": f"launch refused: {exc}", "sticky": sticky}
        except RuntimeError as exc:
            error, sticky = classify_cuda_error(str(exc), during_launch=True)
            return {"error": error.name, "message": str(exc), "sticky": sticky}
        try:
            end.synchronize()
            first_s = end.time_since(start) * 1e-3
            got = {}
            for name, (alloc, shape, dtype) in gpu.outputs.items():
                from search_space.ops.common import numpy_dtype

                host = np.empty(shape, dtype=numpy_dtype(dtype))
                drv.memcpy_dtoh(host, alloc)
                got[name] = host
            # inputs first, always: device inputs written to would hand the damage to every later candidate
            scribbled = gpu.modified_inputs(inputs)
        except drv.Error as exc:
            error, sticky = classify_cuda_error(str(exc))
            return {"error": error.name, "message": f"kernel failed: {exc}", "sticky": sticky}
        if scribbled:
            gpu.drop()  # upload them again for the next candidate
            return {"error": "WRONG_ANSWER", "message": f"modified its input {', '.join(scribbled)} "
                                                        "during the verification run"}
        if payload["check"]:
            for arg in source.args:
                if arg.role == "out":
                    problem = check_output(arg.name, got[arg.name], reference[arg.name], template.tolerance(task),
                                           arg.dtype)
                    if problem:
                        return {"error": "WRONG_ANSWER", "message": problem}
        repeats = max(policy.min_repeats, min(policy.repeats, int(policy.max_total_s / max(first_s, 1e-7))))
        try:
            for _ in range(policy.warmup):
                launch()
            starts = [drv.Event() for _ in range(repeats)]
            ends = [drv.Event() for _ in range(repeats)]
            clock_before = gpu.clock.read()
            for i in range(repeats):
                gpu.flush_l2(i)
                starts[i].record(gpu.stream)
                launch()
                ends[i].record(gpu.stream)
            ends[-1].synchronize()
            clock_after = gpu.clock.read()
            costs = [e.time_since(s) * 1e-3 for s, e in zip(starts, ends)]
            scribbled = gpu.modified_inputs(inputs)
        except drv.Error as exc:
            error, sticky = classify_cuda_error(str(exc))
            return {"error": error.name, "message": f"kernel failed while timed: {exc}", "sticky": sticky}
        if scribbled:
            gpu.drop()
            return {"error": "WRONG_ANSWER", "message": f"modified its input {', '.join(scribbled)} while timed"}
        del module
    finally:
        for alloc in workspaces.values():
            try:
                alloc.free()
            except Exception:  # a poisoned context refuses even this; the worker is replaced anyway
                pass
    stats = {**summarize(costs), "repeats": repeats, "first_s": first_s, "l2_flush_bytes": gpu.flush_bytes,
             "device": gpu.name}
    clocks = [c for c in (clock_before, clock_after) if c]
    if clocks:
        stats["sm_clock_mhz"] = int(np.mean(clocks))
    return {"error": "NO_ERROR", "costs": costs, "stats": stats}


# ----------------------------------------------------------------------------- parent side


class CudaRunner:
    """Measures CUDA candidates, one worker process per GPU in ``devices``.

    ``run`` spreads a batch over the GPUs (each measures its share one candidate at a
    time) and returns the results in input order. ``worker_factory(device)`` replaces the
    worker processes (tests use it to inject faults).
    """

    def __init__(self, devices: Sequence[int] = (0,), timeout_s: float = 20.0, policy: TimingPolicy | None = None,
                 check: bool = True, seed: int = 0, prepare_timeout_s: float = 900.0,
                 worker_factory: Callable[[int], Any] | None = None):
        if not devices:
            raise ValueError("CudaRunner needs at least one device")
        self.devices = tuple(devices)
        self.timeout_s = timeout_s
        self.policy = policy or CUDA_POLICY
        self.check = check
        self.seed = seed
        self.prepare_timeout_s = prepare_timeout_s
        factory = worker_factory or (lambda d: WorkerProcess(env={"CUDA_VISIBLE_DEVICES": visible_device(d)},
                                                             name=f"autotune-cuda{d}"))
        self._workers = [factory(d) for d in self.devices]
        self._prepared: list[tuple[int, str] | None] = [None] * len(self._workers)
        self.device_names: list[str] = [""] * len(self._workers)

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

    def _prepare(self, w: int, inp: MeasureInput) -> MeasureResult | None:
        worker = self._workers[w]
        want = (worker.generation, inp.task.key)
        if self._prepared[w] == want and worker.alive:
            return None
        module = template_module(inp.task.op, "cuda")
        try:
            out = worker.call("measure.cuda_runner:prepare_cuda_task",
                              {"task": inp.task.to_dict(), "seed": self.seed, "module": module},
                              self.prepare_timeout_s)
        except WorkerTimeout as exc:
            return MeasureResult.failed(MeasureError.RUN_TIMEOUT, f"preparing inputs timed out: {exc}")
        except WorkerCrash as exc:
            return MeasureResult.failed(MeasureError.WORKER_CRASH, f"preparing inputs: {exc}")
        except WorkerError as exc:
            return MeasureResult.failed(MeasureError.RUNTIME_ERROR, f"preparing inputs failed: {exc}")
        self.device_names[w] = out.get("device", "")
        self._prepared[w] = (worker.generation, inp.task.key)
        return None

    def _run_one(self, w: int, inp: MeasureInput, build: BuildResult) -> MeasureResult:
        if build.error != MeasureError.NO_ERROR or build.artifact is None or build.source is None:
            return MeasureResult.failed(build.error or MeasureError.COMPILE_ERROR, build.message,
                                        build_s=build.build_s, stats=dict(build.stats))
        failed = self._prepare(w, inp)
        if failed is not None:
            return failed
        worker = self._workers[w]
        payload = {"task": inp.task.to_dict(), "source": build.source.to_dict(), "artifact": build.artifact,
                   "module": template_module(inp.task.op, "cuda"), "policy": asdict(self.policy),
                   "check": self.check, "seed": self.seed}
        stats = dict(build.stats)
        stats["digest"] = build.digest
        start = time.perf_counter()
        try:
            out = worker.call("measure.cuda_runner:run_cuda_candidate", payload, self.timeout_s)
        except WorkerTimeout:
            return MeasureResult.failed(MeasureError.RUN_TIMEOUT, f"no result within {self.timeout_s:.0f} s "
                                        "(the worker was killed)", build.build_s, time.perf_counter() - start, stats)
        except WorkerCrash as exc:
            return MeasureResult.failed(MeasureError.WORKER_CRASH, str(exc), build.build_s,
                                        time.perf_counter() - start, stats)
        except WorkerError as exc:
            error, sticky = classify_cuda_error(str(exc))
            if sticky:
                worker.kill()
            return MeasureResult.failed(error, str(exc), build.build_s, time.perf_counter() - start, stats)
        run_s = time.perf_counter() - start
        error = MeasureError[out["error"]]
        if error != MeasureError.NO_ERROR:
            if out.get("sticky"):
                worker.kill()  # the context is poisoned: the next candidate gets a fresh process
                out["message"] = out.get("message", "") + " (worker replaced)"
            return MeasureResult.failed(error, out.get("message", ""), build.build_s, run_s, stats)
        stats.update(out["stats"])
        return MeasureResult(tuple(out["costs"]), MeasureError.NO_ERROR, "", build.build_s, run_s, stats=stats)

    def close(self) -> None:
        close_all(self._workers)

    def __enter__(self) -> "CudaRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
