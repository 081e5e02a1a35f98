"""Load an exported kernel library (written by ``autotune export``) with numpy and ctypes only.

``runtime.load("lib/")`` reads ``manifest.json``, opens the shared library with ctypes (CPU)
or the cubins with pycuda (CUDA, imported on first use) and hands out ``runtime.kernel.Kernel``
objects chosen by ``runtime.kernel.select``: static dims exactly, dynamic dims at the nearest
tuned bucket. A call no kernel of the library serves goes to the ``fallback`` provider given
at load time, with an ``UntunedShapeWarning`` (the tuning side passes
``export.TunedKernels.defaults()``, which compiles template defaults); without one it is a
LookupError. Nothing here imports any other part of the project.
"""
from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import struct
import warnings
from pathlib import Path, PurePosixPath
from typing import Any, Mapping, Sequence

import numpy as np

from .abi import (MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION, NUMPY_DTYPES, ROLES, ArgSpec, KernelSpec,
                  numpy_dtype, tma_box_fits)
from .kernel import Kernel, KernelProvider, UntunedShapeWarning, ctypes_signature, select
from .launch import evaluate

MANIFEST = "manifest.json"

# What a manifest may say, checked before anything reaches ctypes or the GPU.
MAX_DIM = 2**31 - 1                # no tensor dim comes near it; a larger one is an edited manifest
MAX_WORKSPACE_BYTES = 1 << 32      # scratch a kernel asks for when loaded: 4 GiB is past any template's
MAX_SHARED_BYTES = 1 << 20         # dynamic shared memory per CUDA block (GPUs offer at most 228 KiB)
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# A CPU entry is looked up with dlsym, which also searches the libraries the .so links (libc:
# "system", "abort"): only names of the form export gives its kernels, <op>_<dtype>_<10 hex>.
CPU_ENTRY = re.compile(r"[a-z0-9_]+_[0-9a-f]{10}\Z")

# Instruction-set extensions whose absence makes a kernel die of SIGILL, in LLVM's spelling,
# with /proc/cpuinfo's name where it differs beyond underscores (avx512_bf16 is avx512bf16):
# those LLVM may emit in generated code (gfni: byte shifts; bmi, lzcnt, popcnt: scalar code).
# Extensions no kernel here is compiled to use (amx, aes, sha) are left out: where the kernel
# is too old to list them a library would be refused on the very CPU it was built on.
_CHECKED_FEATURES = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse41", "sse4.2": "sse42", "popcnt": "popcnt",
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm",
    "movbe": "movbe", "gfni": "gfni", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq",
    "avx512vl": "avx512vl", "avx512cd": "avx512cd", "avx512bf16": "avx512bf16", "avx512vnni": "avx512vnni",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512vbmi2", "avx512ifma": "avx512ifma",
    "avx512bitalg": "avx512bitalg", "avx512vpopcntdq": "avx512vpopcntdq", "avx512fp16": "avx512fp16",
    "avxvnni": "avxvnni"}


class LibraryFormatError(ValueError):
    """The directory is not a kernel library this version of the runtime reads."""


class IncompatibleCpuError(ValueError):
    """The library was compiled for instruction-set extensions this CPU lacks."""


