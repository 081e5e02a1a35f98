"""The ``autotune`` command line: one module per group of commands, each registering its
commands on the click group of ``group.py``, which imports none of them.

    group.py         the click group and ``main`` (every failure as one line)
    common.py        parsing targets, tasks and logs; building and running a TuningJob
    tune.py          ops, tune, best
    bench.py         bench
    model.py         tune-model, run
    research.py      sweep, replay
    library.py       export
    cache.py         cache
"""
from __future__ import annotations

from . import bench, cache, library, model, research, tune  # noqa: F401  (each registers its commands on cli)
from .common import resolve_target, resolve_task
from .group import UserError, cli, main

__all__ = ["UserError", "cli", "main", "resolve_target", "resolve_task"]
