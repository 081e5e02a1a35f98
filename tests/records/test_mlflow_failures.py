"""MLflow failing under a tuning job: a server that dies or never answers, a store that
cannot be written, an artifact folder that cannot be, a URI MLflow does not know. The log is
the source of truth: the job warns in one line, tunes on, and never says a run ended when it
did not."""
from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from types import SimpleNamespace

import pytest

from autotune import TuningJob, run_job
from records import RecordLog
from search_space import Task

CLI = [sys.executable, "-m", "autotune.cli"]
GEMM = Task.make("gemm", {"M": 64, "N": 64, "K": 64})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _runs(store: str):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    return client, client.search_runs([client.get_experiment_by_name("llm-autotune").experiment_id])


@pytest.fixture
def http_defaults_unset(monkeypatch):
    """MLflow's HTTP settings as a user who set none has them (and as they were, afterwards)."""
    from records.mlflow_tracking import OUR_SETTINGS

    for name in OUR_SETTINGS:
        monkeypatch.setenv(name, "")  # so that the delenv below is undone
        monkeypatch.delenv(name)


# ----------------------------------------------------------------------------- a dead server


def test_a_dead_server_costs_one_bounded_call_then_nothing_is_sent(mlflow_store, http_defaults_unset, monkeypatch):
    from records.mlflow_tracking import OUR_SETTINGS, MLflowRun, TrackingStopped, _client

    run = MLflowRun(mlflow_store)
    run.client = _client(f"http://127.0.0.1:{_free_port()}")  # its server is gone: nothing listens there
    start = time.monotonic()
    with pytest.raises(Exception):
        run.log_params({"a": 1})
    assert time.monotonic() - start < 15  # 2 retries, not MLflow's 7 with minutes of backoff
    # the settings held only while the calls ran: the process's other MLflow calls keep MLflow's own
    assert not set(OUR_SETTINGS) & set(os.environ)
    assert "Connection refused" in run.failure
    start = time.monotonic()
    with pytest.raises(TrackingStopped):
        run.log_params({"b": 2})
    with pytest.raises(TrackingStopped):
        run.finish()
    assert time.monotonic() - start < 0.5 and not run.ended


def test_the_mlflow_settings_hold_while_calls_of_ours_run_and_a_users_own_win(http_defaults_unset, monkeypatch):
    import logging

    from records.mlflow_tracking import our_settings

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # the user's
    mlflow_logger = logging.getLogger("mlflow")
    before = mlflow_logger.level
    mlflow_logger.setLevel(logging.INFO)  # MLflow's own level
    try:
        with our_settings():
            with our_settings():  # calls from two threads at once
                assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"
            assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "2"  # the other call still runs
            assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"
            assert mlflow_logger.level == logging.WARNING
        assert mlflow_logger.level == logging.INFO
    finally:
        mlflow_logger.setLevel(before)
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ and "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "60"


class FakeRun:
    def __init__(self, failure: str = ""):
        self.run_id, self.uri, self.failure, self.ended = "r1", "http://tracking", failure, ""

    def finish(self, status: str) -> None:
        self.ended = status


def _tracking(run):
    from autotune.tuning import Tracking

    notes: list[str] = []
    tracking = Tracking(SimpleNamespace(mlflow=False), notes.append)
    tracking.run = run
    return tracking, notes


def test_a_run_whose_tracking_failed_is_not_ended_and_the_job_says_so():
    finished = []
    tracking, notes = _tracking(FakeRun(failure="Connection refused"))
    tracking.finish(lambda run, status: finished.append(status), "FINISHED")
    assert finished == [] and tracking.run.ended == ""  # not one more call to a dead server
    (note,) = notes
    assert note.startswith("autotune: warning: MLflow run r1 could not be ended") and "(finished)" not in note
    assert "the log holds every record" in note