class UnverifiedLibraryWarning(UserWarning):
    """A library from an older export records no sha256 of its code, or no contract of its
    kernels: it is loaded unchecked."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a kernel library: it has no {MANIFEST}")
    if not file.resolve().is_relative_to(folder.resolve()):  # a library reads only its own files
        raise LibraryFormatError(f"{file} leads out of the library folder (to {file.resolve()})")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: JSON nested past Python's stack
        raise LibraryFormatError(f"{file} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise LibraryFormatError(f"{file} is not an {MANIFEST_FORMAT} manifest")
    schema = manifest.get("schema")
    if not _is_int(schema) or not 1 <= schema <= MANIFEST_SCHEMA_VERSION:
        raise LibraryFormatError(f"{file} has schema {schema!r}; this runtime reads 1..{MANIFEST_SCHEMA_VERSION}")
    return manifest


# ----------------------------------------------------------------------------- files


def library_file(folder: Path, name: Any, what: str) -> Path:
    """The file ``name`` (as the manifest spells it) inside the library ``folder``, resolved:
    a relative path without ``..`` that, symlinks followed, stays inside the folder."""
    if not isinstance(name, str) or not name:
        raise LibraryFormatError(f"{folder}: {what} has no file name")
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or "\0" in name:
        raise LibraryFormatError(f"{folder}: {what} {name!r} is not a path inside the library folder")
    try:
        root = folder.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise LibraryFormatError(f"{folder}: {what} {name!r} leads out of the library folder (to {path})")
        if not path.is_file():
            raise LibraryFormatError(f"{folder}: {what} {name!r} is missing")
    except OSError as exc:  # a name past the file system's length limit, a loop of symlinks
        raise LibraryFormatError(f"{folder}: {what} {name[:80]!r} cannot be opened: {exc.strerror or exc}") from None
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(actual: str, expected: Any, what: str) -> None:
    """A file whose content is not what export wrote is never run."""
    if actual != expected:
        raise LibraryFormatError(f"{what}: sha256 {actual} does not match the manifest's {expected!r}: "
                                 "the file was changed after export")


# ----------------------------------------------------------------------------- the manifest


def expected_task_key(entry: Mapping[str, Any]) -> str:
    """The task key export wrote for an entry with these op, dtype, dims and attributes (the
    format of ``search_space.Task.key``): an entry whose dims were edited no longer matches it."""
    dims = ",".join(f"{k}{'~' if k in entry['dynamic'] else ''}={v}" for k, v in entry["dims"].items())
    key = f"{entry['op']}/{entry['dtype']}/{dims}"
    attrs = entry.get("attrs") or {}
    if attrs:
        key += "/" + ",".join(f"{k}={json.dumps(v)}" for k, v in sorted(attrs.items()))
    return key


# What the runtime believes of a kernel when it calls it. Export seals these fields of every
# entry together with the sha256 of the code they describe (``contract_sha256``), so an entry
# edited after export (its dims and task, arguments, launch, or the symbol it names) is refused
# instead of called on arrays its code does not expect. From schema 2 the seal covers the
# manifest's target too: the CPU features a library is checked against before it is loaded
# are those it was compiled for. This guards against edits and corruption, not malice:
# whoever can write the folder can put any code in it.
CONTRACT_FIELDS = ("entry", "symbol", "task", "op", "dtype", "dims", "dynamic", "attrs", "lang", "args", "launch")
TARGET_SEALED_FROM_SCHEMA = 2


def contract_sha256(entry: Mapping[str, Any], code_sha256: Any, target: Mapping[str, Any] | None = None) -> str:
    """The seal of ``entry``'s contract with the code it describes (a JSON-shaped entry, as
    the manifest holds it) and, from schema 2, the target it was compiled for."""
    contract = {"code_sha256": code_sha256, **{k: entry.get(k) for k in CONTRACT_FIELDS}}
    if target is not None:
        contract["target"] = target
    return hashlib.sha256(json.dumps(contract, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _sealed_target(manifest: Mapping[str, Any]) -> Mapping[str, Any] | None:
    return manifest["target"] if manifest.get("schema", 1) >= TARGET_SEALED_FROM_SCHEMA else None


def seal_contracts(manifest: dict[str, Any]) -> None:
    """Export's side: give every kernel record its ``contract_sha256`` (the code hashes first)."""
    loader = LOADERS[manifest["target"]["kind"]]
    as_read = json.loads(json.dumps(manifest))  # exactly what runtime.load will read back
    for entry, read in zip(manifest["kernels"], as_read["kernels"]):
        entry["contract_sha256"] = contract_sha256(read, loader.code_sha256(as_read, read), _sealed_target(as_read))


