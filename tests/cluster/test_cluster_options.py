"""--cluster as the user gives it: addresses read without Ray, bad ones refused with one line,
and no Ray at all in a job that does not ask for a cluster. None of this needs Ray installed."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from autotune.job import JobError, TuningJob
from measure.cluster import ClusterAddress, parse_cluster_address
from search_space import Task

CLI = [sys.executable, "-m", "autotune.cli"]


@pytest.mark.parametrize("text, address", [
    ("ray", ClusterAddress()),
    ("ray://127.0.0.1:6379", ClusterAddress("127.0.0.1", 6379)),
    ("ray://head-node.example:10001", ClusterAddress("head-node.example", 10001)),
    ("ray://[::1]:6379", ClusterAddress("::1", 6379)),
])
def test_cluster_addresses_are_read_without_ray(text, address):
    assert parse_cluster_address(text) == address
    assert str(address) == text  # what the user gave, and what MLflow records


@pytest.mark.parametrize("text", ["", "rays", "ray://", "ray://host", "ray://host:", "ray://:6379",
                                  "tcp://host:6379", "ray://host:6379/x", "ray://host:0", "ray://host:70000"])
def test_malformed_cluster_addresses_are_refused(text):
    with pytest.raises(ValueError, match="--cluster"):
        parse_cluster_address(text)


def test_a_job_with_a_malformed_cluster_is_bad_input(host):
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 128})
    with pytest.raises(JobError, match="malformed --cluster"):
        TuningJob(host, task, cluster="ray:/x")
    with pytest.raises(JobError, match="runner_cpus"):
        TuningJob(host, task, cluster="ray", runner_cpus=0)
    job = TuningJob(host, task, cluster="ray://10.0.0.1:6379", runner_cpus=2)
    assert job.params()["cluster"] == "ray://10.0.0.1:6379"
    assert TuningJob.from_dict(job.to_dict()) == job


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, message", [
    (["tune", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--cluster", "ray:/127.0.0.1:1"], "malformed --cluster"),
    (["tune-model", "--model", "tiny", "--cluster", "ray://head"], "malformed --cluster"),
    (["sweep", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--log", "s.jsonl", "--cluster", "ray://h:99999"],
     "port 99999"),
    (["tune", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--runner-cpus", "2"], "--runner-cpus is for --cluster"),
    (["tune", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--cluster", "ray", "--runner-cpus", "0"],
     "--runner-cpus must be >= 1"),
    (["tune", "--target", "sm_90a", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--cluster", "ray"],
     "--compile-only builds on this machine"),
])
def test_bad_cluster_options_are_one_line_and_exit_2(tmp_path, args, message):
    proc = subprocess.run(CLI + args + ["--no-mlflow"] * (args[0] != "sweep"), capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unreachable_cluster_is_one_line_at_once(tmp_path):
    port = _closed_port()
    start = time.monotonic()
    proc = subprocess.run(CLI + ["tune", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--trials", "2", "--no-mlflow",
                                 "--log", "t.jsonl", "--cluster", f"ray://127.0.0.1:{port}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("autotune:")]
    # with Ray installed the head is tried (and nobody answers); without it, the extra is named
    assert len(lines) == 1, proc.stderr
    assert f"no Ray cluster answers at 127.0.0.1:{port}" in lines[0] or "needs Ray" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "t.jsonl").exists() or (tmp_path / "t.jsonl").read_text() == ""


def test_a_job_without_a_cluster_never_imports_ray(tmp_path):
    code = (
        "import sys\n"
        "import autotune.cli, autotune.job, measure, measure.cluster\n"
        "from autotune import TuningJob, run_job\n"
        "from measure import TimingPolicy\n"
        "from search_space import Target, Task\n"
        "policy = TimingPolicy(warmup=1, min_sample_s=0.0005, repeats=3, min_repeats=3, max_total_s=0.5)\n"
        "job = TuningJob(Target.host(), Task.make('gemv', {'M': 1, 'N': 64, 'K': 128}), tuner='random', trials=2,\n"
        "                batch=2, log='t.jsonl', mlflow=False, timing=policy)\n"
        "summary = run_job(job, progress=False)\n"
        "print(summary.measured, 'ray' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "False"]


def test_results_that_came_back_with_the_last_runners_loss_are_handed_back_first(monkeypatch):
    """Every runner gone: the ClusterError came out of wait() at once, and a result collected
    with it (a candidate recorded as a crash, another runner's finished one) never reached
    the log, though the job's message said every measured record was there."""
    from measure.cluster import ClusterError, pool
    from measure.types import MeasureError, MeasureResult

    cluster = object.__new__(pool.RayCluster)  # no Ray: wait()'s bookkeeping alone
    cluster._finished, cluster._failure, cluster._building, cluster._queued = [], None, {}, {}
    cluster._running = {"crash": None, "done": None}
    cluster._last_progress, cluster._stall_noted = time.monotonic(), False
    crash = MeasureResult.failed(MeasureError.WORKER_CRASH, "2 runners died measuring it")

    def collect(ref):
        if ref == "crash":  # recorded as a crash, then no runner of its target is left
            cluster._finished.append((1, crash))
            raise ClusterError("every runner of cpu-x on the Ray cluster is gone")
        cluster._finished.append((2, MeasureResult((1e-3,) * 3)))

    monkeypatch.setattr(pool.ray, "wait", lambda refs, num_returns, timeout: (list(refs), []))
    monkeypatch.setattr(cluster, "_collect_run", lambda ref: (cluster._running.pop(ref), collect(ref)))
    assert [ticket for ticket, _ in cluster.wait()] == [1, 2]
    with pytest.raises(ClusterError, match="every runner"):
        cluster.wait()


def test_a_host_name_the_resolver_cannot_encode_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", "tune", "--op", "gemv", "--shape", "M=1,N=64,K=64",
                           "--trials", "2", "--no-mlflow", "--log", "t.jsonl", "--cluster", "ray://a..b:6379"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr  # was: internal error: UnicodeError, exit 1
    assert proc.stderr.strip() == "autotune: error: --cluster ray://a..b:6379: a..b is not a valid host name"


def test_a_port_where_no_ray_head_listens_is_refused_at_once(monkeypatch):
    """Something else listening there (a web server, a port that takes connections and never
    answers): Ray retried it for minutes, deaf to Ctrl-C; the check only opened a connection."""
    import http.server
    import threading

    from measure.cluster import ClusterError, check_reachable

    web = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:
        with pytest.raises(ClusterError, match="is not a Ray head"):
            check_reachable(ClusterAddress("127.0.0.1", web.server_address[1]), timeout_s=5)
    finally:
        web.shutdown()
    with socket.socket() as silent:  # the kernel accepts connections; nobody ever reads them
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        begin = time.monotonic()
        with pytest.raises(ClusterError, match="no reply within 1 s"):
            check_reachable(ClusterAddress("127.0.0.1", silent.getsockname()[1]), timeout_s=1)
        assert time.monotonic() - begin < 10
    # `--cluster ray` with RAY_ADDRESS naming a head: it waited for Ray's own retries
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free}")
    with pytest.raises(ClusterError, match="no Ray cluster answers at 127.0.0.1"):
        check_reachable(ClusterAddress())
    monkeypatch.setenv("RAY_ADDRESS", "auto")  # Ray's to resolve
    check_reachable(ClusterAddress())
