"""`make demo` on a machine without a C compiler stops at once, naming what to install; `make test`
runs the longest test files first and writes bytecode."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.tools("make")
def test_make_demo_without_a_c_compiler_stops_with_one_line(tmp_path):
    empty = tmp_path / "bin"
    empty.mkdir()  # a PATH with no compiler (and nothing else)
    start = time.monotonic()
    proc = subprocess.run([shutil.which("make"), "-s", "-C", str(ROOT), "demo"], capture_output=True, text=True,
                          env={"PATH": str(empty), "CC": str(tmp_path / "no-such-cc")}, timeout=60)
    assert proc.returncode == 2
    assert time.monotonic() - start < 30
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("make: ", "make["))]  # make's own
    assert len(lines) == 1 and "no C compiler found" in lines[0] and "install gcc" in lines[0]
    assert proc.stdout == ""


def test_make_test_runs_the_longest_files_first():
    """`make test` keeps xdist from reordering files by test count, and every file the conftest
    puts first exists (a renamed one would silently go back to running last)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("top_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)  # by path: "conftest" may name another folder's
    LONGEST_FIRST = conftest.LONGEST_FIRST
    assert "--no-loadscope-reorder" in (ROOT / "Makefile").read_text()
    missing = [path for path in LONGEST_FIRST if not (ROOT / path).is_file()]
    assert not missing, missing
    assert len(set(LONGEST_FIRST)) == len(LONGEST_FIRST)


def test_make_test_writes_bytecode():
    """The suite's many Python processes (CLI runs, build and run workers) read the project's
    compiled modules rather than each compiling them again: `make test` clears
    PYTHONDONTWRITEBYTECODE, which some environments set."""
    (line,) = [line for line in (ROOT / "Makefile").read_text().splitlines() if "-m pytest" in line]
    assert line.split()[0] == "PYTHONDONTWRITEBYTECODE="
