"""What the records a job resumes hold that makes its results mean less than they seem.

A job counts the records already in its log toward its budget and reports the best of them
with its own. Two kinds among them are said as they are resumed, before anything is measured:
records another tuner measured (tuners are compared on logs of their own), and records timed
in another cache condition than the job's (a cold job's best would be a warm time).
"""
from __future__ import annotations

from typing import Callable, Iterable

from records import Record, RecordLog

REMEASURE = "remeasure"  # the tuner name of records that measured a stale record's config again


def other_tuners(records: Iterable[Record], tuner: str) -> str:
    """"N by random, M by grid": the records that a tuner other than ``tuner`` measured; "" for none."""
    counts: dict[str, int] = {}
    for record in records:
        if record.tuner not in (tuner, REMEASURE):
            counts[record.tuner] = counts.get(record.tuner, 0) + 1
    return ", ".join(f"{n} by {name}" for name, n in sorted(counts.items()))


def other_conditions(records: Iterable[Record], condition: str | None) -> str:
    """"N records timed cold" (or warm, or with no condition recorded, or by the older cycle) of
    the verified ``records`` whose cache condition is not ``condition``; "" when there are none
    (or the target times in no condition: the GPU's runner)."""
    if condition is None:
        return ""
    counts: dict[str, int] = {}
    for record in records:
        if not record.ok:
            continue
        stats = record.result.stats
        other = stats.get("cache", "with no cache condition recorded")
        if other == condition and stats.get("input_copies", 1) > 1 and "cycle_bytes" not in stats:
            other = (f"timed {condition} by the older cycle of input copies (each sample started again at "
                     "the first copy, which finds the weights nearer than the model does)")
        if other != condition:
            counts[other] = counts.get(other, 0) + 1
    return ", ".join(f"{n} records timed {c}" if c in ("cold", "warm") else f"{n} records {c}"
                     for c, n in sorted(counts.items()))


class ResumeNote:
    """A tuner callback: on the first call (the resumed records, before anything is measured)
    says which of them another tuner measured and which were timed in another cache condition."""

    def __init__(self, job, log: RecordLog, note: Callable[[str], None]):
        self.job, self.log, self.note, self.done = job, log, note, False

    def __call__(self, tuner, inputs, results, records: list[Record], first: int) -> None:
        if self.done:
            return
        self.done = True
        task = self.job.task.key
        others = other_tuners(records, self.job.tuner)
        if others:
            self.note(f"autotune: warning: {self.log.path} holds records of {task} measured by other tuners "
                      f"({others}): they count toward --trials and show in this run as {self.job.tuner}'s; "
                      "compare tuners on logs of their own")
        condition = self.job.cache_condition()
        mixed = other_conditions(records, condition)
        if mixed:
            self.note(f"autotune: warning: {self.log.path} holds {mixed} of {task}; this job times {condition} "
                      "and resumes them as they are, so its best time mixes both (a new --log tunes in one "
                      "condition only)")
