"""Tuning on a real Ray cluster: two nodes on this machine (``ray.cluster_utils.Cluster``,
two CPUs each), so that one runner can die while the other goes on.

Each node gets one CPU runner pinned to its last core; builds run on the other cores. The
candidates are small gemv kernels timed briefly; every test shares the one cluster, and the
tests that drive a RayCluster themselves share one with its runners started."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from fakes import lines_in

pytestmark = pytest.mark.tools("ray")

CLI = [sys.executable, "-m", "autotune.cli"]
SHAPE = {"M": 1, "N": 64, "K": 128}
SHARED: dict = {}  # {"cluster": the RayCluster the ``cluster`` fixture hands out} while one is open


NEW_LOCAL_CLUSTER = """
import os
import ray
from ray._raylet import AuthenticationMode, get_authentication_mode
from measure.cluster import open_cluster

with open_cluster("ray") as cluster:
    token_mode = get_authentication_mode() == AuthenticationMode.TOKEN
    # a task runs on the cluster: its worker process was let in with the token it inherited
    worker_has_it = ray.get(ray.remote(lambda: "RAY_AUTH_TOKEN" in os.environ).remote())
print(token_mode, worker_has_it, os.environ.get("RAY_AUTH_MODE"), os.environ.get("RAY_AUTH_TOKEN"))
"""


def test_a_new_local_cluster_keeps_token_authentication_and_writes_nothing_to_the_home(tmp_path):
    """``RAY_ADDRESS=local``: a cluster of its own, though another may run on this machine (the
    module's, another test session's) that ``ray`` would otherwise join."""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    proc = subprocess.run([sys.executable, "-c", NEW_LOCAL_CLUSTER], env=dict(env, HOME=str(home), RAY_ADDRESS="local"),
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["True", "True", "None", "None"]  # on, used, and put back after
    assert not list(home.iterdir())  # Ray would have written .ray/auth_token
    assert "Token authentication" not in proc.stderr


def test_where_the_user_has_a_say_ray_s_own_token_rules_hold(tmp_path, monkeypatch):
    from measure.cluster import local_token
    from measure.cluster.local_token import use_a_process_token

    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert use_a_process_token("127.0.0.1:6379") is None  # a cluster that runs: its token is its own
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert use_a_process_token(None) is None and os.environ["RAY_AUTH_MODE"] == "disabled"
    monkeypatch.delenv("RAY_AUTH_MODE")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("theirs")
    assert use_a_process_token(None) is None and "RAY_AUTH_TOKEN" not in os.environ
    # a Ray whose internals moved: its own rules, and nothing of ours left in the environment
    (tmp_path / ".ray" / "auth_token").unlink()

    def moved():
        raise ImportError("cannot import name 'AuthenticationTokenLoader'")
    monkeypatch.setattr(local_token, "_reload_ray_settings", moved)
    monkeypatch.setattr(local_token, "_starts_a_new_cluster", lambda address: True)
    assert use_a_process_token(None) is None
    assert not {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"} & set(os.environ)


@pytest.fixture(scope="module")
def ray_cluster(kernel_cache):
    """The cluster's GCS address; this process is connected to it as a driver."""
    import ray
    from ray.cluster_utils import Cluster

    # a test cluster: no token for the CLI drivers started below to find, no usage reports, and
    # idle workers kept (not killed after a second), so that each job of this process builds on
    # the workers its last one left instead of starting new ones (about a CPU-second each)
    ours = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_idle_worker_killing_time_threshold_ms": str(600_000)}
    saved = {k: os.environ.get(k) for k in ours}
    os.environ.update(ours)
    # no daemon that no test uses (each a Python process polling all along): no autoscaler
    # monitor, no log monitor (every driver here has log_to_driver=False)
    node = {"num_cpus": 2, "object_store_memory": 80 << 20, "include_log_monitor": False}
    cluster = Cluster(initialize_head=True, head_node_args=dict(node, no_monitor=True))
    cluster.add_node(**node)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster.address
    finally:
        _close_the_shared_cluster()
        ray.shutdown()
        cluster.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _close_the_shared_cluster():
    if "cluster" in SHARED:
        SHARED.pop("cluster").close()


@pytest.fixture(autouse=True)
def one_set_of_runners_at_a_time(request):
    """The shared RayCluster's runners hold a CPU of each node: a test that starts runners of
    its own (a job, a CLI driver) runs without them."""
    if "cluster" not in request.fixturenames:
        _close_the_shared_cluster()


