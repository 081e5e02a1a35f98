"""nvcc builds cubins here without a GPU; ptxas's report becomes build stats."""
from __future__ import annotations

import re

import pytest

from measure.compile_cuda import CudaCompileError, compile_to_cubin, compiler_version, parse_ptxas
from search_space import ArgSpec, KernelSource, Target
from search_space.codegen.cuda import PREAMBLE, evaluate, kernel_params, resolve_launch

ARGS = (ArgSpec("A", "in", "float16", ("N",)), ArgSpec("Y", "out", "float16", ("N",)), ArgSpec("N", "scalar", "int64"))
LAUNCH = (("block", (256, 1, 1)), ("grid", ("(N + 255) // 256", 1, 1)), ("smem", 0))


def source(body: str) -> KernelSource:
    code = PREAMBLE + f'extern "C" __global__ void twice({kernel_params(ARGS)}) {{ {body} }}'
    return KernelSource("cuda", code, "twice", ARGS, LAUNCH)


@pytest.mark.tools("nvcc")
def test_cubin_and_resource_report():
    body = ("__shared__ float s[128]; long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; "
            "s[threadIdx.x % 128] = 2.0f; __syncthreads(); if (i < N) Y[i] = from_f32<__half>(s[0] * to_f32(A[i]));")
    data, stats = compile_to_cubin(source(body), Target.from_name("sm_90a"))
    assert len(data) > 1000 and data[:4] == b"\x7fELF"
    assert stats["registers"] > 0 and stats["smem_bytes"] == 512 and stats["barriers"] == 1
    assert stats["spill_stores"] == 0


@pytest.mark.tools("nvcc")
def test_compile_error_names_the_problem():
    with pytest.raises(CudaCompileError, match="undefined"):
        compile_to_cubin(source("Y[0] = not_declared;"), Target.from_name("sm_90a"))


def test_launch_expressions():
    assert resolve_launch(dict(LAUNCH), {"N": 1000}) == ((4, 1, 1), (256, 1, 1), 0)
    assert evaluate("(L + 63) // 64 * B", {"L": 65, "B": 3}) == 6
    with pytest.raises(ValueError):
        evaluate("__import__('os')", {})


def test_occupancy_from_the_real_registers_and_the_launch():
    """A built kernel's occupancy (a cost-model feature): resident threads per SM / 2048 from
    ptxas's registers, its static plus the launch's dynamic shared memory, and the block."""
    from measure.resources import cuda_occupancy

    sm90, kernel = Target.from_name("sm_90a"), source("")
    assert cuda_occupancy(kernel, {"registers": 32, "smem_bytes": 512}, sm90, {"N": 1000}) == 1.0
    # 128 registers x 256 threads: two blocks' worth of the 65536 registers of an SM
    assert cuda_occupancy(kernel, {"registers": 128, "smem_bytes": 512}, sm90, {"N": 1000}) == 0.25
    # 100 KB of shared memory a block: two blocks fit the 227 KB
    assert cuda_occupancy(kernel, {"registers": 32, "smem_bytes": 100 << 10}, sm90, {"N": 1000}) == 0.25


def test_ptxas_report_parsing():
    report = ("ptxas info    : Used 40 registers, used 1 barriers, 8192 bytes smem\n"
              "    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads")
    assert parse_ptxas(report) == {"registers": 40, "smem_bytes": 8192, "stack_bytes": 16, "spill_stores": 8,
                                   "spill_loads": 4, "barriers": 1}


@pytest.mark.tools("nvcc")
def test_the_nvcc_version_is_named_or_empty_when_nvcc_cannot_say(tmp_path, monkeypatch):
    assert re.fullmatch(r"nvcc \d+(\.\d+)+", compiler_version())
    broken = tmp_path / "nvcc"
    broken.write_text("#!/bin/sh\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert compiler_version() == ""
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    assert compiler_version() == ""
