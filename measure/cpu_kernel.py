"""Load CPU object code into this process and call it on numpy arrays.

Objects are linked in memory by LLVM's MCJIT (no system linker needed); symbols such as
``pthread_create`` or ``expf`` resolve against the running process. Each loaded kernel
also gets a small repeat harness, compiled here, that calls the entry ``n`` times (cycling
over sets of buffers, for timing with cold caches) so that timing a microsecond kernel does
not measure Python's call overhead.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from search_space import ArgSpec, KernelSource, Target
from search_space.codegen import llvm_pool
from search_space.ops.common import numpy_dtype

from .compile_llvm import compile_to_object, new_target_machine
from .verify import GUARD_BYTES, GUARD_PATTERN

_HARNESS = "autotune_repeat"


def _harness_ir(source: KernelSource) -> str:
    """``autotune_repeat(table, sets, scalars..., n)``: call the entry n times, call i with
    the pointer set ``i % sets`` of ``table`` (sets x pointer arguments, row-major)."""
    n_ptr = sum(1 for a in source.args if a.role != "scalar")
    n_int = len(source.args) - n_ptr
    scalars = [f"i64 %s{i}" for i in range(n_int)]
    entry_params = ", ".join(["ptr"] * n_ptr + ["i64"] * n_int)
    offsets = "\n".join(f"  %at{j} = add i64 %base, {j}" for j in range(n_ptr))
    loads = "\n".join(f"  %slot{j} = getelementptr ptr, ptr %table, i64 %at{j}\n  %p{j} = load ptr, ptr %slot{j}"
                      for j in range(n_ptr))
    call_args = ", ".join([f"ptr %p{j}" for j in range(n_ptr)] + scalars)
    params = ", ".join(["ptr %table", "i64 %sets"] + scalars + ["i64 %n"])
    return f"""
declare void @{source.entry}({entry_params})

