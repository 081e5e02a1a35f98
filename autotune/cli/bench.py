"""``autotune bench``: the best recorded kernel beside its baseline and the roofline, in one run."""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager

import click

from .common import (UserError, echo_json, positive, read_log, refuse_other_targets, report_stale, require_compiler,
                     resolve_target, resolve_task)
from .group import cli


@cli.command()
@click.option("--op", required=True, help="operator, see `autotune ops`")
@click.option("--shape", required=True, help="dims, e.g. M=256,N=256,K=256")
@click.option("--dtype", default="float32", show_default=True, help="element type of the arrays (`autotune ops` lists each operator's)")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="operator attribute, repeatable; VALUE is JSON when it parses (residual=true, eps=1e-6)")
@click.option("--dynamic", default="", metavar="DIM[,DIM]",
              help="dims the kernel takes at run time; --shape gives the size tuned at")
@click.option("--log", "log_path", default=None, help="tuning log; without it the template default is benched")
@click.option("--target", default="cpu", show_default=True, help="cpu or cuda (vendor baselines through torch)")
@click.option("--threads", default=None, type=int, callback=positive,
              help="cpu: threads for both sides [default: the best record's]")
@click.option("--allow-stale", is_flag=True,
              help="use records of code this version no longer builds for their config (with a warning)")
@click.option("--json", "as_json", is_flag=True, help="print the result as one JSON object")
def bench(op, shape, dtype, attrs, dynamic, log_path, target, threads, allow_stale, as_json) -> None:
    """Run the best recorded kernel and the numpy baseline side by side."""
    from records import chosen, select_best, stale_warnings

    from ..bench import bench_kernel

    tgt = resolve_target(target)
    require_compiler(tgt)  # the tuned kernel is built again here
    if threads is not None and not tgt.uses_cpu_threads:
        raise UserError("--threads is for the cpu target")
    if threads is not None and threads > len(os.sched_getaffinity(0)):
        raise UserError(f"--threads {threads}: this machine runs {len(os.sched_getaffinity(0))} thread(s) at once")
    logged = read_log(log_path) if log_path else []
    refuse_other_targets(logged, tgt, target, f"--log {log_path}")  # before its dtypes or tasks are looked at
    template, task = resolve_task(op, shape, dtype, tgt.kind, dynamic, attrs)
    space = template.space(task, tgt)
    config = None
    if log_path:
        records = [r for r in logged if r.task.key == task.key and r.target.key == tgt.key]
        if threads is not None:
            records = [r for r in records if r.config.get("threads", threads) == threads]
        outside = [r for r in records if not in_space(r, space)]
        if outside:  # written by another version of the template: counted, never run
            click.echo(f"autotune: warning: {log_path}: skipped {len(outside)} record(s) whose config is not in "
                       f"today's space of {task.op}", err=True)
            records = [r for r in records if in_space(r, space)]
        choices = select_best(records, allow_stale)
        report_stale(stale_warnings(choices), [log_path], allow_stale)
        winner = chosen(choices).get((task.key, tgt.key))
        if winner is None:
            fresh = "fresh " if choices else ""  # there were verified records, all of them stale
            elsewhere = sorted({r.target.key for r in logged if r.ok and r.task.key == task.key} - {tgt.key})
            # the op's other tasks in the log: one tuned with --dynamic, or other attributes, is another task
            others = sorted({r.task.key for r in logged if r.ok and r.task.op == task.op and r.task.key != task.key})
            raise UserError(f"{log_path} has no {fresh}verified record for {task.key} on {tgt.key}"
                            + (f" with threads={threads}" if threads else "")
                            + (f"; it has some measured on {', '.join(elsewhere)}, another machine" if elsewhere else "")
                            + (f"; its {task.op} tasks: {', '.join(others[:3])}{' ...' if len(others) > 3 else ''}"
                               " (a dim tuned with --dynamic is written DIM~=N)" if others and not elsewhere else ""))
        config = winner.to_config(space)
    else:
        config = template.default(task, tgt)
        if threads is not None and "threads" in space.names:
            values = dict(config.as_dict(), threads=threads)
            if space.is_valid(values):
                config = space.from_values(values)
    with waiting(f"benching {task.op}: tuned kernel, baseline, roofline probes"):
        result = bench_kernel(task, tgt, config, threads)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(result.summary())
    if result.error:
        sys.exit(1)


@contextmanager
def waiting(text: str):
    """A spinner with ``text`` on a terminal while the work runs (a bench takes 10 s or more)."""
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(file=sys.stderr).status(text):
        yield


def in_space(record, space) -> bool:
    try:
        record.to_config(space)
    except (KeyError, ValueError, IndexError):
        return False
    return True