def check_contracts(manifest: Mapping[str, Any], folder: Path) -> list[str]:
    """Refuse a kernel record that is not what export sealed for its code; returns the entries
    of a library from before contracts were sealed (loaded with a warning). Export seals every
    entry or (before contracts) none: a library where some are sealed and others not, or of a
    schema that seals them all with some missing, was edited, and is refused."""
    loader, unsealed = LOADERS[manifest["target"]["kind"]], []
    target = _sealed_target(manifest)
    for entry in manifest["kernels"]:
        sealed = entry.get("contract_sha256")
        if sealed is None:
            unsealed.append(entry["entry"])
        elif sealed != contract_sha256(entry, loader.code_sha256(manifest, entry), target):
            raise LibraryFormatError(f"{folder / MANIFEST}: kernel {entry['entry']} was edited after export: what "
                                     "it says of its dims, arguments, launch, symbol or target is not what export "
                                     "sealed with its code (export it again rather than editing it)")
    if unsealed and (target is not None or len(unsealed) < len(manifest["kernels"])):
        raise LibraryFormatError(f"{folder / MANIFEST}: kernel {unsealed[0]} was edited after export: it has no "
                                 "contract_sha256, where export seals every kernel's (export it again)")
    return unsealed


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_dtype(value: Any) -> bool:
    return isinstance(value, str) and value in NUMPY_DTYPES


def _check_dims(entry: Mapping[str, Any], where: str) -> None:
    dims = entry.get("dims")
    if not isinstance(dims, dict) or not dims:
        raise LibraryFormatError(f"{where}: dims must be an object of dim names and sizes")
    for name, value in dims.items():
        if not IDENTIFIER.match(name) or not _is_int(value) or not 1 <= value <= MAX_DIM:
            raise LibraryFormatError(f"{where}: dim {name} = {value!r} is not a positive int up to {MAX_DIM}")
    dynamic = entry.get("dynamic")
    if (not isinstance(dynamic, list) or any(not isinstance(d, str) or d not in dims for d in dynamic)
            or len(set(dynamic)) != len(dynamic)):
        raise LibraryFormatError(f"{where}: dynamic dims {dynamic!r} are not distinct dims of {list(dims)}")


def _check_args(entry: Mapping[str, Any], where: str) -> None:
    """Arguments as the calling convention has them: arrays of known dtypes whose shapes name
    the entry's dims, workspaces of sane sizes, then one int64 per dim taken at run time."""
    args, dims = entry.get("args"), entry["dims"]
    if not isinstance(args, list) or not args:
        raise LibraryFormatError(f"{where}: args must be a list")
    names, scalars_started, arrays_started = set(), False, False
    arrays = {a["name"]: a for a in args
              if isinstance(a, dict) and isinstance(a.get("name"), str) and a.get("role") in ("in", "out")}
    for arg in args:
        if not isinstance(arg, dict) or not isinstance(arg.get("name"), str) or not IDENTIFIER.match(arg["name"]):
            raise LibraryFormatError(f"{where}: argument {arg!r} has no valid name")
        name, role = arg["name"], arg.get("role")
        if name in names:
            raise LibraryFormatError(f"{where}: two arguments are named {name}")
        names.add(name)
        if role not in ROLES:
            raise LibraryFormatError(f"{where}: argument {name} has role {role!r}, not one of {ROLES}")
        if scalars_started and role != "scalar":
            raise LibraryFormatError(f"{where}: argument {name} comes after the int64 dims")
        scalars_started = role == "scalar"
        if arrays_started and role == "tensor_map":
            raise LibraryFormatError(f"{where}: tensor map {name} comes after an array")
        arrays_started = role != "tensor_map"
        if role == "tensor_map":
            _check_tensor_map(arg, arrays.get(arg.get("of")), where)
        elif role in ("in", "out"):
            shape = arg.get("shape")
            if not _is_dtype(arg.get("dtype", "float32")) or not isinstance(shape, list):
                raise LibraryFormatError(f"{where}: array {name} needs a known dtype and a shape")
            for d in shape:
                if not (d in dims if isinstance(d, str) else _is_int(d) and 1 <= d <= MAX_DIM):
                    raise LibraryFormatError(f"{where}: array {name} has shape {shape}: {d!r} is not a dim "
                                             f"of {list(dims)} or a positive int")
        elif role == "workspace":
            nbytes = arg.get("nbytes", 0)
            if not _is_int(nbytes) or not 0 <= nbytes <= MAX_WORKSPACE_BYTES:
                raise LibraryFormatError(f"{where}: workspace {name} of {nbytes!r} bytes (at most "
                                         f"{MAX_WORKSPACE_BYTES})")
        elif name not in dims:
            raise LibraryFormatError(f"{where}: int64 argument {name} is not a dim of {list(dims)}")
    scalars = {a["name"] for a in args if a["role"] == "scalar"}
    if not set(entry["dynamic"]) <= scalars:
        raise LibraryFormatError(f"{where}: dynamic dims {entry['dynamic']} are not all int64 arguments")


