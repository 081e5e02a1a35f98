"""One TuningJob, built by the CLI and the Python API alike, checked when built, carried as JSON."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

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


def test_one_transfer_log_may_be_given_alone(host):
    """A str is one path: it was read as a tuple of its characters, each then "not a file"."""
    assert TuningJob(host, TASK, transfer_from="other.jsonl").transfer_from == ("other.jsonl",)
    assert TuningJob(host, TASK, transfer_from=[Path("a.jsonl"), "b.jsonl"]).transfer_from == ("a.jsonl", "b.jsonl")


def test_a_workload_takes_one_size_alone_and_refuses_what_is_not_sizes():
    """A str of digits was read digit by digit, and the first comparison with an int raised a TypeError."""
    import numpy as np

    workload = ModelWorkload(MICRO, 128, np.int64(1), [32, np.int64(64)])
    assert (workload.prefill_tokens, workload.decode_batch, workload.kv_len) == ((128,), (1,), (32, 64))
    for bad in ("128", (), (1.5,), None, (True,)):
        with pytest.raises(ValueError, match="prefill_tokens must be a size or sizes"):
            ModelWorkload(MICRO, bad)


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


@pytest.mark.parametrize("change, message", [
    ({"task": Task.make("gemv_typo", {"M": 1, "N": 64, "K": 64})}, "unknown op 'gemv_typo' for target cpu"),
    ({"task": Task.make("gemv", {"M": 1, "N": 64})}, r"task gemv/float32/M=1,N=64: gemv takes dims M,N,K"),
    ({"task": Task.make("gemv", {"M": 1, "N": 64, "K": 64, "Q": 2})}, "gemv takes dims M,N,K"),
    ({"task": Task.make("gemv", {"M": 1, "N": 64, "K": 64}, attrs={"colour": 1})}, "has no attributes"),
    ({"task": Task.make("rmsnorm", {"M": 1, "N": 64}, attrs={"eps": "abc"})}, "eps = 'abc' is not a float"),
    ({"task": "gemm"}, "task must be a Task"),
    ({"target": "cpu"}, "target must be a Target"),
    ({"seed": "x"}, "seed must be an integer >= 0"),
    ({"seed": 1.5}, "seed must be an integer >= 0"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"trials": True}, "trials must be an integer >= 1"),
    ({"restrict": {"threads": [10**6]}}, r"restrict: knob threads has none of the values \[1000000\]"),
    ({"restrict": {"colour": [1]}}, "restrict: no knob named colour"),
    ({"restrict": "threads=1"}, "restrict must map knob names to values"),
    ({"log": ""}, "log must name the log file"),
    ({"timing": "fast"}, "timing must be a measure.TimingPolicy"),  # failed deep in the runner, mid-job
    ({"tuner_options": ["plan"]}, "tuner_options must map option names to values"),
    ({"transfer_from": 3}, "transfer_from must name tuning logs"),
])
def test_a_task_or_an_input_the_job_cannot_use_is_refused_when_built(host, change, message):
    fields = {"target": host, "task": TASK, **change}
    with pytest.raises(JobError, match=message):
        TuningJob(**fields)


def test_numpy_integers_and_single_restriction_values_are_taken(host):
    import numpy as np

    task = Task.make("gemv", {"M": np.int64(1), "N": np.int32(64), "K": 64})
    job = TuningJob(host, task, trials=np.int64(8), batch=np.int16(2), seed=np.uint8(3), restrict={"threads": 1})
    assert task == TASK and (job.trials, job.batch, job.seed) == (8, 2, 3) and type(job.trials) is int
    assert job.restrict == {"threads": [1]}  # one value alone is a one-value list
    json.dumps(job.to_dict())  # plain Python values all the way down
    gelu = TuningJob(host, Task.make("gelu", {"M": 8, "N": 64}), restrict={"stores": "cached"})
    assert gelu.restrict == {"stores": ["cached"]}  # a string is one value, not its characters
    assert Task.make("rmsnorm", {"M": 8, "N": 64}, dynamic="M").dynamic == ("M",)
    assert Task.make("gemm", {"M": 8, "N": 8, "K": 8}, dynamic="M, N").dynamic == ("M", "N")


def test_run_job_refuses_a_file_that_is_not_a_log_before_anything_starts(host, tmp_path):
    from fakes import SyntheticRunner

    notes = tmp_path / "notes.csv"
    notes.write_text("a,b\n1,2\n")
    runner = SyntheticRunner({"gemv": 1e-5})
    with pytest.raises(JobError, match="notes.csv is not a tuning log"):
        run_job(TuningJob(host, TASK, tuner="random", trials=2, log=str(notes), mlflow=False), progress=False,
                builder=runner, runner=runner)
    assert notes.read_text() == "a,b\n1,2\n" and not runner.calls
    with pytest.raises(JobError, match="compressed"):  # before any candidate is measured, not at its append
        run_job(TuningJob(host, TASK, tuner="random", trials=2, log=str(tmp_path / "x.jsonl.gz"), mlflow=False),
                progress=False, builder=runner, runner=runner)
    assert not runner.calls and not (tmp_path / "x.jsonl.gz").exists()


def test_a_cuda_job_without_this_machines_gpu_is_refused_before_measuring(tmp_path, monkeypatch):
    from fakes import SyntheticRunner

    def no_gpu(cls, device=0):
        raise RuntimeError("no CUDA device")

    monkeypatch.setattr(Target, "cuda", classmethod(no_gpu))
    job = TuningJob(Target.from_name("sm_90a"), Task.make("gemv", {"M": 1, "N": 256, "K": 256}, "float16"),
                    tuner="random", trials=2, log=str(tmp_path / "gpu.jsonl"), mlflow=False)
    with pytest.raises(JobError, match="cuda target unavailable: no CUDA device"):
        run_job(job, progress=False)
    assert not (tmp_path / "gpu.jsonl").exists()
    # a runner given (a fake GPU, a replay) measures without this machine's GPU
    runner = SyntheticRunner({"gemv": 1e-5})
    assert run_job(job, progress=False, builder=runner, runner=runner).measured == 2


def test_a_space_with_no_valid_config_is_refused_but_a_spent_one_resumes(host, tmp_path):
    from fakes import SyntheticRunner

    gelu = Task.make("gelu", {"M": 8, "N": 64})
    log = tmp_path / "gelu.jsonl"
    job = TuningJob(host, gelu, tuner="random", trials=64, log=str(log), mlflow=False,
                    restrict={"form": ["tanh"], "division": ["reciprocal"]})
    with pytest.raises(JobError, match=r"the restriction .* leaves no valid config of gelu/float32/M=8,N=64"):
        run_job(job, progress=False)
    assert not log.exists()
    runner = SyntheticRunner({"gelu": 1e-5})
    small = dataclasses.replace(job, restrict={"form": ["tanh"], "division": ["divide"], "threads": [1]})
    first = run_job(small, progress=False, builder=runner, runner=runner)
    assert 0 < first.measured < 64
    again = run_job(small, progress=False, builder=runner, runner=runner)  # every config measured: nothing to do
    assert again.measured == 0 and again.resumed == first.measured
