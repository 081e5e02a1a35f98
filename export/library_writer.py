"""Export the best verified kernel of every task as a library directory a deployment loads.

``export_library(records, "lib/")`` writes::

    lib/manifest.json                 what every kernel computes and how to call it
    lib/libllm_autotune_kernels.so    CPU: every kernel, one exported symbol each
    lib/llm_autotune_kernels.h        CPU: a typed C prototype per kernel
    lib/cubins/<entry>.cubin          CUDA: one cubin per kernel
    lib/sources/<entry>.ll | .cu      every kernel's source text

For each task the fastest verified record on the target that is not stale (its code is what
today's template renders for its config: ``records.freshness``; a StaleRecordsWarning per task
says how many were skipped, ``allow_stale`` uses them) is rendered again and compiled by the target's
backend (``measure.backends``) in worker processes: CPU kernels by LLVM's O3 pipeline, each
entry renamed to a name unique in the library and everything else made internal, then
linked by the system C compiler; CUDA kernels by nvcc (no GPU needed; the cubin tuning built
when the kernel cache still holds it). Before the new library replaces anything at
``out_dir``, every kernel that this machine can run is loaded from it and checked against
the numpy reference in a worker process, so a library that exists is one whose kernels
compute the right answer here.
``runtime.load`` reads the directory back with numpy and ctypes only, and checks the sha256
the manifest records of the shared library and of every cubin and source.

Only a library replaces a library: ``out_dir`` may be missing, empty, or a directory this
module wrote (``_why_not_replaceable``); a symlink to one is followed and the link kept. The
new library is staged beside it in ``.NAME.partial-PID-*``, which an export that dies leaves
behind and the next export to the same place removes (``remove_stale_leftovers``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from queue import Queue
from typing import Any, Iterable

from measure.backends import Backend, get_backend
from measure.worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout, close_all
from records import Record, select_best, stale_warnings
from records.record import package_version
from runtime.abi import MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION
from runtime.library import MANIFEST, read_manifest, required_cpu_features, seal_contracts, sha256_of
from search_space import KernelSource, Target, Task, get_template, template_module

from .c_header import header_text

LIBRARY = "libllm_autotune_kernels.so"
HEADER = "llm_autotune_kernels.h"
LIBRARY_FILES = (MANIFEST, LIBRARY, HEADER)   # what a library directory holds: these files,
LIBRARY_FOLDERS = ("sources", "cubins")        # and these folders of plain files
STALE_AFTER_S = 24 * 3600  # a leftover this old goes even if its pid was reused by a live process
SOURCE_SUFFIX = {"llvm": ".ll", "cuda": ".cu"}
DTYPE_TAG = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


class ExportError(Exception):
    """The records cannot be exported as asked (bad input): one line for the user."""


class ExportFailed(ExportError):
    """Exporting went wrong past the input: a compiler crashed, linking failed, a kernel was wrong."""


@dataclass
class ExportSummary:
    path: Path
    target: Target
    kernels: list[dict[str, Any]]
    library: Path | None
    total_bytes: int
    verified: int
    seconds: float
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- choosing


def choose_target(records: Iterable[Record], name: str | None = None) -> Target:
    """The target whose kernels to export: ``cpu``, ``cuda``, an arch (``sm_90a``, ``znver4``)
    or a target key (``cpu-znver4``); without a name, the only one the records hold."""
    targets: dict[str, Target] = {}
    for record in records:
        if record.ok:
            targets.setdefault(record.target.key, record.target)
    if not targets:
        raise ExportError("the records hold no verified measurement: nothing to export")
    if name is None:
        chosen = dict(targets)
    elif name in ("cpu", "host", "llvm", "cuda"):
        kind = "cuda" if name == "cuda" else "cpu"
        chosen = {k: t for k, t in targets.items() if t.kind == kind}
    else:
        chosen = {k: t for k, t in targets.items() if name in (k, t.arch)}
    if not chosen:
        raise ExportError(f"no verified record for target {name}: the records hold kernels for "
                          f"{', '.join(sorted(targets))}")
    if len(chosen) > 1 and name in ("cpu", "host", "llvm"):
        host = Target.host().key
        if host in chosen:
            return chosen[host]
    if len(chosen) > 1:
        raise ExportError(f"the records hold kernels for {', '.join(sorted(chosen))}: pass --target with one of them")
    return next(iter(chosen.values()))


def entry_name(task: Task, target: Target, source: KernelSource) -> str:
    """A C identifier unique in the library, stable across exports of the same task while its
    calling convention (the arguments, their shapes and the workspaces' sizes, which the tuned
    config may change) stays the same: a C program built against an earlier header then calls
    the new kernel, and one whose convention changed fails to link rather than pass arguments
    the kernel reads otherwise (a workspace too small, a pointer taken for a dim)."""
    convention = json.dumps([a.to_dict() for a in source.args], sort_keys=True)
    digest = hashlib.sha256(f"{task.key}|{target.key}|{convention}".encode()).hexdigest()[:10]
    return f"{task.op}_{DTYPE_TAG.get(task.dtype, task.dtype)}_{digest}"


@dataclass
class _Kernel:
    record: Record
    source: KernelSource
    entry: str

    @property
    def task(self) -> Task:
        return self.record.task


def _render(record: Record) -> KernelSource:
    task, target = record.task, record.target
    try:
        template = get_template(task.op, target.kind)
        config = record.to_config(template.space(task, target))
        return template.render(task, config, target)
    except (ValueError, KeyError) as exc:
        raise ExportError(f"the best record of {task.key} no longer renders with this version "
                          f"(config {json.dumps(record.config)}): {exc}") from None


def _kernels(records: Iterable[Record], target: Target, allow_stale: bool) -> list[_Kernel]:
    choices = select_best((r for r in records if r.target.key == target.key), allow_stale)
    for warning in stale_warnings(choices):
        warnings.warn(warning, stacklevel=3)
    winners = sorted((c.record for c in choices if c.record is not None), key=lambda r: (r.task.op, r.task.key))
    if not winners and choices:
        raise ExportError(f"every verified record for target {target.key} is stale: nothing to export (measure "
                          "them again with `autotune tune --remeasure-stale`, or use them with --allow-stale)")
    if not winners:
        raise ExportError(f"no verified record for target {target.key}: nothing to export")
    sources = [_render(r) for r in winners]
    kernels = [_Kernel(r, source, entry_name(r.task, target, source)) for r, source in zip(winners, sources)]
    names = [k.entry for k in kernels]
    if len(set(names)) != len(names):  # a 40-bit clash between two task keys: never silently
        raise ExportFailed("two tasks got the same entry name; report this with the log")
    return kernels


# ----------------------------------------------------------------------------- compiling


def _in_workers(jobs: list[tuple[str, dict]], labels: list[str], n_parallel: int, timeout_s: float) -> list[Any]:
    """Run ``(function path, payload)`` jobs on a few worker processes; any failure is an ExportFailed."""
    idle: Queue[WorkerProcess] = Queue()
    workers = [WorkerProcess(name=f"autotune-export-{i}") for i in range(max(1, min(n_parallel, len(jobs))))]
    for worker in workers:
        idle.put(worker)

    def run(i: int) -> Any:
        worker = idle.get()
        try:
            return worker.call(jobs[i][0], jobs[i][1], timeout_s)
        except WorkerTimeout:
            raise ExportFailed(f"{labels[i]}: took longer than {timeout_s:.0f} s") from None
        except WorkerCrash as exc:
            raise ExportFailed(f"{labels[i]}: the worker died ({exc})") from None
        except WorkerError as exc:
            raise ExportFailed(f"{labels[i]}: {exc}") from None
        finally:
            idle.put(worker)

    try:
        with ThreadPoolExecutor(max_workers=len(workers)) as pool:
            return list(pool.map(run, range(len(jobs))))
    finally:
        close_all(workers)


def find_c_compiler(cc: str | None = None) -> list[str]:
    """The command that links the shared library: ``cc``, else $CC, else cc, gcc or clang."""
    for candidate in (cc, os.environ.get("CC"), "cc", "gcc", "clang"):
        if not candidate:
            continue
        words = shlex.split(candidate)
        path = shutil.which(words[0]) if words else None
        if path:
            return [path, *words[1:]]
    raise ExportError("no C compiler found (tried $CC, cc, gcc, clang): one is needed to link the CPU kernels "
                      "into a shared library")


def link_shared_library(objects: list[Path], out: Path, cc: str | None = None) -> None:
    from search_space.codegen.llvm_pool import object_file  # the kernels' shared worker pool

    command = [*find_c_compiler(cc), "-shared", "-o", str(out), *map(str, objects), str(object_file()),
               # LLVM's objects carry no .note.GNU-stack: without this the linker asks for an
               # executable stack, which recent glibc refuses to dlopen
               "-Wl,-z,noexecstack", f"-Wl,-soname,{out.name}", "-lm", "-lpthread",
               # the worker pool's threads run the library's code until the process exits: a
               # dlclose must not unmap it under them
               "-Wl,-z,nodelete"]
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if line.strip()][:4]
        raise ExportFailed(f"linking {out.name} failed: {' | '.join(lines) or f'exit code {proc.returncode}'}")


def _compile(kernels: list[_Kernel], target: Target, n_parallel: int, timeout_s: float) -> list[bytes]:
    """Each kernel as its library ships it (``Backend.library_object``), several at a time in
    worker processes: a compiler that aborts costs the export, not the process that runs it."""
    jobs = [("measure.builder:library_object_job",
             {"source": k.source.to_dict(), "symbol": k.entry, "target": target.to_dict()}) for k in kernels]
    return _in_workers(jobs, [f"compiling {k.task.key}" for k in kernels], n_parallel, timeout_s)


def _link(kernels: list[_Kernel], objects: list[bytes], stage: Path, cc: str | None) -> Path:
    """One shared library of every kernel's object."""
    with tempfile.TemporaryDirectory(prefix="autotune-export-") as tmp:
        paths = []
        for kernel, data in zip(kernels, objects):
            path = Path(tmp) / f"{kernel.entry}.o"
            path.write_bytes(data)
            paths.append(path)
        library = stage / LIBRARY
        link_shared_library(paths, library, cc)
    return library


