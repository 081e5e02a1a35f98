"""A spawned worker process that runs one job at a time and can be killed and replaced.

Compiling (LLVM has assertions on) and running candidate kernels can abort, segfault or
hang. Each happens in a ``WorkerProcess``: the parent waits with a timeout, and on a hang
or a crash kills the process and starts a fresh one on the next call. The job goes on.
Workers die with their parent (see ``measure.worker_main``), even one stuck in a hang.
"""
from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
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
    The worker is a fresh interpreter (``python -m measure.worker_main``) rather than a
    multiprocessing child, so it never re-imports the caller's ``__main__`` and works the
    same from scripts, notebooks and the CLI. It sees the caller's ``sys.path``.
    ``generation`` increases each time a new process starts, so callers can tell that
    per-process state (loaded inputs, caches) is gone.
    """

    def __init__(self, env: dict[str, str | None] | None = None, name: str = "autotune-worker"):
        self.env = dict(env or {})
        self.name = name
        self.generation = 0
        self._process: subprocess.Popen | None = None
        self._conn: Connection | None = None

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
            process = _popen_from_lasting_thread(
                [sys.executable, "-m", "measure.worker_main", str(theirs.fileno()), str(os.getpid())],
                pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        self._process, self._conn = process, Connection(ours.detach())
        self.generation += 1

    @property
    def alive(self) -> bool:
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
        if not ready:
            self.kill()
            raise WorkerTimeout(f"no answer within {timeout:.1f} s")
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            process = self._process
            self.kill()
            raise WorkerCrash(_describe_exit(process.returncode)) from None
        if status == "error":
            raise WorkerError(*value)
        return value

    def kill(self) -> None:
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


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "worker died"
    if code < 0:
        import signal

        try:
            return f"worker killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"worker killed by signal {-code}"
    return f"worker exited with code {code}"
