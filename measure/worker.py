"""A spawned worker process that runs one job at a time and can be killed and replaced.

Compiling (LLVM has assertions on) and running candidate kernels can abort, segfault or
hang. Each happens in a ``WorkerProcess``: the parent waits with a timeout, and on a hang
or a crash kills the process and starts a fresh one on the next call. The job goes on.
Workers die with their parent (see ``measure.worker_main``), even one stuck in a hang.
"""
from __future__ import annotations

import atexit
import os
import queue
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any


class WorkerTimeout(Exception):
    """The job did not finish in time; the worker was killed."""


class WorkerCrash(Exception):
    """The worker process died during the job (signal, abort, os._exit)."""


class WorkerError(Exception):
    """The job raised a Python exception inside the worker; the worker is still usable.

    ``str(error)`` is the exception's type and message; ``traceback`` has the details.
    """

    def __init__(self, summary: str, traceback: str = ""):
        super().__init__(summary)
        self.traceback = traceback


class WorkerProcess:
    """One worker process serving ``call(function_path, payload, timeout)`` requests.

    ``function_path`` is ``"module:function"``; the function takes one picklable payload.
    The worker is forked from a zygote of this process (``measure.worker_zygote``), a fresh
    interpreter that has imported what workers need; where none can start it is itself a
    fresh interpreter (``python -m measure.worker_main``). Either way it is not a
    multiprocessing child, so it never re-imports the caller's ``__main__`` and works the
    same from scripts, notebooks and the CLI. It sees the caller's ``sys.path``.
    ``generation`` increases each time a new process starts, so callers can tell that
    per-process state (loaded inputs, caches) is gone.

    A process forked from the owner (a DataLoader-style worker) does not share the owner's
    worker: its first call starts one of its own. Both talking over one socket would read each
    other's answers (a kernel built for another shape).
    """

    def __init__(self, env: dict[str, str | None] | None = None, name: str = "autotune-worker"):
        self.env = dict(env or {})
        self.name = name
        self.generation = 0
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._owner = os.getpid()  # the process whose worker ``_process`` is

    def _disown_inherited(self) -> None:
        """In a process forked from the owner: forget the owner's worker (this process's copies
        of its socket and handles close; the worker itself is the owner's to use and end)."""
        if self._owner == os.getpid():
            return
        self._owner = os.getpid()
        process, self._process = self._process, None
        if isinstance(process, _ForkedWorker):
            process.forget()
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        for key, value in self.env.items():  # None removes a variable for this worker only
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        try:
            process = _fork_from_zygote(env, theirs) or _popen_from_lasting_thread(
                [sys.executable, "-m", "measure.worker_main", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._process, self._conn = process, Connection(ours.detach())
        self.generation += 1

    @property
    def alive(self) -> bool:
        self._disown_inherited()
        return self._process is not None and self._process.poll() is None

    def call(self, path: str, payload: Any, timeout: float) -> Any:
        if not self.alive:
            self.kill()
            self._start()
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send((path, payload))
            ready = self._conn.poll(timeout)
        except (BrokenPipeError, EOFError, OSError) as exc:
            self.kill()
            raise WorkerCrash(f"worker died: {exc}") from None
        except BaseException:  # interrupted (Ctrl-C in a notebook): the answer in flight would go to the next call
            self.kill()
            raise
        if not ready:
            self.kill()
            raise WorkerTimeout(f"no answer within {timeout:.1f} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            process = self._process
            self.kill()
            raise WorkerCrash(_describe_exit(process.returncode)) from None
        except BaseException:
            self.kill()
            raise
        if status == "error":
            raise WorkerError(*value)
        return value

    def kill(self) -> None:
        self._disown_inherited()
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def request_exit(self) -> None:
        """Ask the worker to exit without waiting for it (``close`` then waits; see ``close_all``)."""
        if self.alive and self._conn is not None:
            try:
                self._conn.send(None)
            except OSError:
                pass

    def close(self) -> None:
        self.request_exit()
        if self._process is not None:
            try:
                self._process.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
        self.kill()
        self._process = None

    def __del__(self) -> None:  # best effort: never leave orphans behind
        try:
            self.kill()
        except Exception:
            pass


def close_all(workers) -> None:
    """Close a pool: every worker is asked to exit first, so their interpreters shut down side by side."""
    workers = list(workers)
    for worker in workers:
        worker.request_exit()
    for worker in workers:
        worker.close()


# ----------------------------------------------------------------------------- starting workers
# A worker asks Linux for SIGKILL when its parent dies (PR_SET_PDEATHSIG), but "parent" there
# is the *thread* that started it: the builder and the CUDA runner call from pool threads that
# end after each batch, which would kill their workers with them. So every worker is started
# from one thread that lives as long as this process.

_spawner: threading.Thread | None = None
_spawn_requests: queue.SimpleQueue | None = None
_spawner_lock = threading.Lock()


def _popen_from_lasting_thread(args: list[str], **kwargs) -> subprocess.Popen:
    global _spawner, _spawn_requests
    with _spawner_lock:
        if _spawner is None or not _spawner.is_alive():  # first use, or a forked child of this process
            _spawn_requests = queue.SimpleQueue()
            _spawner = threading.Thread(target=_serve_spawns, args=(_spawn_requests,), name="autotune-spawner",
                                        daemon=True)
            _spawner.start()
        requests = _spawn_requests
    future: Future = Future()
    requests.put((future, args, kwargs))
    return future.result()


def _serve_spawns(requests: queue.SimpleQueue) -> None:
    while True:
        future, args, kwargs = requests.get()
        try:
            future.set_result(subprocess.Popen(args, **kwargs))
        except BaseException as exc:  # e.g. OSError: handed to the caller
            future.set_exception(exc)


# ----------------------------------------------------------------------------- zygotes
# One zygote per environment a worker can be started in: the variables, the working directory
# and the CPU affinity (a cluster runner pins itself before it starts its worker) are fixed
# when the zygote starts, so a worker asked for under others gets another zygote. Zygotes live
# as long as this process, so pools of later jobs and replacements after crashes reuse them;
# idle ones beyond a few are closed (a zygote's workers would die with it).
# AUTOTUNE_WORKER_ZYGOTE=0 spawns every worker as a fresh interpreter instead.

# the zygote's answers on its control socket (measure.worker_zygote speaks the other side)
FORK_REQUEST = b"fork"
STALE = b"stale"  # instead of a pid: a file of a module it imported changed since
REFUSED = b"refused"  # instead of a pid: it cannot fork (no processes or memory left)

ZYGOTE_START_S = 120.0  # the zygote imports before it answers: slow on a loaded machine
MAX_IDLE_ZYGOTES = 2
# set anew for each phase of each test by pytest and read by no worker: a forked worker goes
# without it rather than each test starting its own zygote
UNKEYED_VARIABLES = ("PYTEST_CURRENT_TEST",)

_zygotes: dict[tuple, "_Zygote"] = {}
_retired: list["_Zygote"] = []  # zygotes that found a module changed on disk, or died, with workers maybe alive
_zygotes_lock = threading.Lock()
_zygotes_failed = False  # once a new one could not start or answer, workers are spawned directly


class _ForkedWorker:
    """The part of ``subprocess.Popen`` a ``WorkerProcess`` uses, for a worker forked by a zygote:
    killed through its pidfd, its exit code read from the pipe the zygote writes it to. Safe to
    poll from several threads (a new worker's start checks whether the zygotes are idle)."""

    WAIT_SLICE_S = 0.05  # wait() holds the lock this long at a time

    def __init__(self, pid: int, pidfd: int, status_fd: int):
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd, self._status_fd = pidfd, status_fd
        self._lock = threading.Lock()

    def poll(self) -> int | None:
        return self._check(0)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = self.WAIT_SLICE_S if deadline is None else min(self.WAIT_SLICE_S, deadline - time.monotonic())
            code = self._check(max(0.0, left))
            if code is not None:
                return code
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)

    def kill(self) -> None:
        with self._lock:
            if self.returncode is None:
                try:
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                except ProcessLookupError:  # already ended
                    pass

    def _check(self, wait_s: float) -> int | None:
        with self._lock:
            if self.returncode is None and select.select([self._status_fd], [], [], wait_s)[0]:
                data = os.read(self._status_fd, 32)
                # nothing written: the zygote died, and its workers with it (SIGKILL on its death;
                # sent again here in case the worker outlived it, as one without prctl does briefly)
                if not data:
                    try:
                        signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                self.returncode = int(data) if data else -signal.SIGKILL
                self._close()
            return self.returncode

    def forget(self) -> None:
        """In a forked child: close this process's copies of the handles, signalling nothing (no
        lock: a thread of the parent may have held it at the fork, and that thread is not here)."""
        self._lock = threading.Lock()
        self._close()

    def _close(self) -> None:
        for fd in (self._pidfd, self._status_fd):
            if fd >= 0:
                os.close(fd)
        self._pidfd = self._status_fd = -1

    def __del__(self) -> None:
        try:
            self._close()
        except Exception:
            pass


class _StaleZygote(Exception):
    """A module the zygote imported changed on disk: it forks no more workers (old code)."""


class _ZygoteEnded(OSError):
    """The zygote closed its end without answering: it has exited."""


class _Zygote:
    def __init__(self, env: dict[str, str]):
        ours, theirs = socket.socketpair()
        try:
            self.process = _popen_from_lasting_thread(
                [sys.executable, "-m", "measure.worker_zygote", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self.control = ours
        self.control.settimeout(ZYGOTE_START_S)
        self.workers: weakref.WeakSet[_ForkedWorker] = weakref.WeakSet()

    def fork(self, conn: socket.socket) -> _ForkedWorker:
        socket.send_fds(self.control, [FORK_REQUEST], [conn.fileno()])
        message, fds, _, _ = socket.recv_fds(self.control, 64, 2)
        if message == STALE:
            raise _StaleZygote()
        if message == REFUSED or not message or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            if not message:
                raise _ZygoteEnded("the worker zygote ended")
            raise OSError("the worker zygote refused to fork")
        worker = _ForkedWorker(int(message), *fds)
        self.workers.add(worker)
        return worker

    @property
    def idle(self) -> bool:
        return all(worker.poll() is not None for worker in list(self.workers))

    def close(self) -> None:
        self.control.close()  # the zygote exits on end of file
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _fork_from_zygote(env: dict[str, str], conn: socket.socket) -> _ForkedWorker | None:
    """A worker forked by the zygote for this environment, or None where none can serve."""
    global _zygotes_failed
    env = {k: v for k, v in env.items() if k not in UNKEYED_VARIABLES}
    if (_zygotes_failed or os.environ.get("AUTOTUNE_WORKER_ZYGOTE") == "0"
            or not hasattr(os, "pidfd_open") or not hasattr(signal, "pidfd_send_signal")):
        return None
    try:
        key = (os.getcwd(), frozenset(os.sched_getaffinity(0)), tuple(sorted(env.items())))
    except OSError:  # e.g. the working directory was deleted: a spawned worker still starts there
        return None
    with _zygotes_lock:
        zygote = _zygotes.pop(key, None)
        try:
            if zygote is None:
                zygote = _Zygote(env)
            try:
                worker = zygote.fork(conn)
            except (_StaleZygote, ConnectionError, _ZygoteEnded):
                # its code changed on disk, or it died (killed, say, and its workers with it):
                # a new one serves, and only a new one that fails sends workers to fresh interpreters
                _retired.append(zygote)  # closed once its workers are gone: they die with it
                zygote = _Zygote(env)
                worker = zygote.fork(conn)
        except (OSError, ValueError, _StaleZygote):
            _zygotes_failed = True
            if zygote is not None and zygote not in _retired:
                _retired.append(zygote)  # it may still serve workers: closed once they are gone
            return None
        _zygotes[key] = zygote  # last used last
        idle = [k for k, z in _zygotes.items() if k != key and z.idle]
        for old in idle[:max(0, len(idle) - MAX_IDLE_ZYGOTES)]:
            _zygotes.pop(old).close()
        _close_idle_retired()
        return worker


def close_idle_zygotes() -> None:
    """End the zygotes no live worker came from (a notebook done tuning gets its memory back;
    the next worker starts a new one)."""
    with _zygotes_lock:
        for key in [k for k, z in _zygotes.items() if z.idle]:
            _zygotes.pop(key).close()
        _close_idle_retired()


def _close_idle_retired() -> None:
    """Close the retired zygotes whose workers are all gone (the caller holds the lock)."""
    for zygote in [z for z in _retired if z.idle]:
        _retired.remove(zygote)
        zygote.close()


def _forget_zygotes() -> None:
    """In a forked child: the zygotes are the parent's to use and close (and the lock may have
    been held by a thread that does not exist here)."""
    global _zygotes_lock
    _zygotes_lock = threading.Lock()
    _zygotes.clear()
    _retired.clear()


os.register_at_fork(after_in_child=_forget_zygotes)


def _close_idle_zygotes_at_exit() -> None:
    """Wait for the idle zygotes as this process exits, so that their CPU time and their
    workers' is counted as this process's (``time autotune tune``) and none outlives it unseen.
    A thread still holding the lock (a daemon mid-fork) is not waited for: exit goes on."""
    if not _zygotes_lock.acquire(timeout=1.0):
        return
    try:
        for key in [k for k, z in _zygotes.items() if z.idle]:
            _zygotes.pop(key).close()
        _close_idle_retired()
    finally:
        _zygotes_lock.release()


atexit.register(_close_idle_zygotes_at_exit)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker died"
    if code < 0:
        try:
            return f"worker killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    return f"worker exited with code {code}"