def _check_tensor_map(arg: Mapping[str, Any], array: Mapping[str, Any] | None, where: str) -> None:
    """A TMA descriptor's box: of an array of this kernel, a size per dim of it, as the hardware
    takes it (at most 256 per dim, the innermost within the swizzle span)."""
    name, box, swizzle = arg["name"], arg.get("shape"), arg.get("swizzle", 0)
    if array is None or not _is_dtype(arg.get("dtype")) or array.get("dtype") != arg.get("dtype"):
        raise LibraryFormatError(f"{where}: tensor map {name} is not of an array argument of its dtype")
    if (not isinstance(box, list) or len(box) != len(array.get("shape") or ()) or not all(_is_int(b) for b in box)
            or not _is_int(swizzle)
            or not tma_box_fits(box, numpy_dtype(arg["dtype"]).itemsize, swizzle)):
        raise LibraryFormatError(f"{where}: tensor map {name}: box {box!r} with swizzle {swizzle!r} is not one "
                                 "TMA can copy")


def _check_launch(entry: Mapping[str, Any], where: str) -> None:
    """CUDA launch geometry: a block of at most 1024 threads, a grid and shared memory that
    evaluate at the entry's dims, and whether it takes a programmatic launch (a bool)."""
    launch = entry.get("launch")
    if not isinstance(launch, dict):
        raise LibraryFormatError(f"{where}: no launch geometry")
    block, grid = launch.get("block"), launch.get("grid")
    if (not isinstance(block, list) or not 1 <= len(block) <= 3 or not all(_is_int(b) and b >= 1 for b in block)
            or math.prod(block) > 1024):
        raise LibraryFormatError(f"{where}: block {block!r} is not 1 to 3 positive ints of at most 1024 threads")
    if not isinstance(grid, list) or not 1 <= len(grid) <= 3 or not all(isinstance(g, (int, str)) for g in grid):
        raise LibraryFormatError(f"{where}: grid {grid!r} is not 1 to 3 ints or expressions")
    try:
        sizes = [evaluate(g, entry["dims"]) for g in grid]
        smem = evaluate(launch.get("smem", 0), entry["dims"])
    except (KeyError, ValueError, TypeError, ZeroDivisionError, SyntaxError, RecursionError) as exc:
        raise LibraryFormatError(f"{where}: launch geometry does not evaluate at its dims: {exc!r}") from None
    if any(n < 1 for n in sizes) or not 0 <= smem <= MAX_SHARED_BYTES:
        raise LibraryFormatError(f"{where}: grid {sizes} or shared memory {smem} bytes out of range")
    if not isinstance(launch.get("programmatic", False), bool):
        raise LibraryFormatError(f"{where}: programmatic {launch['programmatic']!r} is not true or false")


