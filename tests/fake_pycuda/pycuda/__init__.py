"""A stand-in for pycuda, for tests on machines without a GPU (see ``driver``).

It implements the part of ``pycuda.driver`` the project uses, on host memory: "device"
pointers are real host addresses, and a launch runs the kernel's CUDA source on the CPU
emulator of ``tests/cudaemu.py``. Cubins are opaque to it: ``module_from_buffer`` finds the
source a cubin was built from in a registry directory (``FAKE_PYCUDA_REGISTRY``) that the
test fills, keyed by the cubin's sha256, or else beside the cubin in the builder's cache.
"""
VERSION_TEXT = "fake"
