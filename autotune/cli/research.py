"""Research commands of the ``autotune`` CLI: ``sweep`` (measure a space) and ``replay``
(compare tuners offline on a sweep).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
from click.core import ParameterSource

from .common import (ManyValues, UserError, check_timeouts, check_tracking, load_logs, make_job, open_log, positive, refuse_overwriting,
                     resolve_target, resolve_task, run_tuning, restriction, seed_option, job_options, timing_options,
                     timing_policy)
from ..units import format_rate, format_time
from .group import cli


@cli.command()
@click.option("--op", required=True, help="operator, see `autotune ops`")
@click.option("--shape", required=True, help="dims, e.g. M=256,N=256,K=256")
@click.option("--dtype", default="float32", show_default=True, help="element type of the arrays (`autotune ops` lists each operator's)")
@click.option("--target", default="cpu", show_default=True, help="cpu")
@click.option("--sample", default=None, type=int, callback=positive,
              help="measure a seeded random subset of this many configs [default: the whole space]")
@click.option("--seed", default=0, show_default=True, type=int, callback=seed_option, help="seed of the subset and of the inputs")
@click.option("--restrict", "restrict_items", multiple=True, metavar="KNOB=V[,V]",
              help="search only these values of a knob, repeatable (vec=8,16)")
@click.option("--threads", default=None, type=int, callback=positive, help="sweep only configs with this many threads")
@click.option("--batch", default=16, show_default=True, type=int, callback=positive, help="configs built in parallel")
@click.option("--log", "log_path", required=True, help="JSONL log of the sweep (resumed)")
@job_options(experiment="llm-autotune-sweeps")
@timing_options(repeats=7, min_sample_ms=5.0)
@click.option("--quiet", is_flag=True, help="no progress bar")
def sweep(op, shape, dtype, target, sample, seed, restrict_items, threads, batch, log_path, tracking_uri, no_mlflow,
          experiment, build_timeout, run_timeout, repeats, min_sample_ms, quiet) -> None:
    """Measure a whole space, or a stated random subset of it, into a log for `replay`."""
    from autotune.tuners import SweepTuner
    from measure import TimingPolicy

    check_tracking(tracking_uri, no_mlflow)
    check_timeouts(build_timeout=build_timeout)
    timing = timing_policy(repeats, min_sample_ms, run_timeout, TimingPolicy())  # checks --run-timeout too
    tgt = resolve_target(target)
    template, task = resolve_task(op, shape, dtype, tgt.kind)
    restrict = restriction(template, task, tgt, threads, restrict_items)
    log = open_log(log_path)
    plan = set(SweepTuner(task, tgt, template, seed=seed, restrict=restrict, sample=sample).plan)
    # records of this task from an earlier sweep with another plan count toward the total too
    earlier = {r.config_index for r in log.records(warn=False)
               if r.task.key == task.key and r.target.key == tgt.key and r.config_index not in plan}
    job = make_job(target=tgt, task=task, tuner="sweep", trials=len(plan) + len(earlier), batch=batch, seed=seed,
                   log=log.path, restrict=restrict, tuner_options={"sample": sample}, mlflow=not no_mlflow,
                   tracking_uri=tracking_uri, experiment=experiment, build_timeout=build_timeout,
                   run_timeout=run_timeout, timing=timing,
                   extra_params={"sample": sample if sample is not None else "all", "repeats": repeats,
                           "min_sample_ms": min_sample_ms})
    summary = run_tuning(job, progress=not quiet)
    ok = [r for r in summary.records if r.ok]
    # a sweep resumed with another --sample or --seed: the log holds the earlier plan's configs too
    click.echo(f"{task.key}: swept {len(plan) + len(earlier)} of the space's configs ({summary.resumed} resumed, "
               f"{summary.measured} measured now, {summary.failed} failed) in {summary.wall_s:.1f} s")
    if ok:
        best = max(ok, key=lambda r: r.gflops)
        near = sum(1 for r in ok if r.gflops >= 0.95 * best.gflops) / len(ok)
        click.echo(f"best {format_rate(task, best.seconds)} ({format_time(best.seconds)}); "
                   f"{near * 100:.1f}% of the verified configs are within 95% of it")
    click.echo(f"log: {log.path}")


REPLAY_REPORT = "autotune replay"  # the report's "kind": an earlier one (and its plot) may be replaced unnamed
DEFAULT_REPORT = "replay.json"


def _sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _written_by_replay(path: str, reports) -> bool:
    """Whether ``path`` holds what an earlier replay wrote: one of the ``reports`` (an earlier
    replay's report), or the plot such a report names, as it wrote it (its sha256). Replay's
    default files are replaced only then, never a file of the same name the user keeps there."""
    target = str(Path(path).resolve())
    for report_path in reports:
        try:
            report = json.loads(Path(report_path).read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(report, dict) or report.get("kind") != REPLAY_REPORT:
            continue
        if target == str(Path(report_path).resolve()):
            return True
        if target == report.get("plot") and report.get("plot_sha256") == _sha256(path):
            return True
    return False


@cli.command()
@click.option("--log", "logs", cls=ManyValues, required=True, help="sweep log(s) to replay on (.jsonl or .jsonl.gz)")
@click.option("--tuners", default="xgb,random,optuna-tpe", show_default=True, help="comma-separated tuner names")
@click.option("--seeds", default=20, show_default=True, type=int, callback=positive, help="runs of each tuner, one per seed")
@click.option("--trials", default=200, show_default=True, type=int, callback=positive, help="budget of each run")
@click.option("--batch", default=8, show_default=True, type=int, callback=positive, help="configs a tuner proposes at once")
@click.option("--transfer-from", "transfer_from", cls=ManyValues,
              help="logs of other tasks: adds xgb+transfer, xgb starting from a model pre-trained on them")
@click.option("--statistic", default="median", show_default=True, type=click.Choice(["median", "min"]),
              help="recorded time to answer with: the median of the timed samples, or their minimum")
@click.option("--xgb-rounds", default=None, type=int, callback=positive, help="boosting rounds per refit [default: 80]")
@click.option("--json", "json_path", default=DEFAULT_REPORT, show_default=True, help="write the full report here")
@click.option("--plot", "plot_path", default="replay.png", show_default=True, help="write the convergence plot here")
@click.option("--quiet", is_flag=True, help="no progress lines")
def replay(logs, tuners, seeds, trials, batch, transfer_from, statistic, xgb_rounds, json_path, plot_path, quiet) -> None:
    """Compare tuners on recorded sweeps without hardware: trials to 90%/95% of the best over seeds."""
    from cost_model import XGBConfig

    from autotune.compare import compare_tuners, format_table, plot_convergence, plot_formats, to_json
    from autotune.replay import TRANSFER, RecordedSpace
    from autotune.tuners import TUNERS

    names = list(dict.fromkeys(t.strip() for t in tuners.split(",") if t.strip()))  # each tuner once
    allowed = [t for t in TUNERS if t != "sweep"]
    unknown = [t for t in names if t not in allowed and t != TRANSFER]
    if unknown or not names:
        raise UserError(f"--tuners: unknown tuner {', '.join(unknown) or '(none given)'}: choose from {', '.join(allowed)}")
    if TRANSFER in names and not transfer_from:
        raise UserError(f"--tuners {TRANSFER} needs --transfer-from")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        parent = Path(path).parent
        if not parent.is_dir():
            raise UserError(f"cannot write {path}: directory {parent} does not exist")
        if Path(path).is_dir():
            raise UserError(f"cannot write {path}: it is a directory")
        refuse_overwriting(option, path, [*logs, *(transfer_from or ())])
    if Path(plot_path).resolve() == Path(json_path).resolve():
        raise UserError(f"--json and --plot both name {json_path}: the report and the plot are two files")
    formats = plot_formats()
    if Path(plot_path).suffix.lstrip(".").lower() not in formats:  # known before the replay, not after it
        raise UserError(f"--plot {plot_path}: the plot is written as .{', .'.join(sorted(formats))}")
    for option, path in (("--json", json_path), ("--plot", plot_path)):
        named = click.get_current_context().get_parameter_source(option.lstrip("-") + "_path")
        if (named is ParameterSource.DEFAULT and Path(path).exists()
                and not _written_by_replay(path, {json_path, DEFAULT_REPORT})):
            raise UserError(f"{path} exists and is not an earlier replay's: name where to write with {option} PATH "
                            "(a file named there is replaced)")
    records = load_logs(logs)
    try:
        spaces = RecordedSpace.from_records(records, statistic)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if not spaces:
        raise UserError(f"no verified record in {', '.join(logs)} lies in a space of today's templates: "
                        "nothing to replay")
    transfer = load_logs(transfer_from) if transfer_from else []
    model_config = XGBConfig(num_rounds=xgb_rounds) if xgb_rounds else None
    progress = None if quiet else (lambda line: click.echo(line, err=True))
    try:
        report = compare_tuners(spaces, names, seeds, trials, batch, transfer, model_config, progress=progress)
    except ValueError as exc:  # e.g. nothing to pre-train on
        raise UserError(str(exc)) from None
    report.update({"kind": REPLAY_REPORT, "logs": list(logs), "transfer_from": list(transfer_from or []),
                   "statistic": statistic, "xgb_rounds": xgb_rounds or XGBConfig().num_rounds})
    plot_convergence(report, plot_path)
    # the plot as written: a later replay replaces it unnamed only while it is still this file
    report.update(plot=str(Path(plot_path).resolve()), plot_sha256=_sha256(plot_path))
    Path(json_path).write_text(to_json(report))
    click.echo(format_table(report))
    click.echo(f"report: {json_path}; plot: {plot_path}")
