"""Every Python example of the README and of the reference under docs/ runs as written, in
order, one fresh folder per file: the documentation cannot drift from the code again. The shell
lines an example relies on (a library to load) run first, exactly as the file shows them. Every
relative link of these files points at a file of the repository."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def fenced_blocks(text: str = README) -> list[tuple[str, str, int, int]]:
    """(language, text, first line, last line) of every fenced block, in order."""
    found, language, start, body = [], None, 0, []
    for number, line in enumerate(text.splitlines()):
        if line.startswith("```"):
            if language is None:
                language, start, body = line[3:].strip(), number, []
            else:
                found.append((language, "\n".join(body) + "\n", start, number))
                language = None
        elif language is not None:
            body.append(line)
    return found


def shell_lines_before(index: int, found: list) -> list[str]:
    """The ``autotune`` commands of the bare block right before block ``index``, when only a
    few lines of prose stand between them."""
    if index == 0:
        return []
    language, text, _, end = found[index - 1]
    if language or found[index][2] - end > 4:
        return []
    return [line for line in text.splitlines() if line.startswith("autotune ")]


def python_examples(found: list) -> list[int]:
    return [i for i, block in enumerate(found) if block[0] == "python"]


def test_the_documentation_has_examples():
    counts = {path.name: len(python_examples(fenced_blocks(path.read_text()))) for path in DOCS}
    assert counts["README.md"] >= 1, counts
    assert sum(counts.values()) >= 3, counts


@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_every_python_block_of_the_documentation_runs(path, tmp_path):
    name = path.relative_to(ROOT)
    found = fenced_blocks(path.read_text())
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT))
    bin_dir = Path(sys.executable).parent
    for index in python_examples(found):
        code = found[index][1]
        for line in shell_lines_before(index, found):
            words = shlex.split(line)
            proc = subprocess.run([str(bin_dir / "autotune"), *words[1:]], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{name} line `{line}` failed:\n{proc.stderr}"
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        first = code.strip().splitlines()[0]
        assert proc.returncode == 0, f"{name} example starting `{first}` failed:\n{proc.stderr[-3000:]}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(text: str) -> list[str]:
    """The targets of the markdown links outside fenced blocks and code spans that are not URLs or
    anchors."""
    fenced, links = False, []
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            links += [target for target in LINK.findall(re.sub(r"`[^`]*`", "", line))
                      if not re.match(r"[a-z][a-z0-9+.-]*:", target) and not target.startswith("#")]
    return links


@pytest.mark.parametrize("path", DOCS, ids=[str(path.relative_to(ROOT)) for path in DOCS])
def test_every_relative_link_points_at_a_file(path):
    missing = [target for target in relative_links(path.read_text())
               if not (path.parent / target.split("#")[0]).exists()]
    assert not missing, f"{path.relative_to(ROOT)} links to what does not exist: {missing}"
