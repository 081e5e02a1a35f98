"""What the kernel cache holds, and clearing it.

The cache (``builder.default_cache_dir``: ``~/.cache/llm-autotune/kernels`` or
``AUTOTUNE_CACHE_DIR``) keeps each built kernel as ``DIGEST.o`` or ``DIGEST.cubin`` with
``DIGEST.json`` (its build stats and sha256) and ``DIGEST.source.json`` beside it. Nothing
removes them by itself: a long-tuned machine holds tens of thousands. Clearing removes only
files of those names (and temporary files a killed write left), never anything else in the
folder; a kernel's files go together.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

# a kernel's files: the artifact, its stats, its source (builder.artifact_path and _store)
KERNEL_FILE = re.compile(r"^([0-9a-f]{32})(\.o|\.cubin|\.json|\.source\.json)$")
LEFTOVER = re.compile(r"^\.[0-9a-f]{32}(\.o|\.cubin|\.json|\.source\.json)\.\d+\.tmp$")  # _atomic_write's
ARTIFACTS = (".o", ".cubin")


@dataclass
class CacheUsage:
    """Kernels (artifacts) and the bytes of every cache file, by artifact kind."""

    folder: Path
    kernels: dict[str, int] = field(default_factory=dict)  # ".o" / ".cubin" -> count
    files: int = 0
    bytes: int = 0

    @property
    def total_kernels(self) -> int:
        return sum(self.kernels.values())


def _kernel_files(folder: Path) -> dict[str, list[Path]]:
    """The cache's files by kernel digest; leftovers of killed writes under ""."""
    groups: dict[str, list[Path]] = {}
    if not folder.is_dir():
        return groups
    for path in folder.iterdir():
        match = KERNEL_FILE.match(path.name)
        if match and path.is_file() and not path.is_symlink():
            groups.setdefault(match.group(1), []).append(path)
        elif LEFTOVER.match(path.name) and path.is_file() and not path.is_symlink():
            groups.setdefault("", []).append(path)
    return groups


def usage(folder: Path) -> CacheUsage:
    out = CacheUsage(Path(folder))
    for files in _kernel_files(Path(folder)).values():
        for path in files:
            out.files += 1
            out.bytes += path.stat().st_size
            if path.suffix in ARTIFACTS:
                out.kernels[path.suffix] = out.kernels.get(path.suffix, 0) + 1
    return out


def clear(folder: Path, older_than_s: float | None = None) -> CacheUsage:
    """Remove the cache's kernels (those built more than ``older_than_s`` ago, or all) and
    leftovers of killed writes; returns what was removed. Run it while no job builds: one that
    finds a kernel gone between looking and loading fails that candidate."""
    removed = CacheUsage(Path(folder))
    cutoff = None if older_than_s is None else time.time() - older_than_s
    for digest, files in _kernel_files(Path(folder)).items():
        built = max(p.stat().st_mtime for p in files)
        if cutoff is not None and built > cutoff:
            continue
        for path in files:
            size = path.stat().st_size
            path.unlink(missing_ok=True)
            removed.files += 1
            removed.bytes += size
            if path.suffix in ARTIFACTS:
                removed.kernels[path.suffix] = removed.kernels.get(path.suffix, 0) + 1
    return removed
