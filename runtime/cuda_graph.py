"""Record the work queued on a stream once, as a CUDA graph, and replay it with one launch.

A decode step is hundreds of kernel launches; issued one by one from Python each costs
microseconds of host time, more than many of the kernels take on the GPU. Captured once
(``cuStreamBeginCapture``/``cuStreamEndCapture``, ``cuGraphInstantiateWithFlags``) the whole
step is one ``cuGraphLaunch``. pycuda 2026.1 has no graph API, so these driver calls go
through ctypes to ``libcuda``, the driver library pycuda itself uses (same process, same
context): NVIDIA's cuda-python bindings would add a dependency of their own for them.

Programmatic edges (Hopper's programmatic dependent launch): while capturing, the edge from the
kernel captured last to the next one can be made programmatic (``programmatic_edge``,
``cuStreamUpdateCaptureDependencies`` with ``CUgraphEdgeData``). The next kernel may then start
once every block of the one before it has called ``griddepcontrol.launch_dependents`` (or
ended), not when it has finished; it must itself wait (``griddepcontrol.wait``) before it reads
what that kernel writes. Its launch and whatever it does before the wait (sending its weights
towards L2) overlap the end of the kernel before it. Only kernels built for it may be joined so
(``Kernel.programmatic``).

The test suite's fake pycuda provides the same calls (``pycuda.driver.graph_api``), recording
the launches and copies queued during a capture and replaying them, so the logic is tested
without a GPU.
"""
from __future__ import annotations

import ctypes
from typing import Any

from .libcuda import check, open_libcuda

CAPTURE_THREAD_LOCAL = 1  # CU_STREAM_CAPTURE_MODE_THREAD_LOCAL: a synchronising call in the capture fails
CAPTURE_ACTIVE = 1        # CU_STREAM_CAPTURE_STATUS_ACTIVE
NODE_KERNEL = 0           # CU_GRAPH_NODE_TYPE_KERNEL
PORT_PROGRAMMATIC = 1     # CU_GRAPH_KERNEL_NODE_PORT_PROGRAMMATIC: all blocks triggered or ended
EDGE_PROGRAMMATIC = 1     # CU_GRAPH_DEPENDENCY_TYPE_PROGRAMMATIC
SET_DEPENDENCIES = 1      # CU_STREAM_SET_CAPTURE_DEPENDENCIES: replace the set


class EdgeData(ctypes.Structure):
    """``CUgraphEdgeData`` (cuda.h, CUDA 12.3+): when the edge fires on its upstream node, on
    which part of the downstream one, and its type; 8 bytes, the reserved ones zero."""

    _fields_ = [("from_port", ctypes.c_ubyte), ("to_port", ctypes.c_ubyte), ("type", ctypes.c_ubyte),
                ("reserved", ctypes.c_ubyte * 5)]


class CudaGraphError(RuntimeError):
    """A driver call of the capture or replay failed."""