@pytest.fixture
def cluster(ray_cluster, fast_policy):
    """A RayCluster with its runners started (one per node), timing briefly, with no notes or
    build counts from before. The tests next to each other share one (two runner actors, each
    a Ray worker with a worker of its own to measure in, cost about a CPU-second to start); the
    test after one that lost a runner, or left candidates in flight, gets a new one."""
    from measure.cluster import open_cluster

    cluster = SHARED.get("cluster")
    if cluster is None or cluster.lost_runners or cluster.in_flight:
        _close_the_shared_cluster()
        notes = []
        cluster = SHARED["cluster"] = open_cluster(f"ray://{ray_cluster}", note=notes.append)
        (target,) = cluster.start_runners("cpu", run_timeout=10)
        cluster.notes = notes
    cluster.notes.clear()
    cluster.build_nodes.clear()
    cluster.build_cores.clear()
    cluster.set_policy(cluster.runners[0].target.key, fast_policy)
    return cluster


def gemv_inputs(target, n, seed=0, shape=SHAPE):
    from measure import MeasureInput
    from search_space import Task, get_template

    task = Task.make("gemv", shape)
    space = get_template("gemv", "cpu").space(task, target)
    return [MeasureInput(task, cfg, target) for cfg in space.sample(np.random.default_rng(seed), n)]


def test_one_runner_per_host_and_builds_off_its_cores(cluster, host):
    assert len(cluster.runners) == 2 and len({r.node for r in cluster.runners}) == 2
    for runner in cluster.runners:
        assert len(runner.cores) == 1
        # the runner's target is this CPU as its one pinned core sees it
        assert runner.target.key == host.key and runner.target.cores == 1
    # a shape no other test compiles: real compiles (not cache hits) keep both nodes' build CPUs busy
    builds = cluster.build(gemv_inputs(cluster.runners[0].target, 12, shape={"M": 1, "N": 40, "K": 192}))
    assert all(b.error.name == "NO_ERROR" and not b.cached for b in builds)
    assert sum(cluster.build_nodes.values()) == 12
    for runner in cluster.runners:
        assert cluster.build_cores[runner.node], "no build ran on a node"
        assert not cluster.build_cores[runner.node] & set(runner.cores), "a build ran on a runner's core"
    assert cluster.build_cpus == 2


def test_a_stalled_cluster_is_reported_and_the_job_still_gets_every_result(cluster, monkeypatch):
    """A job whose candidates sit behind another job's work says so rather than wait without a
    word: here the remark is due at once, before the builds just submitted can come back."""
    from measure.cluster import pool

    monkeypatch.setattr(pool, "STALL_NOTE_S", 0.0)
    tickets = cluster.submit(gemv_inputs(cluster.runners[0].target, 4, seed=2))
    results = {}
    while len(results) < len(tickets):
        results.update(cluster.wait())
    assert all(r.ok for r in results.values()), [r.message for r in results.values() if not r.ok]
    stalls = [note for note in cluster.notes if "nothing has come back from the cluster" in note]
    assert stalls and "build(s)" in stalls[0] and "CPUs are free" in stalls[0] and "Still waiting" in stalls[0]


def test_the_model_scheduler_measures_several_tasks_at_once(cluster, tmp_path):
    """Rounds of different tasks are in flight together, and their measurements overlap in
    time (each runner measures one candidate at a time, so an overlap is two runners at once)."""
    from autotune.model_tasks import ModelTask
    from autotune.scheduler import ClusterRounds, TaskScheduler
    from autotune.tuning import measure_on_cluster
    from measure import TimingPolicy
    from records import RecordLog
    from search_space import Task

    target = cluster.runners[0].target
    # candidates timed for ~0.2 s each, so that the runners' measurements can be seen to overlap
    cluster.set_policy(target.key, TimingPolicy(warmup=1, min_sample_s=0.04, repeats=5, min_repeats=5))
    tasks = [ModelTask(Task.make("gemv", {"M": 1, "N": n, "K": 128}), weight=1.0) for n in (32, 64, 96)]
    log = RecordLog(tmp_path / "model.jsonl")
    in_flight, most = set(), [0]

    def round_done(scheduler, i, records):
        in_flight.discard(i)

    scheduler = TaskScheduler(tasks, target, tuner="random", batch=2)
    run = ClusterRounds(scheduler, 12, cluster, log, on_round=[round_done])

    def next_rounds():
        rounds = run.next_rounds()
        in_flight.update(r.tag for r in rounds)
        most[0] = max(most[0], len(in_flight))
        return rounds

    measure_on_cluster(cluster, next_rounds)
    summary = run.summary()
    records, _ = distinct_configs(log.path)
    assert summary.trials == len(records) == 12 and len({(r.task.key, r.config_key) for r in records}) == 12
    assert {r.task.key for r in records} == {t.key for t in tasks}
    assert most[0] >= 2, "one round at a time"
    spans = [(r.result.timestamp - r.result.run_s, r.result.timestamp, r.task.key) for r in records]
    overlapping = [(a[2], b[2]) for a in spans for b in spans if a[2] != b[2] and a[0] < b[1] and b[0] < a[1]]
    assert overlapping, "no two tasks were measured at the same time"
    assert np.isfinite(summary.estimated_latency_s)


