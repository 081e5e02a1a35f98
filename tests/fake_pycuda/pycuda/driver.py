"""Fake ``pycuda.driver``: host memory as device memory, kernels run on the CPU emulator."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


class Error(Exception):
    pass


class LogicError(Error):
    pass


class LaunchError(Error):
    pass


class RuntimeError(Error):  # noqa: A001 - pycuda's own name
    pass


class MemoryError(Error):  # noqa: A001
    pass


class device_attribute:  # noqa: N801 - pycuda's spelling
    MULTIPROCESSOR_COUNT = "sm_count"
    MAX_THREADS_PER_BLOCK = "max_threads"
    MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = "smem_optin"
    MAX_REGISTERS_PER_BLOCK = "regs"
    L2_CACHE_SIZE = "l2"
    CLOCK_RATE = "clock"


class function_attribute:  # noqa: N801
    MAX_DYNAMIC_SHARED_SIZE_BYTES = "max_dynamic_smem"
    MAX_THREADS_PER_BLOCK = "max_threads"
    NUM_REGS = "num_regs"


ATTRIBUTES = {"sm_count": 2, "max_threads": 1024, "smem_optin": 227 << 10, "regs": 65536, "l2": 1 << 20,
              "clock": 1980000}
DEFAULT_REGISTERS = 32  # per thread, for a kernel whose ptxas report the fake has not seen
_initialised = False


def init(flags: int = 0) -> None:
    global _initialised
    if os.environ.get("FAKE_PYCUDA_NO_DEVICE"):
        raise RuntimeError("cuInit failed: no CUDA-capable device is detected")
    _initialised = True


class Device:
    def __init__(self, index: int):
        if not _initialised:
            raise LogicError("cuDeviceGet failed: initialization error")
        if index != 0:
            raise LogicError("cuDeviceGet failed: invalid device ordinal")

    @staticmethod
    def count() -> int:
        return 1

    def name(self) -> str:
        return "Fake GPU (CPU emulator)"

    def compute_capability(self) -> tuple[int, int]:
        return (9, 0)

    def pci_bus_id(self) -> str:
        return "0000:00:00.0"

    def get_attribute(self, attr):
        return ATTRIBUTES[attr]

    def retain_primary_context(self):
        return object()


class DeviceAllocation:
    def __init__(self, nbytes: int):
        self._raw = np.zeros(nbytes + 256, dtype=np.uint8)
        offset = (-self._raw.ctypes.data) % 256
        self.bytes = self._raw[offset:offset + nbytes]
        self.freed = False

    def __int__(self) -> int:
        return self.bytes.ctypes.data

    __index__ = __int__

    def free(self) -> None:
        self.freed = True


def mem_alloc(nbytes: int) -> DeviceAllocation:
    return DeviceAllocation(int(nbytes))


def _view(dest, dtype, count):
    if not isinstance(dest, DeviceAllocation):
        raise LogicError("fake pycuda: memset needs a DeviceAllocation")
    view = dest.bytes.view(dtype)
    if count > view.size:
        raise LogicError(f"cuMemset failed: invalid argument ({count} values, {view.size} fit)")
    return view[:count]


def memset_d8(dest, data, size):
    _view(dest, np.uint8, size)[:] = data


def memset_d16(dest, data, size):
    _view(dest, np.uint16, size)[:] = data


def memset_d32(dest, data, size):
    _view(dest, np.uint32, size)[:] = data


# ----------------------------------------------------------------------------- streams and graphs
# Work queued on a stream runs at once, in issue order, unless the stream is being captured
# (``graph_api``): then it is recorded, and runs each time the graph is launched. As on a
# real device, a capture refuses what cannot be recorded: synchronous calls on the stream,
# and copies from host memory that is not page-locked.
_CAPTURES: dict[int, list] = {}   # stream handle -> work recorded so far
_GRAPHS: dict[int, list] = {}     # graph (and executable) handle -> its recorded work
# Programmatic edges (runtime.cuda_graph): replayed in order like any other, but recorded per
# capture as (entry of the kernel before, entry of the kernel after, whether the latter's code
# waits for the former: calls grid_dependency_wait), so tests can check what a GPU would overlap.
_PENDING_EDGE: dict[int, str] = {}  # stream -> the kernel the next captured node joins programmatically
_CAPTURED_EDGES: dict[int, list] = {}
EDGES_OF_CAPTURES: list[list] = []  # one list per capture ended, in order
COUNTS = {"launches": 0, "graph_launches": 0}  # kernels run and graphs replayed, for tests


class _Launch:
    """A kernel launch queued on a stream (recorded as a kernel node while capturing)."""

    def __init__(self, function: Function, run):
        self.function, self.run = function, run

    def __call__(self) -> None:
        self.run()


def _queue(stream, work, host=None) -> None:
    handle = getattr(stream, "handle", None)
    if handle in _CAPTURES:
        if host is not None and not isinstance(host, PagelockedArray):
            raise LogicError("cuMemcpyAsync failed: operation not permitted when stream is capturing "
                             "(host memory is not page-locked)")
        if handle in _PENDING_EDGE:
            if not isinstance(work, _Launch):  # as the driver: programmatic edges join kernel nodes only
                raise LogicError("cuStreamEndCapture failed: a programmatic dependency joins kernel nodes only")
            code = work.function.source_dict.get("code", "")
            _CAPTURED_EDGES[handle].append((_PENDING_EDGE.pop(handle), work.function.source_dict.get("entry"),
                                            "grid_dependency_wait();" in code))  # called, not only defined
        _CAPTURES[handle].append(work)
    else:
        work()


def _refuse_while_capturing(call: str) -> None:
    if _CAPTURES:
        raise LogicError(f"{call} failed: operation not permitted when stream is capturing")


class PagelockedArray(np.ndarray):
    """Host memory the fake treats as page-locked (pycuda.driver.pagelocked_empty)."""


def pagelocked_empty(shape, dtype=np.float32, order="C", mem_flags=0):
    return np.zeros(shape, dtype, order=order).view(PagelockedArray)


class _GraphApi:
    """The driver's capture calls (see runtime.cuda_graph), on recorded work."""

    def begin_capture(self, stream: int) -> None:
        if stream in _CAPTURES:
            raise LogicError("cuStreamBeginCapture failed: the stream is capturing already")
        _CAPTURES[stream] = []
        _CAPTURED_EDGES[stream] = []
        _PENDING_EDGE.pop(stream, None)

    def programmatic_edge(self, stream: int) -> bool:
        if stream not in _CAPTURES:
            raise LogicError("cuStreamUpdateCaptureDependencies failed: the stream is not capturing")
        work = _CAPTURES[stream]
        if not work or not isinstance(work[-1], _Launch):
            return False
        _PENDING_EDGE[stream] = work[-1].function.source_dict.get("entry")
        return True

    def end_capture(self, stream: int) -> int:
        work = _CAPTURES.pop(stream)
        handle = id(work)
        _GRAPHS[handle] = work
        EDGES_OF_CAPTURES.append(_CAPTURED_EDGES.pop(stream, []))
        if _PENDING_EDGE.pop(stream, None) is not None:  # an edge to nothing: the driver refuses it
            raise LogicError("cuStreamEndCapture failed: a programmatic dependency joins kernel nodes only")
        return handle

    def instantiate(self, graph: int) -> int:
        return graph

    def launch(self, executable: int, stream: int) -> None:
        if stream in _CAPTURES:
            raise LogicError("cuGraphLaunch failed: the stream is capturing")
        COUNTS["graph_launches"] += 1
        for work in _GRAPHS[executable]:
            work()

    def destroy(self, graph, executable) -> None:
        _GRAPHS.pop(graph, None)


