"""The CUDA kernels of an exported library: cubins loaded and launched with pycuda.

pycuda is imported when the first CUDA kernel is loaded, never by ``import runtime``.
A ``CudaKernel`` keeps the calling convention of ``runtime.kernel.Kernel``:

- ``kernel(x, w)`` takes and returns numpy arrays (copied to the device and back: for
  checking and occasional calls);
- ``kernel.bind({name: device buffer}, dims)`` binds device-resident buffers (pycuda
  ``GPUArray``s, checked like numpy arrays, or raw ``DeviceAllocation``s) and returns a call
  that only launches: what a model that keeps its activations on the GPU uses;
- ``kernel.function(*device_pointers, *dims)`` launches on the library's stream (a kernel
  with ``tensor_map`` arguments takes their encoded descriptors first: ``runtime.tensor_map``).

Launch geometry comes from the manifest: ``block``, ``grid`` (ints or integer expressions
over dim names, for dynamic dims) and ``smem`` (dynamic shared memory bytes); ``programmatic``
(true) marks a kernel a captured graph may start before the kernel ahead of it has ended.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from . import tensor_map
from .abi import ArgSpec, KernelSpec, numpy_dtype
from .kernel import BoundCall, Kernel, same_layout
from .launch import evaluate

_STREAM: dict[str, object] = {}  # the process's one stream for model work, and the driver it is of


def model_stream():
    """The stream every library's kernels and a model's copies are queued on: one stream, so
    they run in the order they were issued without the host waiting between them, and a
    decode step can be captured from it as one CUDA graph. (Keyed by the driver module: the
    tests put a fresh fake pycuda in place for each test.)"""
    import pycuda.driver as drv

    if _STREAM.get("driver") is not drv:  # first use, or a driver module replaced: its stream goes with it
        _STREAM.update(driver=drv, stream=drv.Stream())
    return _STREAM["stream"]


class CudaModules:
    """The pycuda context, stream and loaded cubins of one library."""

    def __init__(self) -> None:
        try:
            import pycuda.driver as drv

            import pycuda.autoprimaryctx  # noqa: F401 - retains and pushes the primary context
        except ImportError as exc:
            raise RuntimeError("CUDA kernels need pycuda (the project's cuda extra, pip install -e '.[cuda]') and a GPU") from exc
        self.drv = drv
        self.stream = model_stream()
        self.modules: list[Any] = []

    def kernel(self, folder: Path, record: Mapping[str, Any], spec: KernelSpec, args: tuple[ArgSpec, ...],
               cubin: bytes | None = None) -> "CudaKernel":
        """The kernel ``record`` describes, from ``cubin`` (a library passes the bytes it checked)
        or else the file ``folder / record["cubin"]``."""
        drv = self.drv
        if cubin is None:
            cubin = (folder / record["cubin"]).read_bytes()
        module = drv.module_from_buffer(cubin)
        self.modules.append(module)  # a module unloads when collected; its functions go with it
        function = module.get_function(record["symbol"])
        launch = dict(record["launch"])
        smem_expr = launch.get("smem", 0)
        granted = [0]  # dynamic shared memory the function has opted in for so far

        def opt_in(smem: int) -> None:
            # past 48 KB (static + dynamic) a kernel must opt in: for exactly what it asks, as the runner does
            if smem > granted[0]:
                function.set_attribute(drv.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, smem)
                granted[0] = smem

        opt_in(evaluate(smem_expr, spec.dims))
        function.prepare(tensor_map.prepared_types(args))
        block = tuple(int(b) for b in launch["block"])
        grid_exprs = tuple(launch["grid"])
        static = spec.dims
        scalar_names = [a.name for a in args if a.role == "scalar"]
        n_pointers = len(args) - len(scalar_names)
        stream = self.stream

        def launch_kernel(*values: int) -> None:
            dims = dict(static)
            dims.update(zip(scalar_names, values[n_pointers:]))
            grid = tuple(evaluate(g, dims) for g in grid_exprs)
            smem = evaluate(smem_expr, dims)
            opt_in(smem)
            function.prepared_async_call(grid, block, stream, *values, shared_size=smem)

        return CudaKernel(spec, args, launch_kernel, tuned=bool(record.get("tuned", True)),
                          seconds=record.get("seconds"), config=dict(record.get("config") or {}),
                          entry=record["entry"], keepalive=(self, module),
                          programmatic=launch.get("programmatic") is True)

    def close(self) -> None:
        self.modules.clear()


# Lengths a kernel reads from memory and walks its cache by, unclamped (a captured decode
# step fills them itself): on a call with numpy inputs each must lie within the dim named,
# or the kernel reads past the cache.
LENGTHS_READ_UNCLAMPED = {("attention_decode", "LENS"): "L"}


class CudaKernel(Kernel):
    """A library kernel in a cubin (see the module docstring)."""

    def __post_init__(self) -> None:
        self.input_names = [a.name for a in self.args if a.role == "in"]
        self.output_names = [a.name for a in self.args if a.role == "out"]
        self.scalar_names = [a.name for a in self.args if a.role == "scalar"]
        modules: CudaModules = self.keepalive[0]
        drv = modules.drv
        self._drv, self._stream = drv, modules.stream
        self._workspace = {}
        for arg in self.args:
            if arg.role == "workspace":
                alloc = drv.mem_alloc(max(arg.nbytes, 4))
                drv.memset_d8(alloc, 0, max(arg.nbytes, 4))  # counters and partial sums start at zero
                self._workspace[arg.name] = alloc

    def _device_pointer(self, arg: ArgSpec, buffer: Any, dims: Mapping[str, int]) -> int:
        """A device buffer's address: a GPUArray or DeviceArray is checked for shape, dtype and
        layout; a raw allocation is taken to hold ``dims`` (the caller's word, as in C)."""
        if isinstance(buffer, np.ndarray):
            raise ValueError(f"{self.spec.op} {arg.role}put {arg.name}: a numpy array is host memory; bind "
                             "device buffers, or call the kernel on numpy arrays")
        if hasattr(buffer, "gpudata"):
            want = arg.resolve_shape(dims)
            if np.dtype(buffer.dtype) != numpy_dtype(arg.dtype) or not same_layout(buffer.shape, want):
                raise ValueError(f"{self.spec.op} {arg.role}put {arg.name}: expected {want} {arg.dtype}, "
                                 f"got {buffer.shape} {buffer.dtype}")
            flags = getattr(buffer, "flags", None)  # a GPUArray may be a strided view; a DeviceArray never is
            if flags is not None and not flags.c_contiguous:
                raise ValueError(f"{self.spec.op} argument {arg.name} must be C-contiguous")
            return int(buffer.gpudata)
        return int(buffer)

    def bind(self, arrays: Mapping[str, Any], dims: Mapping[str, int] | None = None) -> BoundCall:
        """Bind device buffers by name; ``dims`` gives every dynamic dim a GPUArray shape does not."""
        self.check_names(arrays)
        call_dims = self.dims_for({n: b for n, b in arrays.items() if hasattr(b, "shape")}, dims)
        pointers = {}
        for arg in self.args:
            if arg.role in ("in", "out"):
                if arg.name not in arrays:
                    raise TypeError(f"{self.spec.op} needs {arg.role}put {arg.name}")
                pointers[arg.name] = self._device_pointer(arg, arrays[arg.name], call_dims)
            elif arg.role == "workspace":
                pointers[arg.name] = int(self._workspace[arg.name])
        # descriptors (tensor maps) are encoded here from the bound addresses, and again for new
        # dynamic dims (a descriptor's shape is where TMA stops reading and fills zeros)
        values = tensor_map.bound_values(self._drv, self.args, pointers, call_dims)
        values_at = None
        if any(a.role == "tensor_map" for a in self.args):
            def values_at(dims: Mapping[str, int]) -> list:
                return tensor_map.bound_values(self._drv, self.args, pointers, {**call_dims, **dims})
        return BoundCall(self, values, {n: call_dims[n] for n in self.scalar_names}, dict(arrays), values_at)

    def __call__(self, *arrays: np.ndarray, out: Mapping[str, np.ndarray] | None = None,
                 dims: Mapping[str, int] | None = None, **named: np.ndarray):
        """numpy in, numpy out: copies the inputs to the device, launches, waits, copies back."""
        drv = self._drv
        host, call_dims = self.host_buffers(arrays, named, out, dims)
        for arg in self.args:
            if arg.role in ("in", "out"):
                self._check(arg, host[arg.name], call_dims)
            bound = LENGTHS_READ_UNCLAMPED.get((self.spec.op, arg.name))
            if bound is not None and host[arg.name].size and not (
                    0 <= host[arg.name].min() and host[arg.name].max() <= call_dims[bound]):
                raise ValueError(f"{self.spec.op} input {arg.name}: every length must lie in 0..{bound} = "
                                 f"{call_dims[bound]}, got {host[arg.name].min()}..{host[arg.name].max()}")
        self.check_no_overlap(host)  # two outputs in one host buffer: one copy back would be lost
        device = {}
        try:
            for arg in self.args:
                if arg.role in ("in", "out"):
                    device[arg.name] = drv.mem_alloc(max(host[arg.name].nbytes, 1))
                    if arg.role == "in":
                        drv.memcpy_htod(device[arg.name], host[arg.name])
            self.bind(device, call_dims)()
            done = drv.Event()
            done.record(self._stream)
            done.synchronize()
            for name in self.output_names:
                drv.memcpy_dtoh(host[name], device[name])
        finally:
            for alloc in device.values():
                alloc.free()
        outputs = tuple(host[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs
