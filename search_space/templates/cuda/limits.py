"""Launch limits of a CUDA target as named space constraints, shared by the CUDA templates.

A template knows, before anything is compiled, how many threads a config launches per
block, how much shared memory it asks for and roughly how many registers each thread
needs. Configs that cannot launch on the target are rejected by the space, so the tuner
never spends a build on them; the builder checks ptxas's real numbers again after
compiling (``measure.resources``).
"""
from __future__ import annotations

from typing import Callable, Mapping

from ...target import Target

MAX_REGISTERS_PER_THREAD = 255
WARP = 32
# Shared memory a block may use without the opt-in attribute (cudaFuncSetAttribute).
DEFAULT_SMEM_BYTES = 48 << 10

Values = Mapping[str, object]


def smem_limit(target: Target) -> int:
    return target.max_shared_memory_per_block or DEFAULT_SMEM_BYTES


def launch_constraints(
    target: Target,
    threads: Callable[[Values], int],
    smem: Callable[[Values], int],
    registers: Callable[[Values], int],
) -> list[tuple[str, Callable[[Values], bool]]]:
    """Named constraints: threads per block, shared memory per block, register estimate.

    ``threads``, ``smem`` (bytes, static + dynamic) and ``registers`` (per thread, an
    estimate) are functions of a config's values.
    """
    max_threads = target.max_threads_per_block or 1024
    max_smem = smem_limit(target)
    max_regs_block = target.max_registers_per_block or 65536

    def regs_fit(c: Values) -> bool:
        regs = registers(c)
        return regs <= MAX_REGISTERS_PER_THREAD and block_registers(regs, threads(c)) <= max_regs_block

    return [
        (f"threads per block <= {max_threads}", lambda c: threads(c) <= max_threads),
        (f"shared memory per block <= {max_smem} bytes", lambda c: smem(c) <= max_smem),
        (f"registers (estimate) <= {MAX_REGISTERS_PER_THREAD} per thread and "
         f"{max_regs_block} per block", regs_fit),
    ]


def block_registers(registers_per_thread: int, threads: int) -> int:
    """Registers a block occupies: allocated per warp in units of 256 (8 per thread)."""
    per_warp = -(-registers_per_thread * WARP // 256) * 256
    warps = -(-threads // WARP)
    return per_warp * warps


def blocks_per_sm(threads: int, smem_bytes: int, registers_per_thread: int, target: Target) -> int:
    """Resident blocks per SM, limited by threads (2048), shared memory and registers."""
    by_threads = 2048 // max(threads, 1)
    sm_smem = (target.max_shared_memory_per_block or DEFAULT_SMEM_BYTES) + (1 << 10)
    by_smem = sm_smem // max(smem_bytes + (1 << 10), 1)  # the driver reserves 1 KB per block
    by_regs = 65536 // max(block_registers(max(registers_per_thread, 1), threads), 1)
    return max(0, min(by_threads, by_smem, by_regs, 32))


def occupancy(threads: int, smem_bytes: int, registers_per_thread: int, target: Target) -> float:
    """Resident threads per SM as a share of the 2048 an SM holds: how much latency the SM can
    hide by switching warps (a cost-model feature; ptxas's registers replace the estimate once
    a candidate is built, ``measure.resources``)."""
    return blocks_per_sm(threads, smem_bytes, registers_per_thread, target) * threads / 2048


# Warp-specialised kernels: a producer warpgroup and 1 or 2 consumer warpgroups. With two
# consumers (384 threads: 170 registers each otherwise) setmaxnreg moves registers from the
# producer to them: 128 x 40 + 256 x 232 fits the 65536 of an SM.
PRODUCER_REGISTERS, CONSUMER_REGISTERS = 40, 232


def warp_specialised_registers(consumers: int, need: int) -> int:
    """Registers per thread of such a block, the figure the launch constraint checks, when a
    consumer thread needs ``need``: with one consumer every thread may have that many; with two,
    setmaxnreg gives the consumers up to CONSUMER_REGISTERS (needing more is rejected)."""
    if consumers == 1:
        return need
    if need > CONSUMER_REGISTERS:
        return MAX_REGISTERS_PER_THREAD + 1
    return -(-(128 * PRODUCER_REGISTERS + consumers * 128 * need) // (128 * (1 + consumers)))


def setmaxnreg_calls(consumers: int) -> tuple[str, str]:
    """The C++ statements the producer and each consumer warpgroup start with (none with one consumer)."""
    if consumers == 1:
        return "", ""
    return f"setmaxnreg_dec<{PRODUCER_REGISTERS}>();", f"setmaxnreg_inc<{CONSUMER_REGISTERS}>();"