def check_entry(entry: Any, kind: str) -> None:
    """Refuse a kernel record the runtime could not call safely (LibraryFormatError)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("entry"), str) or not IDENTIFIER.match(entry["entry"]):
        raise LibraryFormatError(f"a kernel record without a valid entry name: {str(entry)[:80]}")
    where = f"kernel {entry['entry']}"
    if not isinstance(entry.get("op"), str) or not _is_dtype(entry.get("dtype")):
        raise LibraryFormatError(f"{where}: needs an op and a known dtype")
    for key in ("attrs", "config"):
        if not isinstance(entry.get(key) or {}, dict):
            raise LibraryFormatError(f"{where}: {key} must be an object")
    _check_dims(entry, where)
    if entry.get("task") != expected_task_key(entry):
        raise LibraryFormatError(f"{where}: its op, dtype, dims and attributes ({expected_task_key(entry)}) "
                                 f"do not match its task {entry.get('task')!r}")
    _check_args(entry, where)
    LOADERS[kind].check_entry(entry, where)


def check_manifest(manifest: Mapping[str, Any], folder: Path) -> None:
    """The whole manifest: a target and a list of valid kernel records with distinct entry names."""
    target, kernels = manifest.get("target"), manifest.get("kernels")
    if not isinstance(target, dict) or not isinstance(target.get("kind"), str) or target["kind"] not in LOADERS:
        raise LibraryFormatError(f"{folder}: the manifest's target kind is not one of {', '.join(LOADERS)}")
    if not isinstance(kernels, list):
        raise LibraryFormatError(f"{folder}: the manifest has no list of kernels")
    try:
        LOADERS[target["kind"]].check_target(target)
        for entry in kernels:
            check_entry(entry, target["kind"])
    except LibraryFormatError as exc:
        raise LibraryFormatError(f"{folder / MANIFEST}: {exc}") from None
    names = [e["entry"] for e in kernels]
    if len(set(names)) != len(names):
        raise LibraryFormatError(f"{folder / MANIFEST}: two kernels share an entry name")


def named_files(manifest: Mapping[str, Any]) -> list[tuple[Any, Any, str]]:
    """(name, recorded sha256 or None, what it is) of every file a checked manifest names."""
    files = LOADERS[manifest["target"]["kind"]].code_files(manifest)
    for entry in manifest["kernels"]:
        files.append((entry.get("source"), entry.get("source_sha256"), f"source of {entry['entry']}"))
    return files


def check_files(manifest: Mapping[str, Any], folder: Path) -> list[str]:
    """Check that every file the manifest names lies inside ``folder`` and has the sha256 it
    records; returns the files it records none for (libraries from before hashes were kept)."""
    unverified = []
    for name, expected, what in named_files(manifest):
        path = library_file(folder, name, what)
        if expected is None:
            unverified.append(str(name))
        else:
            check_sha256(sha256_of(path), expected, f"{folder}: {what} {name}")
    return unverified


def checked_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the library in ``folder`` once it and the files it names check out
    (``check_manifest``, ``check_files``); a library from before hashes were recorded loads
    with an ``UnverifiedLibraryWarning``."""
    manifest = read_manifest(folder)
    check_manifest(manifest, folder)
    unverified = check_files(manifest, folder)
    unsealed = check_contracts(manifest, folder)
    for what, names in (("sha256", unverified), ("contract", unsealed)):
        if names:
            more = " and more" if len(names) > 3 else ""
            warnings.warn(f"{folder} records no {what} of {', '.join(names[:3])}{more}: loaded unchecked "
                          "(export it again to have it checked)", UnverifiedLibraryWarning, stacklevel=4)
    return manifest


def check_shared_object(data: bytes, what: str) -> None:
    """A 64-bit ELF file whose program headers and segments lie within it: dlopen maps the
    segments, and one that runs past the end of a truncated file kills the process (SIGBUS)
    instead of failing."""
    if len(data) < 64 or data[:4] != b"\x7fELF" or data[4] != 2 or data[5] not in (1, 2):
        raise LibraryFormatError(f"{what} is not a 64-bit ELF shared object")
    order = "<" if data[5] == 1 else ">"
    phoff, = struct.unpack_from(order + "Q", data, 32)
    phentsize, phnum = struct.unpack_from(order + "HH", data, 54)
    if phentsize < 56 or phoff + phnum * phentsize > len(data):
        raise LibraryFormatError(f"{what}: its program headers lie past its end (the file is cut short)")
    for i in range(phnum):
        offset, = struct.unpack_from(order + "Q", data, phoff + i * phentsize + 8)
        size, = struct.unpack_from(order + "Q", data, phoff + i * phentsize + 32)
        if offset + size > len(data):
            raise LibraryFormatError(f"{what}: segment {i} lies past its end (the file is cut short)")


def spec_of_entry(entry: Mapping[str, Any]) -> KernelSpec:
    return KernelSpec.make(entry["op"], entry["dims"], entry["dtype"], entry.get("attrs") or {},
                           entry.get("dynamic") or ())


def required_cpu_features(target: Mapping[str, Any]) -> list[str]:
    """The extensions a library compiled for ``target`` (its manifest's target) may use that a
    CPU may lack, in the target's order."""
    features = target.get("features")
    if not isinstance(features, str):
        raise LibraryFormatError(f"the target's features {features!r} are not LLVM's feature string: what the "
                                 "library needs of a CPU cannot be checked")
    need = [f[1:] for f in features.split(",") if f.startswith("+")]
    return [f for f in need if f in _CHECKED_FEATURES]


