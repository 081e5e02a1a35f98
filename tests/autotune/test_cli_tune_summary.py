"""What `autotune tune` says at the end agrees with its log: why it stopped short of --trials,
the failures resumed with the log, and a best that `autotune best` would also choose."""
from __future__ import annotations

import json

from test_cli import run

from records import RecordLog

COMMON = ["tune", "--op", "rmsnorm", "--shape", "M=4,N=256", "--tuner", "random", "--no-mlflow", "--quiet"]
SMALL = ["--restrict", "vec=8", "--restrict", "unroll=1", "--restrict", "rows=1,2", "--restrict", "reuse=reload"]


def test_a_spent_space_early_stopping_and_a_time_limit_are_said(tmp_path):
    proc = run(*COMMON, *SMALL, "--trials", "50", "--log", "t.jsonl", cwd=tmp_path)
    trials = len(RecordLog(tmp_path / "t.jsonl").records())
    assert 1 <= trials < 50
    assert "stopped before --trials 50: every valid config of the space is measured" in proc.stdout
    proc = run(*COMMON, *SMALL, "--trials", "60", "--log", "t.jsonl", "--json", cwd=tmp_path)
    out = json.loads(proc.stdout)
    assert out["trials"] == trials and out["stopped"] == "every valid config of the space is measured"
    proc = run(*COMMON, "--trials", "4", "--log", "u.jsonl", "--json", cwd=tmp_path)
    assert json.loads(proc.stdout)["stopped"] is None
    proc = run(*COMMON, "--trials", "200", "--early-stopping", "3", "--log", "e.jsonl", cwd=tmp_path)
    assert "(early stopping)" in proc.stdout and len(RecordLog(tmp_path / "e.jsonl").records()) < 200
    for bad in (["--early-stopping", "0"], ["--time-limit", "0"], ["--time-limit", "nan"]):
        proc = run(*COMMON, "--trials", "4", "--log", "b.jsonl", *bad, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_resumed_failures_are_counted_and_a_stale_best_is_passed_over(tmp_path):
    run(*COMMON, "--trials", "6", "--log", "t.jsonl", cwd=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    fastest = min(range(len(lines)), key=lambda i: lines[i]["result"]["stats"]["median"])
    lines[fastest]["result"]["stats"]["digest"] = "0" * 32  # measured on code this version does not build
    failed = next(i for i in range(len(lines)) if i != fastest)
    lines[failed]["result"]["error"] = "WRONG_ANSWER"
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run(*COMMON, "--trials", "6", "--log", "t.jsonl", cwd=tmp_path)
    assert "6 trials (6 resumed from the log, 0 measured now; 1 failed, 0 of them now)" in proc.stdout
    assert "1 faster stale record(s) skipped" in proc.stderr and "--remeasure-stale" in proc.stderr
    best = json.loads(run("best", "--log", "t.jsonl", "--json", cwd=tmp_path).stdout)
    said = json.loads(run(*COMMON, "--trials", "6", "--log", "t.jsonl", "--json", cwd=tmp_path).stdout)
    assert said["resumed_failed"] == 1 and said["failed"] == 0
    assert said["best"]["config"] == best[0]["config"] != lines[fastest]["config"]


def test_run_refuses_logs_with_no_record_for_its_target(tmp_path):
    """A log tuned on another machine (a GPU's, another CPU's) ran the model on template defaults
    only, with a warning per kernel and exit 0."""
    run(*COMMON, "--trials", "1", "--log", "t.jsonl", cwd=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    for line in lines:
        line["target"]["arch"] = "znver99"
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run("run", "--log", "other.jsonl", "--model", "tiny", "--new-tokens", "2", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no record is for cpu-" in proc.stderr and "cpu-znver99" in proc.stderr


def test_bench_says_first_that_a_log_is_of_another_target(tmp_path):
    run(*COMMON, "--trials", "1", "--log", "t.jsonl", cwd=tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    for line in lines:
        line["target"]["arch"] = "znver99"
    (tmp_path / "other.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    proc = run("bench", "--op", "rmsnorm", "--shape", "M=4,N=256", "--dtype", "float16", "--log", "other.jsonl",
               cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "no record is for cpu-" in proc.stderr and "cpu-znver99" in proc.stderr and "--dtype" not in proc.stderr
