"""The log is a regular file held by one tuning job at a time; everyone may read it."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import no_hang

from measure import MeasureResult
from records import LogLockedError, LogReadError, LogWriteError, Record, RecordLog
from search_space import Target, Task

ROOT = str(Path(__file__).resolve().parents[2])  # the repository, for the scripts run in subprocesses


def make_record(index: int, seconds: float = 1e-3) -> Record:
    return Record(Task.make("gemm", {"M": 4, "N": 4, "K": 4}), Target.host(), {"mr": index}, index,
                  MeasureResult((seconds,) * 3), tuner="test")


@pytest.fixture
def fifo(tmp_path) -> Path:
    path = tmp_path / "fifo.jsonl"
    os.mkfifo(path)
    return path


def test_a_fifo_is_refused_without_blocking(fifo, tmp_path):
    log = RecordLog(fifo)
    with pytest.raises(LogWriteError, match="is a FIFO: a log must be a regular file"):
        no_hang(log.check_writable)
    with pytest.raises(LogWriteError, match="FIFO"):
        no_hang(lambda: log.append([make_record(0)]))
    with pytest.raises(LogReadError, match="FIFO"):
        no_hang(log.load)

    def lock_it():  # what a tuner given the log does first: opening a FIFO to lock it would wait
        with log.lock():
            pass
    with pytest.raises(LogWriteError, match="FIFO"):
        no_hang(lock_it)
    link = tmp_path / "link.jsonl"  # a symlink is judged by what it points to
    link.symlink_to(fifo)
    with pytest.raises(LogReadError, match="FIFO"):
        no_hang(RecordLog(link).load)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_devices_are_refused():
    # /dev/full never takes a write, and reads zeros forever: one endless line held in memory
    with pytest.raises(LogWriteError, match="/dev/full is a character device: a log must be a regular file"):
        RecordLog("/dev/full").check_writable()
    with pytest.raises(LogReadError, match="/dev/null is a character device"):  # empty, but no log either
        RecordLog("/dev/null").load()


def test_a_socket_is_refused(tmp_path):
    path = tmp_path / "s.jsonl"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(LogWriteError, match="is a socket"):
            RecordLog(path).check_writable()


def test_regular_files_and_new_paths_are_accepted(tmp_path):
    fresh = RecordLog(tmp_path / "new.jsonl")
    fresh.check_writable()
    fresh.append([make_record(0)])
    assert len(fresh.records()) == 1
    assert not fresh.lock_path.exists(), "the lock file is removed when its holder is done"


def test_a_full_disk_fails_the_append_once(tmp_path):
    """Running out of space (here: a file size limit) raises LogWriteError at once, loops over
    nothing, and keeps every whole line written before it."""
    script = f"""
import resource, signal, sys
sys.path[:0] = [{ROOT!r}]
from measure import MeasureResult
from records import LogWriteError, Record, RecordLog
from search_space import Target, Task
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as ENOSPC does
resource.setrlimit(resource.RLIMIT_FSIZE, (4000, 4000))
log = RecordLog({str(tmp_path / "t.jsonl")!r})
task = Task.make("gemm", {{"M": 4, "N": 4, "K": 4}})
for i in range(100):
    try:
        log.append([Record(task, Target.host(), {{"mr": i}}, i, MeasureResult((1e-3,) * 3))])
    except LogWriteError as exc:
        print("appended", i, "then:", exc)
        break
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "then: cannot write log" in proc.stdout
    written = int(proc.stdout.split()[1])
    report = RecordLog(tmp_path / "t.jsonl").load(warn=False)
    assert 0 < written == len(report.records) and report.bad_lines <= 1  # at most the torn last line


def test_one_holder_at_a_time(tmp_path):
    log = RecordLog(tmp_path / "t.jsonl")
    log.append([make_record(0)])
    (tmp_path / "alias.jsonl").symlink_to(log.path)
    with log.lock():
        message = f"log {log.path} is in use by another tuning job (pid {os.getpid()})"
        with pytest.raises(LogLockedError, match=re.escape(message)):
            RecordLog(tmp_path / "t.jsonl").check_writable()
        with pytest.raises(LogLockedError):
            with RecordLog(tmp_path / "alias.jsonl").lock():  # another name of the same log
                pass
        assert issubclass(LogLockedError, LogWriteError)
        log.append([make_record(1)])  # the holder writes
        assert len(RecordLog(log.path).records()) == 2  # readers need no lock
    with log.lock():  # released
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    path = tmp_path / "t.jsonl"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import sys; sys.path[:0] = [{ROOT!r}]\n"
         f"from records import RecordLog\nwith RecordLog({str(path)!r}).lock():\n"
         "    print('held', flush=True)\n    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LogLockedError, match=rf"in use by another tuning job \(pid {holder.pid}\)"):
            RecordLog(path).check_writable()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    RecordLog(path).check_writable()  # the kernel released the dead job's lock


def test_a_log_whose_sidecar_cannot_be_made_is_still_locked(tmp_path):
    """A name at the length limit leaves no room for ".lock" (a read-only directory neither): the
    job ran not at all ("cannot lock log"); the lock on the log itself now holds it alone."""
    log = RecordLog(tmp_path / ("b" * 250 + ".log"))
    log.check_writable()
    with log.lock():
        assert os.listdir(tmp_path) == [log.path.name]  # no sidecar: its name would be too long
        with pytest.raises(LogLockedError, match="is in use by another tuning job$"):
            with RecordLog(log.path).lock():
                pass
        log.append([make_record(0)])
    with log.lock():  # released
        pass
    assert len(log.records()) == 1
