"""Render and compile candidates in parallel worker processes, with a content-addressed cache."""
from __future__ import annotations

import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from search_space import Config, KernelSource, Target, Task, get_template, template_module

from .types import BuildResult, MeasureError, MeasureInput
from .worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout, close_all


def default_cache_dir() -> Path:
    root = os.environ.get("AUTOTUNE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "llm-autotune" / "kernels"


def artifact_path(cache_dir: Path, digest: str, target: Target) -> Path:
    """Where the kernel cache keeps the artifact of a source with this digest (``KernelSource.digest``)."""
    return Path(cache_dir) / (digest + (".o" if target.kind == "cpu" else ".cubin"))


def render_candidate(task: Task, config: Config, target: Target) -> KernelSource:
    return get_template(task.op, target.kind).render(task, config, target)


def compile_source(source: KernelSource, target: Target) -> tuple[bytes, dict[str, Any]]:
    """Source -> artifact bytes and build stats, for either target kind."""
    if target.kind == "cpu":
        from .compile_llvm import compile_to_object

        obj = compile_to_object(source.code, target)
        return obj, {"artifact_bytes": len(obj)}
    from .compile_cuda import compile_to_cubin  # noqa: PLC0415 - CUDA builds only

    return compile_to_cubin(source, target)


def artifact_flags(target: Target) -> str:
    if target.kind == "cpu":
        from .compile_llvm import compile_flags

        return compile_flags(target)
    from .compile_cuda import compile_flags as cuda_flags

    return cuda_flags(target)


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
    flags = artifact_flags(target)
    digest = source.digest(flags)
    cache = Path(payload["cache_dir"])
    path = artifact_path(cache, digest, target)
    stats_path = cache / (digest + ".json")
    cached = path.exists()
    if cached:
        stats = _read_json(stats_path)
    else:
        data, stats = compile_source(source, target)
        cache.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, data)
        _atomic_write(stats_path, _dump_json(stats))
        # the source beside its artifact: which kernel a cached file is, for people and tools
        _atomic_write(cache / (digest + ".source.json"), _dump_json(source.to_dict()))
    return {"artifact": str(path), "source": source.to_dict(), "digest": digest, "stats": stats,
            "build_s": time.perf_counter() - start, "cached": cached}


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
    tmp.write_bytes(data)
    os.replace(tmp, path)


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
        self.compile_s = 0.0  # worker seconds spent rendering and compiling, for reports

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
                               message=f"build took longer than {self.timeout_s:.0f} s")
        except WorkerCrash as exc:
            return BuildResult(None, None, build_s=time.perf_counter() - start, error=MeasureError.COMPILE_ERROR,
                               message=f"compiler crashed: {exc}")
        except WorkerError as exc:
            return BuildResult(None, None, build_s=time.perf_counter() - start, error=MeasureError.COMPILE_ERROR,
                               message=_one_line(str(exc)))
        finally:
            self._idle.put(worker)
        self.compile_s += out["build_s"]
        source = KernelSource.from_dict(out["source"])
        if inp.target.kind == "cuda":
            from .resources import cuda_resource_problems

            problems = cuda_resource_problems(source, out["stats"], inp.target, inp.task.dims)
            if problems:
                return BuildResult(None, source, out["digest"], out["build_s"], MeasureError.OUT_OF_RESOURCES,
                                   "; ".join(problems), stats=out["stats"], cached=out["cached"])
        return BuildResult(out["artifact"], source, out["digest"], out["build_s"], stats=out["stats"],
                           cached=out["cached"])

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