# ----------------------------------------------------------------------------- manifest


def _manifest_entry(kernel: _Kernel, source_file: str, source_hash: str, backend: Backend) -> dict[str, Any]:
    record, task, source = kernel.record, kernel.task, kernel.source
    entry = {
        "op": task.op,
        "task": task.key,
        "dims": task.dims,
        "dynamic": list(task.dynamic),
        "dtype": task.dtype,
        "attrs": task.attr,
        "config": record.config,
        "entry": kernel.entry,
        "symbol": backend.library_symbol(source, kernel.entry),
        "lang": source.lang,
        "args": [a.to_dict() for a in source.args],
        "launch": source.launch_dims,
        "seconds": record.seconds,
        "gflops": record.gflops,
        "source": source_file,
        "source_sha256": source_hash,
        "tuned": True,
        "measured": {"device": record.target.device_name, "tuner": record.tuner, "timestamp": record.timestamp,
                     **{k: record.result.stats[k] for k in ("p20", "p80", "min", "cache") if k in record.result.stats}},
    }
    return entry


def _write_library(kernels: list[_Kernel], stage: Path, target: Target, n_parallel: int, timeout_s: float,
                   cc: str | None) -> tuple[list[dict[str, Any]], Path | None]:
    backend = get_backend(target.kind)
    problem = backend.toolchain_problem()
    if problem:
        raise ExportError(problem)
    if backend.linked_library:
        find_c_compiler(cc)  # fail before spending minutes compiling
    (stage / "sources").mkdir()
    entries = []
    for kernel in kernels:
        name = f"sources/{kernel.entry}{SOURCE_SUFFIX.get(kernel.source.lang, '.txt')}"
        data = kernel.source.code.encode()
        (stage / name).write_bytes(data)
        entries.append(_manifest_entry(kernel, name, hashlib.sha256(data).hexdigest(), backend))
    objects = _compile(kernels, target, n_parallel, timeout_s)
    library = None
    if backend.linked_library:
        library = _link(kernels, objects, stage, cc)
        # the extensions the runtime checks at load, said to C callers
        (stage / HEADER).write_text(header_text(entries, target.key,
                                                cpu_features=required_cpu_features(target.to_dict())))
    else:  # one file per kernel, each loaded as a module of its own
        (stage / "cubins").mkdir()
        for entry, data in zip(entries, objects):
            entry["cubin"] = f"cubins/{entry['entry']}{backend.artifact_suffix}"
            (stage / entry["cubin"]).write_bytes(data)
            entry["cubin_sha256"] = sha256_of(stage / entry["cubin"])  # runtime.load checks it
    manifest = {
        "format": MANIFEST_FORMAT,
        "schema": MANIFEST_SCHEMA_VERSION,
        "target": target.to_dict(),
        "package_version": package_version(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "library": LIBRARY if library is not None else None,
        "library_sha256": sha256_of(library) if library is not None else None,  # runtime.load checks it
        "header": HEADER if library is not None else None,
        "kernels": entries,
    }
    seal_contracts(manifest)  # runtime.load refuses an entry edited after this
    (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return entries, library


# ----------------------------------------------------------------------------- verifying


def verify_library_job(payload: dict[str, Any]) -> list[str]:
    """Worker side: load the library as a deployment would and check the kernel ``entry``
    against the template's numpy reference at its tuned dims, on the inputs tuning measured
    it on. Returns one line per wrong output."""
    import importlib

    from measure.task_data import task_data
    from measure.verify import output_problems
    from runtime.library import KernelLibrary

    for module in payload.get("modules", ()):  # templates registered outside search_space (tests)
        importlib.import_module(module)
    library = KernelLibrary(payload["dir"])
    entry = next(e for e in library.entries if e["entry"] == payload["entry"])
    task = Task.make(entry["op"], entry["dims"], entry["dtype"], entry["attrs"], entry["dynamic"])
    data = task_data(task, library.kind, payload.get("seed", 0))
    kernel = library.kernel(entry["entry"])
    got = kernel(**data.inputs, dims={d: task.dims[d] for d in task.dynamic})
    outputs = dict(zip(kernel.output_names, got if isinstance(got, tuple) else (got,)))
    dtypes = {a.name: a.dtype for a in kernel.args if a.name in outputs}
    tolerance = get_template(task.op, library.kind).tolerance(task)
    return [f"{entry['entry']} ({task.key}): {problem}"
            for problem in output_problems(outputs, data.reference, dtypes, tolerance)]


# ----------------------------------------------------------------------------- the directory


def _resolve_out(out_dir: str | os.PathLike) -> Path:
    """--out as an absolute path. A symlink is followed: the library it points to is replaced
    and the link kept, so that a deployment's ``current -> lib-v3`` link goes on working
    (replacing the link by a directory would silently detach it)."""
    if not str(os.fspath(out_dir)).strip():  # Path("") is the working directory: an unset $VAR would replace it
        raise ExportError("--out is empty: name the library's directory")
    out = Path(out_dir).absolute()
    if not out.is_symlink():
        return out
    try:
        return out.resolve()
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
        raise ExportError(f"--out {out} is a symlink that cannot be followed: {exc}") from None


def _why_not_replaceable(out: Path) -> str | None:
    """Why the non-empty directory ``out`` may not be replaced by a library, or None: only one
    whose manifest is this project's format and that holds nothing a library does not."""
    if not (out / MANIFEST).is_file():
        return "is a non-empty directory that holds no kernel library"
    try:
        read_manifest(out)
    except (OSError, ValueError) as exc:
        return f"holds a {MANIFEST} that is not a kernel library's ({exc})"
    return _foreign_item(out)


def _foreign_item(folder: Path) -> str | None:
    """What in ``folder`` is not part of a kernel library (said as "holds ..."), or None."""
    for item in sorted(folder.iterdir()):
        if item.is_symlink():
            return f"holds the symlink {item.name}, which no kernel library has"
        if item.name in LIBRARY_FILES and item.is_file():
            continue
        if item.name in LIBRARY_FOLDERS and item.is_dir():
            other = next((f for f in item.iterdir() if f.is_symlink() or not f.is_file()), None)
            if other is None:
                continue
            return f"holds {item.name}/{other.name}, which is not part of a kernel library"
        return f"holds {item.name}, which is not part of a kernel library"
    return None


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        reason = _why_not_replaceable(out)
        if reason:
            raise ExportError(f"--out {out} {reason}: refusing to replace it")
    parent = out.parent
    if not parent.exists():
        raise ExportError(f"--out {out}: directory {parent} does not exist")
    if not parent.is_dir():
        raise ExportError(f"--out {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ExportError(f"--out {out}: directory {parent} is not writable")


def _leftover_pattern(out: Path) -> re.Pattern:
    """Names of what an export to ``out`` makes beside it, exactly: ``.NAME.partial-PID-XXXXXXXX``
    (the stage, 8 hex digits) and ``.NAME.old-PID`` (the earlier library while it is swapped out)."""
    return re.compile(rf"\.{re.escape(out.name)}\.(?:partial-(\d+)-[0-9a-f]{{8}}|old-(\d+))\Z")


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user's process
        pass
    return True


def remove_stale_leftovers(out: Path) -> list[Path]:
    """Remove the stages (and swapped-out libraries) that exports to ``out`` killed by a signal
    left behind: those whose export is gone (its pid is dead) or that are older than a day.
    Those of an export still running are kept, and so is a folder of such a name that holds
    anything a library does not (someone else's). Returns what was removed."""
    pattern, removed = _leftover_pattern(out), []
    try:
        neighbours = list(out.parent.iterdir())
    except OSError:  # a parent we may write but not list: nothing to find
        return removed
    for path in neighbours:
        match = pattern.match(path.name)
        if match is None or path.is_symlink() or not path.is_dir():
            continue
        pid = int(match.group(1) or match.group(2))
        dead = 0 < pid < 2**31 and not _process_alive(pid)
        if (dead or time.time() - path.lstat().st_mtime > STALE_AFTER_S) and _foreign_item(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


@contextlib.contextmanager
def _sigterm_raises():
    """While exporting, SIGTERM raises SystemExit(143) in the main thread instead of killing
    the process on the spot, so that the stage is removed on the way out. Only where SIGTERM
    has its default action: a handler the caller installed (the CLI's raises too) is theirs."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum, frame):
        raise SystemExit(128 + signum)  # not an Exception: no `except Exception` swallows it

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _replace(stage: Path, out: Path) -> None:
    """Put the finished library at ``out``; an earlier library there goes only once this one is
    whole, and is put back if the swap is interrupted between its two renames."""
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    had_old = out.exists()
    try:
        if had_old:
            os.replace(out, old)
        os.replace(stage, out)
    except BaseException:
        if had_old and old.exists() and not out.exists():
            os.replace(old, out)
        raise
    if had_old:
        shutil.rmtree(old, ignore_errors=True)


def export_library(records: Iterable[Record], out_dir: str | os.PathLike, target: Target | str | None = None,
                   verify: bool = True, n_parallel: int | None = None, timeout_s: float = 600.0,
                   cc: str | None = None, allow_stale: bool = False) -> ExportSummary:
    """Compile the best verified config of every task on ``target`` into the library ``out_dir``.

    ``target``: a Target, a name for ``choose_target``, or None for the only target in the
    records. Stale records are skipped, one StaleRecordsWarning per task that had any in the
    way, unless ``allow_stale`` (then one per task that uses one). ``verify``: check every
    CPU kernel of the new library against numpy before it replaces anything (on the CPU it
    was compiled for). ``out_dir`` is replaced only if it is
    missing, empty or a library (``_why_not_replaceable``); a symlink is followed, the link kept.
    Raises ExportError for bad input and ExportFailed when compiling, linking or that check
    fails; on SIGTERM (where it has its default action) SystemExit(143) once the stage is removed."""
    start = time.perf_counter()
    records = list(records)
    target = target if isinstance(target, Target) else choose_target(records, target)
    out = _resolve_out(out_dir)
    _check_out_dir(out)
    kernels = _kernels(records, target, allow_stale)
    n_parallel = n_parallel or min(2, len(os.sched_getaffinity(0)))
    with _sigterm_raises():
        return _export(kernels, out, target, verify, n_parallel, timeout_s, cc, start)


def _export(kernels: list[_Kernel], out: Path, target: Target, verify: bool, n_parallel: int, timeout_s: float,
            cc: str | None, start: float) -> ExportSummary:
    """Build the library in a stage beside ``out``, check it, swap it in; the stage goes on any failure."""
    remove_stale_leftovers(out)
    # The pid in the name tells a later export whether this one is still running. The name is
    # chosen before the directory is made, inside the try: a SIGTERM that lands just after the
    # mkdir (a SystemExit raised there) still finds the stage to remove.
    stage: Path | None = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        try:
            stage.mkdir(mode=0o700)
        except OSError as exc:
            stage = None  # nothing of this export's to remove
            raise ExportError(f"--out {out}: cannot create a directory there: {exc.strerror or exc}") from None
        entries, library = _write_library(kernels, stage, target, n_parallel, timeout_s, cc)
        verified, notes = 0, []
        unchecked = get_backend(target.kind).cannot_check_here(target)
        if unchecked:
            notes.append(unchecked)
        elif verify:
            modules = sorted({template_module(k.task.op, target.kind) for k in kernels})
            jobs = [("export.library_writer:verify_library_job", {"dir": str(stage), "modules": modules, "entry": k.entry})
                    for k in kernels]
            # one worker, one kernel at a time: inputs and references of large tasks take memory
            checked = _in_workers(jobs, [f"checking {k.entry} ({k.task.key})" for k in kernels], 1, timeout_s)
            problems = [line for lines in checked for line in lines]
            if problems:
                raise ExportFailed(f"{len(problems)} exported kernel(s) computed a wrong answer, nothing was "
                                  f"written: {problems[0]}")
            verified = len(entries)
        stage.chmod(0o755)  # private while it is built; a library is for others to read
        _check_out_dir(out)  # again: minutes have passed, and someone may have put files there
        _replace(stage, out)
    except BaseException:
        if stage is not None:
            shutil.rmtree(stage, ignore_errors=True)
        raise
    total = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return ExportSummary(out, target, entries, out / library.name if library else None, total, verified,
                         time.perf_counter() - start, notes)
