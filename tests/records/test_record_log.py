from __future__ import annotations

import json
import os

import pytest

from measure import MeasureError, MeasureResult
from records import LogWriteError, Record, RecordLog, best, best_records, to_dataframe
from search_space import Target, Task


def make_record(index: int, seconds: float | None, task=None, error=MeasureError.RUNTIME_ERROR) -> Record:
    task = task or Task.make("gemm", {"M": 4, "N": 4, "K": 4})
    result = (MeasureResult((seconds, seconds * 1.1, seconds * 0.9)) if seconds is not None
              else MeasureResult.failed(error, "boom"))
    return Record(task, Target.host(), {"mr": index}, index, result, tuner="test")


def test_roundtrip_through_json():
    record = make_record(3, 0.5)
    again = Record.from_json(record.to_json())
    assert again.task == record.task and again.config == record.config
    assert again.result.costs == record.result.costs and again.result.error == record.result.error
    assert again.seconds == pytest.approx(0.5)
    failed = Record.from_json(make_record(1, None, error=MeasureError.WORKER_CRASH).to_json())
    assert failed.result.error == MeasureError.WORKER_CRASH and not failed.ok


def test_append_load_skips_broken_lines_with_a_warning(tmp_path):
    log = RecordLog(tmp_path / "t.jsonl")
    log.append([make_record(i, 0.1 * (i + 1)) for i in range(3)])
    with open(log.path, "a") as f:
        f.write("{not json}\n")
        f.write(make_record(9, 0.01).to_json()[:40])  # a write cut off by a kill
    with pytest.warns(UserWarning, match="skipped 2 unreadable"):
        report = log.load()
    assert len(report.records) == 3 and report.bad_lines == 2 and report.first_bad_line == 4
    log.append([make_record(5, 0.2)])  # the torn line is closed, the new record starts a line
    assert [r.config_index for r in log.records(warn=False)] == [0, 1, 2, 5]


def test_exact_duplicate_lines_are_dropped(tmp_path):
    log = RecordLog(tmp_path / "t.jsonl")
    record = make_record(1, 0.1)
    log.append([record, record])
    report = log.load()
    assert len(report.records) == 1 and report.duplicates == 1


def test_best_never_picks_a_failed_record():
    records = [make_record(0, 0.3), make_record(1, None, error=MeasureError.WRONG_ANSWER),
               make_record(2, 0.2), make_record(3, None, error=MeasureError.RUN_TIMEOUT)]
    task = records[0].task
    assert best(records, task, Target.host()).config_index == 2
    assert best([records[1], records[3]], task, Target.host()) is None
    other = make_record(4, 0.05, task=Task.make("gemv", {"M": 1, "N": 4, "K": 4}))
    winners = best_records(records + [other])
    assert len(winners) == 2


def test_unwritable_logs_fail_early(tmp_path):
    with pytest.raises(LogWriteError):
        RecordLog(tmp_path / "missing" / "t.jsonl").check_writable()
    with pytest.raises(LogWriteError):
        RecordLog(tmp_path).check_writable()
    if os.geteuid() != 0:  # root can write anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        with pytest.raises(LogWriteError):
            RecordLog(locked / "t.jsonl").check_writable()


def test_dataframe_has_knob_columns_and_best_so_far():
    records = [make_record(0, 0.3), make_record(1, None), make_record(2, 0.1)]
    frame = to_dataframe(records)
    assert list(frame["cfg.mr"]) == [0, 1, 2]
    assert list(frame["error"]) == ["NO_ERROR", "RUNTIME_ERROR", "NO_ERROR"]
    assert list(frame["message"]) == ["", "boom", ""]  # what failed, for a study of failures
    empty = to_dataframe([])  # a notebook's df["gflops"].cummax() works on an empty log too
    assert empty["gflops"].dtype == float and len(empty) == 0
    gflops = records[0].task.flops / 1e9
    assert frame["best_so_far_gflops"].tolist() == pytest.approx([gflops / 0.3, gflops / 0.3, gflops / 0.1])


def test_schema_version_is_checked():
    data = make_record(0, 0.1).to_dict()
    data["schema"] = 99
    with pytest.raises(ValueError, match="schema"):
        Record.from_dict(json.loads(json.dumps(data)))


def test_model_figures_roundtrip_and_reach_the_dataframe():
    from dataclasses import replace

    plain = make_record(1, 0.2)
    assert "model" not in plain.to_dict(), "records without a model keep the old shape"
    ranked = replace(plain, model={"score": 0.7, "batch": 8, "pairwise_accuracy": 0.75, "topk_recall": 0.5,
                                   "k": 2, "undefined": float("nan")})
    again = Record.from_json(ranked.to_json())
    assert again.model == {"score": 0.7, "batch": 8, "pairwise_accuracy": 0.75, "topk_recall": 0.5, "k": 2}
    frame = to_dataframe([plain, again])
    assert frame.loc[1, "model_score"] == 0.7 and frame.loc[1, "batch"] == 8
    assert frame.loc[1, "model_pairwise_accuracy"] == 0.75 and frame.loc[1, "model_topk_recall"] == 0.5
    assert frame["model_score"].isna().iloc[0]