def test_an_interrupted_job_does_not_wait_for_a_store_that_hangs(monkeypatch):
    import autotune.tuning as tuning

    assert tuning.INTERRUPTED_FINISH_S < 10  # the most an interrupted job waits for its store
    monkeypatch.setattr(tuning, "INTERRUPTED_FINISH_S", 0.5)  # the same wait, not 5 s of it here
    tracking, notes = _tracking(FakeRun())
    start = time.monotonic()
    tracking.finish(lambda run, status: time.sleep(20), "KILLED")  # an upload that never returns
    assert time.monotonic() - start < 10
    assert "could not be ended" in notes[0] and "(killed)" not in notes[0]


def test_a_failed_upload_still_ends_the_run_and_says_how(tmp_path, host, mlflow_store):
    """The artifact folder cannot be made (a file is in its way, as an unwritable one): the
    run was left RUNNING while the job said "(finished)"."""
    (tmp_path / "mlartifacts").write_text("")
    store = mlflow_store
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_job(TuningJob(host, GEMM, tuner="random", trials=2, log=tmp_path / "t.jsonl", tracking_uri=store),
                progress=False, note=notes.append)
    _, (run,) = _runs(store)
    assert run.info.status == "FINISHED"
    assert f"MLflow run {run.info.run_id} (finished) in {store}" in notes
    assert any(f"could not store the log in run {run.info.run_id}" in str(w.message) for w in caught)
    assert len(RecordLog(tmp_path / "t.jsonl").records()) == 2


# ----------------------------------------------------------------------------- check_reachable


def test_a_server_that_takes_connections_but_never_answers_is_unreachable():
    from autotune.tuning import check_reachable

    with socket.socket() as listening:  # the kernel accepts connections; nobody ever reads them
        listening.bind(("127.0.0.1", 0))
        listening.listen(4)
        start = time.monotonic()
        with pytest.raises(ConnectionError, match="no tracking server answers at 127.0.0.1:.*no reply within 1 s"):
            check_reachable(f"http://127.0.0.1:{listening.getsockname()[1]}", timeout_s=1)
        assert time.monotonic() - start < 5


