"""Workers die with their parent: a tuning job that is killed leaves no candidate spinning.

Each test starts a parent Python process, lets it start a worker busy with a hanging job,
kills the parent and waits (with wide margins: the machine may be busy) for the worker to go.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from measure.worker import WorkerProcess

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

TESTS = Path(__file__).resolve().parents[1]
STARTED_WITHIN_S = 60.0  # a fresh interpreter importing the project, on a loaded machine
GONE_WITHIN_S = 15.0  # the worker must be gone this long after its parent was killed


def running(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (dead, not yet reaped by its new parent) does not count."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def start_parent(script: str, started: Path) -> tuple[subprocess.Popen, int]:
    """Run ``script`` in a parent process; it prints its worker's pid, and the worker creates
    ``started`` once it is busy with the hanging job. Returns (parent, worker pid)."""
    paths = [str(TESTS)] + [p for p in sys.path if p]
    code = f"import sys\nsys.path[:0] = {paths!r}\n" + textwrap.dedent(script)
    parent = subprocess.Popen([sys.executable, "-c", code, str(started)], stdout=subprocess.PIPE, text=True)
    line = parent.stdout.readline()
    assert line.strip().isdigit(), f"the parent printed {line!r}"
    assert wait_until(started.exists, STARTED_WITHIN_S), "the worker never started its hanging job"
    return parent, int(line)


def kill_and_expect_worker_gone(parent: subprocess.Popen, worker_pid: int, signum: int) -> None:
    try:
        assert running(worker_pid)
        parent.send_signal(signum)
        parent.wait(timeout=30)
        assert wait_until(lambda: not running(worker_pid), GONE_WITHIN_S), "the worker outlived its parent"
    finally:
        if running(worker_pid):  # never leave a spinning orphan behind, even when the test fails
            os.kill(worker_pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
            parent.wait()


HANGING_WORKER = """
    from measure.worker import WorkerProcess

    worker = WorkerProcess()
    worker.call("time:sleep", 0, 60)  # starts the process
    print(worker._process.pid, flush=True)
    worker.call("fakes:spin_forever", sys.argv[1], 3600)
"""


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_a_hanging_worker_dies_with_its_parent(tmp_path, signum):
    parent, worker_pid = start_parent(HANGING_WORKER, tmp_path / "started")
    kill_and_expect_worker_gone(parent, worker_pid, signum)


def test_without_prctl_the_parent_watch_ends_the_worker(tmp_path):
    """Where PR_SET_PDEATHSIG is not available, a thread notices that the parent changed."""
    script = """
    import subprocess

    child = subprocess.Popen([sys.executable, "-c", (
        "import os, sys; sys.path[:0] = %r; import fakes; from measure.worker_main import watch_parent; "
        "watch_parent(os.getppid(), interval_s=0.2); fakes.spin_forever(%r)") % (sys.path, sys.argv[1])])
    print(child.pid, flush=True)
    child.wait()
"""
    parent, worker_pid = start_parent(script, tmp_path / "started")
    kill_and_expect_worker_gone(parent, worker_pid, signal.SIGKILL)


def test_a_worker_started_from_a_short_lived_thread_outlives_the_thread():
    """Linux sends the parent-death signal when the *thread* that forked ends: the builder and
    the CUDA runner call workers from pool threads, which must not take the workers with them."""
    worker = WorkerProcess()
    try:
        thread = threading.Thread(target=worker.call, args=("time:sleep", 0, 60))
        thread.start()
        thread.join()
        pid = worker._process.pid
        time.sleep(1.0)  # the thread's exit, and any signal it sends, happen just after join returns
        assert running(pid)
        worker.call("time:sleep", 0, 60)
        assert worker.generation == 1 and worker._process.pid == pid
    finally:
        worker.close()
