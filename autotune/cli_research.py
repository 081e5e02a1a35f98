"""Research commands of the ``autotune`` CLI: ``sweep`` (measure a space) and ``replay``
(compare tuners offline on a sweep). Registered on the ``cli`` group by autotune/cli.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import UserError, cli, echo_json, open_log, positive, resolve_target, resolve_task, thread_restriction


@cli.command()
@click.option("--op", required=True, help="operator, see `autotune ops`")
@click.option("--shape", required=True, help="dims, e.g. M=256,N=256,K=256")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--target", default="cpu", show_default=True, help="cpu")
@click.option("--sample", default=None, type=int, callback=positive,
              help="measure a seeded random subset of this many configs [default: the whole space]")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the subset and of the inputs")
@click.option("--threads", default=None, type=int, callback=positive, help="sweep only configs with this many threads")
@click.option("--batch", default=16, show_default=True, type=int, callback=positive, help="configs built in parallel")
@click.option("--log", "log_path", required=True, help="JSONL log of the sweep (resumed)")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI")
@click.option("--no-mlflow", is_flag=True, help="do not log to MLflow")
@click.option("--experiment", default="llm-autotune-sweeps", show_default=True, help="MLflow experiment")
@click.option("--build-timeout", default=60.0, show_default=True, type=float)
@click.option("--run-timeout", default=20.0, show_default=True, type=float)
@click.option("--quiet", is_flag=True, help="no progress bar")
def sweep(op, shape, dtype, target, sample, seed, threads, batch, log_path, tracking_uri, no_mlflow, experiment,
          build_timeout, run_timeout, quiet) -> None:
    """Measure a whole space, or a stated random subset of it, into a log for `replay`."""
    from .tuners import SweepTuner
    from .tuning import run_tuning_job

    tgt = resolve_target(target)
    if tgt.kind != "cpu":
        raise UserError("sweeps on cuda are not available yet: use --target cpu")
    template, task = resolve_task(op, shape, dtype, tgt.kind)
    restrict = thread_restriction(template, task, tgt, threads)
    log = open_log(log_path)
    plan = set(SweepTuner(task, tgt, template, seed=seed, restrict=restrict, sample=sample).plan)
    # records of this task from an earlier sweep with another plan count toward the total too
    earlier = {r.config_index for r in log.records(warn=False)
               if r.task.key == task.key and r.target.key == tgt.key and r.config_index not in plan}
    summary = run_tuning_job(task, tgt, "sweep", len(plan) + len(earlier), batch, seed, log,
                             tracking_uri=None if no_mlflow else tracking_uri, use_mlflow=not no_mlflow,
                             experiment=experiment, build_timeout=build_timeout, run_timeout=run_timeout,
                             progress=not quiet, restrict=restrict, tuner_options={"sample": sample},
                             params={"sample": sample if sample is not None else "all"})
    ok = [r for r in summary.records if r.ok]
    click.echo(f"{task.key}: swept {len(plan)} of the space's configs ({summary.resumed} resumed, "
               f"{summary.measured} measured now, {summary.failed} failed) in {summary.wall_s:.1f} s")
    if ok:
        top = max(r.gflops for r in ok)
        near = sum(1 for r in ok if r.gflops >= 0.95 * top) / len(ok)
        click.echo(f"best {top:.1f} GFLOP/s; {near * 100:.1f}% of the verified configs are within 95% of it")
    click.echo(f"log: {log.path}")