def missing_cpu_features(target: Mapping[str, Any], cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """Extensions the library was compiled for that this CPU lacks ([] where nobody can tell)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return []
    have = {flag.replace("_", "") for flag in flags}
    return [f for f in required_cpu_features(target) if _CHECKED_FEATURES[f] not in have]


class KernelLibrary:
    """The kernels of an exported library, by spec: a ``KernelProvider`` like ``TunedKernels``.

    ``get(op, shape, dtype, attrs, dynamic)`` returns the library's kernel for that call (or
    the ``fallback`` provider's, see the module docstring; the library closes it);
    ``kernel(entry)`` one kernel by its entry name; ``entries`` the manifest's kernel records.
    ``warn_untuned=False`` silences the warning."""

    def __init__(self, path: str | Path, warn_untuned: bool = True, fallback: KernelProvider | None = None):
        self.path = Path(path)
        self.manifest = checked_manifest(self.path)
        self.target: dict[str, Any] = dict(self.manifest["target"])
        self.kind: str = self.target["kind"]
        self.entries: list[dict[str, Any]] = list(self.manifest["kernels"])
        self.warn_untuned = warn_untuned
        self._specs = [spec_of_entry(e) for e in self.entries]
        self._by_entry = {e["entry"]: e for e in self.entries}
        self._loaded: dict[str, Kernel] = {}
        self._warned: set[tuple] = set()  # the untuned kernels warned of
        self._closed = False
        self._fallback = fallback
        self._code = LOADERS[self.kind](self.path, self.manifest)

    # ------------------------------------------------------------------ KernelProvider

    def specs(self) -> list[KernelSpec]:
        return list(self._specs)

    def get(self, op: str, shape: Mapping[str, int], dtype: str = "float32", attrs: Mapping | None = None,
            dynamic: Sequence[str] = ()) -> Kernel:
        """The library's kernel for ``op`` at ``shape`` (dims by name), ``dtype``, ``attrs`` and
        the ``dynamic`` dims taken at run time (a dynamic dim at the nearest exported bucket);
        one it lacks comes from the fallback (with an UntunedShapeWarning). Raises ValueError
        for a dim that is not an int in range, LookupError when neither has the kernel, and
        RuntimeError after ``close``."""
        self._check_open()
        for name, value in dict(shape).items():  # 2.7 would be taken as 2, 0 divide by zero
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_DIM:
                raise ValueError(f"{op}: dim {name} must be an int from 1 to {MAX_DIM}, not {value!r}")
        want = KernelSpec.make(op, dict(shape), dtype, dict(attrs or {}), tuple(dynamic))
        index = select(range(len(self._specs)), self._specs.__getitem__, want)
        if index is not None:
            return self.kernel(self.entries[index]["entry"])
        return self._untuned(want, op, shape, dtype, attrs, dynamic)

    def _untuned(self, want: KernelSpec, op, shape, dtype, attrs, dynamic) -> Kernel:
        if self._fallback is None:
            raise LookupError(f"the kernel library {self.path} has no kernel for {want.key}{self._attrs_held(want)}, "
                              "and it was loaded without a fallback (the tuning side's "
                              "export.TunedKernels.defaults() compiles template defaults)")
        # once per kernel, not per value of its dynamic dims (a decode step's KV length grows every token)
        static = (want.op, want.dtype, want.attrs, tuple(kv for kv in want.shape if kv[0] not in want.dynamic))
        if self.warn_untuned and static not in self._warned:
            self._warned.add(static)
            warnings.warn(f"{want.key} is not in the kernel library {self.path}: running the template default",
                          UntunedShapeWarning, stacklevel=3)
        return self._fallback.get(op, shape, dtype, attrs, dynamic)

    def _attrs_held(self, want: KernelSpec) -> str:
        """Where the library has the op and dtype only with other attributes: which (a call that
        spells out an attribute at its default asks for another kernel than export keyed)."""
        held = {spec.attrs for spec in self._specs if spec.op == want.op and spec.dtype == want.dtype}
        if not held or want.attrs in held:
            return ""
        texts = sorted("{" + ", ".join(f"{k}={json.dumps(v)}" for k, v in attrs) + "}" for attrs in held)
        return (f" (its {want.op} kernels have the attributes {', '.join(texts)}; an attribute at its default "
                "value is left out of a kernel's key)")

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
        self._code.close()
        self._loaded.clear()
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:  # else a call no kernel served would blame a missing fallback
            raise RuntimeError(f"the kernel library {self.path} is closed: load it again to use it")

    def __enter__(self) -> "KernelLibrary":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ kernels

    def kernel(self, entry: str) -> Kernel:
        """The library's kernel named ``entry`` (a manifest entry name), loaded once."""
        self._check_open()
        loaded = self._loaded.get(entry)
        if loaded is not None:
            return loaded
        record = self._by_entry.get(entry)
        if record is None:
            raise KeyError(f"{self.path} has no kernel {entry!r}")
        kernel = self._code.kernel(record, tuple(ArgSpec.from_dict(a) for a in record["args"]))
        self._loaded[entry] = kernel
        return kernel


# --------------------------------------------------------------------------- one loader per target kind
# What differs between targets when a library is loaded: how a manifest entry names its code,
# which files hold that code, and how a kernel is opened from them. A new target is one class
# here (or in its own module, imported on first use) and its line in LOADERS.

# What this process has dlopen'ed: by file (device, inode) the sha256 of its bytes, and by path
# the sha256s of the libraries loaded from it, oldest first. dlopen hands back the library it
# loaded before from the same path string or the same file, and ctypes never unloads one.
_LOADED_FILES: dict[tuple[int, int], str] = {}
_LOADED_PATHS: dict[str, list[str]] = {}


def _dlopen_name(library: Path, digest: str, file: os.stat_result, folder: Path) -> str:
    """The name to dlopen ``library`` (of sha256 ``digest``) under: its path, or, for a library
    exported again to a path loaded before, that path spelled with ``/.`` segments, which dlopen
    does not take for the earlier one (the new file is another inode: it maps it afresh)."""
    if _LOADED_FILES.get((file.st_dev, file.st_ino), digest) != digest:
        raise LibraryFormatError(f"{folder}: {library.name} was rewritten in place after this process loaded it; "
                                 "the process runs what it loaded first: load it in a new process")
    versions = _LOADED_PATHS.setdefault(str(library), [])
    if digest not in versions:
        versions.append(digest)
    again = versions.index(digest)
    return str(library) if again == 0 else f"{library.parent}{'/.' * again}/{library.name}"


class SharedObjectKernels:
    """A CPU library: every kernel in one shared object, opened once with ctypes."""

    @staticmethod
    def check_target(target: Mapping[str, Any]) -> None:
        """The CPU features it was compiled for, checked against this CPU's before it is loaded."""
        required_cpu_features(target)

    @staticmethod
    def check_entry(entry: Mapping[str, Any], where: str) -> None:
        symbol = entry.get("symbol", entry["entry"])
        if symbol != entry["entry"] or not CPU_ENTRY.match(symbol):
            raise LibraryFormatError(f"{where}: symbol {symbol!r} is not an entry name export gives a kernel")
        if any(a["role"] == "tensor_map" for a in entry["args"]):
            raise LibraryFormatError(f"{where}: a CPU kernel takes no tensor maps (TMA is a CUDA feature)")
        if entry.get("lang", "llvm") != "llvm" or "cubin" in entry:
            raise LibraryFormatError(f"{where}: a CPU library's kernel is LLVM code in its shared library, "
                                     f"not {entry.get('lang')!r} code or a cubin")

    @staticmethod
    def code_files(manifest: Mapping[str, Any]) -> list[tuple[Any, Any, str]]:
        return [(manifest.get("library"), manifest.get("library_sha256"), "shared library")]

    @staticmethod
    def code_sha256(manifest: Mapping[str, Any], entry: Mapping[str, Any]) -> Any:
        return manifest.get("library_sha256")

    def __init__(self, folder: Path, manifest: Mapping[str, Any]):
        missing = missing_cpu_features(manifest["target"])
        if missing:
            raise IncompatibleCpuError(f"{folder} was compiled for {manifest['target'].get('arch')} and needs "
                                       f"{', '.join(missing)}, which this CPU lacks: export it again for this machine")
        library = library_file(folder, manifest.get("library"), "shared library")
        # The bytes that are checked are the bytes that are loaded: the file is read once and
        # checked; dlopen then takes its path (so debuggers and profilers find it), and a file
        # put there meanwhile (another inode) is refused.
        try:
            with open(library, "rb") as f:
                data = f.read()
                checked = os.fstat(f.fileno())
            digest = hashlib.sha256(data).hexdigest()
            if manifest.get("library_sha256") is not None:
                check_sha256(digest, manifest["library_sha256"], f"{folder}: {library.name}")
            check_shared_object(data, f"{folder}: {library.name}")
            name = _dlopen_name(library, digest, checked, folder)
            # RTLD_LOCAL: two libraries loaded side by side keep their own symbols
            self._dll = ctypes.CDLL(name, mode=ctypes.RTLD_LOCAL)
            loaded = os.stat(library)
        except OSError as exc:
            raise LibraryFormatError(f"{folder}: {library.name} cannot be loaded: {exc}") from None
        if (loaded.st_dev, loaded.st_ino) != (checked.st_dev, checked.st_ino):
            raise LibraryFormatError(f"{folder}: {library.name} was replaced while it was being loaded")
        _LOADED_FILES[(checked.st_dev, checked.st_ino)] = digest
        for entry in manifest["kernels"]:  # every kernel is there now, not at its first call
            if not hasattr(self._dll, entry.get("symbol", entry["entry"])):
                raise LibraryFormatError(f"{folder}: kernel {entry['entry']}: {library.name} has no symbol "
                                         f"{entry.get('symbol', entry['entry'])!r}")

    def kernel(self, record: Mapping[str, Any], args: tuple[ArgSpec, ...]) -> Kernel:
        function = getattr(self._dll, record.get("symbol", record["entry"]))
        function.argtypes = ctypes_signature(args)
        function.restype = None
        return Kernel(spec_of_entry(record), args, function, tuned=bool(record.get("tuned", True)),
                      seconds=record.get("seconds"), config=dict(record.get("config") or {}),
                      entry=record["entry"], keepalive=self._dll)

    def close(self) -> None:
        pass  # the shared object stays mapped while any of its kernels lives (their keepalive)


class CubinKernels:
    """A CUDA library: one cubin per kernel, loaded through pycuda (imported on first use)."""

    @staticmethod
    def check_target(target: Mapping[str, Any]) -> None:
        pass  # the driver refuses a cubin of another architecture, with an error, at load

    @staticmethod
    def check_entry(entry: Mapping[str, Any], where: str) -> None:
        symbol = entry.get("symbol", entry["entry"])
        if not isinstance(symbol, str) or not IDENTIFIER.match(symbol):
            raise LibraryFormatError(f"{where}: symbol {symbol!r} is not a C identifier")
        _check_launch(entry, where)

    @staticmethod
    def code_files(manifest: Mapping[str, Any]) -> list[tuple[Any, Any, str]]:
        return [(e.get("cubin"), e.get("cubin_sha256"), f"cubin of {e['entry']}") for e in manifest["kernels"]]

    @staticmethod
    def code_sha256(manifest: Mapping[str, Any], entry: Mapping[str, Any]) -> Any:
        return entry.get("cubin_sha256")

    def __init__(self, folder: Path, manifest: Mapping[str, Any]):
        self.folder = folder
        self._modules = None

    def kernel(self, record: Mapping[str, Any], args: tuple[ArgSpec, ...]) -> Kernel:
        from .library_cuda import CudaModules  # pycuda is imported there, on first use

        if self._modules is None:
            self._modules = CudaModules()
        # read and checked once more here: these are the bytes that run, whatever the file holds now
        cubin = library_file(self.folder, record["cubin"], f"cubin of {record['entry']}").read_bytes()
        if record.get("cubin_sha256") is not None:
            check_sha256(hashlib.sha256(cubin).hexdigest(), record["cubin_sha256"], f"{self.folder}: {record['cubin']}")
        return self._modules.kernel(self.folder, record, spec_of_entry(record), args, cubin)

    def close(self) -> None:
        if self._modules is not None:
            self._modules.close()
            self._modules = None


LOADERS = {"cpu": SharedObjectKernels, "cuda": CubinKernels}


def load(path: str | Path, warn_untuned: bool = True, fallback: KernelProvider | None = None) -> KernelLibrary:
    """Open the kernel library exported to ``path`` (see ``KernelLibrary``)."""
    return KernelLibrary(path, warn_untuned, fallback)
