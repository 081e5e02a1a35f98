"""What `autotune export` may overwrite and what it leaves behind: only a library replaces a
library, a symlinked --out keeps its link, and an export killed halfway leaves nothing that
the next one does not remove."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "autotune.cli"]


def _export(log: Path, out: str, cwd: Path, *more: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + ["export", "--log", str(log), "--out", out, "--no-verify", *more],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("autotune: error: ") and "Traceback" not in proc.stderr, lines
    return lines[0]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b"<dir>" for p in sorted(folder.rglob("*"))}


# ----------------------------------------------------------------------------- what may be replaced


def test_a_directory_with_someone_elses_manifest_is_never_replaced(tmp_path, library_log):
    """The tracker's case: a web app's manifest.json made export delete the app's sources."""
    webapp = tmp_path / "webapp"
    (webapp / "src").mkdir(parents=True)
    (webapp / "src" / "index.js").write_text("keep me")
    (webapp / "manifest.json").write_text('{"name": "x"}')
    before = _tree(webapp)
    line = _one_error_line(_export(library_log, "webapp", tmp_path))
    assert "holds a manifest.json that is not a kernel library's" in line and "refusing to replace it" in line
    assert _tree(webapp) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webapp"], "a stage was left behind"


@pytest.mark.parametrize("extra", ["notes.txt", "src/", "sources/mine/", "sources/link"])
def test_a_library_that_holds_anything_else_is_never_replaced(extra, tmp_path, library_log, exported_library):
    library = tmp_path / "lib"
    shutil.copytree(exported_library, library)
    if extra.endswith("/"):
        (library / extra).mkdir()
        (library / extra / "kept.txt").write_text("keep me")
    elif extra == "sources/link":
        (library / extra).symlink_to(tmp_path)
    else:
        (library / extra).write_text("keep me")
    before = _tree(library)
    line = _one_error_line(_export(library_log, "lib", tmp_path))
    assert f"holds {extra.rstrip('/')}" in line and "which is not part of a kernel library" in line, line
    assert _tree(library) == before


def test_a_library_is_replaced_by_a_new_one(tmp_path, library_log, exported_library):
    library = tmp_path / "lib"
    shutil.copytree(exported_library, library)
    manifest = json.loads((library / "manifest.json").read_text())
    (library / "manifest.json").write_text(json.dumps({**manifest, "created": "earlier"}))
    proc = _export(library_log, "lib", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((library / "manifest.json").read_text())["created"] != "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib"]


def test_an_empty_out_is_refused_not_taken_for_the_working_directory(tmp_path, library_log):
    """``--out "$LIB"`` with LIB unset: Path("") is ".", which export would replace when empty."""
    for out in ("", " "):
        line = _one_error_line(_export(library_log, out, tmp_path))
        assert "--out is empty" in line, line
    assert list(tmp_path.iterdir()) == []


def test_a_symlinked_out_replaces_the_library_it_points_to_and_keeps_the_link(tmp_path, library_log,
                                                                              exported_library):
    real = tmp_path / "lib-v1"
    shutil.copytree(exported_library, real)
    manifest = json.loads((real / "manifest.json").read_text())
    (real / "manifest.json").write_text(json.dumps({**manifest, "created": "earlier"}))
    (tmp_path / "current").symlink_to("lib-v1")
    proc = _export(library_log, "current", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "current").is_symlink() and os.readlink(tmp_path / "current") == "lib-v1"
    assert json.loads((real / "manifest.json").read_text())["created"] != "earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "lib-v1"]
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "mine.txt").write_text("keep me")
    (tmp_path / "other").symlink_to("elsewhere")  # a link to a directory that is no library is refused
    assert "holds no kernel library" in _one_error_line(_export(library_log, "other", tmp_path))
    assert (tmp_path / "elsewhere" / "mine.txt").read_text() == "keep me"


# ----------------------------------------------------------------------------- leftovers of a killed export


