"""Records that know when they are stale, through the command line as a user meets it: a
template's rendering changes, `best` and `export` report the old records as stale and skip
them, `tune --remeasure-stale` measures their configs again, and the log then holds fresh
records beside the stale ones (nothing measured is dropped)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from records import RecordLog

# The add template with an edit to its rendering, switched on by STALE_TEST_EDIT: a template
# change as a user makes one (the workers import this module too, through AUTOTUNE_PLUGINS).
PLUGIN = '''
import dataclasses
import os

from search_space import register_template
from search_space.templates.add import AddCpu


@register_template
class EditedAdd(AddCpu):
    def render(self, task, config, target):
        source = super().render(task, config, target)
        edit = os.environ.get("STALE_TEST_EDIT")
        return dataclasses.replace(source, code=source.code + f"\\n; {edit}\\n") if edit else source
'''
TASK = "add/float32/M=4,N=64"


def autotune(tmp_path: Path, *args: str, edit: str | None = None) -> subprocess.CompletedProcess:
    """``autotune ARGS`` in ``tmp_path`` with the edited add template, edited when ``edit`` is given."""
    (tmp_path / "edited_add.py").write_text(PLUGIN)
    project = Path(__file__).resolve().parents[2]
    env = dict(os.environ, AUTOTUNE_PLUGINS="edited_add", MLFLOW_DISABLE_TELEMETRY="true",
               PYTHONPATH=os.pathsep.join(filter(None, [str(project), str(tmp_path), os.environ.get("PYTHONPATH")])))
    env.pop("STALE_TEST_EDIT", None)
    if edit is not None:
        env["STALE_TEST_EDIT"] = edit
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


def warnings_of(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("autotune: warning:")]


@pytest.mark.tools("cc")
def test_a_changed_template_makes_records_stale_until_they_are_measured_again(tmp_path):
    tuned = autotune(tmp_path, "tune", "--op", "add", "--shape", "M=4,N=64", "--tuner", "random", "--trials", "4",
                     "--log", "t.jsonl", "--no-mlflow", "--quiet")
    assert tuned.returncode == 0, tuned.stderr
    before = RecordLog(tmp_path / "t.jsonl").records()
    assert len(before) == 4 and all(r.ok for r in before)
    assert all(r.code is not None and r.code.compiler.startswith("LLVM ") for r in before)

    # the template as it was: nothing is stale
    fresh = autotune(tmp_path, "best", "--log", "t.jsonl", "--json")
    assert fresh.returncode == 0 and not warnings_of(fresh), fresh.stderr
    assert json.loads(fresh.stdout)[0]["stale_skipped"] == 0

    # the template renders differently now: every record is stale, and none is used
    best = autotune(tmp_path, "best", "--log", "t.jsonl", edit="v2")
    assert best.returncode == 0, best.stderr
    assert warnings_of(best) == [f"autotune: warning: {TASK} on {before[0].target.key}: all 4 verified record(s) are "
                                 "stale (today's template renders their config to other code); none is used"]
    assert "autotune tune --remeasure-stale --log t.jsonl" in best.stderr
    assert best.stdout.strip() == "t.jsonl: no fresh verified record"

    export = autotune(tmp_path, "export", "--log", "t.jsonl", "--out", "lib", edit="v2")
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert len(warnings_of(export)) == 1 and "all 4 verified record(s) are stale" in export.stderr
    assert export.stderr.strip().splitlines()[-1].startswith("autotune: error: every verified record for target")
    assert not (tmp_path / "lib").exists()

    # on request they are used, with a warning
    allowed = autotune(tmp_path, "best", "--log", "t.jsonl", "--json", "--allow-stale", edit="v2")
    assert allowed.returncode == 0, allowed.stderr
    (row,) = json.loads(allowed.stdout)
    assert row["stale"] is True and len(warnings_of(allowed)) == 1 and "using a stale record" in allowed.stderr

    # measured again on today's code: appended, the stale records stay
    again = autotune(tmp_path, "tune", "--remeasure-stale", "--log", "t.jsonl", "--no-mlflow", "--quiet", edit="v2")
    assert again.returncode == 0, again.stderr
    assert f"{TASK}: measured 4 stale config(s) again (0 failed)" in again.stdout
    after = RecordLog(tmp_path / "t.jsonl").records()
    assert after[:4] == before and len(after) == 8
    assert {r.config_key for r in after[4:]} == {r.config_key for r in before}
    assert all(r.tuner == "remeasure" and r.ok for r in after[4:])
    assert {r.code.digest for r in after[4:]}.isdisjoint({r.code.digest for r in before})

    # the fresh records are used, the superseded stale ones are not reported again
    best = autotune(tmp_path, "best", "--log", "t.jsonl", "--json", edit="v2")
    assert best.returncode == 0 and not warnings_of(best), best.stderr
    (row,) = json.loads(best.stdout)
    assert row["stale"] is False and row["stale_skipped"] == 0
    assert row["seconds"] in {r.seconds for r in after[4:]}
    export = autotune(tmp_path, "export", "--log", "t.jsonl", "--out", "lib", "--json", edit="v2")
    assert export.returncode == 0 and not warnings_of(export), export.stderr
    assert json.loads(export.stdout)["kernels"][0]["seconds"] == row["seconds"]
    assert "; v2" in next((tmp_path / "lib" / "sources").iterdir()).read_text()
    nothing = autotune(tmp_path, "tune", "--remeasure-stale", "--log", "t.jsonl", "--no-mlflow", edit="v2")
    assert nothing.returncode == 0 and "nothing to measure again" in nothing.stdout, nothing.stderr
    assert len(RecordLog(tmp_path / "t.jsonl").records()) == 8


def test_remeasure_stale_refuses_bad_input_in_one_line(tmp_path):
    for args, message in [(["--shape", "M=4,N=64"], "--shape needs --op"),
                          (["--target", "sm_90a"], "--remeasure-stale measures"),
                          (["--log", "/no/such/dir/t.jsonl"], "does not exist")]:
        proc = autotune(tmp_path, "tune", "--remeasure-stale", *args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr
    proc = autotune(tmp_path, "tune", "--shape", "M=4,N=64")
    assert proc.returncode == 2 and "--op and --shape are required" in proc.stderr


def test_the_remeasure_hint_is_offered_only_for_stale_configs_today_s_space_has(capsys):
    from autotune.cli.common import report_stale
    from records import StaleRecordsWarning

    outside = StaleRecordsWarning("t: all 2 verified record(s) are stale (...); none of them is in today's space",
                                  remeasurable=False)
    report_stale([outside], ["t.jsonl"], allow_stale=False)
    err = capsys.readouterr().err
    assert err.startswith("autotune: warning: t: all 2") and "--remeasure-stale" not in err
    report_stale([outside, StaleRecordsWarning("u: 1 faster stale record(s) skipped (...)")], ["t.jsonl"], False)
    assert "autotune tune --remeasure-stale --log t.jsonl" in capsys.readouterr().err