def test_any_http_answer_but_a_gateways_5xx_is_a_server():
    """A proxy's 404 or a login's 401 is a server that answers: MLflow takes it from there."""
    from autotune.tuning import check_reachable

    class Health(http.server.BaseHTTPRequestHandler):
        code = 200

        def do_GET(self):
            self.send_response(self.code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    uri = f"http://127.0.0.1:{server.server_port}/"
    try:
        for code in (200, 404, 401):
            Health.code = code
            check_reachable(uri, timeout_s=2)
        Health.code = 503
        with pytest.raises(ConnectionError, match="answers 503"):
            check_reachable(uri, timeout_s=2)
    finally:
        server.shutdown()
        server.server_close()


def test_an_sqlite_store_that_cannot_be_written_is_refused_before_tuning(tmp_path, monkeypatch):
    import autotune.tuning as tuning

    with pytest.raises(ConnectionError, match="directory .*nodir does not exist"):
        tuning.check_reachable(f"sqlite:///{tmp_path / 'nodir' / 'x.db'}")
    assert not (tmp_path / "nodir").exists()
    (tmp_path / "m.db").write_bytes(b"")
    tuning.check_reachable(f"sqlite:///{tmp_path / 'm.db'}")
    # root may write anything: as a user without write permission sees it
    monkeypatch.setattr(tuning.os, "access", lambda path, mode: not mode & os.W_OK)
    with pytest.raises(ConnectionError, match=f"tracking store {tmp_path / 'm.db'} is not writable"):
        tuning.check_reachable(f"sqlite:///{tmp_path / 'm.db'}")
    with pytest.raises(ConnectionError, match=f"directory {tmp_path} is not writable"):
        tuning.check_reachable(f"sqlite:///{tmp_path / 'new.db'}")
    tuning.check_reachable(f"sqlite:///{tmp_path / 'm.db'}", writing=False)  # export only reads it


# The CLI with os.access answering from the permission bits, as for a user who is not root: root may
# write into a read-only directory, so there the test would otherwise see a writable store.
CLI_AS_A_USER = [sys.executable, "-c", """
import os, runpy, stat
real_access = os.access
def access(path, mode, *args, **kwargs):
    if mode & os.W_OK and os.path.exists(path) and not os.stat(path).st_mode & stat.S_IWUSR:
        return False
    return real_access(path, mode, *args, **kwargs)
os.access = access
runpy.run_module("autotune.cli", run_name="__main__", alter_sys=True)
"""]


def test_a_job_on_a_read_only_store_warns_at_once(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    try:
        start = time.monotonic()
        proc = subprocess.run(CLI_AS_A_USER + ["tune", "--op", "gemm", "--shape", "M=64,N=64,K=64", "--tuner", "random",
                                     "--trials", "2", "--quiet", "--log", "t.jsonl", "--tracking-uri",
                                     f"sqlite:///{tmp_path / 'ro' / 'm.db'}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert proc.returncode == 0 and time.monotonic() - start < 30, proc.stderr
    assert "is not writable" in proc.stderr and "sqlalchemy" not in proc.stderr.lower(), proc.stderr


def test_a_deleted_experiment_is_named_and_a_log_of_another_tuner_is_said(tmp_path, mlflow_store):
    """A deleted experiment read as an unavailable store; records of another tuner, resumed,
    counted toward the trials and showed in MLflow as the new tuner's, without a word."""
    import mlflow

    store = mlflow_store

    def tune(*more):
        return subprocess.run(CLI + ["tune", "--op", "gemm", "--shape", "M=16,N=16,K=16", "--quiet", "--log",
                                     "t.jsonl", *more], cwd=tmp_path, capture_output=True, text=True, timeout=120)

    # an earlier job's log (of xgb) and its experiment, since deleted; only the next job tracks, so
    # the first needs no run in MLflow (several seconds of a job's CPU), just the experiment
    assert tune("--trials", "2", "--no-mlflow").returncode == 0
    client = mlflow.MlflowClient(store)
    client.delete_experiment(client.create_experiment("gone"))
    proc = tune("--trials", "3", "--tuner", "random", "--tracking-uri", store, "--experiment", "gone")
    assert proc.returncode == 0, proc.stderr
    assert "MLflow experiment 'gone' at" in proc.stderr and "is deleted: restore it" in proc.stderr
    assert "measured by other tuners (2 by xgb)" in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------- export and messages


def test_export_from_a_uri_mlflow_does_not_know_is_one_line_and_exit_2(tmp_path, capsys):
    from autotune.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["export", "--mlflow-run", "abc", "--tracking-uri", "foo://bar", "--out", str(tmp_path / "lib")])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert err.startswith("autotune: error: --mlflow-run abc: cannot open the MLflow store foo://bar")
    assert err.count("\n") == 1 and "internal error" not in err


def test_an_error_is_cut_at_a_word_and_keeps_its_cause():
    from records.mlflow_tracking import error_text

    refused = ("API request to http://127.0.0.1:5055/api/2.0/mlflow/runs/log-batch failed with exception "
               "HTTPConnectionPool(host='127.0.0.1', port=5055): Max retries exceeded with url: "
               "/api/2.0/mlflow/runs/log-batch (Caused by NewConnectionError(\"HTTPConnection(host='127.0.0.1', "
               "port=5055): Failed to establish a new connection: [Errno 111] Connection refused\"))\nsecond line")
    text = error_text(Exception(refused))
    assert text.startswith("API request to http://127.0.0.1:5055/api/2.0/mlflow/runs/log-batch failed")
    assert text.endswith(" … [Errno 111] Connection refused") and len(text) <= 300
    words = "word " * 100
    assert error_text(Exception(words)) == "word " * 58 + "word …"
    assert error_text(Exception("short\nmore")) == "short"
