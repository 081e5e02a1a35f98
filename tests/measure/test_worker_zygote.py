"""Workers forked by a zygote (``measure.worker_zygote``): one per environment, reused by later
workers of this process, never forking code that changed on disk, and reporting how each
worker ended as a spawned worker does."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

import search_space.templates.add as add_template
from measure.worker import WorkerCrash, WorkerProcess, WorkerTimeout, close_all, close_idle_zygotes
from test_worker_lifetime import running, wait_until  # noqa: E402  (same directory)

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="zygotes need pidfds (Linux 5.3)")


def facts(worker: WorkerProcess, variable: str = "ZYGOTE_TEST") -> dict:
    return worker.call("fakes:process_facts", variable, 120)


def test_workers_of_one_environment_share_a_zygote_and_others_get_their_own():
    plain = [WorkerProcess() for _ in range(3)]
    marked = WorkerProcess(env={"ZYGOTE_TEST": "1"})
    try:
        seen = [facts(w) for w in plain]
        assert len({f["pid"] for f in seen}) == 3
        parents = {f["parent"] for f in seen}
        assert len(parents) == 1 and parents != {os.getpid()}  # forked by one zygote, not by us
        other = facts(marked)
        assert other["variable"] == "1" and seen[0]["variable"] is None
        assert other["parent"] not in parents | {os.getpid()}
        # a worker started later in the same environment comes from the same zygote, also in
        # the next test (pytest's own variable, new for every test, keys no zygote)
        os.environ["PYTEST_CURRENT_TEST"] = "another test (call)"
        late = WorkerProcess()
        try:
            late_facts = facts(late, "PYTEST_CURRENT_TEST")
            assert late_facts["parent"] in parents and late_facts["variable"] is None
        finally:
            late.close()
    finally:
        close_all(plain + [marked])


def test_a_forked_worker_that_dies_or_hangs_is_reported_and_replaced():
    worker = WorkerProcess()
    try:
        first = facts(worker)["pid"]
        with pytest.raises(WorkerCrash, match="worker killed by SIGSEGV"):
            worker.call("fakes:die_by_signal", int(signal.SIGSEGV), 60)
        second = facts(worker)["pid"]
        assert second != first and worker.generation == 2
        with pytest.raises(WorkerTimeout):
            worker.call("time:sleep", 30, 0.5)
        assert facts(worker)["pid"] not in (first, second) and worker.generation == 3
    finally:
        worker.close()


def test_a_zygote_that_died_is_replaced_by_a_new_one():
    """A zygote killed (by the OOM killer, say) takes its workers with it; the next worker comes
    from a new zygote, not from a fresh interpreter for the rest of the process's life."""
    first = WorkerProcess()
    try:
        seen = facts(first)
        dead = seen["parent"]
        assert dead != os.getpid()
        os.kill(dead, signal.SIGKILL)
        assert wait_until(lambda: not running(seen["pid"]), 60)  # it dies with its zygote
        # the next call finds it dead (or dying) and starts a new worker, from a new zygote
        try:
            replaced = facts(first)
        except WorkerCrash:  # the call raced the death: the one after it starts the new worker
            replaced = facts(first)
        assert replaced["pid"] != seen["pid"] and replaced["parent"] not in {dead, os.getpid()}
        later = [WorkerProcess() for _ in range(2)]
        try:
            parents = {facts(w)["parent"] for w in later}
            assert len(parents) == 1 and not parents & {dead, os.getpid()}
        finally:
            close_all(later)
    finally:
        first.close()


def test_a_module_changed_on_disk_is_not_forked_from_its_old_code():
    """The zygote imported the templates; once one of their files changes, new workers come from
    a new zygote, and the workers of the old one keep working until they are closed."""
    path = Path(add_template.__file__)
    before = os.stat(path)
    old = WorkerProcess()
    try:
        old_parent = facts(old)["parent"]
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))
        new = WorkerProcess()
        try:
            assert facts(new)["parent"] != old_parent
            assert facts(old)["parent"] == old_parent  # still alive: its zygote was kept for it
        finally:
            new.close()
    finally:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        old.close()


