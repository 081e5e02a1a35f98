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
import json
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from .kernel import ArgInfo, Kernel, KernelProvider, KernelSpec, UntunedShapeWarning, ctypes_signature, select

FORMAT = "llm-autotune-kernels"  # the manifest format export.library_writer writes and this module reads
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# Instruction-set extensions whose absence makes a kernel die of SIGILL, in LLVM's spelling;
# /proc/cpuinfo spells them with underscores (avx512_bf16), which the comparison ignores.
_CHECKED_FEATURES = ("avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512dq", "avx512vl",
                     "avx512cd", "avx512bf16", "avx512vnni", "avx512vbmi", "avx512vbmi2", "avx512ifma",
                     "avx512bitalg", "avx512vpopcntdq", "avx512fp16", "avxvnni")


class LibraryFormatError(ValueError):
    """The directory is not a kernel library this version of the runtime reads."""


class IncompatibleCpuError(ValueError):
    """The library was compiled for instruction-set extensions this CPU lacks."""


def read_manifest(path: str | Path) -> dict[str, Any]:
    folder = Path(path)
    file = folder / MANIFEST
    if not file.is_file():
        raise FileNotFoundError(f"{folder} is not a kernel library: it has no {MANIFEST}")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise LibraryFormatError(f"{file} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LibraryFormatError(f"{file} is not an {FORMAT} manifest")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or not 1 <= schema <= SCHEMA_VERSION:
        raise LibraryFormatError(f"{file} has schema {schema!r}; this runtime reads 1..{SCHEMA_VERSION}")
    return manifest


def spec_of_entry(entry: Mapping[str, Any]) -> KernelSpec:
    return KernelSpec.make(entry["op"], entry["dims"], entry["dtype"], entry.get("attrs") or {},
                           entry.get("dynamic") or ())


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
    need = [f[1:] for f in str(target.get("features", "")).split(",") if f.startswith("+")]
    return [f for f in need if f in _CHECKED_FEATURES and f not in have]


class KernelLibrary:
    """The kernels of an exported library, by spec: a ``KernelProvider`` like ``TunedKernels``.

    ``get(op, shape, dtype, attrs, dynamic)`` returns the library's kernel for that call (or
    the ``fallback`` provider's, see the module docstring; the library closes it);
    ``kernel(entry)`` one kernel by its entry name; ``entries`` the manifest's kernel records.
    ``warn_untuned=False`` silences the warning."""

    def __init__(self, path: str | Path, warn_untuned: bool = True, fallback: KernelProvider | None = None):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.target: dict[str, Any] = dict(self.manifest["target"])
        self.kind: str = self.target["kind"]
        self.entries: list[dict[str, Any]] = list(self.manifest["kernels"])
        self.warn_untuned = warn_untuned
        self._specs = [spec_of_entry(e) for e in self.entries]
        self._by_entry = {e["entry"]: e for e in self.entries}
        self._loaded: dict[str, Kernel] = {}
        self._fallback = fallback
        self._dll: ctypes.CDLL | None = None
        self._cuda = None
        if self.kind == "cpu":
            self._open_shared_library()
        elif self.kind != "cuda":
            raise LibraryFormatError(f"{self.path}: unknown target kind {self.kind!r}")

    def _open_shared_library(self) -> None:
        missing = missing_cpu_features(self.target)
        if missing:
            raise IncompatibleCpuError(f"{self.path} was compiled for {self.target.get('arch')} and needs "
                               f"{', '.join(missing)}, which this CPU lacks: export it again for this machine")
        name = self.manifest.get("library")
        if not name:
            raise LibraryFormatError(f"{self.path}: a CPU library without a shared object")
        # RTLD_LOCAL: two libraries loaded side by side keep their own symbols
        self._dll = ctypes.CDLL(str((self.path / name).resolve()), mode=ctypes.RTLD_LOCAL)

    # ------------------------------------------------------------------ KernelProvider

    def specs(self) -> list[KernelSpec]:
        return list(self._specs)

    def get(self, op: str, shape: Mapping[str, int], dtype: str = "float32", attrs: Mapping | None = None,
            dynamic: Sequence[str] = ()) -> Kernel:
        want = KernelSpec.make(op, dict(shape), dtype, dict(attrs or {}), tuple(dynamic))
        index = select(range(len(self._specs)), self._specs.__getitem__, want)
        if index is not None:
            return self.kernel(self.entries[index]["entry"])
        return self._untuned(want, op, shape, dtype, attrs, dynamic)

    def _untuned(self, want: KernelSpec, op, shape, dtype, attrs, dynamic) -> Kernel:
        if self._fallback is None:
            raise LookupError(f"the kernel library {self.path} has no kernel for {want.describe()}, and it was "
                              "loaded without a fallback (the tuning side's export.TunedKernels.defaults() "
                              "compiles template defaults)")
        if self.warn_untuned:
            warnings.warn(f"{want.describe()} is not in the kernel library {self.path}: running the template default",
                          UntunedShapeWarning, stacklevel=3)
        return self._fallback.get(op, shape, dtype, attrs, dynamic)

    def close(self) -> None:
        if self._fallback is not None:
            self._fallback.close()
            self._fallback = None
        if self._cuda is not None:
            self._cuda.close()
            self._cuda = None
        self._loaded.clear()

    def __enter__(self) -> "KernelLibrary":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ kernels

    def kernel(self, entry: str) -> Kernel:
        """The library's kernel named ``entry`` (a manifest entry name), loaded once."""
        loaded = self._loaded.get(entry)
        if loaded is not None:
            return loaded
        record = self._by_entry.get(entry)
        if record is None:
            raise KeyError(f"{self.path} has no kernel {entry!r}")
        args = tuple(ArgInfo.from_dict(a) for a in record["args"])
        if self.kind == "cpu":
            kernel = self._cpu_kernel(record, args)
        else:
            kernel = self._cuda_kernel(record, args)
        self._loaded[entry] = kernel
        return kernel

    def _cpu_kernel(self, record: Mapping[str, Any], args: tuple[ArgInfo, ...]) -> Kernel:
        assert self._dll is not None
        function = getattr(self._dll, record.get("symbol", record["entry"]))
        function.argtypes = ctypes_signature(args)
        function.restype = None
        return Kernel(spec_of_entry(record), args, function, tuned=bool(record.get("tuned", True)),
                      seconds=record.get("seconds"), config=dict(record.get("config") or {}),
                      entry=record["entry"], keepalive=self._dll)

    def _cuda_kernel(self, record: Mapping[str, Any], args: tuple[ArgInfo, ...]) -> Kernel:
        from .library_cuda import CudaModules  # pycuda is imported there, on first use

        if self._cuda is None:
            self._cuda = CudaModules()
        return self._cuda.kernel(self.path, record, spec_of_entry(record), args)


def load(path: str | Path, warn_untuned: bool = True, fallback: KernelProvider | None = None) -> KernelLibrary:
    """Open the kernel library exported to ``path`` (see ``KernelLibrary``)."""
    return KernelLibrary(path, warn_untuned, fallback)
