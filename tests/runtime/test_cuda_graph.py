"""Capture and replay (runtime.cuda_graph) on the fake pycuda, which records what a capture
queues and refuses, as the driver does, what a graph cannot hold."""
from __future__ import annotations

import numpy as np
import pytest

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
