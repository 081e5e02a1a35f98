"""Input that poisoned logs or stopped jobs, met through the command line as a user meets it:
an unreachable tracking store, nonsense timeouts, shapes no machine can hold, SIGTERM."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from fakes import lines_in

from records import RecordLog
from test_cli import run_refused

CLI = [sys.executable, "-m", "autotune.cli"]
SMALL = ["--op", "gemv", "--shape", "M=1,N=64,K=64"]


def run(*args, cwd, timeout=300):
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)


@pytest.mark.parametrize("uri", ["bogus://x", "http://127.0.0.1:9", "sqlite:///a-folder"])
def test_an_unreachable_tracking_store_warns_once_and_the_job_tunes_into_its_log(uri, tmp_path):
    (tmp_path / "a-folder").mkdir()  # an SQLite store that is a folder: SQLAlchemy retried it for minutes
    start = time.monotonic()
    proc = run("tune", *SMALL, "--tuner", "random", "--trials", "3", "--quiet", "--log", "t.jsonl",
               "--tracking-uri", uri, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert time.monotonic() - start < 120  # not MLflow's minutes of retries
    assert proc.stderr.count("autotune: warning: MLflow") == 1 and "not tracked" in proc.stderr
    assert len(RecordLog(tmp_path / "t.jsonl").records()) == 3


@pytest.mark.parametrize("args, message", [
    (["tune", *SMALL, "--run-timeout", "0"], "--run-timeout must be a number of seconds > 0"),
    (["tune", *SMALL, "--run-timeout", "-1"], "--run-timeout must be a number of seconds > 0"),
    (["tune", *SMALL, "--build-timeout", "nan"], "--build-timeout must be a number of seconds > 0"),
    (["tune", *SMALL, "--build-timeout", "inf"], "--build-timeout must be a number of seconds > 0"),
    (["tune-model", "--model", "tiny", "--run-timeout", "nan"], "--run-timeout must be a number of seconds > 0"),
    (["sweep", *SMALL, "--log", "s.jsonl", "--run-timeout", "0"], "--run-timeout must be a number of seconds > 0"),
    (["sweep", *SMALL, "--log", "s.jsonl", "--min-sample-ms", "nan"], "--min-sample-ms must be"),
    (["sweep", *SMALL, "--log", "s.jsonl", "--min-sample-ms", "inf"], "--min-sample-ms must be"),
    (["bench", *SMALL, "--threads", str(len(os.sched_getaffinity(0)) + 1)], "thread(s) at once"),
    (["replay", "--log", "x.jsonl", "--json", "."], "it is a directory"),
    (["tune", "--op", "gemm", "--shape", "M=1000000,N=1000000,K=1000000"], "GiB available"),
    (["tune", *SMALL, "--restrict", "vec=3"], "--restrict vec=3: gemv on this machine takes"),
    (["tune", *SMALL, "--restrict", "nope=1"], "gemv has no knob nope"),
    (["tune", *SMALL, "--restrict", "vec"], "malformed --restrict"),
    # 8 rows x 4 unrolled steps need more vector registers than any x86 CPU has: no valid config,
    # which ran zero trials and exited 0
    (["tune", *SMALL, "--restrict", "rows=8", "--restrict", "unroll=4"], "no config of gemv's space"),
    (["sweep", *SMALL, "--log", "s.jsonl", "--restrict", "rows=8", "--restrict", "unroll=4"], "no config of"),
    (["tune", *SMALL, "--seed", "-1"], "--seed must be an int >= 0, got -1"),
    (["tune", *SMALL, "--experiment", " "], "experiment must name an MLflow experiment"),
    (["sweep", *SMALL, "--log", "s.jsonl", "--seed", "-1"], "--seed must be an int >= 0"),
    (["tune-model", "--model", "tiny", "--seed", "-1"], "--seed must be an int >= 0"),
    (["run", "--model", "tiny", "--log", "x.jsonl", "--seed", "-1"], "--seed must be an int >= 0"),
    # the prompts were made before the memory check: numpy's "Maximum allowed dimension exceeded"
    (["run", "--model", "tiny", "--log", "x.jsonl", "--batch", "99999999999999999999"], "GiB available"),
    (["tune-model", "--model", "tiny", "--kv-len", "99999999999"], "GiB available"),
    # outputs that would replace what the command reads: measurements lost
    (["tune", *SMALL, "--log", "x.jsonl", "--save-model", "x.jsonl"], "--save-model x.jsonl is x.jsonl, which this"),
    (["tune", *SMALL, "--transfer-from", "x.jsonl", "--save-model", "x.jsonl"], "which this command reads"),
    (["tune", *SMALL, "--save-model", "."], "--save-model . is a directory"),
    (["replay", "--log", "x.jsonl", "--json", "x.jsonl"], "--json x.jsonl is x.jsonl, which this command reads"),
    (["replay", "--log", "x.jsonl", "--plot", "x.jsonl"], "--plot x.jsonl is x.jsonl"),
    (["replay", "--log", "x.jsonl", "--json", "r.png", "--plot", "r.png"], "--json and --plot both name r.png"),
    (["replay", "--log", "x.jsonl", "--plot", "r.txt"], "--plot r.txt: the plot is written as"),
    (["sweep", *SMALL, "--log", "s.jsonl", "--min-sample-ms", "1e9"], "take longer than --run-timeout 20 s"),
    (["tune", *SMALL, "--min-sample-ms", "0"], "--min-sample-ms must be a number of milliseconds > 0"),
    (["tune", *SMALL, "--repeats", "0"], "--repeats must be >= 1"),
    (["tune", *SMALL, "--target", "sm_90a", "--repeats", "3"], "--compile-only times nothing"),
    (["tune-model", "--model", "tiny", "--repeats", "1000", "--run-timeout", "10"], "each the best of 3 runs"),
    (["tune", *SMALL, "--tuner", "xgb", "--transfer-from", "."], "--transfer-from: log . is not a file"),
    # a transfer log that gives nothing: the job ran as if it had transferred
    (["tune", *SMALL, "--no-mlflow", "--transfer-from", "x.jsonl"], "--transfer-from: x.jsonl hold(s) no record"),
    (["tune", *SMALL, "--no-mlflow", "--transfer-from", "x.jsonl.gz"], "--transfer-from: cannot read log x.jsonl.gz"),
    # an option given twice: click kept the last, silently
    (["tune", *SMALL, "--log", "a.jsonl", "--log", "b.jsonl"], "--log given twice: it takes one value"),
    (["tune", *SMALL, "--restrict", "vec=8", "--restrict", "vec=16"], "--restrict vec given twice"),
    (["tune", *SMALL, "--log", ""], "--log is empty"),
    (["tune", *SMALL, "--tracking-uri", ""], "--tracking-uri is empty"),
    # NaN rows where numpy's are NaN too passed the check
    (["tune", "--op", "rmsnorm", "--shape", "M=4,N=64", "--attr", "eps=-1"], "eps = -1.0 is not a positive number"),
    (["replay", "--log", "x.jsonl", "--tuners", "random"], "replay.json exists and is not an earlier replay's"),
])
def test_bad_numbers_and_impossible_shapes_are_bad_input(args, message, tmp_path):
    (tmp_path / "x.jsonl").write_text("")
    (tmp_path / "x.jsonl.gz").write_text("{}\n")  # named .gz, not gzip
    (tmp_path / "replay.json").write_text("my notes\n")  # not replay's: never replaced unnamed
    proc = run_refused(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tune.jsonl").exists() or not (tmp_path / "tune.jsonl").read_text()


@pytest.fixture(scope="module")
def restricted_log(tmp_path_factory):
    """(the tune's result, its log): SMALL tuned within --restrict, once for the tests that need a log."""
    folder = tmp_path_factory.mktemp("restricted")
    proc = run("tune", *SMALL, "--tuner", "random", "--trials", "4", "--restrict", "vec=8", "--restrict", "unroll=1,2",
               "--repeats", "4", "--min-sample-ms", "2", "--quiet", "--no-mlflow", "--log", "r.jsonl", cwd=folder)
    return proc, folder / "r.jsonl"


def test_restrict_limits_the_search_to_the_values_given(restricted_log):
    proc, log = restricted_log
    assert proc.returncode == 0, proc.stderr
    records = RecordLog(log).records()
    assert len(records) == 4 and all(r.config["vec"] == 8 and r.config["unroll"] in (1, 2) for r in records)


def test_repeats_and_min_sample_ms_set_how_each_candidate_is_timed(restricted_log):
    from autotune.cli.common import timing_policy
    from autotune.job import MODEL_TIMING
    from measure import TimingPolicy

    _, log = restricted_log
    stats = [r.result.stats for r in RecordLog(log).records() if r.ok]
    assert stats and all(s["repeats"] == 4 for s in stats)
    # what the options make of a job's timing: the rest of it kept (a model job's best-of-3 too)
    assert timing_policy(None, None, 20.0, TimingPolicy()) is None
    assert timing_policy(4, 2.0, 20.0, TimingPolicy()) == TimingPolicy(repeats=4, min_sample_s=0.002)
    assert timing_policy(2, None, 20.0, MODEL_TIMING) == TimingPolicy(repeats=2, min_repeats=2, best_of=3)


def test_run_refuses_a_model_whose_weights_cannot_fit_before_making_them(tmp_path, restricted_log):
    import json

    (tmp_path / "huge").mkdir()
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 10_000_000, "vocab_size": 1000, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
    (tmp_path / "huge" / "config.json").write_text(json.dumps(config))
    assert restricted_log[0].returncode == 0, restricted_log[0].stderr
    shutil.copy(restricted_log[1], tmp_path / "t.jsonl")  # a tuned log: the model is what is refused
    proc = run_refused("run", "--model", "huge/config.json", "--log", "t.jsonl", "--new-tokens", "2", cwd=tmp_path)
    assert proc.returncode == 2 and "weights take about" in proc.stderr and "GiB available" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_warning_reaches_the_user_as_one_autotune_line(tmp_path):
    (tmp_path / "t.jsonl").write_text('{"schema":1,"task":\n')  # a line a kill cut short
    proc = run("tune", *SMALL, "--tuner", "random", "--trials", "2", "--quiet", "--no-mlflow", "--log", "t.jsonl",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "autotune: warning: t.jsonl: skipped 1 unreadable line(s)" in proc.stderr
    assert "UserWarning" not in proc.stderr and ".py:" not in proc.stderr, proc.stderr


def test_only_a_command_that_logs_says_its_records_are_in_the_log_when_stopped():
    from autotune.cli.group import _stopped

    assert _stopped("terminated", ["tune-model", "--model", "tiny"]).endswith("every measured record is in the log")
    assert _stopped("interrupted", ["sweep"]).endswith("in the log")
    assert _stopped("terminated", ["export", "--log", "t.jsonl", "--out", "lib"]) == "terminated"
    assert _stopped("interrupted", ["run", "--lib", "lib"]) == "interrupted"


@pytest.mark.parametrize("native_wait", [False, True])
def test_sigterm_ends_a_job_as_terminated_even_where_a_native_wait_rewraps_it(native_wait, monkeypatch, capsys):
    """Ray's waits raise a new KeyboardInterrupt where a signal handler raised during them, so
    the Terminated the CLI's SIGTERM handler raises can arrive as a plain KeyboardInterrupt: the
    job still ends as terminated (143), not as interrupted (130). Ctrl-C stays 130."""
    from autotune.cli import group

    def command(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in here
        except KeyboardInterrupt:
            if native_wait:
                raise KeyboardInterrupt() from None  # what ray.wait does with it
            raise

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt()

    previous = signal.getsignal(signal.SIGTERM)
    try:
        monkeypatch.setattr(group.cli, "main", command)
        with pytest.raises(SystemExit) as stopped:
            group.main(["tune", "--op", "gemv"])
        assert stopped.value.code == 143
        assert capsys.readouterr().err.strip() == "autotune: error: terminated; every measured record is in the log"
        monkeypatch.setattr(group.cli, "main", ctrl_c)
        with pytest.raises(SystemExit) as stopped:
            group.main(["tune", "--op", "gemv"])
        assert stopped.value.code == 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_sigterm_ends_the_job_as_an_interrupt_does_and_marks_the_run_killed(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    store = mlflow_store
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    # a gemm large enough that the job is still measuring when the signal comes
    proc = subprocess.Popen(CLI + ["tune", "--op", "gemm", "--shape", "M=256,N=256,K=256", "--tuner", "random",
                                   "--trials", "400", "--quiet", "--log", "t.jsonl", "--tracking-uri", store],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "t.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and lines_in(log) < 1:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "terminated; every measured record is in the log" in stderr
    records = RecordLog(log).records()
    assert len(records) >= 1
    client = MlflowClient(tracking_uri=store)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("llm-autotune").experiment_id])
    assert mlflow_run.info.status == "KILLED"
    # every trial in the log is a point in the run, those of the batch it stopped in too
    steps = sorted(m.step for m in client.get_metric_history(mlflow_run.info.run_id, "ok"))
    assert steps == list(range(len(records)))


@pytest.mark.tools("cc")
def test_a_tracked_job_names_its_mlflow_run_for_export(tmp_path, mlflow_store):
    from mlflow import MlflowClient

    store = mlflow_store
    proc = run("tune", *SMALL, "--tuner", "random", "--trials", "2", "--quiet", "--log", "t.jsonl",
               "--tracking-uri", store, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    client = MlflowClient(tracking_uri=store)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("llm-autotune").experiment_id])
    assert f"MLflow run {mlflow_run.info.run_id} (finished) in {store}" in proc.stderr
    # a memory-bound task in GB/s wherever its rate is printed, its time in a unit that shows it
    best = run("best", "--log", "t.jsonl", cwd=tmp_path)
    for text in (proc.stdout, best.stdout):
        assert " us, " in text and "GB/s" in text and "GFLOP/s" not in text
    export = run("export", "--mlflow-run", mlflow_run.info.run_id, "--tracking-uri", store, "--out", "lib",
                 cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert " us " in export.stdout and "GB/s" in export.stdout and "0.0000 ms" not in export.stdout


def test_bench_skips_a_record_whose_config_is_not_in_the_space(tmp_path, restricted_log):
    import json

    assert restricted_log[0].returncode == 0, restricted_log[0].stderr
    shutil.copy(restricted_log[1], tmp_path / "t.jsonl")
    lines = (tmp_path / "t.jsonl").read_text().splitlines()
    alien = json.loads(lines[0])
    alien["config"]["values"]["vec"] = 999  # a knob value today's template does not offer
    alien["result"]["costs"] = [1e-12] * 3  # so it would win
    alien["timestamp"] += 1
    with open(tmp_path / "t.jsonl", "a") as f:
        f.write(json.dumps(alien) + "\n")
    proc = run("bench", *SMALL, "--log", "t.jsonl", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 record(s) whose config is not in today's space" in proc.stderr
    assert json.loads(proc.stdout)["config"]["vec"] != 999


def test_a_plugin_that_cannot_be_imported_is_bad_input(tmp_path):
    env = dict(os.environ, AUTOTUNE_PLUGINS="no_such_plugin_module")
    proc = subprocess.run(CLI + ["ops"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 2 and "AUTOTUNE_PLUGINS: cannot import no_such_plugin_module" in proc.stderr


def test_a_q4_run_counts_the_weights_it_quantises_from(tmp_path, monkeypatch):
    """A q4 run holds the weights it quantises (as the checkpoint stores them, generated ones in
    float32) beside the codes, and with --compare the float32 weights the codes stand for: a model
    whose codes alone fit, but not with those, is refused before anything is made."""
    from safetensors.numpy import save_file

    from autotune.cli import model as cli_model
    from autotune.cli.common import UserError
    from runtime.model_config import PRESETS

    config = PRESETS["tiny"]
    codes = config.parameters * 0.5
    monkeypatch.setattr(cli_model, "available_memory", lambda: int(codes * 2))
    fits = dict(weights_dtype="float32", quantize="q4", cache_dtype="float32", batch=1, positions=8, logit_steps=0)
    with pytest.raises(UserError, match="as int4 codes beside the weights they are quantised from; this machine"):
        cli_model._check_model_fits(config, **fits)  # generated: float32 beside the codes
    save_file({"model.norm.weight": np.ones(4, np.float16)}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(cli_model, "available_memory", lambda: int(codes * 6))
    cli_model._check_model_fits(config, **fits, weights_dir=str(tmp_path))  # 2.5 bytes a weight fit in 3
    with pytest.raises(UserError, match="and those the codes stand for"):
        cli_model._check_model_fits(config, **fits, weights_dir=str(tmp_path), compare=True)
