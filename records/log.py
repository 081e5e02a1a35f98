"""The JSONL tuning log: the source of truth for everything measured.

Each record is one whole line, written, flushed and fsynced before the next trial, so a
job killed at any moment loses at most the trial in flight. Loading skips and counts
lines that are not records (a truncated last line after a kill, a hand edit gone wrong,
JSON that is not a record, a record of an operator no template knows).
A log whose name ends in ``.gz`` (an archived sweep) is read through gzip and is read-only;
one cut short or damaged (an interrupted copy) keeps the records before the damage, which
counts as one unreadable line, and is refused when not even its first line can be read.
Only regular files are logs: a device never ends (``/dev/zero``) or never takes a write
(``/dev/full``), and a FIFO blocks until someone opens its other end.
"""
from __future__ import annotations

import fcntl
import gzip
import json
import math
import os
import stat
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .record import Record


class LogWriteError(OSError):
    """The log cannot be written (missing directory, no permission, full disk, not a regular file)."""


class LogLockedError(LogWriteError):
    """Another tuning job holds the log: two jobs would measure every config twice."""


class LogReadError(OSError):
    """The log cannot be read as a log (it is not a regular file, or no line of it can be read)."""


def _special_kind(path: Path) -> str | None:
    """What ``path`` is when it exists and is not a regular file ("a directory", "a FIFO", ...),
    else None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:  # a new log (or a dangling symlink), or one that open() reports on
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


@dataclass
class LoadReport:
    records: list[Record] = field(default_factory=list)
    bad_lines: int = 0
    duplicates: int = 0
    first_bad_line: int | None = None
    damage: str | None = None  # why the file could not be read past ``first_bad_line`` (a damaged .gz)


class RecordLog:
    """Append-only JSONL file of ``Record`` lines."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def check_writable(self) -> None:
        """Fail early, before any measurement, if records could not be kept (or another job
        holds the log: see ``lock``)."""
        parent = self.path.parent if str(self.path.parent) else Path(".")
        if self.compressed:
            raise LogWriteError(f"log {self.path} is compressed (.gz): archived logs are read-only")
        self._refuse_special(LogWriteError)
        if not parent.exists():
            raise LogWriteError(f"log directory {parent} does not exist")
        try:
            with open(self.path, "a"):
                pass
        except OSError as exc:
            raise LogWriteError(f"cannot write log {self.path}: {exc.strerror or exc}") from None
        with self.lock():  # refuse now, before any set-up, when another job is tuning into this log
            pass

    def _refuse_special(self, error: type[OSError]) -> None:
        kind = _special_kind(self.path)
        if kind == "a directory":
            raise error(f"log path {self.path} is a directory")
        if kind is not None:
            raise error(f"log {self.path} is {kind}: a log must be a regular file")

    @property
    def lock_path(self) -> Path:
        # beside the real file, so a log named through a symlink or another path has one lock
        real = self.path.resolve()
        return real.with_name(real.name + ".lock")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the log for one tuning job; LogLockedError at once if another job holds it.

        An advisory ``flock`` on a sidecar ``PATH.lock`` rather than on the log itself: the
        holder's pid goes into it for the message without putting anything but records in
        the log, and it is independent of ``append`` opening and closing the log (a POSIX
        fcntl/lockf lock would be dropped by the first close of any descriptor of the log).
        The kernel releases a flock when its holder dies, so a killed job leaves no stale
        lock. Readers (best, replay, export) never take it.
        """
        path = self.lock_path
        fd = self._acquire(path)
        try:
            yield
        finally:
            # unlinked while still held: a job that opened this file meanwhile sees it is gone
            try:
                os.unlink(path)
            except OSError:
                pass
            os.close(fd)

    def _acquire(self, path: Path) -> int:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise LogWriteError(f"cannot lock log {self.path}: {path}: {exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise LogLockedError(f"log {self.path} is in use by another tuning job (pid {holder})") from None
            except OSError as exc:
                os.close(fd)
                raise LogWriteError(f"cannot lock log {self.path}: {exc.strerror or exc}") from None
            try:  # the previous holder may have unlinked the file between our open and flock
                current = os.stat(path)
            except FileNotFoundError:
                current = None
            mine = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:  # a full disk: the pid is only for the message, the flock is the lock
                    pass
                return fd
            os.close(fd)

    @property
    def compressed(self) -> bool:
        return self.path.suffix == ".gz"

    def append(self, records: Iterable[Record]) -> None:
        lines = "".join(r.to_json() + "\n" for r in records)
        if not lines:
            return
        if self.compressed:
            raise LogWriteError(f"log {self.path} is compressed (.gz): archived logs are read-only")
        self._refuse_special(LogWriteError)  # a FIFO would block, /dev/full never takes the line
        try:
            self._repair_tail()
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(lines)
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise LogWriteError(f"cannot write log {self.path}: {exc.strerror or exc}") from None

    def _repair_tail(self) -> None:
        """After a kill mid-write the file may end without a newline: end that line first,
        so the next record starts on a line of its own (the broken one is skipped on load)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return
                f.seek(-1, os.SEEK_END)
                last = f.read(1)
        except FileNotFoundError:
            return
        if last != b"\n":
            with open(self.path, "ab") as f:
                f.write(b"\n")

    def load(self, warn: bool = True) -> LoadReport:
        report = LoadReport()
        seen: set[tuple[str, str, str, float]] = set()
        if not self.path.exists():
            return report
        # a device reads forever (/dev/zero: one endless line in memory), a FIFO blocks
        self._refuse_special(LogReadError)
        opener = gzip.open if self.compressed else open
        with opener(self.path, "rt", encoding="utf-8", errors="replace") as f:
            for number, line in self._lines(f, report):
                if not line.strip():
                    continue
                try:
                    record = Record.from_json(line)
                except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                    report.bad_lines += 1
                    report.first_bad_line = report.first_bad_line or number
                    continue
                identity = (record.task.key, record.target.key, record.config_key, record.timestamp)
                if identity in seen:
                    report.duplicates += 1
                    continue
                seen.add(identity)
                report.records.append(record)
        if warn and report.bad_lines:
            damage = f"; {report.damage}" if report.damage else ""
            warnings.warn(f"{self.path}: skipped {report.bad_lines} unreadable line(s) "
                          f"(first at line {report.first_bad_line}){damage}", stacklevel=2)
        return report

    def _lines(self, f, report: LoadReport) -> Iterator[tuple[int, str]]:
        """(number, line) of ``f`` up to where it cannot be read: a .gz cut short or corrupt (an
        interrupted copy) or an I/O error. The lines before are measurements, kept as after a
        torn last line, and the damage counts as one unreadable line; a LogReadError when not
        even the first line can be read."""
        number = 0
        try:
            for number, line in enumerate(f, start=1):
                yield number, line
        except (OSError, EOFError, zlib.error) as exc:  # gzip's errors: BadGzipFile, EOFError, zlib.error
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if number == 0:
                raise LogReadError(f"cannot read log {self.path}: {reason}") from None
            report.bad_lines += 1
            report.first_bad_line = report.first_bad_line or number + 1
            report.damage = f"unreadable from line {number + 1} on ({reason})"

    def records(self, warn: bool = True) -> list[Record]:
        return self.load(warn).records

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())


