"""Run generated CUDA kernels on the CPU, so their indexing is checked without a GPU (tests only).

``cudaemu.h`` turns the CUDA C that templates render into C++ that g++ compiles: each CUDA
thread is a fiber, barriers and warp collectives (shuffles, ldmatrix, mma.sync, wgmma) are
rendezvous points, cp.async copies run at once or at their wait_group. The inline-PTX
section of the source (between ``// BEGIN PTX`` and ``// END PTX``) is swapped for the
emulated definitions of ``cudaemu_ptx.h``; a source may instead call the ``emu::`` functions
of ``cudaemu.h`` under ``#ifdef AUTOTUNE_EMULATE``. The fake pycuda of ``tests/fake_pycuda``
launches its kernels here too.

Kernels run in a worker process on buffers fenced by inaccessible pages: a read or write
past the end of an array kills the worker (reported as a crash), bytes just before and
after each array are NaN canaries (an out-of-bounds read that reaches an output shows as
NaN; a write there is reported). Outputs start as NaN, workspaces as zeros (or as the
caller passes them: a kernel that must leave its workspace as it found it is run twice),
as in the CUDA runner. Shared memory addressed by offset is checked against the launch's
dynamic size. This checks what the generated code computes with the documented semantics
of each instruction; it cannot check timing, the hardware's own behaviour or resources.
"""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from runtime.abi import tma_box_fits
from runtime.tensor_map import TENSOR_MAP_BYTES
from search_space import KernelSource, Task, get_template
from search_space.codegen.cuda import resolve_launch
from search_space.ops.common import numpy_dtype

HERE = Path(__file__).resolve().parent
HEADER = HERE / "cudaemu.h"
PTX_HEADER = HERE / "cudaemu_ptx.h"
CUDA_INCLUDE = "/usr/local/cuda/include"
FLAGS = ["-std=c++17", "-O1", "-fPIC", "-w", f"-I{CUDA_INCLUDE}"]
_PTX_SECTION = re.compile(r"// BEGIN PTX.*?// END PTX", re.S)
_CLUSTER_DIMS = re.compile(r"__cluster_dims__\(\s*(\d+)\s*,\s*1\s*,\s*1\s*\)")
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w:]+(?:\s+\w+)*?)\s+(\w+)\s*\[\s*\]\s*;")


def cache_dir() -> Path:
    # the test session's fresh artifact cache when there is one, so a run pays what CI pays
    root = Path(os.environ.get("AUTOTUNE_CACHE_DIR") or tempfile.gettempdir())
    path = root / f"autotune-cudaemu-{os.getuid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def emulated_source(source: KernelSource) -> str:
    """The kernel as C++ for the emulator, plus an ``emu_run`` entry taking untyped pointers."""
    sections = iter(range(1 << 30))
    # the first PTX section becomes every emulated helper; later ones (wgmma) are covered by it
    code = _PTX_SECTION.sub(lambda _: '#include "cudaemu_ptx.h"' if next(sections) == 0 else "", source.code)
    ptx = next(sections) > 0
    clear_prefetched = "\n  prefetched.clear();" if ptx else ""
    code = _DYNAMIC_SMEM.sub(lambda m: f"{m.group(1)}* {m.group(2)} = reinterpret_cast<{m.group(1)}*>"
                                       f"(emu::dynamic_smem_bytes);", code)
    params = []
    pointers = scalars = maps = 0
    for arg in source.args:
        if arg.role == "scalar":
            params.append(f"s[{scalars}]")
            scalars += 1
        elif arg.role == "tensor_map":  # the kernel's TensorMap struct, 128 bytes by value
            params.append(f"*reinterpret_cast<const TensorMap*>(m + {TENSOR_MAP_BYTES * maps})")
            maps += 1
        else:  # converts to whatever pointer type the kernel declares (float4*, uint8_t*, ...)
            params.append(f"emu::AnyPtr{{p[{pointers}]}}")
            pointers += 1
    found = _CLUSTER_DIMS.search(source.code)
    cluster = int(found.group(1)) if found else 1
    return '#include "cudaemu.h"\n' + code + f"""
extern "C" int emu_run(void** p, long long* s, const unsigned char* m, unsigned gx, unsigned gy, unsigned gz,
                       unsigned bx, unsigned by, unsigned bz, int deferred, unsigned seed, char* error) {{
  emu::kernel_body = [=]() {{ {source.entry}({", ".join(params)}); }};{clear_prefetched}
  const int rc = emu::launch(gx, gy, gz, bx, by, bz, deferred != 0, seed, {cluster});
  if (rc) snprintf(error, 511, "%s", emu::failure);
  return rc;
}}
extern "C" void emu_set_dynamic_smem(unsigned long long bytes) {{
  emu::dynamic_smem_size = bytes < emu::SMEM_BYTES ? bytes : emu::SMEM_BYTES;
}}
""" + ("""
// the addresses the last launch's prefetch_l2 calls named: how many, and the first ``cap`` of them
extern "C" unsigned long long emu_prefetched(unsigned long long* out, unsigned long long cap) {
  for (unsigned long long i = 0; i < cap && i < prefetched.size(); ++i) out[i] = (unsigned long long)prefetched[i];
  return prefetched.size();
}
""" if ptx else "")


