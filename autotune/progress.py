"""Progress of a long job on stderr: a rich bar on a terminal, plain lines in a log.

The figures come first (trials done, time, what the job reports) and the job's label last,
shortened from the middle, so an 80-column terminal keeps what matters on the line; a log
file (no terminal) gets whole plain lines, one per batch, never cut with an ellipsis.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO


def shorten(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, cut from the middle (both ends of a task key
    say something: the op and dtype, then the last dims and attributes)."""
    if len(text) <= width:
        return text
    keep = max(width - 1, 2)
    head = (keep + 1) // 2
    return text[:head] + "…" + text[len(text) - (keep - head):]


class ProgressDisplay:
    """``update(done, figures)`` as work advances; ``line=True`` marks a point worth a line in a log."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.label, self.total, self.done, self.figures = label, total, 0, ""
        self.started = time.monotonic()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.progress = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream)
            # counter 9, bar 12-20, time 7, figures ~34: the label gets what is left
            self.progress = Progress(MofNCompleteColumn(), BarColumn(bar_width=12 if console.width < 100 else 20),
                                     TimeElapsedColumn(), TextColumn("{task.fields[figures]}"),
                                     TextColumn("{task.description}"), console=console)
            self.bar = self.progress.add_task(shorten(label, max(16, console.width - 70)), total=total, figures="")
            self.progress.start()

    def update(self, done: int | None = None, figures: str | None = None, line: bool = False) -> None:
        if done is not None:
            self.done = done
        if figures is not None:
            self.figures = figures
        if self.progress is not None:
            self.progress.update(self.bar, completed=self.done, figures=self.figures)
        elif line:
            elapsed = time.monotonic() - self.started
            figures = f"  {self.figures}" if self.figures else ""
            print(f"{self.done}/{self.total} trials  {elapsed:.0f} s{figures}  {self.label}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
