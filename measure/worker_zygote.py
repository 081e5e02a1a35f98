"""A zygote: one process that has imported what workers need and forks each new worker.

A worker started as a fresh interpreter pays about 0.3 s of CPU importing numpy, the search
space and the measuring code, and pays it again after every crash or timeout that replaced
it. A job instead starts one zygote per environment (``measure.worker`` starts it the way it
would start a worker: same variables, working directory and CPU affinity). The zygote imports
those modules once and forks a worker from that state on each request. It never compiles,
runs a kernel or initialises CUDA, and it has no threads, so forking it is safe (CUDA is
initialised, if at all, in the forked worker).

``python -m measure.worker_zygote FD PARENT_PID``. On the control socket at FD:

- the job sends ``b"fork"`` with the worker's end of a socket pair (SCM_RIGHTS);
- the zygote forks; the child serves that connection exactly as ``measure.worker_main`` does
  (unless a file of a module it imported changed since: then it answers ``b"stale"``, and the
  job starts a new zygote, so an edited template is never built from its old code; where it
  cannot fork it answers ``b"refused"``, and the job spawns the worker as a fresh interpreter);
- the zygote answers the child's pid with two descriptors: a pidfd of the child, through which
  the job kills it (a pid can be reused once the child is reaped, a pidfd cannot), and the
  read end of a pipe on which the zygote writes the child's exit code after reaping it.

The zygote exits when the job closes the control socket. It dies with the job, and its workers
die with it (``PR_SET_PDEATHSIG``), so a killed job still leaves no worker behind.
"""
from __future__ import annotations

import importlib
import os
import selectors
import signal
import socket
import sys
import traceback
from multiprocessing.connection import Connection

from measure.worker import FORK_REQUEST, REFUSED, STALE
from measure.worker_main import die_with_parent, serve

# what build and run workers import for their jobs, the built-in templates included; never
# pycuda (it would initialise CUDA state in a process that forks)
PRELOAD = ("numpy", "measure.builder", "measure.runner", "measure.backends.cpu", "measure.backends.cuda")


def main(control_fd: int, parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the job and its workers
    die_with_parent(parent_pid)
    try:
        os.close(os.pidfd_open(os.getpid()))
        for module in PRELOAD:
            importlib.import_module(module)
        from search_space import list_templates

        list_templates()  # imports every built-in template's module
    except (OSError, AttributeError, ImportError):  # no pidfds (old kernel), or a broken install:
        sys.exit(3)                                   # the job then spawns its workers itself
    loaded = _module_files()
    control = socket.socket(fileno=control_fd)
    selector = selectors.DefaultSelector()
    selector.register(control, selectors.EVENT_READ)
    children: dict[int, tuple[int, int]] = {}  # pidfd -> (pid, write end of its exit-code pipe)
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj is not control:
                    _reap(key.fd, selector, children)
                    continue
                message, fds, _, _ = socket.recv_fds(control, 64, 1)
                if not message:  # the job closed the socket or ended
                    return
                if message != FORK_REQUEST or len(fds) != 1:
                    refusal = REFUSED
                elif _module_files() != loaded:  # a module changed on disk: fork no old code, but
                    refusal = STALE              # serve the workers already forked (they die with us)
                else:
                    try:
                        _fork_worker(fds[0], control, selector, children)
                        continue
                    except OSError:  # out of processes or memory: the job starts this worker itself
                        refusal = REFUSED
                for fd in fds:
                    os.close(fd)
                socket.send_fds(control, [refusal], [])
    except OSError:  # the job went away
        return


def _module_files() -> dict[str, int]:
    """The modification time of the file of every module imported here."""
    files = {}
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if path:
            try:
                files[path] = os.stat(path).st_mtime_ns
            except OSError:
                files[path] = -1
    return files


def _fork_worker(conn_fd: int, control: socket.socket, selector: selectors.BaseSelector,
                 children: dict[int, tuple[int, int]]) -> None:
    zygote_pid = os.getpid()
    pid = os.fork()
    if pid == 0:
        _become_worker(conn_fd, zygote_pid, control, selector, children)
    try:
        pidfd = os.pidfd_open(pid)  # the child is not reaped before _reap, so this is the child
        status_read, status_write = os.pipe()
    except OSError:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    os.close(conn_fd)
    socket.send_fds(control, [str(pid).encode()], [pidfd, status_read])
    os.close(status_read)
    children[pidfd] = (pid, status_write)
    selector.register(pidfd, selectors.EVENT_READ)


def _reap(pidfd: int, selector: selectors.BaseSelector, children: dict[int, tuple[int, int]]) -> None:
    """The child behind ``pidfd`` ended: reap it and hand its exit code to the job."""
    pid, status_write = children.pop(pidfd)
    selector.unregister(pidfd)
    os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    try:
        os.write(status_write, str(os.waitstatus_to_exitcode(status)).encode())
    except OSError:  # the job no longer listens
        pass
    os.close(status_write)


def _become_worker(conn_fd: int, zygote_pid: int, control: socket.socket, selector: selectors.BaseSelector,
                   children: dict[int, tuple[int, int]]) -> None:
    """The forked child: drop the zygote's descriptors, then serve as a worker until told to stop."""
    code = 0
    try:
        selector.close()
        control.close()
        for pidfd, (_, status_write) in children.items():
            os.close(pidfd)
            os.close(status_write)
        # SIGINT stays ignored, as in the zygote: Ctrl-C is the job's to handle (it ends its
        # workers); a worker that raised it would report the candidate in hand as failed
        die_with_parent(zygote_pid)
        serve(Connection(conn_fd))
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]))
