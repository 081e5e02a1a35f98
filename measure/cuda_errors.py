"""What a CUDA driver error means for a candidate: its error, and whether it is sticky.

A sticky error (a fault while the kernel ran: illegal address, misaligned access, trap)
leaves the CUDA context unusable: every later call in that process fails too, so the worker
is replaced. A launch the driver refuses (too many registers or threads, too much shared
memory) is OUT_OF_RESOURCES, as is running out of device memory; the context stays usable.
"""
from __future__ import annotations

from .types import MeasureError

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
