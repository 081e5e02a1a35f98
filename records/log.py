"""The JSONL tuning log: the source of truth for everything measured.

Each record is one whole line, written, flushed and fsynced before the next trial, so a
job killed at any moment loses at most the trial in flight. Loading skips and counts
lines that are not records (a truncated last line after a kill, a hand edit gone wrong,
JSON that is not a record, a record of an operator no template knows).
A log whose name ends in ``.gz`` (an archived sweep) is read through gzip and is read-only;
one cut short or damaged (an interrupted copy) keeps the records before the damage, which
counts as one unreadable line, and is refused when not even its first line can be read.
Only regular files are logs: a device never ends (``/dev/zero``) or never takes a write
(``/dev/full``), and a FIFO blocks until someone opens its other end. A job appends only to a
file that is a log of this schema (``check_writable``), not to one with no record in it (a
database or notes named by mistake) nor to one a newer version wrote.
"""
from __future__ import annotations

import errno
import fcntl
import gzip
import json
import math
import numbers
import os
import re
import stat
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .record import SCHEMA_VERSION, NewerSchemaError, Record


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
    newer_schema: int = 0  # records a newer llm-autotune wrote (not counted in ``bad_lines``)
    newest_schema: int = 0

    def warning(self, path) -> str | None:
        """What was skipped, in one line, or None."""
        parts = []
        if self.bad_lines:
            damage = f"; {self.damage}" if self.damage else ""
            parts.append(f"skipped {self.bad_lines} unreadable line(s) (first at line {self.first_bad_line}){damage}")
        if self.newer_schema:
            parts.append(f"skipped {self.newer_schema} record(s) of schema {self.newest_schema}, written by a newer "
                         f"llm-autotune (this one reads schema 1..{SCHEMA_VERSION}): upgrade to use them")
        return f"{path}: " + "; ".join(parts) if parts else None


class RecordLog:
    """Append-only JSONL file of ``Record`` lines."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        # Path drops a trailing "/": "runs/" would become a file named runs
        self._names_directory = os.fspath(path).endswith(os.sep)

    def check_writable(self) -> None:
        """Fail early, before any measurement, if records could not be kept, if the file is not
        a log this version may append to, or if another job holds the log (see ``lock``)."""
        if self.compressed:
            raise LogWriteError(f"log {self.path} is compressed (.gz): archived logs are read-only")
        self._refuse_special(LogWriteError)
        if self._names_directory:
            raise LogWriteError(f"log path {self.path}{os.sep} names a directory: name the log file in it")
        parent = self.path.parent if str(self.path.parent) else Path(".")
        try:
            if not parent.exists():
                raise LogWriteError(f"log directory {parent} does not exist")
            self._refuse_foreign()
            existed = os.path.lexists(self.path)
            with open(self.path, "a"):
                pass
        except LogWriteError:
            raise
        except OSError as exc:  # no permission, a name too long, ...
            raise LogWriteError(f"cannot write log {self.path}: {exc.strerror or exc}") from None
        with self.lock():  # refuse now, before any set-up, when another job is tuning into this log
            if not existed:  # made only to try: a job refused after this (bad options) leaves no empty log
                try:
                    if os.stat(self.path).st_size == 0:
                        os.unlink(self.path)
                except OSError:
                    pass

    _SCHEMA = re.compile(rb'\s*\{\s*"schema"\s*:\s*(\d+)')

    def _refuse_foreign(self) -> None:
        """Appending is for logs: not for a file that holds no record at all (a database or a
        report named by mistake would get records written into it), nor for one a newer
        llm-autotune wrote (records of two schemas in one file; this version cannot resume it)."""
        try:
            f = open(self.path, "rb")
        except FileNotFoundError:
            return
        lines = records = newer = newest = 0
        with f:
            if b"\0" in f.read(1 << 16):
                raise LogWriteError(f"{self.path} is not a tuning log (it holds binary data): name a new file")
            f.seek(0)
            for line in f:
                if not line.strip():
                    continue
                lines += 1
                if line.lstrip().startswith((b"{", b"\xef\xbb\xbf{")):
                    records += 1
                    found = self._SCHEMA.match(line.removeprefix(b"\xef\xbb\xbf"))
                    if found and int(found.group(1)) > SCHEMA_VERSION:
                        newer += 1
                        newest = max(newest, int(found.group(1)))
        if lines and not records:
            raise LogWriteError(f"{self.path} is not a tuning log (none of its {lines} line(s) is a record): "
                                "name a new file or an existing log")
        if newer:
            raise LogWriteError(f"log {self.path} holds {newer} record(s) of schema {newest}, written by a newer "
                                f"llm-autotune (this one writes schema {SCHEMA_VERSION}): use a new log, or upgrade")

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

        Two advisory ``flock``s: one on the log itself, which every name of the file shares
        (symlinks and hard links alike), and one on a sidecar ``PATH.lock`` that holds the
        holder's pid for the message without putting anything but records in the log. A
        flock belongs to its open file, so ``append`` opening and closing the log leaves it
        (a POSIX fcntl/lockf lock would be dropped by the first close of any descriptor of
        the log). The kernel releases a flock when its holder dies, so a killed job leaves no
        stale lock. Where no sidecar can be made (a writable log in a read-only directory, a
        name at the length limit) the lock on the log alone holds it. Readers (best, replay,
        export) never take either.
        """
        sidecar = self._acquire_sidecar(self.lock_path)
        try:
            held = self._flock_log(sidecar is not None)
        except BaseException:
            self._release_sidecar(sidecar)
            raise
        try:
            yield
        finally:
            os.close(held)
            self._release_sidecar(sidecar)

    def _release_sidecar(self, fd: int | None) -> None:
        if fd is None:
            return
        # unlinked while still held: a job that opened this file meanwhile sees it is gone
        try:
            os.unlink(self.lock_path)
        except OSError:
            pass
        os.close(fd)

    def _flock_log(self, named_holder: bool) -> int:
        self._refuse_special(LogWriteError)  # opening a FIFO to read would wait for a writer
        try:  # the job writes this file anyway: a new log starts empty here
            fd = os.open(self.path, os.O_RDONLY | os.O_CREAT | os.O_NONBLOCK, 0o644)
        except OSError as exc:
            raise LogWriteError(f"cannot lock log {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            # our sidecar was free, so the holder named the file otherwise (a hard link)
            how = " under another name" if named_holder else ""
            raise LogLockedError(f"log {self.path} is in use by another tuning job{how}") from None
        except OSError as exc:
            os.close(fd)
            raise LogWriteError(f"cannot lock log {self.path}: {exc.strerror or exc}") from None
        return fd

    def _acquire_sidecar(self, path: Path) -> int | None:
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENAMETOOLONG):
                    return None  # the lock on the log itself still holds it
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
        """Write ``records`` as lines at the end of the log, flushed and fsynced before it
        returns. LogWriteError when the log cannot take them (compressed, not a regular file,
        no permission, full disk); it takes no lock (a tuning job holds ``lock``)."""
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
        try:
            os.stat(self.path)
        except (FileNotFoundError, NotADirectoryError):
            return report
        except OSError as exc:  # a name too long, no permission on a directory, ...
            raise LogReadError(f"cannot read log {self.path}: {exc.strerror or exc}") from None
        # a device reads forever (/dev/zero: one endless line in memory), a FIFO blocks
        self._refuse_special(LogReadError)
        opener = gzip.open if self.compressed else open
        # utf-8-sig: a byte-order mark that an editor put before the first record is no record
        with opener(self.path, "rt", encoding="utf-8-sig", errors="replace") as f:
            for number, line in self._lines(f, report):
                if not line.strip():
                    continue
                try:
                    record = Record.from_json(line)
                except NewerSchemaError as exc:
                    report.newer_schema += 1
                    report.newest_schema = max(report.newest_schema, exc.schema)
                    continue
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
        if warn and (message := report.warning(self.path)):
            warnings.warn(message, stacklevel=2)
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
        """Every record of the log, in order (none when the file does not exist yet); lines that
        are not records are skipped with a warning (``warn``). LogReadError when the path is not
        a regular file or no line can be read."""
        return self.load(warn).records

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records())


