"""CUDA C -> cubin with nvcc, keeping ptxas's resource report as build stats.

Needs nvcc on the PATH but no GPU: a cubin built here for ``sm_90a`` loads on an H200.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from search_space import KernelSource, Target

NVCC_FLAGS = ("-cubin", "-O3", "-std=c++17", "-Xptxas", "-v")
NVCC_TIMEOUT_S = 120


class CudaCompileError(RuntimeError):
    pass


def nvcc_path() -> str:
    path = shutil.which("nvcc")
    if path is None:
        raise CudaCompileError("nvcc not found on PATH: the CUDA toolkit is needed to build CUDA kernels")
    return path


def compile_flags(target: Target) -> str:
    return "nvcc " + " ".join(NVCC_FLAGS) + f" -arch={target.arch}"


_RELEASE = re.compile(r"release [\d.]+, V([\d.]+)")


def compiler_version() -> str:
    """nvcc's version as kept in each record ("nvcc 12.4.131"), or "" when no nvcc answers
    here: another nvcc may make other code of the same source (part of the record's code identity)."""
    path = shutil.which("nvcc")
    return _nvcc_version(path) if path else ""


@functools.lru_cache(maxsize=4)
def _nvcc_version(path: str) -> str:
    try:
        proc = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    match = _RELEASE.search(proc.stdout)
    if proc.returncode != 0 or match is None:
        return ""
    return f"nvcc {match.group(1)}"


_REGISTERS = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_BARRIERS = re.compile(r"used (\d+) barriers")


def parse_ptxas(report: str) -> dict[str, int]:
    """Registers, static shared memory, stack and spills from ``ptxas -v`` output."""
    stats: dict[str, int] = {"registers": 0, "smem_bytes": 0, "stack_bytes": 0, "spill_stores": 0,
                             "spill_loads": 0, "barriers": 0}
    if m := _REGISTERS.search(report):
        stats["registers"] = int(m.group(1))
    if m := _SMEM.search(report):
        stats["smem_bytes"] = int(m.group(1))
    if m := _STACK.search(report):
        stats["stack_bytes"], stats["spill_stores"], stats["spill_loads"] = (int(g) for g in m.groups())
    if m := _BARRIERS.search(report):
        stats["barriers"] = int(m.group(1))
    return stats


def compile_to_cubin(source: KernelSource, target: Target) -> tuple[bytes, dict[str, Any]]:
    if source.lang != "cuda":
        raise CudaCompileError(f"expected CUDA source, got {source.lang}")
    nvcc = nvcc_path()
    with tempfile.TemporaryDirectory(prefix="autotune-nvcc-") as tmp:
        cu, cubin = Path(tmp) / "kernel.cu", Path(tmp) / "kernel.cubin"
        cu.write_text(source.code)
        start = time.perf_counter()
        try:
            proc = subprocess.run([nvcc, *NVCC_FLAGS, f"-arch={target.arch}", "-o", str(cubin), str(cu)],
                                  capture_output=True, text=True, timeout=NVCC_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise CudaCompileError(f"nvcc took longer than {NVCC_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()] or proc.stderr.splitlines()
            raise CudaCompileError("nvcc failed: " + " | ".join(errors[:5]))
        stats: dict[str, Any] = parse_ptxas(proc.stderr + proc.stdout)
        stats["nvcc_s"] = time.perf_counter() - start
        data = cubin.read_bytes()
    stats["artifact_bytes"] = len(data)
    return data, stats