# the last test on the shared RayCluster: it kills one of the runners
def test_a_runner_killed_while_measuring_loses_only_that_candidate(cluster):
    import ray

    from measure.cluster.pool import RUNNER_DEPTH

    inputs = gemv_inputs(cluster.runners[0].target, 10, seed=1)
    builds = cluster.build(inputs)
    tickets = cluster.submit(inputs, builds)
    results = dict(cluster.wait())
    busy = cluster.busy_runners()
    assert busy, "both runners idle with candidates queued"
    ray.kill(busy[0].actor)
    while len(results) < len(tickets):
        for ticket, result in cluster.wait():
            assert ticket not in results, "a candidate came back twice"
            results[ticket] = result
    assert sorted(results) == sorted(tickets)
    assert all(r.ok for r in results.values()), [r.message for r in results.values() if not r.ok]
    # what the dead runner held (the candidate it measured, and the next one queued on it) went to the other
    assert cluster.lost_runners == 1 and 1 <= cluster.measured_again <= RUNNER_DEPTH and len(cluster.runners) == 1
    assert any("died" in note and "measured again" in note for note in cluster.notes)


def _job(host, fast_policy, log, cluster=None, trials=8, batch=4):
    from autotune import TuningJob
    from search_space import Task

    return TuningJob(host, Task.make("gemv", SHAPE), tuner="random", trials=trials, batch=batch, seed=3, log=str(log),
                     mlflow=False, timing=fast_policy, cluster=cluster)


def distinct_configs(path):
    from records import RecordLog

    records = RecordLog(path).records()
    return records, {r.config_key for r in records}


def test_a_clustered_job_writes_as_many_distinct_records_as_a_local_one(ray_cluster, host, fast_policy, tmp_path):
    from autotune import run_job

    notes = []
    local = run_job(_job(host, fast_policy, tmp_path / "local.jsonl"), progress=False)
    clustered = run_job(_job(host, fast_policy, tmp_path / "cluster.jsonl", f"ray://{ray_cluster}"), progress=False,
                        note=notes.append)
    records, configs = distinct_configs(tmp_path / "cluster.jsonl")
    local_records, local_configs = distinct_configs(tmp_path / "local.jsonl")
    assert len(records) == len(configs) == len(local_configs) == len(local_records) == 8
    assert clustered.measured == local.measured == 8 and clustered.best is not None
    # the records carry the target their runner reported: this CPU, as its one core sees it
    assert {(r.target.key, r.target.cores) for r in records} == {(host.key, 1)}
    assert any("2 runner(s) measuring" in n for n in notes), notes


def _kill_a_runner_after_first_record(log_path, killed):
    import ray

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if lines_in(log_path) >= 1:
            break
        time.sleep(0.01)
    names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("autotune-runner-")]
    actor = ray.get_actor(names[0]["name"], namespace=names[0]["namespace"])
    ray.kill(actor)
    killed.append(names[0]["name"])


def test_a_runner_killed_mid_job_loses_nothing_and_records_nothing_twice(ray_cluster, host, fast_policy, tmp_path):
    from autotune import run_job

    log, notes, killed = tmp_path / "kill.jsonl", [], []
    killer = threading.Thread(target=_kill_a_runner_after_first_record, args=(log, killed))
    killer.start()
    summary = run_job(_job(host, fast_policy, log, f"ray://{ray_cluster}", trials=12, batch=6), progress=False,
                      note=notes.append)
    killer.join()
    records, configs = distinct_configs(log)
    # the runner died measuring a candidate (the other was busy too: the batch keeps both fed)
    assert killed and any(killed[0] in n and "measured again" in n for n in notes), notes
    assert summary.measured == len(records) == len(configs) == 12
    assert all(r.ok for r in records)


