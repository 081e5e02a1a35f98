"""Progress a user can follow: per candidate, compiling and measuring apart, the figures
first, whole lines in a log."""
from __future__ import annotations

import io

from fakes import SyntheticRunner

from autotune.progress import ProgressDisplay, shorten
from autotune.tuners import RandomTuner
from autotune.tuning import ProgressCallback
from search_space import Target, Task

TASK = Task.make("gemv", {"M": 1, "N": 11008, "K": 4096}, attrs={})


class Recorder(ProgressCallback):
    """The real callback, remembering what it showed after each event."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown: list[tuple[str, int, str]] = []

    def building(self, n):
        super().building(n)
        self.shown.append(("building", self.display.done, self.display.figures))

    def measured(self, record, trial):
        super().measured(record, trial)
        self.shown.append(("measured", self.display.done, self.display.figures))


def test_progress_advances_per_measured_candidate_and_says_compiling_or_measuring():
    stream = io.StringIO()
    progress = Recorder(TASK, 12, stream)
    runner = SyntheticRunner({"gemv": 1e-4})
    RandomTuner(TASK, Target.host(), seed=0).tune(12, runner, runner, batch_size=4, callbacks=[progress])
    progress.close()
    measured = [done for event, done, _ in progress.shown if event == "measured"]
    assert measured == list(range(1, 13))  # one step per candidate, not per batch of 4
    building = [figures for event, _, figures in progress.shown if event == "building"]
    assert len(building) == 3 and all(f.startswith("compiling 4") for f in building)
    assert progress.shown[1][2].startswith("measuring 1/4") and "GB/s" in progress.shown[-1][2]
    # no terminal: one whole plain line per batch, nothing cut with an ellipsis
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == ["4/12", "8/12", "12/12"]
    assert all(line.endswith(TASK.key) and "…" not in line for line in lines)
    assert lines[-1].index("best") < lines[-1].index(TASK.key)  # the figures come before the name


def test_a_long_task_name_is_shortened_from_the_middle():
    key = "attention_decode/float32/B=1,H=32,HKV=8,D=128,S~=4096,L~=4096/scale=0.0"
    short = shorten(key, 30)
    assert len(short) == 30 and short.startswith("attention_dec") and short.endswith("scale=0.0") and "…" in short
    assert shorten("gemv", 30) == "gemv"


def test_a_terminal_line_fits_80_columns():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    display = ProgressDisplay("attention_decode/float32/B=1,H=32,HKV=8,D=128,S~=4096,L~=4096/scale=0.0", 64, stream)
    display.progress.console.width = 80
    display.update(8, "measuring 3/8  best 335.9 GB/s")
    display.progress.refresh()
    display.close()
    rendered = [line for line in stream.getvalue().replace("\r", "\n").splitlines() if "8/64" in line]
    assert rendered and "335.9 GB/s" in rendered[-1]
