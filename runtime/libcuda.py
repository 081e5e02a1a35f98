"""The CUDA driver library through ctypes, for the few driver calls pycuda does not wrap
(graph capture in ``runtime.cuda_graph``, TMA descriptors in ``runtime.tensor_map``): the
same ``libcuda`` pycuda itself uses, in the same process."""
from __future__ import annotations

import ctypes


def open_libcuda(error: type[Exception]) -> ctypes.CDLL:
    """libcuda, with ``cuGetErrorString`` declared; ``error`` when it cannot be opened."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        raise error(f"the CUDA driver library cannot be opened: {exc}") from None
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def check(lib, result: int, call: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``call`` and the driver's words for ``result`` unless it is 0."""
    if result != 0:
        text = ctypes.c_char_p()
        lib.cuGetErrorString(result, ctypes.byref(text))
        raise error(f"{call} failed: {(text.value or b'unknown error').decode()} ({result})")
