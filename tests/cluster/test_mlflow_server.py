"""A team's MLflow: one real ``mlflow server`` (SQLite backend, its own artifact store) on
127.0.0.1, jobs logging to it over HTTP at the same time, and their records read back from
it by someone who does not have the logs."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from fakes import lines_in

CLI = [sys.executable, "-m", "autotune.cli"]
SERVER: dict[str, subprocess.Popen] = {}  # the module's server, for the last test to kill


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory, mlflow_tables):
    from fakes import copied_store

    folder = tmp_path_factory.mktemp("mlflow-server")
    copied_store(mlflow_tables, folder)
    port = _free_port()
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or "mlflow"
    # no job runner: it and its seven Huey consumers (eight processes, polling all along) run GenAI
    # jobs, which tuning never submits
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    server = subprocess.Popen([mlflow, "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                               "--artifacts-destination", (folder / "artifacts").as_uri(), "--host", "127.0.0.1",
                               "--port", str(port), "--workers", "1"],
                              cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "w"),
                              start_new_session=True)  # its workers die with it (the last test kills it)
    SERVER["process"] = server
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                if reply.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"mlflow server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        time.sleep(0.25)
    yield uri
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def two_jobs(tracking_server, tmp_path_factory):
    """Two tuning jobs run at once, both logging to the server: {"gemv shape": (log path, run id)}."""
    folder = tmp_path_factory.mktemp("jobs")
    shapes = ("M=1,N=64,K=128", "M=1,N=32,K=256")
    procs = [subprocess.Popen(CLI + ["tune", "--op", "gemv", "--shape", shape, "--tuner", "random", "--trials", "4",
                                     "--batch", "2", "--log", f"job{i}.jsonl", "--tracking-uri", tracking_server,
                                     "--experiment", "team", "--quiet"],
                              cwd=folder, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, shape in enumerate(shapes)]
    jobs = {}
    for i, (shape, proc) in enumerate(zip(shapes, procs)):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        assert "warning: MLflow" not in err and "not tracked" not in err, err  # the server was reached
        run_id = next(line.split()[2] for line in err.splitlines() if line.startswith("MLflow run "))
        jobs[shape] = (folder / f"job{i}.jsonl", run_id)
    return jobs


def test_two_concurrent_jobs_log_to_one_server(tracking_server, two_jobs):
    import mlflow

    runs = mlflow.search_runs(experiment_names=["team"], tracking_uri=tracking_server) \
        if "tracking_uri" in mlflow.search_runs.__code__.co_varnames else None
    if runs is None:  # older signature: the URI is process-wide
        mlflow.set_tracking_uri(tracking_server)
        runs = mlflow.search_runs(experiment_names=["team"])
    assert sorted(runs["run_id"]) == sorted(run for _, run in two_jobs.values())
    assert set(runs["status"]) == {"FINISHED"}
    assert sorted(runs["params.shape"]) == sorted(["{'M': 1, 'N': 64, 'K': 128}", "{'M': 1, 'N': 32, 'K': 256}"])
    assert (runs["metrics.best_gflops"] > 0).all() and (runs["metrics.trials"] == 4).all()
    client = mlflow.MlflowClient(tracking_uri=tracking_server)
    for _, run_id in two_jobs.values():
        assert [m.step for m in client.get_metric_history(run_id, "gflops")] == [0, 1, 2, 3]


def test_records_come_back_from_the_server_without_the_log(tracking_server, two_jobs, tmp_path, monkeypatch):
    from records import RecordLog
    from records.mlflow_tracking import records_from_run

    log, run_id = two_jobs["M=1,N=64,K=128"]
    kept = RecordLog(log).records()
    moved = tmp_path / "elsewhere"  # another machine: the log is not there, the server is
    moved.mkdir()
    monkeypatch.chdir(moved)  # back where the test started when it ends: later tests read files relative to it
    back = records_from_run(run_id, tracking_server)
    assert [r.to_json() for r in back] == [r.to_json() for r in kept]


@pytest.mark.tools("cc")
def test_export_from_the_server_on_another_machine(tracking_server, two_jobs, tmp_path):
    _, run_id = two_jobs["M=1,N=32,K=256"]
    proc = subprocess.run(CLI + ["export", "--mlflow-run", run_id, "--tracking-uri", tracking_server, "--out", "lib"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    manifest = (tmp_path / "lib" / "manifest.json").read_text()
    assert "gemv/float32/M=1,N=32,K=256" in manifest


# last in the module: it kills the server the tests above share
def test_a_server_that_dies_mid_job_costs_seconds_not_minutes(tracking_server, tmp_path):
    from records import RecordLog

    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        env.pop(name, None)  # the job's own bounds, not a setting of this machine
    log = tmp_path / "s.jsonl"
    job = subprocess.Popen(CLI + ["tune", "--op", "gemm", "--shape", "M=64,N=64,K=64", "--tuner", "random",
                                  "--trials", "12", "--batch", "2", "--quiet", "--log", str(log),
                                  "--tracking-uri", tracking_server],
                           cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while lines_in(log) < 4:
            assert job.poll() is None, job.communicate()[1]
            time.sleep(0.05)
    finally:
        os.killpg(SERVER["process"].pid, signal.SIGKILL)
        SERVER["process"].wait()
    killed = time.monotonic()
    try:
        _, stderr = job.communicate(timeout=60)  # it took 523 s with MLflow's own retries
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job was still waiting for its dead server after 60 s")
    assert time.monotonic() - killed < 30
    assert job.returncode == 0, stderr
    assert len(RecordLog(log).records()) == 12
    assert "could not be ended" in stderr and "(finished)" not in stderr, stderr
    assert all(len(line) < 600 for line in stderr.splitlines())
