"""The tuning log met through the command line: special files, lines that are not records,
and two jobs on one log. Run as a user runs it: in a subprocess."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

from measure import MeasureResult
from records import LogLockedError, Record, RecordLog
from search_space import Target, Task, get_template

CLI = [sys.executable, "-m", "autotune.cli"]
TUNE = ["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--trials", "2", "--no-mlflow", "--quiet",
        "--tuner", "random"]


def run(*args, cwd, timeout=300, max_memory: int | None = None):
    limit = None
    if max_memory is not None:  # a regression fails with MemoryError instead of waking the OOM killer
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (max_memory, max_memory))
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          preexec_fn=limit)


def assert_usage_error(proc, message: str) -> None:
    """Exit code 2 and one line on stderr that says ``message``, never a traceback."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: error:"), proc.stderr
    assert message in lines[0], proc.stderr


def gemv_record(seconds: float, config_offset: int = 0, shape=None) -> Record:
    """A record of the gemv task the CLI tunes below (or of ``shape``), on this machine."""
    task = Task.make("gemv", shape or {"M": 1, "N": 64, "K": 64})
    host = Target.host()
    template = get_template("gemv", "cpu")
    space = template.space(task, host)
    config = template.default(task, host)
    if config_offset:
        config = space.get((config.index + config_offset) % len(space))
    return Record(task, host, config.as_dict(), config.index, MeasureResult((seconds,) * 3), tuner="test")


# ----------------------------------------------------------------------------- special files


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_tune_refuses_a_device_as_log(tmp_path):
    # before: resuming read /dev/full's endless zeros into memory (~1 GB/s) until the OOM killer
    assert_usage_error(run(*TUNE, "--log", "/dev/full", cwd=tmp_path, timeout=120, max_memory=4 << 30),
                       "log /dev/full is a character device: a log must be a regular file")


def test_tune_refuses_a_fifo_as_log(tmp_path):
    os.mkfifo(tmp_path / "fifo")  # before: the job blocked in open() until something read the FIFO
    assert_usage_error(run(*TUNE, "--log", "fifo", cwd=tmp_path, timeout=120), "log fifo is a FIFO")


def test_best_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "fifo")
    proc = run("best", "--log", "fifo", cwd=tmp_path, timeout=120)  # before: blocked until the timeout
    assert proc.returncode == 2 and "log fifo is a FIFO: a log must be a regular file" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ----------------------------------------------------------------------------- lines that are not records


