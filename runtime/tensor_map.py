"""TMA descriptors (``CUtensorMap``) for the ``tensor_map`` arguments of CUDA kernels.

Hopper's tensor memory accelerator copies a box of a matrix from global to shared memory in
one instruction, laid out (and swizzled) as the tensor cores read it, with zeros where the
box hangs over the matrix's edges. It needs a 128-byte descriptor of the matrix, made on the
host by the driver (``cuTensorMapEncodeTiled``) from the array's address, and passed to the
kernel by value. Whoever binds a kernel's arrays (the tuning runner, a library's kernels)
encodes one per ``tensor_map`` argument here, from the address of the array it is ``of``.

pycuda 2026.1 does not wrap ``cuTensorMapEncodeTiled``: the call goes through ctypes to
``libcuda``, the driver pycuda itself uses (as ``runtime.cuda_graph`` does). The test
suite's fake pycuda offers the same call (``pycuda.driver.tensor_map_api``) in the CPU
emulator's own encoding.
"""
from __future__ import annotations

import ctypes
import functools
from typing import Any, Mapping

from .abi import ArgSpec, numpy_dtype
from .libcuda import check, open_libcuda

TENSOR_MAP_BYTES = 128
# CUtensorMapDataType, CUtensorMapSwizzle and CUtensorMapL2promotion of cuda.h
_DATA_TYPES = {"uint8": 0, "float16": 6, "float32": 7, "bfloat16": 9, "int32": 3, "int64": 5}
_SWIZZLES = {0: 0, 32: 1, 64: 2, 128: 3}
_L2_PROMOTION_256B = 3


class TensorMapError(RuntimeError):
    """The driver refused a descriptor (an address, stride or box TMA cannot take)."""


class _Libcuda:
    def __init__(self) -> None:
        lib = open_libcuda(TensorMapError)
        u64p, u32p = ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32)
        lib.cuTensorMapEncodeTiled.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p,
                                               u64p, u64p, u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                               ctypes.c_int]
        self.lib = lib

    def encode_tiled(self, pointer: int, dtype: str, dims: tuple[int, ...], strides: tuple[int, ...],
                     box: tuple[int, ...], swizzle: int) -> bytes:
        """``dims`` and ``box`` innermost first; ``strides`` in bytes, of every dim but the innermost."""
        rank = len(dims)
        # CUtensorMap is a 64-byte aligned struct: the driver writes it into aligned memory
        room = ctypes.create_string_buffer(TENSOR_MAP_BYTES + 64)
        out = (ctypes.addressof(room) + 63) & ~63
        result = self.lib.cuTensorMapEncodeTiled(
            ctypes.c_void_p(out), _DATA_TYPES[dtype], rank, pointer, (ctypes.c_uint64 * rank)(*dims),
            (ctypes.c_uint64 * max(rank - 1, 1))(*strides), (ctypes.c_uint32 * rank)(*box),
            (ctypes.c_uint32 * rank)(*([1] * rank)), 0, _SWIZZLES[swizzle], _L2_PROMOTION_256B, 0)
        check(self.lib, result, "cuTensorMapEncodeTiled", TensorMapError)
        return ctypes.string_at(out, TENSOR_MAP_BYTES)


@functools.lru_cache(maxsize=None)
def _libcuda() -> _Libcuda:
    return _Libcuda()


def _encoder(drv: Any):
    fake = getattr(drv, "tensor_map_api", None)
    return fake() if fake is not None else _libcuda()


def encode(drv: Any, arg: ArgSpec, array: ArgSpec, pointer: int, dims: Mapping[str, int]) -> bytes:
    """The descriptor ``arg`` (a ``tensor_map``) of ``array`` at device address ``pointer``, its
    shape taken at ``dims``: the array as it is (C order), boxes of ``arg.shape`` (one size per
    dim of the array, outermost first)."""
    shape = array.resolve_shape(dims)
    box = arg.resolve_shape(dims)
    itemsize = numpy_dtype(array.dtype).itemsize
    if len(box) != len(shape):
        raise TensorMapError(f"{arg.name}: a box of {len(box)} dims for {array.name}'s {len(shape)}")
    strides, step = [], itemsize
    for size in reversed(shape[1:]):
        step *= size
        strides.append(step)
    if pointer % 16 or any(s % 16 for s in strides):
        raise TensorMapError(f"{arg.name}: TMA needs 16-byte aligned rows ({array.name} at {pointer:#x}, "
                             f"strides {strides} bytes)")
    return _encoder(drv).encode_tiled(int(pointer), array.dtype, tuple(reversed(shape)), tuple(strides),
                                      tuple(reversed(box)), arg.swizzle)


def bound_values(drv: Any, args: tuple[ArgSpec, ...], pointers: Mapping[str, int], dims: Mapping[str, int]) -> list:
    """The values of a kernel's non-scalar arguments in call order: an encoded descriptor
    (bytes) for each ``tensor_map``, the device address for each array and workspace."""
    by_name = {a.name: a for a in args}
    return [encode(drv, a, by_name[a.of], pointers[a.of], dims) if a.role == "tensor_map" else int(pointers[a.name])
            for a in args if a.role != "scalar"]


def prepared_types(args: tuple[ArgSpec, ...]) -> list:
    """pycuda ``prepare`` types: 128 raw bytes per descriptor, a pointer per array, int64 per dim."""
    import numpy as np

    return [np.dtype(f"V{TENSOR_MAP_BYTES}") if a.role == "tensor_map" else np.int64 if a.role == "scalar"
            else np.uintp for a in args]