def graph_api() -> _GraphApi:
    return _GraphApi()


def tensor_map_api():
    """cuTensorMapEncodeTiled (see runtime.tensor_map), in the CPU emulator's encoding."""
    import cudaemu  # tests/ is on the path

    return cudaemu.TensorMapApi()


def memset_d8_async(dest, data, size, stream=None):
    _queue(stream, lambda: memset_d8(dest, data, size))


def memset_d16_async(dest, data, size, stream=None):
    _queue(stream, lambda: memset_d16(dest, data, size))


def memset_d32_async(dest, data, size, stream=None):
    _queue(stream, lambda: memset_d32(dest, data, size))


def memcpy_htod(dest, src):
    _refuse_while_capturing("cuMemcpyHtoD")
    src = np.ascontiguousarray(src)
    dest.bytes[: src.nbytes] = src.reshape(-1).view(np.uint8)


def memcpy_dtoh(dest, src):
    _refuse_while_capturing("cuMemcpyDtoH")
    flat = dest.reshape(-1).view(np.uint8)
    flat[:] = src.bytes[: flat.size]


def memcpy_htod_async(dest, src, stream=None):
    def copy():  # reads ``src`` when it runs: a replayed graph copies what the host holds then
        data = np.ascontiguousarray(src)
        ctypes.memmove(int(dest), data.ctypes.data, data.nbytes)  # an allocation or a raw address
    _queue(stream, copy, host=src)