@pytest.fixture
def messy_log(tmp_path):
    """Good records of two gemv tasks among JSON lines that are not records (a list, null, a
    number, a string, an empty object, an unknown operator) and records of the second task
    whose times no kernel takes (zero, negative, NaN, infinite)."""
    good = gemv_record(1e-5)
    other = {"M": 2, "N": 64, "K": 64}
    unknown_op = good.to_dict()
    unknown_op["task"]["op"] = "nosuchop"
    impossible = []
    for i, costs in enumerate(([0.0] * 3, [-1e-6] * 3, [float("nan")] * 3, [float("inf")] * 3), start=1):
        data = gemv_record(1.0, config_offset=i, shape=other).to_dict()
        data["result"]["costs"] = costs
        impossible.append(json.dumps(data))  # NaN and Infinity as Python's json writes them
    lines = [good.to_json(), "[1,2,3]", "null", "42", '"text"', "{}", json.dumps(unknown_op),
             *impossible, gemv_record(3e-5, shape=other).to_json()]
    path = tmp_path / "messy.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_best_skips_lines_that_are_not_records(messy_log, tmp_path):
    proc = run("best", "--log", messy_log.name, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 6 unreadable line(s) (first at line 2)" in proc.stderr
    rows = {row["task"]: row for row in json.loads(proc.stdout)}
    assert rows["gemv/float32/M=1,N=64,K=64"]["seconds"] == pytest.approx(1e-5)
    assert rows["gemv/float32/M=2,N=64,K=64"]["seconds"] == pytest.approx(3e-5), "an impossible time won"


def test_tune_resumes_past_lines_that_are_not_records(messy_log, tmp_path):
    proc = run(*TUNE, "--log", messy_log.name, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 6 unreadable line(s)" in proc.stderr
    assert "2 trials (1 resumed from the log, 1 measured now" in proc.stdout
    assert len(RecordLog(messy_log).records(warn=False)) == 6 + 1  # the six records and the new one


def test_replay_skips_lines_that_are_not_records(messy_log, tmp_path):
    proc = run("replay", "--log", messy_log.name, "--tuners", "random", "--seeds", "1", "--trials", "2",
               "--json", "r.json", "--plot", "r.png", "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 6 unreadable line(s)" in proc.stderr
    assert "gemv/float32/M=2,N=64,K=64 on " in proc.stdout and ": 5 recorded configs" in proc.stdout, proc.stdout


def test_tune_refuses_files_that_are_not_logs(tmp_path):
    """Records were appended to whatever file --log named: a database, notes, a directory's name."""
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"SQLite format 3\0" + b"\0" * 4096 + b"\n" * 3)
    notes = tmp_path / "notes.txt"
    notes.write_text("measure gemv again\n\nsee the log\n")
    before = {p.name: p.read_bytes() for p in (database, notes)}
    assert_usage_error(run(*TUNE, "--log", "mlflow.db", cwd=tmp_path), "mlflow.db is not a tuning log (it holds binary data)")
    assert_usage_error(run(*TUNE, "--log", "notes.txt", cwd=tmp_path),
                       "notes.txt is not a tuning log (none of its 2 line(s) is a record)")
    assert {p.name: p.read_bytes() for p in (database, notes)} == before
    # "runs/" became a file named runs
    assert_usage_error(run(*TUNE, "--log", "runs/", cwd=tmp_path), "log path runs/ names a directory")
    assert not (tmp_path / "runs").exists()
    # an empty file, and a log whose only line a kill cut short, are logs to append to
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "torn.jsonl").write_text(gemv_record(1e-5).to_json()[:40])
    for name in ("empty.jsonl", "torn.jsonl"):
        proc = run(*TUNE, "--log", name, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert len(RecordLog(tmp_path / name).records(warn=False)) == 2


def test_a_job_refused_after_its_log_was_checked_leaves_no_empty_log(tmp_path):
    # the log is checked before the job's other options: the check made the file and left it
    assert_usage_error(run(*TUNE, "--log", "new.jsonl", "--runner-cpus", "2", cwd=tmp_path), "--runner-cpus is for --cluster")
    assert not (tmp_path / "new.jsonl").exists()
    (tmp_path / "kept.jsonl").write_text("")  # an empty file the user made stays
    assert_usage_error(run(*TUNE, "--log", "kept.jsonl", "--runner-cpus", "2", cwd=tmp_path), "--runner-cpus")
    assert (tmp_path / "kept.jsonl").exists()


def test_a_log_of_a_newer_schema_is_named_as_such_and_not_appended_to(tmp_path):
    newer = []
    for i in range(3):
        data = gemv_record(1e-5 * (i + 1), config_offset=i).to_dict()
        data["schema"] = 7
        newer.append(json.dumps(data))
    log = tmp_path / "new.jsonl"
    log.write_text("\n".join([gemv_record(4e-5, config_offset=5).to_json(), *newer]) + "\n")
    before = log.read_text()
    proc = run("best", "--log", "new.jsonl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # was: "skipped 3 unreadable line(s)", as if the file were damaged
    assert ("skipped 3 record(s) of schema 7, written by a newer llm-autotune (this one reads schema 1..1): "
            "upgrade to use them") in proc.stderr
    assert "unreadable" not in proc.stderr
    # was: measured every config again into the file, beside records of another schema
    assert_usage_error(run(*TUNE, "--log", "new.jsonl", cwd=tmp_path),
                       "log new.jsonl holds 3 record(s) of schema 7, written by a newer llm-autotune")
    assert log.read_text() == before


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path):
    log = tmp_path / "bom.jsonl"
    log.write_bytes(b"\xef\xbb\xbf" + (gemv_record(1e-5).to_json() + "\n").encode())
    assert len(RecordLog(log).records()) == 1
    proc = run(*TUNE, "--log", "bom.jsonl", cwd=tmp_path)
    assert proc.returncode == 0 and "1 resumed from the log" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("command", [["best"], ["export", "--out", "lib"], ["replay", "--tuners", "random"], TUNE])
def test_a_name_too_long_is_one_line_and_exit_2(tmp_path, command):
    name = "a" * 300 + ".jsonl"  # was: internal error: OSError: [Errno 36] File name too long
    assert_usage_error(run(*command, "--log", name, cwd=tmp_path, timeout=120), "File name too long")


def test_an_output_that_is_a_hard_link_of_the_log_is_refused(tmp_path):
    log = RecordLog(tmp_path / "t.jsonl")
    log.append([gemv_record(1e-5)])
    os.link(log.path, tmp_path / "other-name.jsonl")
    before = log.path.read_text()
    # was: the replay report written over the log, under both names
    assert_usage_error(run("replay", "--log", "other-name.jsonl", "--tuners", "random", "--trials", "1",
                           "--json", "t.jsonl", cwd=tmp_path), "--json t.jsonl is other-name.jsonl, which this command reads")
    assert log.path.read_text() == before


# ----------------------------------------------------------------------------- one job per log


def test_a_second_job_on_a_log_refuses_at_once(tmp_path):
    log = RecordLog(tmp_path / "t.jsonl")
    log.append([gemv_record(1e-5)])
    with log.lock():  # the first job, here in the test's process
        proc = run(*TUNE, "--log", "t.jsonl", cwd=tmp_path, timeout=120)
        assert_usage_error(proc, f"log t.jsonl is in use by another tuning job (pid {os.getpid()})")
        reader = run("best", "--log", "t.jsonl", cwd=tmp_path, timeout=120)  # readers need no lock
        assert reader.returncode == 0 and "gemv/float32/M=1,N=64,K=64" in reader.stdout, reader.stderr
    assert len(log.records()) == 1, "the refused job measured nothing"


def test_a_hard_link_of_a_held_log_is_held_too(tmp_path):
    """The lock was a sidecar keyed on the name: a job on a hard link of the log ran beside the
    holder and both measured every config."""
    log = RecordLog(tmp_path / "t.jsonl")
    log.append([gemv_record(1e-5)])
    os.link(log.path, tmp_path / "link.jsonl")
    with log.lock():
        assert_usage_error(run(*TUNE, "--log", "link.jsonl", cwd=tmp_path, timeout=120),
                           "log link.jsonl is in use by another tuning job under another name")
    assert len(log.records()) == 1


def test_tuner_holds_the_log_for_the_whole_job(tmp_path):
    from autotune.tuners import make_tuner
    from fakes import SyntheticRunner

    task, host = Task.make("gemv", {"M": 1, "N": 64, "K": 64}), Target.host()
    log = RecordLog(tmp_path / "t.jsonl")
    runner = SyntheticRunner({"gemv": 1e-5})
    seen_locked = []

    def probe(tuner, inputs, results, records, first):  # another job trying mid-run
        try:
            RecordLog(log.path).check_writable()
            seen_locked.append(False)
        except LogLockedError:
            seen_locked.append(True)

    make_tuner("random", task, host, seed=0).tune(4, runner, runner, batch_size=2, log=log, callbacks=[probe])
    assert seen_locked and all(seen_locked)
    log.check_writable()  # released at the end
    with log.lock():
        with pytest.raises(LogLockedError, match="in use by another tuning job"):
            make_tuner("random", task, host, seed=0).tune(6, runner, runner, log=log)
    assert len(runner.calls) == 4, "the refused job measured nothing"


def test_resume_counts_each_config_once(tmp_path):
    """A log where an old double job recorded every config twice: each counts once toward the budget."""
    from dataclasses import replace

    from autotune.tuners import make_tuner
    from fakes import SyntheticRunner

    task, host = Task.make("gemv", {"M": 1, "N": 64, "K": 64}), Target.host()
    log = RecordLog(tmp_path / "t.jsonl")
    once = [gemv_record(1e-5 * (i + 1), config_offset=i) for i in range(3)]
    log.append(once + [replace(r, timestamp=r.timestamp + 1) for r in once])  # same configs, measured again
    assert len(log.records()) == 6
    runner = SyntheticRunner({"gemv": 1e-5})
    summary = make_tuner("random", task, host, seed=0).tune(5, runner, runner, batch_size=2, log=log)
    assert summary.resumed == 3 and summary.measured == 2 and summary.trials == 5
    assert len({r.config_index for r in log.records()}) == 5