def _signal_after_records(args, cwd, log, records: int, signum) -> tuple[subprocess.Popen, str]:
    """Run the CLI ``args`` as a driver and send it ``signum`` once ``log`` holds ``records``
    lines; the ended driver and its stderr."""
    driver = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and driver.poll() is None:
        if lines_in(log) >= records:
            break
        time.sleep(0.02)
    driver.send_signal(signum)
    try:
        _, stderr = driver.communicate(timeout=60)
    except subprocess.TimeoutExpired:  # a driver left running would hold the cluster the next tests use
        driver.kill()
        driver.communicate()
        pytest.fail(f"the driver did not end within 60 s of signal {signum}")
    return driver, stderr


def test_sigkill_of_the_driver_then_resume(ray_cluster, tmp_path):
    args = CLI + ["tune", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--tuner", "random", "--trials", "10",
                  "--batch", "2", "--seed", "5", "--log", "kill.jsonl", "--no-mlflow", "--quiet",
                  "--cluster", f"ray://{ray_cluster}"]
    log = tmp_path / "kill.jsonl"
    _signal_after_records(args, tmp_path, log, 3, signal.SIGKILL)
    first, _ = distinct_configs(log)
    assert 3 <= len(first) < 10, "the driver finished before it could be killed"
    again = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    assert f"({len(first)} resumed from the log, {10 - len(first)} measured now" in again.stdout, again.stdout
    records, configs = distinct_configs(log)
    assert len(records) == len(configs) == 10
    assert {r.config_key for r in first} <= configs


def test_sigterm_of_a_cluster_job_ends_it_as_an_interrupt_does(ray_cluster, tmp_path):
    """ray.init put Ray's own SIGTERM handler over the CLI's: exit 15 and a native stack dump,
    not the one line (and exit 143) of a terminated job."""
    args = CLI + ["tune", "--op", "gemv", "--shape", "M=1,N=64,K=128", "--tuner", "random", "--trials", "40",
                  "--batch", "2", "--log", "term.jsonl", "--no-mlflow", "--quiet", "--cluster", f"ray://{ray_cluster}"]
    log = tmp_path / "term.jsonl"
    driver, stderr = _signal_after_records(args, tmp_path, log, 2, signal.SIGTERM)
    assert driver.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "autotune: error: terminated; every measured record is in the log", stderr
    assert "SIGTERM received" not in stderr
    records, configs = distinct_configs(log)
    assert 2 <= len(records) == len(configs) < 40


class Alarm(Exception):
    pass


def test_a_driver_waiting_on_the_cluster_still_takes_signals(ray_cluster):
    """ray.wait runs a signal handler while it waits but hands back its exception only when it
    returns: a driver whose candidates cannot run (their builds queued behind another job's)
    waited out SIGTERM and Ctrl-C for as long as that lasted. It waits in slices, so the
    handler's exception comes out within about one."""
    import ray

    from measure.cluster.pool import WAIT_SLICE_S, wait_in_slices

    @ray.remote(num_cpus=0)
    def never_done():
        time.sleep(120)

    def on_alarm(*_):
        raise Alarm

    ref = never_done.remote()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    start = time.monotonic()
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.2)
        with pytest.raises(Alarm):
            wait_in_slices([ref], num_returns=1, timeout=None)
        assert time.monotonic() - start < 0.2 + 4 * WAIT_SLICE_S + 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        ray.cancel(ref, force=True)


def test_a_model_job_on_the_cluster_logs_to_the_log_and_mlflow(ray_cluster, host, fast_policy, tmp_path, mlflow_store):
    """``tune-model`` through ``run_job``: every task's first round on the two runners, the
    records in the log (written by the driver's log thread) and the MLflow run, which keeps the
    whole log and says what the job measured on."""
    from autotune import TuningJob, run_job
    from autotune.tune_model import ModelWorkload
    from records import RecordLog
    from records.mlflow_tracking import records_from_run
    from runtime.model_config import PRESETS

    log, uri, notes = tmp_path / "model.jsonl", mlflow_store, []
    job = TuningJob(host, model=ModelWorkload(PRESETS["tiny"]), tuner="random", trials=6, batch=2, log=str(log),
                    tracking_uri=uri, timing=fast_policy, cluster=f"ray://{ray_cluster}")
    summary = run_job(job, progress=False, note=notes.append)
    records = RecordLog(log).records()
    assert summary.measured == len(records) == 6 and len({(r.task.key, r.config_key) for r in records}) == 6
    run_id = next(n.split()[2] for n in notes if n.startswith("MLflow run "))
    assert len(records_from_run(run_id, uri)) == 6  # the log artifact was taken once every record was in
    import mlflow

    params = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id).data.params
    assert params["cluster_runners"] == "2" and params["cluster_targets"] == host.key
    assert params["cluster"] == f"ray://{ray_cluster}"
