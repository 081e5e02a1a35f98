"""Render and compile candidates in parallel worker processes, with a content-addressed cache."""
from __future__ import annotations

import hashlib
import os
import queue
import stat
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from search_space import KernelSource, Target, Task, get_template, template_module

from .backends import get_backend
from .types import BuildResult, MeasureError, MeasureInput
from .worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout, close_all


# the key of the artifact's sha256 in the build stats the cache keeps beside it (not a stat of
# the build: never handed on to records)
ARTIFACT_SHA256 = "artifact_sha256"


def default_cache_dir() -> Path:
    root = os.environ.get("AUTOTUNE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "llm-autotune" / "kernels"


def fallback_cache_dir(create: bool) -> Path | None:
    """This user's kernel cache under the temp dir, for when the cache cannot be written (a
    read-only home in a container); None where it does not exist (``create`` false) or is not
    safely this user's: kernels loaded from a folder others can write could be anyone's code."""
    folder = Path(tempfile.gettempdir()) / f"llm-autotune-{os.getuid()}-kernels"
    try:
        if create:
            folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return None
    return folder


def artifact_path(cache_dir: Path, digest: str, target: Target) -> Path:
    """Where the kernel cache keeps the artifact of a source with this digest (``KernelSource.digest``)."""
    return Path(cache_dir) / (digest + get_backend(target.kind).artifact_suffix)


def artifact_flags(target: Target) -> str:
    """What besides the source decides the artifact (compiler, its options): part of the cache key."""
    return get_backend(target.kind).flags(target)


def compiler_identity(target: Target) -> str:
    """The compiler (and its version) that builds ``target``'s artifacts here; "" when unknown."""
    return get_backend(target.kind).compiler()


def cached_artifact(cache_dir: Path, source: KernelSource, target: Target) -> tuple[Path, dict[str, Any]] | None:
    """The kernel cache's artifact of ``source`` and its build stats, or None when the cache
    lacks it or another compiler built it."""
    digest = source.digest(artifact_flags(target))
    path = artifact_path(cache_dir, digest, target)
    if not path.exists():
        return None
    stats = _read_json(Path(cache_dir) / (digest + ".json"))
    compiler = compiler_identity(target)
    # one from another compiler (or from before the cache kept which) is not what a build
    # makes now; with no compiler to ask (none here, or it does not say), the cache is all there is
    if compiler and stats.get("compiler") != compiler:
        return None
    # a file cut short or damaged on disk is built again: loaded, a broken object file takes the
    # process down (the JIT trusts it), and it may be the user's notebook
    expected = stats.pop(ARTIFACT_SHA256, None)
    try:
        if expected != hashlib.sha256(path.read_bytes()).hexdigest():
            return None
    except OSError:
        return None
    return path, stats


def build_candidate(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: render, look up the cache, compile on a miss. Returns a plain dict."""
    import importlib

    importlib.import_module(payload["module"])
    task = Task.from_dict(payload["task"])
    target = Target.from_dict(payload["target"])
    template = get_template(task.op, target.kind)
    config = template.space(task, target).from_values(payload["config"])
    start = time.perf_counter()
    source = template.render(task, config, target)
    built = compile_through_cache(source, target, Path(payload["cache_dir"]))
    return {**built, "source": source.to_dict(), "build_s": time.perf_counter() - start}


def compile_through_cache(source: KernelSource, target: Target, cache: Path) -> dict[str, Any]:
    """The artifact of ``source`` from the kernel cache, compiled and stored there on a miss
    (in this user's private temp folder where the cache cannot be written). Returns the
    artifact's path, digest, build stats, whether it was cached and a note for the user."""
    digest = source.digest(artifact_flags(target))
    fallback = fallback_cache_dir(create=False)
    hit = cached_artifact(cache, source, target) or (fallback and cached_artifact(fallback, source, target))
    cached, note = hit is not None, ""
    if hit is not None:
        path, stats = hit
    else:
        data, stats = get_backend(target.kind).compile(source, target)
        stats["compiler"] = compiler_identity(target)  # kept in the record: part of its code identity
        try:
            path = _store(cache, digest, target, data, stats, source)
        except OSError as exc:  # the kernel compiled: a cache that cannot be written is no compile error
            fallback = fallback_cache_dir(create=True)
            if fallback is None:
                raise OSError(f"the kernel cache {cache} cannot be written ({exc.strerror or exc}), nor a "
                              f"private folder under {tempfile.gettempdir()}") from None
            path = _store(fallback, digest, target, data, stats, source)
            note = (f"the kernel cache {cache} cannot be written ({exc.strerror or exc}): kernels are kept in "
                    f"{fallback} (AUTOTUNE_CACHE_DIR sets the cache)")
    return {"artifact": str(path), "digest": digest, "stats": stats, "cached": cached, "cache_note": note}


def _store(cache: Path, digest: str, target: Target, data: bytes, stats: dict[str, Any], source: KernelSource) -> Path:
    """Write a built artifact into ``cache``, its stats (with its sha256) and source beside it."""
    path = artifact_path(cache, digest, target)
    cache.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, data)
    _atomic_write(cache / (digest + ".json"), _dump_json({**stats, ARTIFACT_SHA256: hashlib.sha256(data).hexdigest()}))
    # the source beside its artifact: which kernel a cached file is, for people and tools
    _atomic_write(cache / (digest + ".source.json"), _dump_json(source.to_dict()))
    return path


def library_object_job(payload: dict[str, Any]) -> bytes:
    """Worker side of exporting: one kernel compiled as its library ships it (see
    ``Backend.library_object``); a compiler that aborts takes only the worker with it."""
    target = Target.from_dict(payload["target"])
    return get_backend(target.kind).library_object(KernelSource.from_dict(payload["source"]), payload["symbol"], target)


def _dump_json(data: dict[str, Any]) -> bytes:
    import json

    return json.dumps(data).encode()


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk leaves no half-written file behind
        raise


class LocalBuilder:
    """Compiles candidates on ``n_parallel`` worker processes, each build under ``timeout_s``."""

    def __init__(self, n_parallel: int | None = None, timeout_s: float = 60.0, cache_dir: str | Path | None = None):
        self.n_parallel = max(1, n_parallel or len(os.sched_getaffinity(0)))
        self.timeout_s = timeout_s
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self._idle: queue.Queue[WorkerProcess] = queue.Queue()
        for i in range(self.n_parallel):
            self._idle.put(WorkerProcess(name=f"autotune-build-{i}"))
        self._spaces: dict[tuple[str, str], Any] = {}
        self._cache_noted = False  # a cache that cannot be written is said once per builder

    def _space(self, task: Task, target: Target):
        key = (task.key, target.key)
        if key not in self._spaces:
            self._spaces[key] = get_template(task.op, target.kind).space(task, target)
        return self._spaces[key]

    def build(self, inputs: list[MeasureInput]) -> list[BuildResult]:
        with ThreadPoolExecutor(max_workers=self.n_parallel) as pool:
            return list(pool.map(self._build_one, inputs))

    def _build_one(self, inp: MeasureInput) -> BuildResult:
        space = self._space(inp.task, inp.target)
        broken = space.violations(inp.config)
        if broken:
            return BuildResult(None, None, error=MeasureError.INVALID_CONFIG,
                               message="violates " + ", ".join(broken))
        payload = {
            "task": inp.task.to_dict(),
            "config": inp.config.as_dict(),
            "target": inp.target.to_dict(),
            "module": template_module(inp.task.op, inp.target.kind),
            "cache_dir": str(self.cache_dir),
        }
        worker = self._idle.get()
        start = time.perf_counter()
        try:
            out = worker.call("measure.builder:build_candidate", payload, self.timeout_s)
        except WorkerTimeout:
            return BuildResult(None, None, build_s=time.perf_counter() - start, error=MeasureError.BUILD_TIMEOUT,
                               message=f"build took longer than {self.timeout_s:g} s")
        except WorkerCrash as exc:
            return BuildResult(None, None, build_s=time.perf_counter() - start, error=MeasureError.COMPILE_ERROR,
                               message=f"compiler crashed: {exc}")
        except WorkerError as exc:
            return BuildResult(None, None, build_s=time.perf_counter() - start, error=MeasureError.COMPILE_ERROR,
                               message=_one_line(str(exc)))
        finally:
            self._idle.put(worker)
        if out.get("cache_note") and not self._cache_noted:
            self._cache_noted = True
            warnings.warn(out["cache_note"], stacklevel=2)
        source = KernelSource.from_dict(out["source"])
        backend = get_backend(inp.target.kind)
        problems = backend.build_problems(source, out["stats"], inp.target, inp.task.dims)
        if problems:  # compiled, but it can never launch on the target
            return BuildResult(None, source, out["digest"], out["build_s"], MeasureError.OUT_OF_RESOURCES,
                               "; ".join(problems), stats=out["stats"], cached=out["cached"])
        stats = {**out["stats"], **backend.launch_stats(source, out["stats"], inp.target, inp.task.dims)}
        return BuildResult(out["artifact"], source, out["digest"], out["build_s"], stats=stats, cached=out["cached"])

    def close(self) -> None:
        workers = []
        while not self._idle.empty():
            workers.append(self._idle.get())
        close_all(workers)

    def __enter__(self) -> "LocalBuilder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _one_line(text: str) -> str:
    """An error message folded onto one line (compiler diagnostics span several)."""
    return " | ".join(line.strip() for line in text.strip().splitlines() if line.strip())[:1500]