def test_gzipped_logs_are_read_and_never_written(tmp_path):
    import gzip

    records = [make_record(i, 0.1 * (i + 1)) for i in range(3)]
    path = tmp_path / "sweep.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(r.to_json() + "\n" for r in records))
    log = RecordLog(path)
    assert [r.config_index for r in log.records()] == [0, 1, 2]
    with pytest.raises(LogWriteError, match="read-only"):
        log.append(records[:1])
    with pytest.raises(LogWriteError, match="read-only"):
        log.check_writable()


def test_json_lines_that_are_not_records_are_skipped_and_counted(tmp_path):
    """JSON that is not a record (a list, null, a number, a string, an empty object, fields of
    the wrong type, an operator no template knows) is skipped and counted like a torn line."""
    good = make_record(0, 0.1)
    unknown_op = good.to_dict()
    unknown_op["task"]["op"] = "nosuchop"
    wrong_types = good.to_dict()
    wrong_types["task"]["shape"] = [1, 2]
    lines = [good.to_json(), "[1,2,3]", "null", "42", '"text"', "{}", json.dumps(unknown_op),
             json.dumps({**good.to_dict(), "task": "gemm"}), json.dumps(wrong_types), make_record(1, 0.2).to_json()]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.warns(UserWarning, match="skipped 8 unreadable"):
        report = RecordLog(path).load()
    assert [r.config_index for r in report.records] == [0, 1]
    assert report.bad_lines == 8 and report.first_bad_line == 2


def test_records_of_an_op_known_for_the_other_target_kind_are_kept(tmp_path):
    from fakes import CUDA_FAULT_OP  # registers a template for cuda only

    record = Record(Task.make(CUDA_FAULT_OP, {"N": 64}), Target.host(), {"mode": "ok", "block": 128}, 0,
                    MeasureResult((1e-6, 1e-6, 1e-6)))
    log = RecordLog(tmp_path / "t.jsonl")
    log.append([record])
    report = log.load(warn=False)
    assert len(report.records) == 1 and report.bad_lines == 0


@pytest.mark.parametrize("costs", [[0.0, 0.0, 0.0], [-1e-6, -1e-6, -1e-6], [float("nan")] * 3,
                                   [float("inf")] * 3, [1e-6, 0.0, 1e-6]])
def test_times_no_kernel_takes_never_win(costs, tmp_path):
    """A zero, negative, NaN or infinite time (a hand edit, a broken timer) is not verified."""
    good = make_record(0, 0.3)
    bad = make_record(1, 0.1).to_dict()
    bad["result"]["costs"] = costs
    path = tmp_path / "t.jsonl"
    path.write_text(good.to_json() + "\n" + json.dumps(bad) + "\n")  # json writes NaN and Infinity as such
    records = RecordLog(path).records(warn=False)
    assert len(records) == 2 and not records[1].ok
    assert best_records(records)[(good.task.key, good.target.key)].config_index == 0
    assert best(records[1:], good.task, good.target) is None


# ----------------------------------------------------------------------------- damaged .gz logs

def _gzipped(records) -> bytes:
    import gzip

    return gzip.compress("".join(r.to_json() + "\n" for r in records).encode())