def test_closing_idle_zygotes_keeps_the_one_a_live_worker_came_from():
    live, done = WorkerProcess(), WorkerProcess(env={"ZYGOTE_TEST": "2"})
    try:
        live_parent, done_parent = facts(live)["parent"], facts(done)["parent"]
        done.close()
        close_idle_zygotes()
        assert not Path(f"/proc/{done_parent}").exists()  # ended and reaped
        assert facts(live)["parent"] == live_parent
    finally:
        close_all([live, done])


def test_a_process_forked_from_the_owner_starts_its_own_worker_and_leaves_the_owners_alone():
    """A DataLoader-style fork of a process that has a worker: the child's calls go to a worker
    of its own (sharing the socket, each read the other's answers: kernels of other shapes), and
    the child ending or killing its worker leaves the parent's serving."""
    import multiprocessing

    worker = WorkerProcess()
    try:
        parent_worker = facts(worker)["pid"]

        def child(queue):
            first = facts(worker)["pid"]
            worker.kill()  # ends the child's own worker only
            queue.put((first, facts(worker)["pid"], worker.generation))

        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        children = [context.Process(target=child, args=(queue,)) for _ in range(2)]
        for process in children:
            process.start()
        for _ in range(4):  # the parent keeps calling its worker meanwhile
            assert facts(worker)["pid"] == parent_worker
        results = [queue.get(timeout=120) for _ in children]
        for process in children:
            process.join(60)
            assert process.exitcode == 0
        used = {pid for first, second, _ in results for pid in (first, second)}
        assert len(used) == 4 and parent_worker not in used
        assert all(generation == worker.generation + 2 for _, _, generation in results)
        assert facts(worker)["pid"] == parent_worker and worker.generation == 1
    finally:
        worker.close()


@pytest.mark.parametrize("zygote", ["1", "0"])
def test_a_worker_ignores_sigint_and_an_interrupted_call_leaves_no_answer_behind(zygote, monkeypatch):
    """Ctrl-C is the job's: a worker that raised KeyboardInterrupt reported the candidate in hand
    as failed, recorded for good (a job started in the background has SIGINT ignored, yet its
    workers raised it). And a call interrupted in the caller (a notebook's Ctrl-C) ends its
    worker: the answer it was computing would otherwise be read by the next call."""
    import _thread
    import threading

    monkeypatch.setenv("AUTOTUNE_WORKER_ZYGOTE", zygote)
    worker = WorkerProcess()
    try:
        pid = facts(worker)["pid"]
        os.kill(pid, signal.SIGINT)
        assert worker.call("time:sleep", 0.2, 60) is None and facts(worker)["pid"] == pid and worker.generation == 1
        # Ctrl-C as Python takes it (a process started with SIGINT ignored, as by make, would not)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            timer = threading.Timer(0.3, _thread.interrupt_main)
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                worker.call("time:sleep", 3, 60)
        finally:
            signal.signal(signal.SIGINT, previous)
        answer = facts(worker)
        assert isinstance(answer, dict) and answer["pid"] != pid and worker.generation == 2
    finally:
        worker.close()


WORKER_THEN_EXIT = """
import resource, sys
from measure.worker import WorkerProcess

worker = WorkerProcess()
worker_cpu = worker.call("fakes:burn_cpu", 1.0, 120)
worker.close()
own = resource.getrusage(resource.RUSAGE_SELF)
print(worker_cpu, own.ru_utime + own.ru_stime)
"""


def test_a_process_waits_for_its_idle_zygote_as_it_exits():
    """So that ``time autotune tune`` counts what the workers spent, and no zygote outlives the
    job unseen: a process's children's CPU time includes a grandchild's only once it is waited for."""
    import resource
    import subprocess
    import sys

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))  # its worker imports fakes, as ours do
    proc = subprocess.run([sys.executable, "-c", WORKER_THEN_EXIT], capture_output=True, text=True, timeout=300, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert proc.returncode == 0, proc.stderr
    worker_cpu, own_cpu = map(float, proc.stdout.split())
    counted = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    assert worker_cpu > 0.05
    assert counted >= own_cpu + 0.9 * worker_cpu, (counted, own_cpu, worker_cpu)
