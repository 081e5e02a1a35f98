"""Capture and replay (runtime.cuda_graph) on the fake pycuda, which records what a capture
queues and refuses, as the driver does, what a graph cannot hold."""
from __future__ import annotations

import numpy as np
import pytest
from cudaemu import CUDA_INCLUDE

from runtime.cuda_graph import CudaGraph, CudaGraphError


def test_a_replay_copies_what_the_host_holds_at_launch(fake_gpu):
    import pycuda.driver as drv

    drv.init()
    stream = drv.Stream()
    host_in = drv.pagelocked_empty((4,), np.int32)
    host_out = drv.pagelocked_empty((4,), np.int32)
    device = drv.mem_alloc(16)
    graph = CudaGraph(drv, stream)
    with graph.capture():
        drv.memcpy_htod_async(device, host_in, stream)
        drv.memcpy_dtoh_async(host_out, device, stream)
    assert host_out.tolist() == [0, 0, 0, 0]  # recorded, not run
    for step in (3, 7):
        host_in[:] = np.arange(4) * step
        graph.launch()
        stream.synchronize()
        assert host_out.tolist() == (np.arange(4) * step).tolist()
    graph.close()
    with pytest.raises(CudaGraphError, match="launch before capture"):
        graph.launch()


def test_a_capture_refuses_pageable_memory_and_synchronous_calls(fake_gpu):
    import pycuda.driver as drv

    drv.init()
    stream = drv.Stream()
    device = drv.mem_alloc(16)
    graph = CudaGraph(drv, stream)
    with pytest.raises(drv.LogicError, match="not page-locked"):
        with graph.capture():
            drv.memcpy_htod_async(device, np.zeros(4, np.int32), stream)
    assert graph.executable is None
    with pytest.raises(drv.LogicError, match="capturing"):
        with CudaGraph(drv, stream).capture():
            stream.synchronize()
    drv.memcpy_htod(device, np.zeros(4, np.int32))  # the stream is usable again after a failed capture


# A stand-in for libcuda's three capture-dependency calls, compiled against the toolkit's own
# cuda.h (so the prototypes, the CUgraphEdgeData layout and the enum values are the header's),
# recording what runtime.cuda_graph hands them through ctypes.
_SHIM = r"""
#include <cuda.h>
#include <string.h>

static CUgraphNode deps[2] = {(CUgraphNode)0x1000, (CUgraphNode)0x2000};
static CUgraphEdgeData dep_edges[2];
int shim_count = 1, shim_node_type = CU_GRAPH_NODE_TYPE_KERNEL, shim_status = CU_STREAM_CAPTURE_STATUS_ACTIVE;
int shim_update_result = 0, shim_updates = 0;
CUstream shim_stream;
CUgraphNode shim_node;
CUgraphEdgeData shim_edge;
size_t shim_n;
unsigned shim_flags;

CUresult cuStreamGetCaptureInfo(CUstream s, CUstreamCaptureStatus *status, cuuint64_t *id, CUgraph *graph,
                                const CUgraphNode **nodes, const CUgraphEdgeData **edges, size_t *n) {
  *status = (CUstreamCaptureStatus)shim_status;
  if (id) *id = 7;
  if (graph) *graph = 0;
  *nodes = deps; *edges = dep_edges; *n = (size_t)shim_count;
  return CUDA_SUCCESS;
}

CUresult cuGraphNodeGetType(CUgraphNode node, CUgraphNodeType *type) {
  *type = (CUgraphNodeType)(node == deps[0] ? shim_node_type : -1);
  return CUDA_SUCCESS;
}

CUresult cuStreamUpdateCaptureDependencies(CUstream s, CUgraphNode *nodes, const CUgraphEdgeData *data,
                                           size_t n, unsigned int flags) {
  shim_updates += 1;
  shim_stream = s; shim_node = nodes[0]; memcpy(&shim_edge, data, sizeof shim_edge); shim_n = n; shim_flags = flags;
  return (CUresult)shim_update_result;
}

CUresult cuGetErrorString(CUresult error, const char **text) { *text = "operation not supported"; return CUDA_SUCCESS; }
"""


