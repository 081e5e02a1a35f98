"""Every Python example of the README runs as written, in order, in one fresh folder: the
README cannot drift from the code again. The shell lines an example relies on (a library to
load) run first, exactly as the README shows them."""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def fenced_blocks() -> list[tuple[str, str, int, int]]:
    """(language, text, first line, last line) of every fenced block, in order."""
    found, language, start, body = [], None, 0, []
    for number, line in enumerate(README.splitlines()):
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


def test_every_python_block_of_the_readme_runs(tmp_path):
    found = fenced_blocks()
    examples = [i for i, block in enumerate(found) if block[0] == "python"]
    assert len(examples) >= 3
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=str(ROOT))
    bin_dir = Path(sys.executable).parent
    for index in examples:
        code = found[index][1]
        for line in shell_lines_before(index, found):
            words = shlex.split(line)
            proc = subprocess.run([str(bin_dir / "autotune"), *words[1:]], cwd=tmp_path, env=env,
                                  capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"README line `{line}` failed:\n{proc.stderr}"
        proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        first = code.strip().splitlines()[0]
        assert proc.returncode == 0, f"README example starting `{first}` failed:\n{proc.stderr[-3000:]}"
