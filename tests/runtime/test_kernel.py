"""Kernel.dims_for: what a call's arrays say about its dims, and what is wrong when they do not."""
from __future__ import annotations

import re

import numpy as np
import pytest

from runtime.abi import ArgSpec, KernelSpec
from runtime.kernel import Kernel


def rmsnorm_kernel() -> Kernel:
    """An rmsnorm kernel taking M at run time; dims_for never calls its function."""
    args = (ArgSpec("X", "in", shape=("M", "N")), ArgSpec("G", "in", shape=("N",)),
            ArgSpec("Y", "out", shape=("M", "N")), ArgSpec("M", "scalar", "int64"))
    return Kernel(KernelSpec.make("rmsnorm", {"M": 8, "N": 64}, dynamic=["M"]), args, lambda *a: None, tuned=True)


def test_the_dynamic_dim_is_read_off_the_arrays():
    kernel = rmsnorm_kernel()
    arrays = {"X": np.zeros((5, 64), np.float32), "G": np.zeros(64, np.float32)}
    assert kernel.dims_for(arrays) == {"M": 5, "N": 64}


@pytest.mark.parametrize("shape", [(320,), (1, 5, 64)])
def test_an_array_of_the_wrong_number_of_dims_is_named_with_its_shape(shape):
    kernel = rmsnorm_kernel()
    arrays = {"X": np.zeros(shape, np.float32), "G": np.zeros(64, np.float32)}
    with pytest.raises(ValueError, match=rf"input X: expected a 2-D array of shape \(M, N\), got shape "
                                         rf"{re.escape(str(shape))}"):
        kernel.dims_for(arrays)
    with pytest.raises(TypeError, match="pass the dynamic dim M"):  # no array holds M: the dim is missing
        kernel.dims_for({"G": np.zeros(64, np.float32)})
