"""A tuning job's MLflow run, checked in a temporary SQLite store."""
from __future__ import annotations

import pytest

from autotune import TuningJob, run_job
from records import RecordLog
from search_space import Task


@pytest.fixture
def store(mlflow_store):
    return mlflow_store


def test_job_run_has_params_per_trial_metrics_and_the_log(store, tmp_path, host):
    from mlflow import MlflowClient

    log = RecordLog(tmp_path / "job.jsonl")
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 128})
    summary = run_job(TuningJob(host, task, tuner="random", trials=10, batch=4, log=log.path, tracking_uri=store),
                      progress=False)
    assert summary.trials == 10
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("llm-autotune")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["op"] == "gemv" and params["tuner"] == "random" and params["trials"] == "10"
    assert params["task"] == task.key and params["target"] == host.key
    history = client.get_metric_history(run.info.run_id, "gflops")
    assert sorted(m.step for m in history) == list(range(10))
    best = client.get_metric_history(run.info.run_id, "best_gflops")
    values = [m.value for m in sorted(best, key=lambda m: m.step)]
    assert values == sorted(values) and values[-1] == pytest.approx(summary.best.gflops)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"job.jsonl", "best_config.json"} <= artifacts

    from records.mlflow_tracking import records_from_run

    back = records_from_run(run.info.run_id, store)
    assert [r.to_json() for r in back] == [r.to_json() for r in log.records()]


def test_xgb_job_logs_the_models_live_ranking_quality(store, tmp_path, host):
    from mlflow import MlflowClient

    log = RecordLog(tmp_path / "xgb.jsonl")
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 300})  # K > 256: a K-block knob, 24+ configs on any host
    run_job(TuningJob(host, task, tuner="xgb", trials=24, batch=8, log=log.path, tracking_uri=store,
                      restrict={"threads": [1]}), progress=False)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("llm-autotune").experiment_id])
    ranked = {r.model["batch"] + 7: r.model for r in log.records() if "pairwise_accuracy" in r.model}
    assert all("score" in r.model for r in log.records()[8:]), "batches 2 and 3 were ranked before being measured"
    # a batch whose throughputs all lie within the noise margin has no pairwise figure
    assert ranked and set(ranked) <= {15, 23}
    history = client.get_metric_history(run.info.run_id, "model_pairwise_accuracy")
    assert {m.step: m.value for m in history} == {step: pytest.approx(m["pairwise_accuracy"])
                                                  for step, m in ranked.items()}
    recall = client.get_metric_history(run.info.run_id, "model_topk_recall")
    assert {m.step for m in recall} <= {15, 23} and recall


def test_jobs_that_start_together_on_a_new_store_each_get_their_run(tmp_path):
    """Both would create the new store's schema at once, and the loser's half-done migration
    broke the store for every later job. Three processes wait for one signal, then open it."""
    import os
    import subprocess
    import sys
    import time

    script = tmp_path / "open.py"
    script.write_text(
        "import os, sys, time\n"
        "from records.mlflow_tracking import MLflowRun\n"  # imports mlflow: seconds, before the signal
        "import mlflow  # noqa\n"
        "while not os.path.exists(sys.argv[2]):\n"
        "    time.sleep(0.005)\n"
        "run = MLflowRun(sys.argv[1], experiment='together')\n"
        "run.finish()\n"
        "print(run.run_id)\n")
    uri, go = f"sqlite:///{tmp_path / 'new.db'}", tmp_path / "go"
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    procs = [subprocess.Popen([sys.executable, str(script), uri, str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=os.getcwd()) for _ in range(3)]
    time.sleep(4)  # every child has imported mlflow
    go.write_text("")
    results = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-800:] for _, err in results]
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    assert len(runs) == 3


def test_a_log_path_that_is_not_utf8_is_tracked_and_read_back_by_run(store, tmp_path, host):
    """A surrogate-escaped byte in the log's name failed the store's encoder after the run was
    created: the run stayed RUNNING with no metric and the warning blamed the store."""
    import os
    import warnings

    from mlflow import MlflowClient

    from records.mlflow_tracking import records_from_run

    log = tmp_path / os.fsdecode(b"m\xff.jsonl")
    run_job(TuningJob(host, Task.make("gemm", {"M": 64, "N": 64, "K": 64}), tuner="random", trials=4,
                      log=str(log), tracking_uri=store), progress=False)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("llm-autotune").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["log"].endswith("m\\xff.jsonl")
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "gflops")) == [0, 1, 2, 3]
    # a damaged line in the run's log: the warning names the run's artifact, not a deleted download
    (artifact,) = [a.path for a in client.list_artifacts(run.info.run_id) if a.path.endswith(".jsonl")]
    folder = run.info.artifact_uri.removeprefix("file://")
    with open(os.path.join(folder, artifact), "a") as f:
        f.write("not a record\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = records_from_run(run.info.run_id, store)
    assert len(back) == 4
    (message,) = [str(w.message) for w in caught if "unreadable" in str(w.message)]
    assert message.startswith(f"MLflow run {run.info.run_id}: ") and "/tmp" not in message.split(": skipped")[0]


def test_a_run_whose_set_up_fails_is_ended_as_failed(store, monkeypatch):
    from mlflow import MlflowClient

    from records.mlflow_tracking import MLflowRun

    def refuse(self, params):
        raise RuntimeError("the store refused the parameters")

    monkeypatch.setattr(MLflowRun, "log_params", refuse)
    with pytest.raises(RuntimeError, match="refused"):
        MLflowRun(store, params={"a": 1})
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("llm-autotune").experiment_id])
    assert run.info.status == "FAILED"  # not an orphan left RUNNING