def load_records(paths: Iterable[str | os.PathLike], warn: bool = True) -> list[Record]:
    out: list[Record] = []
    for path in paths:
        out.extend(RecordLog(path).records(warn))
    return out


def best_records(records: Iterable[Record]) -> dict[tuple[str, str], Record]:
    """The fastest verified record per (task key, target key). Failed records never win, nor do
    times no kernel takes (zero, negative, NaN, infinite: ``Record.ok`` is False for them)."""
    best: dict[tuple[str, str], Record] = {}
    for record in records:
        if not record.ok:
            continue
        key = (record.task.key, record.target.key)
        if key not in best or record.seconds < best[key].seconds:
            best[key] = record
    return best


def best(records: Iterable[Record], task, target) -> Record | None:
    """The best verified record for one task on one target, or None."""
    return best_records(r for r in records if r.task.key == task.key and r.target.key == target.key).get(
        (task.key, target.key))


def to_dataframe(records: Iterable[Record]):
    """One row per record, knob values as ``cfg.<name>`` columns, for notebooks."""
    import pandas as pd

    rows = []
    for i, r in enumerate(records):
        row = {
            "trial": i,
            "op": r.task.op,
            "task": r.task.key,
            "dtype": r.task.dtype,
            "target": r.target.key,
            "device": r.target.device_name,
            "tuner": r.tuner,
            "config_index": r.config_index,
            "error": r.result.error.name,
            "ok": r.ok,
            "seconds": r.seconds if r.ok else math.nan,
            "gflops": r.gflops if r.ok else math.nan,
            "build_s": r.result.build_s,
            "run_s": r.result.run_s,
            "timestamp": r.timestamp,
            "config": json.dumps(r.config, sort_keys=True),
        }
        for dim, value in r.task.shape:
            row[f"dim.{dim}"] = value
        for name, value in r.config.items():
            row[f"cfg.{name}"] = value
        for key in ("p20", "p80", "min"):
            if key in r.result.stats:
                row[key] = r.result.stats[key]
        for key, column in (("score", "model_score"), ("batch", "batch"),
                            ("pairwise_accuracy", "model_pairwise_accuracy"), ("topk_recall", "model_topk_recall")):
            if key in r.model:
                row[column] = r.model[key]
        rows.append(row)
    # the fixed columns even without a record: a notebook's df["task"] works on an empty log too
    frame = pd.DataFrame(rows, columns=list(dict.fromkeys([*FRAME_COLUMNS, *(k for row in rows for k in row)])))
    frame["best_so_far_gflops"] = frame["gflops"].astype(float).fillna(0.0).groupby(
        [frame["task"], frame["target"]]).cummax()
    return frame


FRAME_COLUMNS = ("trial", "op", "task", "dtype", "target", "device", "tuner", "config_index", "error", "ok",
                 "seconds", "gflops", "build_s", "run_s", "timestamp", "config")