def memcpy_dtoh_async(dest, src, stream=None):
    def copy():
        ctypes.memmove(dest.ctypes.data, int(src), dest.nbytes)
    _queue(stream, copy, host=dest)


class Memcpy2D:
    """cuMemcpy2D between host and fake device memory (both are host addresses here)."""

    def __init__(self):
        self.src = self.dst = None
        self.src_pitch = self.dst_pitch = self.width_in_bytes = self.height = 0

    def set_src_host(self, array):
        self._keep = np.ascontiguousarray(array)
        self.src = self._keep.ctypes.data

    def set_src_device(self, pointer):
        self.src = int(pointer)

    def set_dst_device(self, pointer):
        self.dst = int(pointer)

    def __call__(self, aligned_or_stream=True):
        """``copy(aligned)`` runs now; ``copy(stream)`` is queued on the stream (as pycuda's)."""
        if self.width_in_bytes > min(self.src_pitch, self.dst_pitch):
            raise LogicError("cuMemcpy2D failed: invalid value (width exceeds a pitch)")
        src, dst, pitches = self.src, self.dst, (self.src_pitch, self.dst_pitch, self.width_in_bytes, self.height)

        def copy():
            src_pitch, dst_pitch, width, height = pitches
            for row in range(height):
                ctypes.memmove(dst + row * dst_pitch, src + row * src_pitch, width)
        if isinstance(aligned_or_stream, Stream):
            _queue(aligned_or_stream, copy, host=getattr(self, "_keep", None))
        else:
            _refuse_while_capturing("cuMemcpy2D")
            copy()


class Stream:
    def __init__(self, flags: int = 0):
        self.handle = id(self)

    def synchronize(self) -> None:
        if self.handle in _CAPTURES:
            raise LogicError("cuStreamSynchronize failed: operation not permitted when stream is capturing")

    def is_done(self) -> bool:
        return True


class Event:
    def __init__(self, flags: int = 0):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()
        return self

    def synchronize(self):
        return self

    def time_since(self, other: Event) -> float:
        return (self.t - other.t) * 1e3


def _registry() -> Path:
    return Path(os.environ["FAKE_PYCUDA_REGISTRY"])


def register(cubin: bytes, source_dict: dict) -> None:
    """Test side: remember which source a cubin was built from. An optional ``registers``
    entry is what ptxas would have put in the cubin (registers per thread)."""
    path = _registry() / (hashlib.sha256(cubin).hexdigest() + ".json")
    path.write_text(json.dumps(source_dict))


class Module:
    def __init__(self, source_dict: dict):
        self.source_dict = source_dict

    def get_function(self, name: str) -> Function:
        if name != self.source_dict["entry"]:
            raise LogicError(f"cuModuleGetFunction failed: named symbol not found ({name})")
        return Function(self.source_dict)


_CACHE_INDEX: dict[str, Path] = {}
_INDEXED: set[Path] = set()  # cubins already hashed into the index (a file's content never changes)


