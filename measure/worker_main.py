"""Entry point of a worker process: ``python -m measure.worker_main FD [PARENT_PID]``.

Receives ``(function_path, payload)`` on the connection at file descriptor FD, runs it and
sends back ``("ok", value)`` or ``("error", (summary, traceback))``; a crash simply ends the process.

A worker dies with its parent: a candidate that hangs must not outlive a tuning job that
was killed. On Linux the kernel sends SIGKILL when the parent goes (``PR_SET_PDEATHSIG``);
elsewhere a thread checks every second that the parent is still the one that started us.
"""
from __future__ import annotations

import importlib
import os
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
PARENT_CHECK_S = 1.0


def _resolve(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def serve(conn: Connection) -> None:
    while True:
        try:
            message = conn.recv()
        except (EOFError, KeyboardInterrupt):
            return
        if message is None:
            return
        path, payload = message
        try:
            reply = ("ok", _resolve(path)(payload))
        except BaseException as exc:  # report, stay alive for the next job
            summary = f"{type(exc).__name__}: {exc}".strip()
            reply = ("error", (summary, traceback.format_exc(limit=8)))
        conn.send(reply)


def die_with_parent(parent_pid: int) -> None:
    """Make this process end when ``parent_pid`` (the process that started it) ends."""
    if not _kill_me_when_parent_dies():
        watch_parent(parent_pid)
    # the parent may have died before the line above took effect: then no signal ever comes
    if os.getppid() != parent_pid:
        os._exit(1)


def _kill_me_when_parent_dies() -> bool:
    """PR_SET_PDEATHSIG with SIGKILL; False where there is no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int] + [ctypes.c_ulong] * 4
        prctl.restype = ctypes.c_int
        return prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def watch_parent(parent_pid: int, interval_s: float = PARENT_CHECK_S) -> threading.Thread:
    """A daemon thread that ends this process once its parent is no longer ``parent_pid``
    (an orphan is re-parented to init or a subreaper). Kernels called through ctypes release
    the GIL, so this runs even while a candidate hangs."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watch", daemon=True)
    thread.start()
    return thread


if __name__ == "__main__":
    # Ctrl-C is the job's to handle (it ends its workers): a worker that raised it would report
    # the candidate in hand as failed, recorded for good (in a job started with SIGINT ignored, too)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid())
    serve(Connection(int(sys.argv[1])))
