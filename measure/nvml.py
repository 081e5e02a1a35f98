"""The SM clock of a GPU through NVML (ctypes), for the records; nothing when NVML is absent."""
from __future__ import annotations

import ctypes
import os

_CLOCK_SM = 1  # NVML_CLOCK_SM


class SmClock:
    """``read()``: the SM clock of the GPU at ``pci_bus_id`` in MHz, or None."""

    def __init__(self, pci_bus_id: str):
        self.lib = None
        self.handle = None
        try:
            lib = ctypes.CDLL("libnvidia-ml.so.1")
        except OSError:
            return
        if lib.nvmlInit_v2() != 0:
            return
        handle = ctypes.c_void_p()
        if lib.nvmlDeviceGetHandleByPciBusId_v2(pci_bus_id.encode(), ctypes.byref(handle)) != 0:
            # NVML counts GPUs physically, as CUDA_VISIBLE_DEVICES names them
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
            if not visible.isdigit() or lib.nvmlDeviceGetHandleByIndex_v2(int(visible), ctypes.byref(handle)):
                return
        self.lib, self.handle = lib, handle

    def read(self) -> int | None:
        if self.lib is None:
            return None
        clock = ctypes.c_uint()
        if self.lib.nvmlDeviceGetClockInfo(self.handle, _CLOCK_SM, ctypes.byref(clock)) != 0:
            return None
        return int(clock.value)
