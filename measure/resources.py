"""Does a compiled CUDA kernel fit the target? ptxas's report against the launch it asks for.

Spaces reject configs that cannot launch from estimates before anything is compiled; this
check runs after compiling, on the real register and shared-memory counts, so a candidate
the GPU would refuse is recorded as OUT_OF_RESOURCES instead of failing at launch.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from search_space import KernelSource, Target
from search_space.codegen.cuda import resolve_launch
from search_space.templates.cuda.limits import DEFAULT_SMEM_BYTES, MAX_REGISTERS_PER_THREAD, block_registers, occupancy

MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)


def cuda_resource_problems(source: KernelSource, stats: Mapping[str, Any], target: Target,
                           dims: Mapping[str, int]) -> list[str]:
    """What keeps this kernel from launching on ``target`` (empty when it fits)."""
    grid, block, dynamic = resolve_launch(source.launch_dims, dims)
    threads = math.prod(block)
    registers = int(stats.get("registers", 0))
    static = int(stats.get("smem_bytes", 0))
    max_threads = target.max_threads_per_block or 1024
    max_smem = target.max_shared_memory_per_block or DEFAULT_SMEM_BYTES
    max_regs = target.max_registers_per_block or 65536
    problems = []
    if threads > max_threads or any(b > m for b, m in zip(block, MAX_BLOCK)):
        problems.append(f"block {block} has {threads} threads, the target allows {max_threads}")
    if any(g < 1 or g > m for g, m in zip(grid, MAX_GRID)):
        problems.append(f"grid {grid} is outside {MAX_GRID}")
    if registers > MAX_REGISTERS_PER_THREAD:
        problems.append(f"{registers} registers per thread > {MAX_REGISTERS_PER_THREAD}")
    block_regs = block_registers(registers, threads)
    if block_regs > max_regs:
        problems.append(f"{registers} registers x {threads} threads = {block_regs} per block > {max_regs}")
    if static + dynamic > max_smem:
        problems.append(f"shared memory {static} static + {dynamic} dynamic = {static + dynamic} bytes "
                        f"> {max_smem}")
    return problems


def cuda_occupancy(source: KernelSource, stats: Mapping[str, Any], target: Target, dims: Mapping[str, int]) -> float:
    """The occupancy of a compiled kernel (resident threads per SM / 2048) from ptxas's
    registers and shared memory and the launch it asks for: the cost model's feature, the
    template's estimate replaced by the real counts."""
    _, block, dynamic = resolve_launch(source.launch_dims, dims)
    static = int(stats.get("smem_bytes", 0))
    return occupancy(math.prod(block), static + dynamic, int(stats.get("registers", 0)), target)