define void @{_HARNESS}({params}) {{
entry:
  %go = icmp sgt i64 %n, 0
  br i1 %go, label %loop, label %done
loop:
  %i = phi i64 [0, %entry], [%next, %loop]
  %set = urem i64 %i, %sets
  %base = mul i64 %set, {n_ptr}
{offsets}
{loads}
  call void @{source.entry}({call_args})
  %next = add nsw i64 %i, 1
  %more = icmp slt i64 %next, %n
  br i1 %more, label %loop, label %done
done:
  ret void
}}
"""


def _check_order(args: tuple[ArgSpec, ...]) -> None:
    seen_scalar = False
    for arg in args:
        if arg.role == "scalar":
            seen_scalar = True
        elif seen_scalar:
            raise ValueError("CPU kernels take pointer arguments before scalar ones")


@dataclass
class LoadedKernel:
    """A callable CPU kernel: ``kernel(buffers, dims)`` and ``kernel.repeat(buffers, dims, n)``."""

    source: KernelSource
    engine: object
    entry: object
    harness: object

    def _argv(self, buffers: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> list:
        argv: list = []
        for arg in self.source.args:
            if arg.role == "scalar":
                argv.append(ctypes.c_int64(int(dims[arg.name])))
            else:
                array = buffers[arg.name]
                if not array.flags.c_contiguous:
                    raise ValueError(f"argument {arg.name} must be C-contiguous")
                argv.append(ctypes.c_void_p(array.ctypes.data))
        return argv

    def __call__(self, buffers: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> None:
        self.entry(*self._argv(buffers, dims))

    def repeat(self, buffers: Mapping[str, np.ndarray], dims: Mapping[str, int], n: int) -> None:
        self.rotate([buffers], dims, n)

    def rotate(self, sets: list[Mapping[str, np.ndarray]], dims: Mapping[str, int], n: int) -> None:
        """Call n times, cycling through the buffer ``sets`` (see ``TimingPolicy.cold_bytes``)."""
        self.rotation(sets, dims)(n)

    def rotation(self, sets: list[Mapping[str, np.ndarray]], dims: Mapping[str, int]) -> Callable[[int], None]:
        """``run(n)``: call n times, cycling through the buffer ``sets``; each run goes on from the
        set after the last one the run before called. Were every run to start again at the first
        set, a sample of fewer calls than there are sets would only ever touch its first few, and
        its inputs would be found as near as those few fill, not as far back as all of them.
        The pointer table is built here, once: built per call, its Python work (about 4 us a set)
        would be timed with the kernel, a quarter of a millisecond a sample with 64 sets."""
        rows = np.array([[a.value for a in self._argv(bufs, dims) if isinstance(a, ctypes.c_void_p)]
                         for bufs in sets], dtype=np.uint64)
        table = np.concatenate([rows, rows])  # twice over: a run may start at any set and wrap
        row_bytes, count = rows.shape[1] * rows.itemsize, len(sets)
        scalars = [a for a in self._argv(sets[0], dims) if isinstance(a, ctypes.c_int64)]
        harness, start = self.harness, [0]

        def run(n: int) -> None:
            harness(ctypes.c_void_p(table.ctypes.data + start[0] * row_bytes), ctypes.c_int64(count), *scalars,
                    ctypes.c_int64(n))
            start[0] = (start[0] + n) % count

        run.keepalive = (table, sets)  # the table, and the arrays its pointers point into
        return run


def load_object(obj: bytes, source: KernelSource, target: Target) -> LoadedKernel:
    import llvmlite.binding as llvm

    _check_order(source.args)
    tm = new_target_machine(target.arch, target.features)  # the engine takes ownership of it
    host = llvm.parse_assembly(_harness_ir(source))
    host.triple = llvm.get_process_triple()
    host.verify()
    engine = llvm.create_mcjit_compiler(host, tm)
    # parallel kernels call the worker pool: compiled once per process, shared by every kernel
    # loaded here (why it is not inside each kernel object: search_space/codegen/llvm_pool.py)
    llvm_pool.install()
    engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
    engine.finalize_object()
    n_ptr = sum(1 for a in source.args if a.role != "scalar")
    n_int = len(source.args) - n_ptr
    types = [ctypes.c_void_p] * n_ptr + [ctypes.c_int64] * n_int
    entry = ctypes.CFUNCTYPE(None, *types)(engine.get_function_address(source.entry))
    harness = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, *([ctypes.c_int64] * n_int),
                               ctypes.c_int64)(engine.get_function_address(_HARNESS))
    if not engine.get_function_address(source.entry):
        raise RuntimeError(f"entry {source.entry} not found in object")
    return LoadedKernel(source, engine, entry, harness)


def compile_and_load(source: KernelSource, target: Target) -> LoadedKernel:
    """Compile in this process and load: for small, trusted kernels (tests, runtime fallbacks)."""
    return load_object(compile_to_object(source.code, target), source, target)


def allocate_args(source: KernelSource, dims: Mapping[str, int], inputs: Mapping[str, np.ndarray],
                  poison: bool = True) -> dict[str, np.ndarray]:
    """Buffers for every array argument: the given inputs, outputs filled with NaN, workspaces."""
    buffers: dict[str, np.ndarray] = {}
    for arg in source.args:
        if arg.role == "in":
            array = np.ascontiguousarray(inputs[arg.name])
            expected = arg.resolve_shape(dict(dims))
            if expected and array.size != int(np.prod(expected)):
                raise ValueError(f"input {arg.name} has {array.size} elements, kernel expects {expected}")
            buffers[arg.name] = array
        elif arg.role == "out":
            shape = arg.resolve_shape(dict(dims))
            out = guarded_empty(shape, numpy_dtype(arg.dtype))
            if poison:
                out.fill(np.nan if out.dtype.kind == "f" else 0xFFFF)
            buffers[arg.name] = out
        elif arg.role == "workspace":
            buffers[arg.name] = allocate_workspace(arg.nbytes)
    return buffers


def guarded_empty(shape, dtype) -> np.ndarray:
    """An array followed in memory by GUARD_BYTES of a known pattern (see ``overran``)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + GUARD_BYTES, dtype=np.uint8)
    raw[nbytes:] = GUARD_PATTERN
    return raw[:nbytes].view(dtype).reshape(shape)


def overran(array: np.ndarray) -> bool:
    """Whether a kernel wrote into the guard after ``array`` (one made by ``guarded_empty``)."""
    base = array
    while base is not None and not (base.dtype == np.uint8 and base.ndim == 1
                                    and base.size == array.nbytes + GUARD_BYTES):
        base = base.base
    return base is not None and bool((base[array.nbytes:] != GUARD_PATTERN).any())


def allocate_workspace(nbytes: int) -> np.ndarray:
    """Scratch memory aligned to 64 bytes: kernels may use aligned vector stores into it."""
    raw = np.empty(nbytes + 64, dtype=np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset:offset + nbytes]