def test_a_gzipped_log_cut_short_keeps_every_line_before_the_cut(tmp_path):
    """An interrupted copy of an archive: the records before the cut are measurements, kept
    (the cut counts as one unreadable line); before, gzip's EOFError ended every command."""
    import zlib

    data = _gzipped([make_record(i, 1e-3 * (i + 1)) for i in range(400)])
    cut = data[: len(data) // 2]
    whole_lines = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(cut).count(b"\n")
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(cut)
    with pytest.warns(UserWarning, match=rf"skipped 1 unreadable line\(s\) \(first at line {whole_lines + 1}\); "
                                         rf"unreadable from line {whole_lines + 1} on \(Compressed file ended"):
        report = RecordLog(path).load()
    assert 0 < whole_lines < 400 and [r.config_index for r in report.records] == list(range(whole_lines))
    assert report.bad_lines == 1 and report.first_bad_line == whole_lines + 1


def test_a_gzipped_log_corrupt_after_its_first_member_keeps_that_member(tmp_path):
    # a second gzip member whose deflate data starts with a reserved block type: zlib.error
    bad_member = _gzipped([make_record(9, 1e-3)])[:10] + b"\xff" * 16
    path = tmp_path / "corrupt.jsonl.gz"
    path.write_bytes(_gzipped([make_record(i, 1e-3) for i in range(3)]) + bad_member)
    with pytest.warns(UserWarning, match=r"unreadable from line 4 on \(Error -3 while decompressing data"):
        report = RecordLog(path).load()
    assert [r.config_index for r in report.records] == [0, 1, 2] and report.damage.startswith("unreadable")


@pytest.mark.parametrize("data, reason", [
    (lambda: _gzipped([make_record(0, 1e-3)])[:30], "Compressed file ended before the end-of-stream marker"),
    (lambda: _gzipped([make_record(0, 1e-3)])[:10] + b"\xff" * 16, "Error -3 while decompressing data"),
    (lambda: (make_record(0, 1e-3).to_json() + "\n").encode(), "Not a gzipped file"),
], ids=["cut-short", "corrupt", "not-gzip"])
def test_a_gzipped_log_with_no_readable_line_is_refused_in_one_line(data, reason, tmp_path):
    from records import LogReadError

    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(data())
    with pytest.raises(LogReadError, match=rf"^cannot read log {path}: {reason}"):
        RecordLog(path).load()


def test_damaged_gzipped_logs_through_the_command_line(tmp_path):
    """Exit 2 and one line for a log with nothing readable (before: "aborted", exit 130, or an
    internal error, exit 1); a warning and the records before the damage otherwise."""
    import subprocess
    import sys

    (tmp_path / "empty.jsonl.gz").write_bytes(_gzipped([make_record(0, 1e-3)])[:30])
    (tmp_path / "cut.jsonl.gz").write_bytes(_gzipped([make_record(i, 1e-3) for i in range(3)])
                                            + _gzipped([make_record(9, 1e-3)])[:10] + b"\xff" * 16)
    cli = [sys.executable, "-m", "autotune.cli", "best", "--json", "--log"]
    proc = subprocess.run(cli + ["empty.jsonl.gz"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == ["autotune: error: cannot read log empty.jsonl.gz: Compressed file "
                                                "ended before the end-of-stream marker was reached"]
    proc = subprocess.run(cli + ["cut.jsonl.gz"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "autotune: warning: cut.jsonl.gz: skipped 1 unreadable line(s) (first at line 4)" in proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr


def test_records_that_spell_out_a_default_attribute_join_their_task(tmp_path):
    """Logs from before ``KernelSpec.make`` left defaults out of keys (the model's tasks had
    eps=1e-5, residual=false): their records count for the task that leaves them out."""
    task = Task.make("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True}, dynamic=("M",))
    old = json.loads(make_record(1, 0.2, task).to_json())
    old["task"]["attrs"] = {"eps": 1e-5, "residual": True}
    log = RecordLog(tmp_path / "old.jsonl")
    log.path.write_text(json.dumps(old) + "\n")
    log.append([make_record(2, 0.1, Task.make("rmsnorm", {"M": 8, "N": 64}, attrs={"eps": 1e-5, "residual": True},
                                              dynamic=("M",)))])
    records = log.records(warn=False)
    assert [r.task.key for r in records] == [task.key] * 2 and task.key == "rmsnorm/float32/M~=8,N=64/residual=true"
    assert best(records, task, Target.host()).config_index == 2


def test_reading_a_log_that_does_not_exist_is_an_error(tmp_path):
    """A mistyped name read as an empty log: a notebook then failed in pandas, a model ran on
    template defaults. A log to write (RecordLog) may still be new."""
    from records import load_records

    with pytest.raises(FileNotFoundError, match="log .*typo.jsonl does not exist"):
        load_records([tmp_path / "typo.jsonl"])
    assert RecordLog(tmp_path / "new.jsonl").records() == []


def test_one_log_path_is_one_log_not_its_characters(tmp_path):
    from records import load_records

    log = RecordLog(tmp_path / "tune.jsonl")
    log.append([make_record(0, 0.3), make_record(1, 0.2)])
    for path in (str(log.path), log.path):
        assert [r.config_index for r in load_records(path)] == [0, 1]
        assert list(to_dataframe(path)["config_index"]) == [0, 1]  # a notebook's to_dataframe("tune.jsonl")
    with pytest.raises(FileNotFoundError, match="typo.jsonl does not exist"):
        to_dataframe(str(tmp_path / "typo.jsonl"))


def test_an_empty_frame_has_the_dtypes_of_a_full_one():
    empty = to_dataframe([])
    assert empty["ok"].dtype == bool and empty[empty["ok"]].empty  # a filter on ok works on an empty log
    assert empty["trial"].dtype == "int64" and empty["config_index"].dtype == "int64"
    assert empty["timestamp"].dtype == float


def test_integer_columns_stay_integers_when_other_ops_lack_them():
    gemm = make_record(0, 0.3, Task.make("gemm", {"M": 128, "N": 4, "K": 4}))
    norm = Record(Task.make("rmsnorm", {"M": 8, "N": 64}), Target.host(), {"vec": 8, "form": "fast"}, 3,
                  MeasureResult((0.1,)), tuner="test")
    frame = to_dataframe([gemm, norm])
    assert frame["dim.M"].dtype == "int64" and frame["dim.M"].tolist() == [128, 8]  # both ops have M
    assert frame["dim.K"].dtype == "Int64" and frame["dim.K"].tolist()[0] == 4 and frame["dim.K"].isna()[1]
    assert frame["cfg.mr"].dtype == "Int64" and frame["cfg.vec"].dtype == "Int64"
    assert frame["cfg.form"].tolist()[1] == "fast" and frame["cfg.form"].dtype != "Int64"  # strings stay strings