def load_records(paths: Iterable[str | os.PathLike] | str | os.PathLike, warn: bool = True) -> list[Record]:
    """Every record of the logs ``paths`` (one path, or several), in order. Each must exist
    (FileNotFoundError): a name mistyped would read as a log of nothing, and a model run on
    template defaults. Unreadable lines are skipped with a warning (``warn``)."""
    out: list[Record] = []
    for path in as_paths(paths):
        if not Path(path).exists():
            raise FileNotFoundError(f"log {path} does not exist")
        out.extend(RecordLog(path).records(warn))
    return out


def as_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[str | os.PathLike]:
    """``paths`` as a list: one path (a str is one name, not its characters) or several."""
    if isinstance(paths, (str, os.PathLike)):
        return [paths]
    return list(paths)


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


def to_dataframe(records: Iterable[Record] | str | os.PathLike):
    """One row per record, knob values as ``cfg.<name>`` columns, for notebooks.

    ``records``: records, or the path of one log (``str`` or ``os.PathLike``), read with
    ``load_records``. Integer columns that some rows lack (``dim.*`` and ``cfg.*`` of another
    operator) are pandas' nullable ``Int64``, not floats; the fixed columns keep their dtypes
    on an empty frame too."""
    import pandas as pd

    if isinstance(records, (str, os.PathLike)):
        records = load_records(records)
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
            "message": r.result.message,  # what the compiler, the check or the worker said
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
    # the fixed columns' dtypes even when empty: df[df["ok"]] needs bool, cummax and plots numbers
    for column, dtype in FRAME_DTYPES.items():
        frame[column] = frame[column].astype(dtype)
    for column in frame.columns[len(FRAME_COLUMNS):]:
        # integers that some rows lack (another op's dims and knobs) would turn float: 1.28e+02
        present = [row[column] for row in rows if column in row]
        if len(present) < len(rows) and all(_is_int(v) for v in present):
            frame[column] = pd.array([row.get(column) for row in rows], dtype="Int64")
    frame["best_so_far_gflops"] = frame["gflops"].astype(float).fillna(0.0).groupby(
        [frame["task"], frame["target"]]).cummax()
    return frame


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


FRAME_COLUMNS = ("trial", "op", "task", "dtype", "target", "device", "tuner", "config_index", "error", "message", "ok",
                 "seconds", "gflops", "build_s", "run_s", "timestamp", "config")
FRAME_DTYPES = {"trial": "int64", "config_index": "int64", "ok": bool, "seconds": float, "gflops": float,
                "build_s": float, "run_s": float, "timestamp": float}