@pytest.mark.tools("nvcc")  # the toolkit's cuda.h
def test_programmatic_edges_reach_the_driver_as_its_header_lays_them_out(tmp_path):
    import ctypes
    import shutil
    import subprocess

    from runtime import cuda_graph

    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        pytest.skip("no C compiler")
    (tmp_path / "shim.c").write_text(_SHIM)
    subprocess.run([compiler, "-shared", "-fPIC", "-Werror", f"-I{CUDA_INCLUDE}", "-o", str(tmp_path / "shim.so"),
                    str(tmp_path / "shim.c")], check=True)
    lib = ctypes.CDLL(str(tmp_path / "shim.so"))
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    api = cuda_graph._Libcuda.__new__(cuda_graph._Libcuda)
    api.lib, api._edge_calls_declared = lib, False
    value = lambda name, kind=ctypes.c_int: kind.in_dll(lib, name)

    assert ctypes.sizeof(cuda_graph.EdgeData) == 8
    assert api.programmatic_edge(0xABC0) is True
    assert value("shim_updates").value == 1 and value("shim_n", ctypes.c_size_t).value == 1
    assert value("shim_stream", ctypes.c_void_p).value == 0xABC0
    assert value("shim_node", ctypes.c_void_p).value == 0x1000  # the kernel captured last
    assert value("shim_flags", ctypes.c_uint).value == 1        # CU_STREAM_SET_CAPTURE_DEPENDENCIES
    edge = bytes(value("shim_edge", ctypes.c_ubyte * 8))
    assert edge == bytes([1, 0, 1, 0, 0, 0, 0, 0])  # PORT_PROGRAMMATIC, to the whole node, TYPE_PROGRAMMATIC

    for name, wrong in (("shim_node_type", 1), ("shim_count", 2), ("shim_status", 0)):  # a memcpy, a join, no capture
        value(name).value = wrong
        assert api.programmatic_edge(0xABC0) is False
        value(name).value = {"shim_node_type": 0, "shim_count": 1, "shim_status": 1}[name]
    assert value("shim_updates").value == 1  # nothing changed by those
    value("shim_update_result").value = 801
    with pytest.raises(CudaGraphError, match=r"cuStreamUpdateCaptureDependencies failed: operation not supported \(801\)"):
        api.programmatic_edge(0xABC0)


class _RecordingGraphApi:
    """The driver's capture calls, recording the order they come in, failing where told."""

    def __init__(self, end_error=None, instantiate_error=None):
        self.calls, self.end_error, self.instantiate_error = [], end_error, instantiate_error

    def begin_capture(self, stream):
        self.calls.append("begin")

    def end_capture(self, stream):
        self.calls.append("end")
        if self.end_error:
            raise self.end_error
        return 1234

    def instantiate(self, graph):
        self.calls.append("instantiate")
        if self.instantiate_error:
            raise self.instantiate_error
        return 99

    def destroy(self, graph, executable):
        self.calls.append(("destroy", graph, executable))


def _graph_on(api) -> CudaGraph:
    driver = type("Driver", (), {"graph_api": staticmethod(lambda: api)})
    return CudaGraph(driver, type("Stream", (), {"handle": 7})())


def test_a_graph_the_driver_will_not_instantiate_is_destroyed():
    api = _RecordingGraphApi(instantiate_error=CudaGraphError("cuGraphInstantiate failed: not supported (801)"))
    graph = _graph_on(api)
    with pytest.raises(CudaGraphError, match="not supported"):
        with graph.capture():
            pass
    assert api.calls == ["begin", "end", "instantiate", ("destroy", 1234, None)]
    assert graph.graph is None and graph.executable is None


def test_a_failed_capture_reports_its_own_error_not_the_end_of_the_capture():
    api = _RecordingGraphApi(end_error=CudaGraphError("cuStreamEndCapture failed: previous error during capture"))
    with pytest.raises(ValueError, match="the edge was refused"):
        with _graph_on(api).capture():
            raise ValueError("the edge was refused")
    assert api.calls == ["begin", "end"]  # ended all the same; nothing left to destroy
