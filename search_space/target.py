"""Where kernels run: a CPU or a CUDA device, with its limits as data."""
from __future__ import annotations

import dataclasses
import functools
import os
import re
from dataclasses import dataclass
from typing import Any

SCHEMA_VERSION = 1

# Compute capability -> (SM count, L2 bytes, shared memory per block opt-in) for the GPUs
# named by `Target.from_name`; anything else falls back to conservative Hopper-like limits.
_KNOWN_SM = {
    "sm_80": dict(sm_count=108, l2_bytes=40 << 20, max_shared_memory_per_block=163 << 10),
    "sm_86": dict(sm_count=84, l2_bytes=6 << 20, max_shared_memory_per_block=99 << 10),
    "sm_89": dict(sm_count=128, l2_bytes=72 << 20, max_shared_memory_per_block=99 << 10),
    "sm_90": dict(sm_count=132, l2_bytes=50 << 20, max_shared_memory_per_block=227 << 10),
    "sm_90a": dict(sm_count=132, l2_bytes=50 << 20, max_shared_memory_per_block=227 << 10),
}


@dataclass(frozen=True)
class Target:
    """A compilation and measurement target.

    CPU fields: ``cores``, ``vector_bits``, cache sizes and the LLVM ``features`` string
    (positive features only). CUDA fields: ``sm_count``, ``max_threads_per_block``,
    ``max_shared_memory_per_block``, ``max_registers_per_block``, ``l2_bytes``,
    ``clock_mhz``. Unused fields stay zero.
    """

    kind: str  # "cpu" | "cuda"
    arch: str  # LLVM CPU name ("znver4") or CUDA arch ("sm_90a")
    device_name: str = ""
    # CPU
    cores: int = 0
    vector_bits: int = 0
    features: str = ""
    l1_bytes: int = 0
    l2_bytes: int = 0
    l3_bytes: int = 0
    # CUDA
    sm_count: int = 0
    max_threads_per_block: int = 0
    max_shared_memory_per_block: int = 0
    max_registers_per_block: int = 0
    clock_mhz: int = 0
    version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "cuda"):
            raise ValueError(f"unknown target kind {self.kind!r}: expected 'cpu' or 'cuda'")

    @property
    def key(self) -> str:
        """A short stable name: targets with equal keys produce interchangeable kernels."""
        return f"{self.kind}-{self.arch}"

    @property
    def has_hopper_instructions(self) -> bool:
        """wgmma, TMA, thread-block clusters: sm_90a's arch-specific instructions (ptxas refuses
        them for sm_80-sm_89, and for sm_90 without the "a")."""
        return self.kind == "cuda" and self.arch == "sm_90a"

    @property
    def uses_cpu_threads(self) -> bool:
        """Its kernels run on CPU threads: a ``threads`` knob, and ``--threads`` applies."""
        return self.kind == "cpu"

    @property
    def vector_lanes_f32(self) -> int:
        return max(self.vector_bits // 32, 1)

    def has_feature(self, name: str) -> bool:
        return f"+{name}" in self.features.split(",")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Target":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def host(cls) -> "Target":
        """The CPU this process runs on, as LLVM sees it."""
        return _host_target()

    @classmethod
    def from_name(cls, name: str) -> "Target":
        """``cpu``/``host`` for this CPU, or a CUDA arch like ``sm_90a`` (compile-only)."""
        if name in ("cpu", "host", "llvm"):
            return cls.host()
        if re.fullmatch(r"sm_(\d+)a?", name):
            # an arch's SM count and shared memory are what the constraints check: one not known
            # here would be given another's (and "sm_9" would fail at every nvcc call)
            limits = _KNOWN_SM.get(name)
            if limits is None:
                raise ValueError(f"unknown CUDA arch {name!r}: compile-only targets are {', '.join(_KNOWN_SM)}")
            return cls(
                kind="cuda",
                arch=name,
                device_name=f"compile-only {name}",
                max_threads_per_block=1024,
                max_registers_per_block=65536,
                clock_mhz=0,
                **limits,
            )
        raise ValueError(f"unknown target {name!r}: use 'cpu' or a CUDA arch such as 'sm_90a'")

    @classmethod
    def cuda(cls, device: int = 0) -> "Target":
        """Query a real GPU through pycuda (imported lazily: pycuda is an optional extra)."""
        try:
            import pycuda.driver as drv
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise RuntimeError("the cuda target needs pycuda: the project's cuda extra, pip install -e '.[cuda]'") from exc
        drv.init()
        dev = drv.Device(device)
        attr = drv.device_attribute
        major, minor = dev.compute_capability()
        arch = f"sm_{major}{minor}" + ("a" if major >= 9 else "")
        return cls(
            kind="cuda",
            arch=arch,
            device_name=dev.name(),
            sm_count=dev.get_attribute(attr.MULTIPROCESSOR_COUNT),
            max_threads_per_block=dev.get_attribute(attr.MAX_THREADS_PER_BLOCK),
            max_shared_memory_per_block=dev.get_attribute(attr.MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            max_registers_per_block=dev.get_attribute(attr.MAX_REGISTERS_PER_BLOCK),
            l2_bytes=dev.get_attribute(attr.L2_CACHE_SIZE),
            clock_mhz=dev.get_attribute(attr.CLOCK_RATE) // 1000,
        )


def _read_cache_bytes(level: int) -> int:
    """Per-core data/unified cache size from sysfs (0 when unknown)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            path = os.path.join(base, entry)
            with open(os.path.join(path, "level")) as f:
                if int(f.read()) != level:
                    continue
            with open(os.path.join(path, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
            with open(os.path.join(path, "size")) as f:
                text = f.read().strip()
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except (OSError, ValueError):
        pass
    return 0


@functools.lru_cache(maxsize=None)
def _host_target() -> Target:
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    features = ",".join(f for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+"))
    flags = set(features.split(","))
    vector_bits = 512 if "+avx512f" in flags else 256 if "+avx2" in flags else 128
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return Target(
        kind="cpu",
        arch=llvm.get_host_cpu_name(),
        device_name=model,
        cores=cores,
        vector_bits=vector_bits,
        features=features,
        l1_bytes=_read_cache_bytes(1) or 32 << 10,
        l2_bytes=_read_cache_bytes(2) or 1 << 20,
        l3_bytes=_read_cache_bytes(3),
    )