def _from_build_cache(digest: str) -> dict | None:
    """The builder keeps each artifact's source beside it (and ptxas's report, whose register
    count the cubin carries on a real GPU): find the cubin by content."""
    root = os.environ.get("AUTOTUNE_CACHE_DIR")
    if not root:
        return None
    if digest not in _CACHE_INDEX:
        for cubin in Path(root).glob("*.cubin"):
            if cubin not in _INDEXED:
                _INDEXED.add(cubin)
                _CACHE_INDEX.setdefault(hashlib.sha256(cubin.read_bytes()).hexdigest(), cubin)
    cubin = _CACHE_INDEX.get(digest)
    source = cubin.with_name(cubin.stem + ".source.json") if cubin else None
    if not (source and source.exists()):
        return None
    found = json.loads(source.read_text())
    stats = cubin.with_name(cubin.stem + ".json")
    if stats.exists():
        found.setdefault("registers", json.loads(stats.read_text()).get("registers", 0))
    return found


def module_from_buffer(buffer, options=None, message_handler=None) -> Module:
    digest = hashlib.sha256(bytes(buffer)).hexdigest()
    path = _registry() / (digest + ".json") if os.environ.get("FAKE_PYCUDA_REGISTRY") else None
    if path is not None and path.exists():
        return Module(json.loads(path.read_text()))
    found = _from_build_cache(digest)
    if found is None:
        raise LogicError("cuModuleLoadData failed: device kernel image is invalid (unknown to the fake)")
    return Module(found)


def _register_limited_threads(registers: int) -> int:
    """The most threads per block the register file holds (registers go out per warp, in
    units of 256), as the driver reports in CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK."""
    per_warp = -(-registers * 32 // 256) * 256
    return min(ATTRIBUTES["max_threads"], ATTRIBUTES["regs"] // max(per_warp, 1) * 32)


class Function:
    def __init__(self, source_dict: dict):
        self.source_dict = source_dict
        self.registers = int(source_dict.get("registers") or DEFAULT_REGISTERS)
        self.max_dynamic_smem = 48 << 10
        self.types = None
        self.lib = None

    def set_attribute(self, attr, value):
        if attr == function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES:
            if value > ATTRIBUTES["smem_optin"]:
                raise LogicError("cuFuncSetAttribute failed: invalid argument")
            self.max_dynamic_smem = value

    def get_attribute(self, attr):
        if attr == function_attribute.MAX_THREADS_PER_BLOCK:
            return _register_limited_threads(self.registers)
        if attr == function_attribute.NUM_REGS:
            return self.registers
        return 0

    def prepare(self, arg_types):
        self.types = [np.dtype(t) for t in arg_types]
        return self

    def prepared_async_call(self, grid, block, stream, *args, shared_size=0):
        # Refused launches, as the driver refuses them: before anything runs, so nothing is
        # written, and not sticky (the context stays usable; only faults while running poison it).
        threads = int(np.prod(block))
        if threads > ATTRIBUTES["max_threads"] or shared_size > self.max_dynamic_smem:
            raise LogicError("cuLaunchKernel failed: invalid argument")  # CUDA_ERROR_INVALID_VALUE
        if threads > _register_limited_threads(self.registers):
            raise LaunchError("cuLaunchKernel failed: too many resources requested for launch")
        # the argument values as they are now: a recorded launch replays with these
        _queue(stream, _Launch(self, lambda: self._run(tuple(grid), tuple(block), args, shared_size)))

    def _run(self, grid, block, args, shared_size) -> None:
        import cudaemu  # tests/ is on the worker's path

        COUNTS["launches"] += 1
        if self.lib is None:
            from search_space import KernelSource

            self.lib = ctypes.CDLL(str(cudaemu.build(KernelSource.from_dict(self.source_dict))))
        failure = cudaemu.emu_launch(
            self.lib, [int(a) for a, t in zip(args, self.types) if t == np.dtype(np.uintp)],
            [int(a) for a, t in zip(args, self.types) if t.kind == "i"],
            b"".join(bytes(a) for a, t in zip(args, self.types) if t.kind == "V"),  # tensor maps, by value
            grid, block, shared_size, deferred=True, seed=0)
        if failure is not None:
            raise LaunchError(f"cuCtxSynchronize failed: an illegal instruction was encountered ({failure})")
