"""Fixtures of the runtime tests."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def default_kernels():
    """Template defaults, compiled once for every test of a module."""
    from export import TunedKernels

    with TunedKernels.defaults() as kernels:
        yield kernels