_PCH_LOCK = threading.Lock()


def precompiled_header(name: str, text: str, flags: list[str]) -> Path:
    """A directory holding header ``name`` (contents ``text``) and its precompiled form for
    ``flags``; a source that includes it from there skips parsing the C++ library headers,
    which is most of each compile."""
    folder = cache_dir() / ("pch-" + hashlib.sha256((text + " ".join(flags)).encode()).hexdigest()[:16])
    gch = folder / f"{name}.gch"
    with _PCH_LOCK:  # builds run in threads: one of them compiles the header, the others wait
        if not gch.exists():
            _compile_header(folder, name, text, flags)
    return folder


def _compile_header(folder: Path, name: str, text: str, flags: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # other processes may build the same header: each writes its own files and renames them in
    header = folder / f".{name}.{os.getpid()}"
    header.write_text(text)
    os.replace(header, folder / name)
    tmp = folder / f".{name}.gch.{os.getpid()}"
    proc = subprocess.run(["g++", "-x", "c++-header", *flags, "-o", str(tmp), str(folder / name)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed on {name}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, folder / f"{name}.gch")


def runtime_object() -> Path:
    """The emulator's state and scheduler (``cudaemu.h`` under CUDAEMU_RUNTIME), compiled once
    and linked into every kernel's library instead of being compiled with each kernel."""
    text = HEADER.read_text()
    obj = cache_dir() / ("runtime-" + hashlib.sha256((text + " ".join(FLAGS)).encode()).hexdigest()[:16] + ".o")
    with _PCH_LOCK:
        if not obj.exists():
            cpp = obj.with_suffix(".cpp")
            cpp.write_text('#define CUDAEMU_RUNTIME 1\n#include "cudaemu.h"\n')
            tmp = obj.with_name(f".{obj.name}.{os.getpid()}")  # other processes may build it too
            proc = subprocess.run(["g++", *FLAGS, "-c", f"-I{HERE}", "-o", str(tmp), str(cpp)],
                                  capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                raise RuntimeError(f"g++ failed on the emulator's runtime:\n{proc.stderr[-4000:]}")
            os.replace(tmp, obj)
    return obj


def build(source: KernelSource) -> Path:
    """Compile the emulated kernel into a shared library (cached by content)."""
    text = emulated_source(source)
    pch = precompiled_header("cudaemu.h", HEADER.read_text(), FLAGS)
    runtime = runtime_object()
    digest = hashlib.sha256((text + PTX_HEADER.read_text() + pch.name + runtime.name).encode()).hexdigest()[:24]
    lib = cache_dir() / f"{digest}.so"
    if lib.exists():
        return lib
    # every builder its own source and output file: two test processes building the same
    # kernel at once must not read each other's half-written files
    unique = f"{os.getpid()}.{threading.get_ident()}"  # builds run in threads too
    cpp = lib.with_name(f"{digest}.{unique}.cpp")
    cpp.write_text(text)
    tmp = lib.with_name(f".{lib.name}.{unique}")
    proc = subprocess.run(["g++", *FLAGS, "-shared", f"-I{pch}", f"-I{HERE}", "-o", str(tmp), str(cpp), str(runtime)],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"g++ failed on {cpp}:\n{proc.stderr[-4000:]}")
    os.replace(tmp, lib)
    cpp.unlink(missing_ok=True)
    return lib


# ----------------------------------------------------------------------------- fenced buffers

PAGE = mmap.PAGESIZE
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
CANARY = 0xFF  # NaN in float32, float16 and bfloat16


class Fenced:
    """An array whose (16-byte rounded) end touches an inaccessible page, with a page before it."""

    def __init__(self, nbytes: int, dtype: np.dtype, shape: tuple[int, ...]):
        rounded = -(-max(nbytes, 1) // 16) * 16
        body = -(-rounded // PAGE) * PAGE
        self.map = mmap.mmap(-1, body + 2 * PAGE)
        raw = np.frombuffer(self.map, dtype=np.uint8)
        base = raw.ctypes.data
        raw[:] = CANARY
        for offset in (0, PAGE + body):
            if _libc.mprotect(base + offset, PAGE, 0) != 0:
                raise OSError(ctypes.get_errno(), "mprotect failed")
        self.start = PAGE + body - rounded
        self.raw = raw
        self.nbytes = nbytes
        self.array = raw[self.start:self.start + nbytes].view(dtype).reshape(shape)

    @property
    def pointer(self) -> int:
        return self.array.ctypes.data

    def canaries_intact(self) -> bool:
        before = self.raw[PAGE:self.start]
        after = self.raw[self.start + self.nbytes: len(self.raw) - PAGE]
        return bool(np.all(before == CANARY) and np.all(after == CANARY))


# ----------------------------------------------------------------------------- tensor maps
# The emulator's own encoding of a TMA descriptor (the driver's is opaque), read by the
# emulated copies (cudaemu_ptx.h, tma_load / tma_store): word 0 a magic number, the rank, the
# element size and the swizzle; word 1 the address; then the dims (5 words), the byte strides
# of every dim but the innermost (4) and the box (5), innermost first.
TENSOR_MAP_MAGIC = 0x50414D54  # "TMAP"


def encode_tensor_map(pointer: int, dtype: str, dims: tuple[int, ...], strides: tuple[int, ...],
                      box: tuple[int, ...], swizzle: int) -> bytes:
    itemsize = numpy_dtype(dtype).itemsize
    rank = len(dims)
    # the box comes innermost first here, as the driver takes it
    if not (len(box) == rank and len(strides) == rank - 1 and tma_box_fits(box[::-1], itemsize, swizzle)):
        raise ValueError(f"cuTensorMapEncodeTiled failed: invalid value (dims {dims}, box {box}, swizzle {swizzle})")
    pad = lambda values, n: list(values) + [0] * (n - len(values))  # noqa: E731
    words = ([(TENSOR_MAP_MAGIC << 32) | (rank << 24) | (itemsize << 16) | swizzle, pointer]
             + pad(dims, 5) + pad(strides, 4) + pad(box, 5))
    return np.array(words, dtype=np.uint64).tobytes()


class TensorMapApi:
    """What ``runtime.tensor_map`` asks the driver for, in the emulator's encoding."""

    encode_tiled = staticmethod(encode_tensor_map)


class _EmulatedDriver:
    tensor_map_api = TensorMapApi


def emu_launch(lib, addresses: list[int], scalars: list[int], maps: bytes, grid, block, smem: int, deferred: bool,
               seed: int) -> str | None:
    """Run a built kernel (``lib``, from ``build``) on its arguments by kind, in call order
    within each: array addresses, int64 dims, tensor maps (128 bytes each). None, or what
    went wrong."""
    lib.emu_run.restype = ctypes.c_int
    lib.emu_set_dynamic_smem(ctypes.c_ulonglong(smem))
    error = ctypes.create_string_buffer(512)
    rc = lib.emu_run((ctypes.c_void_p * max(len(addresses), 1))(*addresses),
                     (ctypes.c_longlong * max(len(scalars), 1))(*scalars),
                     ctypes.create_string_buffer(maps, max(len(maps), 1)),
                     *[ctypes.c_uint(v) for v in (*grid, *block)], ctypes.c_int(int(deferred)), ctypes.c_uint(seed),
                     error)
    return error.value.decode(errors="replace") if rc != 0 else None


def run_emulated(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: run the kernel once on fenced copies of the inputs (and of the workspaces
    given); return the outputs and the workspaces as the kernel left them."""
    source = KernelSource.from_dict(payload["source"])
    dims = payload["dims"]
    inputs = payload["inputs"]
    workspaces = payload.get("workspaces") or {}
    lib = ctypes.CDLL(payload["library"])
    buffers: dict[str, Fenced] = {}
    for arg in source.args:
        if arg.role in ("scalar", "tensor_map"):
            continue
        if arg.role == "workspace":
            fenced = Fenced(arg.nbytes, np.dtype(np.uint8), (arg.nbytes,))
            given = workspaces.get(arg.name)
            fenced.array[:] = 0 if given is None else given.view(np.uint8).reshape(-1)[:arg.nbytes]
        else:
            shape = arg.resolve_shape(dims)
            dtype = numpy_dtype(arg.dtype)
            fenced = Fenced(int(np.prod(shape)) * dtype.itemsize, dtype, shape)
            if arg.role == "in":
                fenced.array[...] = inputs[arg.name].reshape(shape)
            else:
                fenced.array.view(np.uint8)[...] = CANARY  # NaN: unwritten outputs show
        buffers[arg.name] = fenced
    from runtime.tensor_map import bound_values

    values = bound_values(_EmulatedDriver, source.args, {n: f.pointer for n, f in buffers.items()}, dims)
    failure = emu_launch(lib, [v for v in values if not isinstance(v, bytes)],
                         [int(dims[a.name]) for a in source.args if a.role == "scalar"],
                         b"".join(v for v in values if isinstance(v, bytes)),
                         *resolve_launch(source.launch_dims, dims), payload["deferred"], payload["seed"])
    if failure is not None:
        return {"error": failure}
    damaged = [name for name, f in buffers.items() if not f.canaries_intact()]
    if damaged:
        return {"error": f"wrote next to the arrays {damaged}"}
    # bytes, not values: an input may hold NaN (rows a kernel must not read)
    changed = [a.name for a in source.args if a.role == "in"
               and buffers[a.name].array.tobytes() != np.ascontiguousarray(inputs[a.name]).tobytes()]
    if changed:
        return {"error": f"wrote into the inputs {changed}"}
    return {"outputs": {a.name: buffers[a.name].array.copy() for a in source.args if a.role == "out"},
            "workspaces": {a.name: buffers[a.name].array.copy() for a in source.args if a.role == "workspace"},
            "prefetched": prefetched_lines(lib, buffers)}


def prefetched_lines(lib, buffers: dict[str, Fenced]) -> dict[str, int]:
    """Distinct 128-byte lines the launch's ``prefetch_l2`` calls named, by the array they lie
    in ("" for lines in none of them)."""
    try:
        entry = lib.emu_prefetched
    except AttributeError:  # a kernel without inline PTX prefetches nothing
        return {}
    entry.restype = ctypes.c_ulonglong
    count = entry(None, ctypes.c_ulonglong(0))
    addresses = (ctypes.c_ulonglong * max(count, 1))()
    entry(addresses, ctypes.c_ulonglong(count))
    lines: dict[str, set[int]] = {}
    for address in addresses[:count]:
        owner = next((name for name, f in buffers.items() if f.pointer <= address < f.pointer + f.array.nbytes), "")
        lines.setdefault(owner, set()).add(address // 128)
    return {name: len(found) for name, found in lines.items()}


class Emulator:
    """Checks (task, config) pairs of CUDA templates against their float64 references."""

    def __init__(self, timeout_s: float = 600.0):
        from measure.worker import WorkerProcess

        self.worker = WorkerProcess(name="cudaemu")
        self.timeout_s = timeout_s

    def run(self, source: KernelSource, dims: dict[str, int], inputs: dict[str, np.ndarray],
            deferred: bool = False, seed: int = 0, workspaces: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
        """``{"outputs": ..., "workspaces": ...}`` by argument name, or ``{"error": what went wrong}``."""
        library = build(source)
        payload = {"source": source.to_dict(), "dims": dims, "inputs": inputs, "library": str(library),
                   "deferred": deferred, "seed": seed, "workspaces": workspaces or {}}
        return self.worker.call("cudaemu:run_emulated", payload, self.timeout_s)

    def check(self, task: Task, config, target, seed: int = 0, deferred: bool = False) -> str | None:
        """None when the kernel's outputs match the reference, else what went wrong."""
        from measure.verify import check_output
        from measure.worker import WorkerCrash, WorkerTimeout

        template = get_template(task.op, "cuda")
        source = template.render(task, config, target)
        inputs = template.make_inputs(task, np.random.default_rng(seed))
        reference = template.reference(task, inputs)
        try:
            out = self.run(source, task.dims, inputs, deferred=deferred, seed=seed)
        except (WorkerCrash, WorkerTimeout) as exc:
            return f"{type(exc).__name__}: {exc}"
        if "error" in out:
            return out["error"]
        for arg in source.args:
            if arg.role == "out":
                problem = check_output(arg.name, out["outputs"][arg.name], reference[arg.name],
                                       template.tolerance(task), arg.dtype)
                if problem:
                    return problem
        return None

    def close(self) -> None:
        self.worker.close()
