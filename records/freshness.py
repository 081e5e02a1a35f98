"""Whether a record still describes the code this version builds for its config.

Every record keeps the identity of the code it measured (``Record.code``): the digest of the
rendered source with its compile flags, and the compiler that built it (LLVM for the CPU,
nvcc for CUDA). Export, ``TunedKernels``, ``autotune best`` and ``autotune bench`` build a
record's config again with today's template and compiler; when that makes other code, the
record's time is a claim about code nobody builds any more: the record is *stale*.

- fresh: today's template renders the config to the same digest, and the compiler is the
  same (or one side does not say which: records from before records kept it, a machine
  without nvcc);
- stale: another digest, another compiler, or a config today's template no longer has;
- unknown: the record keeps no digest (a runner that records none, a record written by
  hand): nothing says it is stale, so it is used as before.

A stale record whose config was measured again on today's code (a fresh record of the same
config, from ``autotune tune --remeasure-stale``) is *superseded*: the log keeps it, but it
is neither reported nor measured again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from measure.builder import artifact_flags, compiler_identity
from search_space import Target, Task, get_template

from .record import CodeIdentity, Record

FRESH, STALE, UNKNOWN = "fresh", "stale", "unknown"


class StaleRecordsWarning(UserWarning):
    """Records of a task were measured on code this version no longer builds for their config.
    ``remeasurable``: whether any of them has a config today's template still has (those
    ``tune --remeasure-stale`` can measure again)."""

    def __init__(self, message: str, remeasurable: bool = True):
        super().__init__(message)
        self.remeasurable = remeasurable


class CodeCheck:
    """Compares records with what this version builds for their configs, rendering each
    (task, target, config) once."""

    def __init__(self) -> None:
        self._today: dict[tuple[str, str, str], CodeIdentity | str] = {}
        self._compilers: dict[str, str] = {}

    def today(self, record: Record) -> CodeIdentity | str:
        """The identity of the code this version builds for the record's config, or why it
        cannot build that config."""
        key = (record.task.key, record.target.key, record.config_key)
        if key not in self._today:
            self._today[key] = self._build_identity(record)
        return self._today[key]

    def _build_identity(self, record: Record) -> CodeIdentity | str:
        task, target = record.task, record.target
        try:
            template = get_template(task.op, target.kind)
            source = template.render(task, record.to_config(template.space(task, target)), target)
        except (KeyError, ValueError) as exc:
            detail = exc.args[0] if exc.args else exc
            return f"today's template does not have their config: {detail}"
        if target.kind not in self._compilers:
            self._compilers[target.kind] = compiler_identity(target)
        return CodeIdentity(source.digest(artifact_flags(target)), self._compilers[target.kind])

    def status(self, record: Record) -> tuple[str, str]:
        """FRESH, STALE or UNKNOWN, and for STALE why."""
        measured = record.code
        if measured is None:
            return UNKNOWN, ""
        today = self.today(record)
        if isinstance(today, str):
            return STALE, today
        if measured.digest != today.digest:
            return STALE, "today's template renders their config to other code"
        if measured.compiler and today.compiler and measured.compiler != today.compiler:
            return STALE, f"built by {measured.compiler}, this machine has {today.compiler}"
        return FRESH, ""

    def buildable(self, record: Record) -> bool:
        """Whether today's template has the record's config (a stale one may still be built)."""
        return not isinstance(self.today(record), str)


@dataclass
class TaskChoice:
    """The record used for one (task, target), and the stale records passed over for it."""

    task: Task
    target: Target
    record: Record | None = None  # None: every verified record is stale
    stale: int = 0                # stale verified records faster than ``record``, superseded ones not counted
    reason: str = ""              # why the first of them (or ``record`` itself) is stale
    uses_stale: bool = False      # ``record`` is stale (allowed by the caller)
    outside: int = 0              # of the ``stale`` ones, those whose config today's template lacks

    @property
    def remeasurable(self) -> bool:
        """Whether some of the stale records can be measured again (their config is still in the space)."""
        return self.stale > self.outside

    def note(self) -> str | None:
        """One line for the user about stale records, or None when none was in the way."""
        where = f"{self.task.key} on {self.target.key}"
        if self.uses_stale:
            return f"{where}: using a stale record ({self.reason})"
        if not self.stale:
            return None
        if self.record is None:
            note = f"{where}: all {self.stale} verified record(s) are stale ({self.reason}); none is used"
        else:
            note = f"{where}: {self.stale} faster stale record(s) skipped ({self.reason})"
        if self.outside == self.stale:
            note += f"; none of them is in today's space of {self.task.op}, so none can be measured again"
        elif self.outside:
            note += (f"; {self.outside} of them are not in today's space of {self.task.op} and cannot be "
                     "measured again")
        return note

    def warning(self) -> StaleRecordsWarning | None:
        """The note as the warning export and TunedKernels raise, or None."""
        note = self.note()
        return StaleRecordsWarning(note, self.remeasurable) if note else None


def stale_warnings(choices: Iterable[TaskChoice]) -> list[StaleRecordsWarning]:
    """One warning per choice that passed over stale records (or uses one)."""
    return [w for w in (c.warning() for c in choices) if w is not None]


def _by_config(records: list[Record]) -> dict[str, list[Record]]:
    out: dict[str, list[Record]] = {}
    for record in records:
        out.setdefault(record.config_key, []).append(record)
    return out


def _superseded(record: Record, same_config: list[Record], check: CodeCheck) -> bool:
    """A stale record whose config also has a record of today's code."""
    return any(other.code is not None and check.status(other)[0] == FRESH for other in same_config)