class _Libcuda:
    """The graph calls of the CUDA driver API, through ctypes."""

    def __init__(self) -> None:
        self.lib = lib = open_libcuda(CudaGraphError)
        lib.cuStreamBeginCapture_v2.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.cuStreamEndCapture.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p)]
        lib.cuGraphInstantiateWithFlags.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p,
                                                    ctypes.c_ulonglong]
        lib.cuGraphLaunch.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.cuGraphExecDestroy.argtypes = [ctypes.c_void_p]
        lib.cuGraphDestroy.argtypes = [ctypes.c_void_p]
        self._edge_calls_declared = False

    def _check(self, result: int, call: str) -> None:
        check(self.lib, result, call, CudaGraphError)

    def begin_capture(self, stream: int) -> None:
        self._check(self.lib.cuStreamBeginCapture_v2(stream, CAPTURE_THREAD_LOCAL), "cuStreamBeginCapture")

    def _declare_edge_calls(self) -> None:
        """The capture-dependency calls with edge data (drivers of CUDA 12.3 on)."""
        if self._edge_calls_declared:
            return
        lib = self.lib
        try:
            info, update, node_type = (lib.cuStreamGetCaptureInfo_v3, lib.cuStreamUpdateCaptureDependencies_v2,
                                       lib.cuGraphNodeGetType)
        except AttributeError as exc:
            raise CudaGraphError(f"this CUDA driver has no programmatic edges: {exc}") from None
        info.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_uint64),
                         ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.POINTER(ctypes.c_void_p)),
                         ctypes.POINTER(ctypes.POINTER(EdgeData)), ctypes.POINTER(ctypes.c_size_t)]
        update.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(EdgeData),
                           ctypes.c_size_t, ctypes.c_uint]
        node_type.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_int)]
        self._edge_calls_declared = True

    def programmatic_edge(self, stream: int) -> bool:
        """Join the next node captured on ``stream`` to the one captured last by a programmatic
        edge; False, changing nothing, where that is not exactly one kernel node."""
        self._declare_edge_calls()
        lib = self.lib
        status, count = ctypes.c_int(), ctypes.c_size_t()
        nodes, edges = ctypes.POINTER(ctypes.c_void_p)(), ctypes.POINTER(EdgeData)()
        self._check(lib.cuStreamGetCaptureInfo_v3(stream, ctypes.byref(status), None, None, ctypes.byref(nodes),
                                                  ctypes.byref(edges), ctypes.byref(count)), "cuStreamGetCaptureInfo")
        if status.value != CAPTURE_ACTIVE or count.value != 1:
            return False
        node = nodes[0]
        kind = ctypes.c_int(-1)
        self._check(lib.cuGraphNodeGetType(node, ctypes.byref(kind)), "cuGraphNodeGetType")
        if kind.value != NODE_KERNEL:
            return False
        edge = EdgeData(PORT_PROGRAMMATIC, 0, EDGE_PROGRAMMATIC)
        self._check(lib.cuStreamUpdateCaptureDependencies_v2(stream, (ctypes.c_void_p * 1)(node), ctypes.byref(edge),
                                                             1, SET_DEPENDENCIES), "cuStreamUpdateCaptureDependencies")
        return True

    def end_capture(self, stream: int) -> int:
        graph = ctypes.c_void_p()
        self._check(self.lib.cuStreamEndCapture(stream, ctypes.byref(graph)), "cuStreamEndCapture")
        return graph.value

    def instantiate(self, graph: int) -> int:
        executable = ctypes.c_void_p()
        self._check(self.lib.cuGraphInstantiateWithFlags(ctypes.byref(executable), graph, 0), "cuGraphInstantiate")
        return executable.value

    def launch(self, executable: int, stream: int) -> None:
        self._check(self.lib.cuGraphLaunch(executable, stream), "cuGraphLaunch")

    def destroy(self, graph: int | None, executable: int | None) -> None:
        if executable:
            self.lib.cuGraphExecDestroy(executable)
        if graph:
            self.lib.cuGraphDestroy(graph)


def _driver_graphs(drv: Any):
    """The driver's graph calls: the fake pycuda's own when it offers them, else libcuda's."""
    fake = getattr(drv, "graph_api", None)
    return fake() if fake is not None else _Libcuda()


class CudaGraph:
    """``with graph.capture(): ...issue work on stream...``, then ``graph.launch()`` per replay.

    Everything issued on ``stream`` inside the block is recorded, not run: kernel launches
    with the argument values they had then, copies between fixed addresses (page-locked host
    memory only). What changes between replays must therefore live in memory the recorded
    work reads."""

    def __init__(self, drv: Any, stream: Any):
        self.stream = stream
        handle = getattr(stream, "handle", None)
        if handle is None:
            raise CudaGraphError("this pycuda's Stream has no handle to capture")
        self.handle = int(handle)
        self.api = _driver_graphs(drv)
        self.graph: int | None = None
        self.executable: int | None = None

    def capture(self) -> "_Capture":
        if self.executable is not None:
            raise CudaGraphError("this graph is captured already")
        return _Capture(self)

    def programmatic_edge(self) -> bool:
        """While capturing: the next kernel may start before the one captured last has ended
        (see the module docstring); False where the node captured last is no kernel."""
        return self.api.programmatic_edge(self.handle)

    def launch(self) -> None:
        if self.executable is None:
            raise CudaGraphError("launch before capture")
        self.api.launch(self.executable, self.handle)

    def close(self) -> None:
        self.api.destroy(self.graph, self.executable)
        self.graph = self.executable = None


class _Capture:
    def __init__(self, graph: CudaGraph):
        self.graph = graph

    def __enter__(self) -> CudaGraph:
        self.graph.api.begin_capture(self.graph.handle)
        return self.graph

    def __exit__(self, kind, exc, tb) -> None:
        g = self.graph
        if kind is not None:  # ended all the same (a stream left capturing refuses all further work)
            try:
                g.api.destroy(g.api.end_capture(g.handle), None)
            except Exception:  # noqa: BLE001 - the capture's own error is the one to report, not this one
                pass
            return
        recorded = g.api.end_capture(g.handle)
        try:
            g.executable = g.api.instantiate(recorded)
        except BaseException:
            g.api.destroy(recorded, None)  # a graph the driver will not instantiate is not kept
            raise
        g.graph = recorded
