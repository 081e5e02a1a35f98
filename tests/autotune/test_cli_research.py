"""sweep, replay and the research options of tune, run as a user runs them."""
from __future__ import annotations

import json

import pytest

from records import RecordLog
from test_cli import run, run_refused


@pytest.mark.parametrize("args, message", [
    (["replay", "--log", "/no/such/sweep.jsonl"], "does not exist"),
    (["replay", "--log", "{target}", "--tuners", "xgb,magic"], "unknown tuner magic"),
    (["replay", "--log", "{target}", "--tuners", "xgb+transfer"], "needs --transfer-from"),
    (["replay", "--log", "{target}", "--seeds", "0"], "--seeds must be >= 1"),
    (["replay", "--log", "{target}", "--json", "/no/such/dir/r.json"], "does not exist"),
    (["sweep", "--op", "nosuchop", "--shape", "M=1", "--log", "s.jsonl"], "unknown op 'nosuchop'"),
    (["sweep", "--op", "gemv", "--shape", "M=1,N=8,K=8", "--log", "s.jsonl", "--sample", "0"], "--sample must be >= 1"),
    (["tune", "--op", "gemv", "--shape", "M=1,N=8,K=8", "--tuner", "random", "--transfer-from", "{other}"],
     "need --tuner xgb"),
    (["tune", "--op", "gemv", "--shape", "M=1,N=8,K=8", "--load-model", "/no/such/model.json"], "no saved model"),
    (["tune", "--op", "gemv", "--shape", "M=1,N=8,K=8", "--transfer-from", "/no/such/log.jsonl"], "does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, sweep_logs, tmp_path):
    args = [a.format(target=sweep_logs["target"], other=sweep_logs["other"]) for a in args]
    proc = run_refused(*args, "--no-mlflow" if args[0] in ("sweep", "tune") else "--quiet", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: error:"), proc.stderr
    assert message in lines[0] and "Traceback" not in proc.stderr


def test_sweep_measures_a_stated_subset_and_resumes(tmp_path):
    args = ["sweep", "--op", "gemv", "--shape", "M=1,N=16,K=40", "--threads", "1", "--sample", "4",
            "--log", "s.jsonl", "--no-mlflow", "--quiet", "--repeats", "5", "--min-sample-ms", "0.2"]
    out = run(*args, cwd=tmp_path).stdout
    records = RecordLog(tmp_path / "s.jsonl").records()
    assert len(records) == 4 and len({r.config_index for r in records}) == 4
    assert all(r.tuner == "sweep" and r.config["threads"] == 1 for r in records)
    assert all(len(r.result.costs) == 5 for r in records if r.ok)
    assert "swept 4" in out and "within 95%" in out
    again = run(*args, cwd=tmp_path).stdout
    assert "4 resumed, 0 measured now" in again and len(RecordLog(tmp_path / "s.jsonl").records()) == 4


def test_replay_reports_table_json_and_plot(sweep_logs, tmp_path):
    proc = run("replay", "--log", str(sweep_logs["target"]), "--tuners", "xgb,random,optuna-tpe", "--seeds", "2",
               "--trials", "20", "--transfer-from", str(sweep_logs["other"]), str(sweep_logs["other"]),
               "--statistic", "min", "--xgb-rounds", "30", "--json", "r.json", "--plot", "r.png", cwd=tmp_path)
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["transfer_from"] == [str(sweep_logs["other"])] * 2, "--transfer-from takes several logs"
    assert report["statistic"] == "min" and report["xgb_rounds"] == 30
    (entry,) = report["spaces"]
    assert [t["tuner"] for t in entry["tuners"]] == ["xgb", "xgb+transfer", "random", "optuna-tpe"]
    assert entry["transfer"]["records"] == 2 * len(RecordLog(sweep_logs["other"]).records())
    assert all(t["seeds"] == 2 for t in entry["tuners"])
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "xgb+transfer" in proc.stdout and "within 95%" in proc.stdout
    assert "95% of best after" in proc.stderr  # progress lines
    # replay's own default files are replaced by the next replay; another file of their name is not
    for _ in range(2):
        run("replay", "--log", str(sweep_logs["target"]), "--tuners", "random", "--seeds", "1", "--trials", "4",
            "--quiet", cwd=tmp_path)
    assert json.loads((tmp_path / "replay.json").read_text())["kind"] == "autotune replay"
    (tmp_path / "replay.png").write_bytes(b"a figure of the user's own")  # the name, not replay's plot
    proc = run_refused("replay", "--log", str(sweep_logs["target"]), "--tuners", "random", "--json", "other.json",
                      cwd=tmp_path)
    assert proc.returncode == 2 and "replay.png exists and is not an earlier replay's" in proc.stderr
    assert (tmp_path / "replay.png").read_bytes() == b"a figure of the user's own"
    # best reads every log it is given
    rows = json.loads(run("best", "--log", str(sweep_logs["target"]), str(sweep_logs["other"]), "--json",
                          cwd=tmp_path).stdout)
    assert len({row["task"] for row in rows}) == 2


def test_tune_transfers_saves_and_loads_a_model(sweep_logs, tmp_path):
    shape = "M=2,N=40,K=64"
    # 8 trials in batches of 4, both ranked by the pre-trained model; with 8 (min_train) measured the task's
    # own model is fitted, so what is saved is the pre-trained model continued on this task
    proc = run("tune", "--op", "gemv", "--shape", shape, "--threads", "1", "--trials", "8", "--batch", "4",
               "--transfer-from", str(sweep_logs["other"]), str(sweep_logs["target"]), "--save-model", "m.json",
               "--log", "t.jsonl", "--no-mlflow", "--quiet", cwd=tmp_path)
    swept = sum(len(RecordLog(sweep_logs[name]).records()) for name in ("other", "target"))
    assert f"pre-trained the cost model on {swept} records of 2 other task(s)" in proc.stderr
    records = RecordLog(tmp_path / "t.jsonl").records()
    assert len(records) == 8
    assert all("score" in r.model for r in records), "with a pre-trained model even the first batch is ranked"
    assert (tmp_path / "m.json").is_file() and (tmp_path / "m.json.meta.json").is_file()
    proc = run("tune", "--op", "gemv", "--shape", shape, "--threads", "1", "--trials", "12", "--batch", "4",
               "--load-model", "m.json", "--log", "t.jsonl", "--no-mlflow", "--quiet", cwd=tmp_path)
    assert "loaded the cost model m.json" in proc.stderr
    records = RecordLog(tmp_path / "t.jsonl").records()
    assert len(records) == 12 and all("score" in r.model for r in records[8:])
    # a model of gemv's features cannot see gemm's knobs: every model of the job would lack them
    # fewer trials than the model needs to fit its own: the pre-trained model is saved, as it is
    proc = run("tune", "--op", "gemv", "--shape", "M=3,N=40,K=64", "--threads", "1", "--trials", "3",
               "--transfer-from", str(sweep_logs["other"]), "--save-model", "few.json", "--log", "few.jsonl",
               "--no-mlflow", "--quiet", "--json", cwd=tmp_path)
    assert (tmp_path / "few.json").is_file() and "no cost model to save" not in proc.stderr
    summary = json.loads(proc.stdout)  # --json: the job's result as one object
    assert summary["trials"] == 3 and summary["log"] == "few.jsonl" and set(summary["best"]) >= {"seconds", "config"}
    proc = run_refused("tune", "--op", "gemm", "--shape", "M=16,N=16,K=16", "--trials", "4", "--load-model", "m.json",
                      "--log", "g.jsonl", "--no-mlflow", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "was trained without the knobs" in proc.stderr, proc.stderr
    meta = json.loads((tmp_path / "m.json.meta.json").read_text())
    (tmp_path / "m.json.meta.json").write_text(json.dumps({**meta, "feature_names": meta["feature_names"][:5]}))
    proc = run_refused("tune", "--op", "gemv", "--shape", shape, "--threads", "1", "--trials", "13", "--load-model",
                      "m.json", "--log", "t.jsonl", "--no-mlflow", "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "names 5 features; the model takes" in proc.stderr, proc.stderr
