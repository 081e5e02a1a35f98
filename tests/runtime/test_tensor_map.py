"""TMA descriptors as ``runtime.tensor_map`` asks the driver for them: what reaches
``cuTensorMapEncodeTiled`` (checked against a stand-in for libcuda that records its
arguments, since no driver exists here), and the refusals before any driver call."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from runtime import tensor_map
from runtime.abi import ArgSpec


class RecordingLibcuda:
    """libcuda's cuTensorMapEncodeTiled and cuGetErrorString, recording what they are given."""

    def __init__(self, result: int = 0):
        self.result = result
        self.calls = []

    def cuTensorMapEncodeTiled(self, out, dtype, rank, pointer, dims, strides, box, element_strides, interleave,  # noqa: N802
                               swizzle, promotion, fill):
        self.calls.append(dict(out=out.value, dtype=dtype, rank=rank, pointer=pointer, dims=list(dims[:rank]),
                               strides=list(strides[:rank - 1]), box=list(box[:rank]),
                               element_strides=list(element_strides[:rank]), interleave=interleave, swizzle=swizzle,
                               promotion=promotion, fill=fill))
        if self.result == 0:
            ctypes.memmove(out.value, bytes(range(128)), 128)
        return self.result

    def cuGetErrorString(self, result, text):  # noqa: N802
        text._obj.value = b"invalid argument"
        return 0


def _driver(lib: RecordingLibcuda):
    encoder = tensor_map._Libcuda.__new__(tensor_map._Libcuda)
    encoder.lib = lib

    class Driver:  # a pycuda without a fake tensor_map_api: the libcuda path is taken
        pass

    return Driver, encoder


Q = ArgSpec("Q", "in", "float16", ("B", "T", "H", "D"))
Q_MAP = ArgSpec("Q_map", "tensor_map", "float16", (1, 64, 1, 64), of="Q", swizzle=128)


def test_the_driver_gets_the_array_innermost_first_with_byte_strides_and_an_aligned_map(monkeypatch):
    lib = RecordingLibcuda()
    driver, encoder = _driver(lib)
    monkeypatch.setattr(tensor_map, "_libcuda", lambda: encoder)
    dims = {"B": 2, "T": 100, "H": 8, "D": 128}
    encoded = tensor_map.encode(driver, Q_MAP, Q, 0x7F0000001000, dims)
    (call,) = lib.calls
    assert encoded == bytes(range(128))
    assert call["out"] % 64 == 0  # CUtensorMap is 64-byte aligned
    assert call["rank"] == 4 and call["pointer"] == 0x7F0000001000
    assert call["dims"] == [128, 8, 100, 2]                     # D, H, T, B
    assert call["strides"] == [128 * 2, 8 * 128 * 2, 100 * 8 * 128 * 2]
    assert call["box"] == [64, 1, 64, 1] and call["element_strides"] == [1, 1, 1, 1]
    assert (call["dtype"], call["swizzle"], call["interleave"], call["fill"]) == (6, 3, 0, 0)  # fp16, 128 B


def test_a_refused_descriptor_is_an_error_naming_the_driver_call(monkeypatch):
    driver, encoder = _driver(RecordingLibcuda(result=1))
    monkeypatch.setattr(tensor_map, "_libcuda", lambda: encoder)
    with pytest.raises(tensor_map.TensorMapError, match=r"cuTensorMapEncodeTiled failed: invalid argument \(1\)"):
        tensor_map.encode(driver, Q_MAP, Q, 0x1000, {"B": 1, "T": 8, "H": 1, "D": 64})


@pytest.mark.parametrize("pointer, dims, words", [
    (0x1008, {"B": 1, "T": 8, "H": 1, "D": 64}, "16-byte aligned"),      # an address TMA cannot take
    (0x1000, {"B": 1, "T": 8, "H": 1, "D": 12}, "16-byte aligned"),      # 24-byte rows
])
def test_what_tma_cannot_address_is_refused_before_the_driver(pointer, dims, words, monkeypatch):
    lib = RecordingLibcuda()
    driver, encoder = _driver(lib)
    monkeypatch.setattr(tensor_map, "_libcuda", lambda: encoder)
    with pytest.raises(tensor_map.TensorMapError, match=words):
        tensor_map.encode(driver, Q_MAP, Q, pointer, dims)
    assert not lib.calls


def test_a_box_of_another_rank_than_its_array_is_refused():
    x = ArgSpec("X", "in", "float16", ("M", "K"))
    box = ArgSpec("X_map", "tensor_map", "float16", (1, 64, 64), of="X", swizzle=128)
    with pytest.raises(tensor_map.TensorMapError, match="a box of 3 dims for X's 2"):
        tensor_map.encode(object(), box, x, 0x1000, {"M": 64, "K": 64})


def test_bound_values_put_descriptors_first_then_addresses():
    class Fake:
        @staticmethod
        def tensor_map_api():
            class Api:
                @staticmethod
                def encode_tiled(pointer, dtype, dims, strides, box, swizzle):
                    return b"M" * 128
            return Api()

    x = ArgSpec("X", "in", "float16", ("M", "K"))
    y = ArgSpec("Y", "out", "float16", ("M", "N"))
    args = (ArgSpec("X_map", "tensor_map", "float16", (64, 64), of="X", swizzle=128), x, y,
            ArgSpec("M", "scalar", "int64"))
    values = tensor_map.bound_values(Fake, args, {"X": 0x1000, "Y": 0x2000}, {"M": 64, "K": 64, "N": 8})
    assert values == [b"M" * 128, 0x1000, 0x2000]
    types = tensor_map.prepared_types(args)
    assert types[0] == np.dtype("V128") and types[1] is np.uintp and types[3] is np.int64


def test_a_tensor_map_arg_needs_its_array_a_box_and_a_known_swizzle():
    with pytest.raises(ValueError, match="a tensor map needs the array it is of"):
        ArgSpec("X_map", "tensor_map", "float16", (64, 64), swizzle=128)
    with pytest.raises(ValueError, match="swizzle in"):
        ArgSpec("X_map", "tensor_map", "float16", (64, 64), of="X", swizzle=96)
    spec = ArgSpec("X_map", "tensor_map", "float16", (64, 64), of="X", swizzle=128)
    assert ArgSpec.from_dict(spec.to_dict()) == spec
    assert "of" not in ArgSpec("X", "in", "float16", ("M", "K")).to_dict()  # other args' records unchanged
