"""One TuningJob, built by the CLI and the Python API alike, checked when built, carried as JSON."""
from __future__ import annotations

import json
import math

import pytest

import autotune.job
from autotune import JobError, ModelWorkload, TuningJob, run_job
from measure import TimingPolicy
from records import RecordLog
from runtime.model_config import ModelConfig
from search_space import Target, Task

TASK = Task.make("gemv", {"M": 1, "N": 64, "K": 64})
MICRO = ModelConfig(name="micro", hidden_size=64, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, num_hidden_layers=1, vocab_size=64)


@pytest.mark.parametrize("change, message", [
    ({"trials": 0}, "trials must be an integer >= 1"),
    ({"batch": -1}, "batch must be an integer >= 1"),
    ({"run_timeout": 0.0}, "run-timeout must be a number of seconds > 0"),
    ({"build_timeout": math.nan}, "build-timeout must be a number of seconds > 0"),
    ({"run_timeout": math.inf}, "run-timeout must be a number of seconds > 0"),
    ({"tuner": "annealing"}, "unknown tuner 'annealing'"),
    ({"tuner": "random", "transfer_from": ("a.jsonl",)}, "need the xgb tuner"),
    ({"model": ModelWorkload(MICRO)}, "either one task or one model"),
])
def test_a_job_that_cannot_run_is_refused_when_built(host, change, message):
    with pytest.raises(JobError, match=message):
        TuningJob(host, TASK, **change)


def test_a_job_round_trips_through_json(host):
    jobs = [TuningJob(host, TASK, tuner="xgb", trials=5, restrict={"threads": [1]}, transfer_from=("x.jsonl",),
                      timing=TimingPolicy(repeats=3), extra_params={"note": "a"}),
            TuningJob(Target.from_name("sm_90a"), model=ModelWorkload(MICRO, (8, 16), (1,), (32,), "q4", 32),
                      tuner="random", trials=40, cache="cold")]
    for job in jobs:
        back = TuningJob.from_dict(json.loads(json.dumps(job.to_dict())))
        assert back == job
        assert back.params() == job.params()


def test_mlflow_params_say_what_the_job_is(host):
    job = TuningJob(host, TASK, tuner="random", trials=7, batch=2, seed=3, log="x.jsonl", extra_params={"sample": 9})
    params = job.params()
    assert params["task"] == TASK.key and params["tuner"] == "random" and params["trials"] == 7
    assert params["seed"] == 3 and params["log"] == "x.jsonl" and params["sample"] == 9
    model = TuningJob(host, model=ModelWorkload(MICRO), trials=12).params()
    assert model["model"] == "micro" and model["trials_total"] == 12 and model["tasks"] > 0


def test_the_cli_builds_a_job_and_runs_it_like_the_api(host, tmp_path, monkeypatch, fast_policy):
    """`autotune tune` hands run_job the same TuningJob the Python API would build."""
    seen = []
    real = autotune.job.run_job

    def spy(job, **kwargs):
        seen.append(job)
        return real(job, **kwargs)

    monkeypatch.setattr(autotune.job, "run_job", spy)
    from autotune.cli import main

    log = tmp_path / "cli.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--tuner", "random", "--trials", "3",
              "--batch", "3", "--seed", "4", "--threads", "1", "--log", str(log), "--no-mlflow", "--quiet"])
    assert exit_info.value.code == 0
    (job,) = seen
    api = TuningJob(host, TASK, tuner="random", trials=3, batch=3, seed=4, log=str(log), restrict={"threads": [1]},
                    mlflow=False)
    assert job == api
    assert len(RecordLog(log).records()) == 3
    # the API's run of the same job resumes the CLI's log: nothing is measured again
    summary = run_job(api, progress=False)
    assert summary.resumed == 3 and summary.measured == 0


def test_a_model_job_runs_through_the_same_entry(host, tmp_path, fast_policy):
    from measure import LocalRunner

    job = TuningJob(host, model=ModelWorkload(MICRO, (4,), (1,), (8,)), tuner="random", trials=3, batch=1,
                    log=str(tmp_path / "model.jsonl"), mlflow=False)
    with LocalRunner(policy=fast_policy, timeout_s=60) as runner:
        summary = run_job(job, progress=False, runner=runner)
    assert summary.trials == 3 and len(RecordLog(job.log).records()) == 3