def select_best(records: Iterable[Record], allow_stale: bool = False,
                check: CodeCheck | None = None) -> list[TaskChoice]:
    """The fastest usable verified record of every (task, target) in ``records``.

    Stale records are skipped (each choice counts them) unless ``allow_stale``: then the
    fastest verified record is used whatever its code, as long as today's template still has
    its config. Only as many records are rendered as it takes to find a usable one."""
    check = check or CodeCheck()
    groups: dict[tuple[str, str], list[Record]] = {}
    for record in records:
        groups.setdefault((record.task.key, record.target.key), []).append(record)
    choices = []
    for items in groups.values():
        # sorted() keeps the log's order among equal times: the first of them wins, as in best_records
        verified = sorted((r for r in items if r.ok), key=lambda r: r.seconds)
        if not verified:
            continue
        configs = _by_config(items)
        choice = TaskChoice(verified[0].task, verified[0].target)
        for record in verified:
            status, reason = check.status(record)
            if status != STALE:
                choice.record = record
                break
            if allow_stale and check.buildable(record):
                choice.record, choice.uses_stale, choice.reason = record, True, reason
                break
            if not _superseded(record, configs[record.config_key], check):
                choice.stale += 1
                choice.outside += not check.buildable(record)
                choice.reason = choice.reason or reason
        choices.append(choice)
    return choices


def chosen(choices: Iterable[TaskChoice]) -> dict[tuple[str, str], Record]:
    """The records the choices use, by (task key, target key), as ``best_records`` returns them."""
    return {(c.task.key, c.target.key): c.record for c in choices if c.record is not None}


def stale_configs(records: Iterable[Record], task: Task, target: Target,
                  check: CodeCheck | None = None) -> tuple[list[Record], int]:
    """What ``--remeasure-stale`` measures again for ``task`` on ``target``: one stale verified
    record per config that no fresh record supersedes (the fastest of the config's, in the log's
    order of configs), and the number of stale configs today's template no longer has (those
    cannot be measured again)."""
    check = check or CodeCheck()
    items = [r for r in records if r.task.key == task.key and r.target.key == target.key]
    again, lost = [], 0
    for same_config in _by_config(items).values():
        stale = [r for r in same_config if r.ok and check.status(r)[0] == STALE]
        if not stale or _superseded(stale[0], same_config, check):
            continue
        if check.buildable(stale[0]):
            again.append(min(stale, key=lambda r: r.seconds))
        else:
            lost += 1
    return again, lost