def _start_export(log: Path, cwd: Path, command: list[str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(command or CLI + ["export", "--log", str(log), "--out", "lib"], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_stage(folder: Path, proc: subprocess.Popen) -> Path:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        stages = list(folder.glob(".lib.partial-*"))
        if stages:
            return stages[0]
        assert proc.poll() is None, f"the export ended before staging: {proc.communicate()}"
        time.sleep(0.02)
    raise AssertionError("the export never created its stage")


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.tools("cc")
def test_the_next_export_removes_what_a_killed_one_left(tmp_path, library_log):
    proc = _start_export(library_log, tmp_path)
    stage = _wait_for_stage(tmp_path, proc)
    proc.kill()  # SIGKILL: no cleanup can run
    proc.communicate(timeout=60)
    assert stage.is_dir() and stage.name.startswith(f".lib.partial-{proc.pid}-")
    # (name, what it holds, days old, removed?): only export's own names, holding only library files
    cases = [
        (f".lib.partial-{os.getpid()}-0123abcd", ["manifest.json"], 0, False),   # an export still running
        (f".lib.partial-{os.getpid()}-89abcdef", ["sources/a.ll"], 2, True),    # two days old: its pid reused
        (f".lib.old-{_dead_pid()}", ["manifest.json", "libllm_autotune_kernels.so"], 0, True),  # set aside, dead
        (f".lib.old-{_dead_pid()}", ["keep.txt"], 2, False),                     # a user's files: not export's
        (".lib.old-backup", ["manifest.json"], 2, False),                        # not a name export gives
        (".lib.old-2024", ["manifest.json", "notes.txt"], 2, False),             # export's name, not its files
        (".lib.partial-notes", [], 2, False),
        (f".other.partial-{_dead_pid()}-0123abcd", [], 2, False),                # another --out's
    ]
    two_days_ago = time.time() - 2 * 86400
    for name, files, days, _ in cases:
        for file in files:
            (tmp_path / name / file).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name / file).write_text("x")
        (tmp_path / name).mkdir(exist_ok=True)
        if days:
            os.utime(tmp_path / name, (two_days_ago, two_days_ago))
    done = _export(library_log, "lib", tmp_path)
    assert done.returncode == 0, done.stderr
    kept = sorted(["lib"] + [name for name, _, _, removed in cases if not removed])
    assert sorted(p.name for p in tmp_path.iterdir()) == kept


@pytest.mark.tools("cc")
def test_sigterm_during_an_export_from_the_cli_removes_its_stage(tmp_path, library_log):
    proc = _start_export(library_log, tmp_path)
    _wait_for_stage(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == [], "the export left its stage (or a library) behind"


@pytest.mark.tools("cc")
def test_sigterm_during_export_library_removes_its_stage(tmp_path, library_log):
    """Called from Python, where SIGTERM would kill the process on the spot: export_library
    turns it into SystemExit(143) for as long as it runs, and cleans up on the way out."""
    script = ("import sys; from export import export_library; from records import load_records; "
              "export_library(load_records([sys.argv[1]]), 'lib')")
    proc = _start_export(library_log, tmp_path, [sys.executable, "-c", script, str(library_log)])
    _wait_for_stage(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert list(tmp_path.iterdir()) == [], "the export left its stage (or a library) behind"


def test_a_sigterm_just_after_the_stage_is_made_still_removes_it(tmp_path, library_log, monkeypatch):
    """The window CI once hit: the signal's SystemExit raised right after the stage's mkdir
    returned, before any cleanup was armed (made deterministic here by raising it from mkdir)."""
    from export import export_library
    from records import load_records

    made = []
    real_mkdir = Path.mkdir

    def mkdir_then_signal(self, *args, **kwargs):
        real_mkdir(self, *args, **kwargs)
        if self.name.startswith(".lib.partial-"):
            made.append(self)
            raise SystemExit(143)

    monkeypatch.setattr(Path, "mkdir", mkdir_then_signal)
    with pytest.raises(SystemExit):
        export_library(load_records([library_log]), tmp_path / "lib", verify=False)
    assert made, "the export made no stage"
    assert list(tmp_path.iterdir()) == [], "the export left its stage behind"


def test_the_sigterm_handler_lasts_only_as_long_as_the_export():
    from export.library_writer import _sigterm_raises

    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with _sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

        def mine(signum, frame):
            pass

        signal.signal(signal.SIGTERM, mine)  # a caller's own handler is left alone
        with _sigterm_raises():
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
