"""``autotune ops``, ``tune`` and ``best``: the operators, tuning one of them, the best configs."""
from __future__ import annotations

import json
import sys

import click

from ..units import format_rate, format_time, rate
from .common import (ManyValues, UserError, check_model_files, check_timeouts, check_tracking, cluster_options_given, echo_json, load_logs,
                     make_job, open_log, positive, read_log, report_stale, require_compiler, resolve_target, resolve_task,
                     run_tuning,
                     restriction, seed_option, job_options, timing_options, timing_policy)
from .group import cli


@cli.command()
@click.option("--target", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
@click.option("--op", default=None, help="list this operator's knobs and their values (for --restrict) instead")
@click.option("--shape", default=None, help="with --op: the dims to list them at [default: the example shape]")
@click.option("--dtype", default=None, help="with --op: the element type [default: the operator's first]")
def ops(target: str, as_json: bool, op: str | None, shape: str | None, dtype: str | None) -> None:
    """List the operator templates for a target, or one operator's knobs (--op)."""
    from search_space import format_shape, list_templates

    kind = "cuda" if target == "cuda" or target.startswith("sm_") else target
    if kind not in ("cpu", "cuda"):
        raise UserError(f"unknown target {target!r}: use cpu or cuda")
    if op is not None:
        _knobs(op, shape, dtype, kind, target, as_json)
        return
    if shape is not None or dtype is not None:
        raise UserError("--shape and --dtype are for --op")
    templates = list_templates(kind)
    rows = [{"op": t.op, "dims": list(t.dims), "example_shape": format_shape(t.example_shape),
             "dtypes": list(t.dtypes), "dynamic_dims": list(t.dynamic_dims), "attrs": dict(t.default_attrs),
             "attr_docs": {k: t.attr_docs.get(k, "") for k in t.default_attrs}, "description": t.description}
            for t in templates]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no templates for target {kind} yet")
        return
    # one line per operator, its attributes below it: nothing runs past a column of another row
    for r in rows:
        dynamic = f"; --dynamic {','.join(r['dynamic_dims'])}" if r["dynamic_dims"] else ""
        click.echo(f"{r['op']}: {r['description']}")
        click.echo(f"    --shape {r['example_shape']}  ({'/'.join(r['dtypes'])}{dynamic})")
        for key, value in r["attrs"].items():
            click.echo(f"    --attr {key}={json.dumps(value)}  {r['attr_docs'][key]}")


def _knobs(op: str, shape: str | None, dtype: str | None, kind: str, target: str, as_json: bool) -> None:
    """``ops --op``: the knobs of ``op``'s space at a shape, on this CPU or a CUDA arch (the
    values depend on both: vector widths, thread counts, tiles that fit)."""
    from search_space import format_shape, get_template

    try:
        template = get_template(op, kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tgt = resolve_target("sm_90a" if target == "cuda" else target, compile_only=True)
    _, task = resolve_task(op, shape or format_shape(template.example_shape), dtype or template.dtypes[0], kind)
    space = template.space(task, tgt)
    rows = [{"knob": knob.name, "values": list(knob.values)} for knob in space.knobs]
    if as_json:
        echo_json({"task": task.key, "target": tgt.key, "knobs": rows, "size": len(space)})
        return
    click.echo(f"{task.key} on {tgt.key}: {len(space)} configs before constraints; --restrict KNOB=V[,V] keeps values")
    for row in rows:
        click.echo(f"    {row['knob']}: {', '.join(map(str, row['values']))}")


@cli.command()
@click.option("--op", default=None, help="operator, see `autotune ops` (required unless --remeasure-stale)")
@click.option("--shape", default=None, help="dims, e.g. M=256,N=256,K=256 (required with --op)")
@click.option("--dtype", default="float32", show_default=True, help="element type of the arrays (`autotune ops` lists each operator's)")
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="operator attribute, repeatable; VALUE is JSON when it parses (residual=true, eps=1e-6)")
@click.option("--dynamic", default="", metavar="DIM[,DIM]",
              help="dims the kernel takes at run time; --shape gives the size tuned at")
@click.option("--target", default="cpu", show_default=True, help="cpu, cuda (this machine's GPU 0) or an arch like sm_90a (compile-only, no GPU needed)")
@click.option("--tuner", default="xgb", show_default=True,
              type=click.Choice(["xgb", "random", "grid", "optuna-tpe", "optuna-cmaes"]), help="xgb: a learned cost model (XGBoost) ranks the candidates; random, grid; Optuna's TPE and CMA-ES")
@click.option("--trials", default=64, show_default=True, type=int, callback=positive,
              help="total trials for this task, records already in the log included")
@click.option("--batch", default=8, show_default=True, type=int, callback=positive, help="candidates built and measured per round")
@click.option("--seed", default=0, show_default=True, type=int, callback=seed_option, help="seed of the tuner and the inputs")
@click.option("--log", "log_path", default="tune.jsonl", show_default=True, help="JSONL tuning log (resumed)")
@job_options(experiment="llm-autotune")
@click.option("--restrict", "restrict_items", multiple=True, metavar="KNOB=V[,V]",
              help="search only these values of a knob, repeatable (vec=8,16)")
@click.option("--threads", default=None, type=int, callback=positive,
              help="search only configs with this many threads")
@click.option("--transfer-from", "transfer_from", cls=ManyValues,
              help="xgb: pre-train the cost model on these logs of other shapes/operators first")
@click.option("--load-model", default=None, help="xgb: start from a cost model saved by --save-model")
@click.option("--save-model", default=None, help="xgb: save the cost model here when the job ends")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--compile-only", is_flag=True,
              help="cuda or sm_XX: build --trials configs and check their resources; run nothing")
@click.option("--json", "as_json", is_flag=True,
              help="print the result as one JSON object (with --compile-only: a JSON list of the candidates)")
@click.option("--cold-cache", is_flag=True,
              help="cpu: time with the inputs out of cache, as in a model (tune-model always does)")
@click.option("--time-limit", default=None, type=float, metavar="SECONDS",
              help="start no new batch after this many seconds (the budget may be left unspent)")
@click.option("--early-stopping", default=None, type=int, callback=positive, metavar="N",
              help="stop once the last N trials found no faster config")
@timing_options()
@click.option("--remeasure-stale", is_flag=True,
              help="search nothing: measure again the configs of the log's stale records (code this version no "
                   "longer builds for their config) and append fresh records; with --op/--shape, that task's only")
def tune(op, shape, dtype, attrs, dynamic, target, tuner, trials, batch, seed, log_path, tracking_uri, no_mlflow,
         experiment, build_timeout, run_timeout, restrict_items, threads, transfer_from, load_model, save_model, quiet,
         compile_only, as_json, cold_cache, time_limit, early_stopping, repeats, min_sample_ms, remeasure_stale) -> None:
    """Tune one operator instance; every measurement goes to the log. With --remeasure-stale,
    measure the log's stale records again instead."""
    from measure.backends import get_backend

    check_tracking(tracking_uri, no_mlflow)
    if remeasure_stale:
        if compile_only or target.startswith("sm_"):
            raise UserError("--remeasure-stale measures: it needs --target cpu or cuda, not --compile-only")
        if as_json:
            raise UserError("--json is for tuning and --compile-only, not --remeasure-stale")
        if shape is not None and op is None:
            raise UserError("--shape needs --op")
        tgt = resolve_target(target)
        timing = timing_policy(repeats, min_sample_ms, run_timeout, get_backend(tgt.kind).default_policy)
        remeasure(op, shape, dtype, attrs, dynamic, tgt, log_path, batch, seed, not no_mlflow,
                  tracking_uri, experiment, build_timeout, run_timeout, cold_cache, quiet, timing)
        return
    if op is None or shape is None:
        raise UserError("--op and --shape are required (or --remeasure-stale to measure a log's stale records again)")
    compile_only = compile_only or target.startswith("sm_")
    tgt = resolve_target(target, compile_only)
    if compile_only and not get_backend(tgt.kind).resource_report:
        raise UserError("--compile-only is for CUDA targets: use --target cuda or an arch like sm_90a")
    if compile_only and cluster_options_given():
        raise UserError("--compile-only builds on this machine and measures nothing: --cluster is for measuring")
    if threads is not None and not tgt.uses_cpu_threads:
        raise UserError("--threads is for the cpu target")
    if cold_cache and not tgt.uses_cpu_threads:
        raise UserError("--cold-cache is for the cpu target")
    if compile_only and (time_limit is not None or early_stopping is not None):
        raise UserError("--time-limit and --early-stopping end a search; --compile-only builds --trials configs")
    if compile_only and (repeats is not None or min_sample_ms is not None):
        raise UserError("--repeats and --min-sample-ms say how candidates are timed; --compile-only times nothing")
    template, task = resolve_task(op, shape, dtype, tgt.kind, dynamic, attrs)
    if compile_only:
        from ..compile_only import compile_only_report, format_compile_report

        check_timeouts(build_timeout=build_timeout)
        require_compiler(tgt)
        try:
            rows = compile_only_report(task, tgt, trials, seed, build_timeout,
                                       restriction(template, task, tgt, threads, restrict_items))
        except ValueError as exc:
            raise UserError(f"--restrict: {exc}") from None
        if as_json:
            echo_json(rows)
        else:
            click.echo(format_compile_report(task, tgt, rows))
        if not any(r["status"] == "NO_ERROR" for r in rows):
            sys.exit(1)
        return
    check_model_files(tuner, transfer_from, load_model, save_model, log_path)
    timing = timing_policy(repeats, min_sample_ms, run_timeout, get_backend(tgt.kind).default_policy)
    job = make_job(target=tgt, task=task, tuner=tuner, trials=trials, batch=batch, seed=seed, log=open_log(log_path).path,
                   restrict=restriction(template, task, tgt, threads, restrict_items), transfer_from=tuple(transfer_from or ()),
                   load_model=load_model, save_model=save_model, mlflow=not no_mlflow, tracking_uri=tracking_uri,
                   experiment=experiment, build_timeout=build_timeout, run_timeout=run_timeout,
                   cache="cold" if cold_cache else "auto", time_limit=time_limit, early_stopping=early_stopping,
                   timing=timing)
    summary = run_tuning(job, progress=not quiet)
    best = summary.best
    note = timing_note(best, job.target) if best is not None and job.cluster is None else ""  # this machine's load says nothing there
    if note:
        click.echo(f"autotune: {note}", err=True)
    if as_json:
        echo_json({"task": task.key, "target": job.target.key, "trials": summary.trials, "resumed": summary.resumed,
                   "measured": summary.measured, "failed": summary.failed,
                   "resumed_failed": summary.resumed_failed, "stopped": summary.stopped or None,
                   "wall_s": summary.wall_s,
                   "best": None if best is None else {"seconds": best.seconds, "gflops": best.gflops,
                                                      "rate": rate(task, best.seconds)[0],
                                                      "rate_unit": rate(task, best.seconds)[1], "config": best.config},
                   "log": str(job.log)})
        return
    failed = summary.failed + summary.resumed_failed
    failed_now = f", {summary.failed} of them now" if summary.resumed else ""
    click.echo(f"{task.key}: {summary.trials} trials ({summary.resumed} resumed from the log, "
               f"{summary.measured} measured now; {failed} failed{failed_now}) in {summary.wall_s:.1f} s; "
               f"compile share {summary.compile_share * 100:.0f}%")
    if summary.stopped:
        click.echo(f"stopped before --trials {trials}: {summary.stopped}")
    for each in getattr(summary, "by_target", ()):  # a cluster of several kinds of machine: each its own best
        fastest = f"{format_time(each.best.seconds)}, {format_rate(task, each.best.seconds)}, config " \
                  f"{json.dumps(each.best.config)}" if each.best else "no candidate verified"
        click.echo(f"  on {each.target.key} ({each.target.device_name}): {each.trials} trials, best {fastest}")
    if best is None:
        click.echo("no candidate verified; nothing is best")
    else:
        click.echo(f"best: {format_time(best.seconds)}, {format_rate(task, best.seconds)}, config {json.dumps(best.config)}")
    click.echo(f"log: {job.log}")


def remeasure(op, shape, dtype, attrs, dynamic, tgt, log_path, batch, seed, mlflow, tracking_uri, experiment,
              build_timeout, run_timeout, cold_cache, quiet, timing=None) -> None:
    """``tune --remeasure-stale``: one job per task of the log (or the task given) that has stale
    records on this target."""
    from records import CodeCheck, stale_configs

    records = read_log(log_path)  # first: a log that does not exist is an error here, not a new log
    log = open_log(log_path)
    if op is not None:
        tasks = [resolve_task(op, shape, dtype, tgt.kind, dynamic, attrs)[1]]
    else:
        tasks = list({r.task.key: r.task for r in records if r.target.key == tgt.key}.values())
        elsewhere = sorted({r.target.key for r in records} - {tgt.key})
        if elsewhere:
            click.echo(f"autotune: warning: {log_path}: records of {', '.join(elsewhere)} are not measured again "
                       f"here ({tgt.key})", err=True)
    check, todo = CodeCheck(), []
    for task in tasks:
        again, lost = stale_configs(records, task, tgt, check)
        if again:
            todo.append((task, again))
        elif lost:  # with configs to measure, the job says this itself
            click.echo(f"autotune: warning: {task.key}: {lost} stale config(s) are not in today's space of "
                       f"{task.op}: they cannot be measured again", err=True)
    if not todo:
        what = tasks[0].key if op is not None else "any task"
        click.echo(f"{log_path}: no stale record of {what} on {tgt.key}: nothing to measure again")
        return
    for task, again in todo:
        # records timed cold (a model's) are measured again cold, so that they compare with the rest
        cold = cold_cache or 2 * sum(r.result.stats.get("cache") == "cold" for r in again) > len(again)
        job = make_job(target=tgt, task=task, trials=len(again), batch=batch, seed=seed, log=log.path, mlflow=mlflow,
                       tracking_uri=tracking_uri, experiment=experiment, build_timeout=build_timeout,
                       run_timeout=run_timeout, cache="cold" if cold else "auto", remeasure_stale=True,
                       timing=timing)
        summary = run_tuning(job, progress=not quiet)
        click.echo(f"{task.key}: measured {summary.measured} stale config(s) again ({summary.failed} failed) in "
                   f"{summary.wall_s:.1f} s")
        if summary.best is not None:
            best = summary.best
            click.echo(f"  fastest of them: {format_time(best.seconds)}, {format_rate(task, best.seconds)}, "
                       f"config {json.dumps(best.config)}")
    click.echo(f"log: {log.path}")


def timing_note(record, target) -> str:
    """A warning when the best record's samples spread widely or the machine is busy now."""
    import os

    from ..bench.cpu import BUSY_LOAD, SPREAD_LIMIT

    stats = record.result.stats
    reasons = []
    if stats.get("p20") and stats.get("p80") and record.seconds > 0:
        spread = (stats["p80"] - stats["p20"]) / record.seconds
        if spread > SPREAD_LIMIT:
            reasons.append(f"its samples spread {spread * 100:.0f}%")
    if target.uses_cpu_threads:
        load, cores = os.getloadavg()[0], len(os.sched_getaffinity(0))
        threads = int(record.config.get("threads", 1) or 1)
        if load - threads > BUSY_LOAD:
            reasons.append(f"the load is {load:.1f} on {cores} cores")
    return f"warning: the best time may be off: {', '.join(reasons)}; tune again on a quiet machine" if reasons else ""


@cli.command()
@click.option("--log", "logs", cls=ManyValues, required=True, help="JSONL tuning log(s)")
@click.option("--allow-stale", is_flag=True,
              help="use records of code this version no longer builds for their config (with a warning)")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def best(logs: tuple[str, ...], allow_stale: bool, as_json: bool) -> None:
    """Print the best verified config per task in the logs. Stale records (measured on code
    this version no longer builds for their config) are skipped, with one warning per task."""
    from records import select_best, stale_warnings

    records = load_logs(logs)
    choices = select_best(records, allow_stale)
    report_stale(stale_warnings(choices), list(logs), allow_stale)
    rows = []
    for choice in sorted((c for c in choices if c.record is not None), key=lambda c: (c.task.op, c.task.key)):
        r = choice.record
        rows.append({"task": r.task.key, "op": r.task.op, "shape": r.task.dims, "dtype": r.task.dtype,
                     "target": r.target.key, "device": r.target.device_name, "seconds": r.seconds,
                     "gflops": r.gflops, "rate": rate(r.task, r.seconds)[0], "rate_unit": rate(r.task, r.seconds)[1],
                     "config": r.config, "stale": choice.uses_stale, "stale_skipped": choice.stale,
                     "trials": sum(1 for x in records if x.task.key == r.task.key and x.target.key == r.target.key)})
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"{', '.join(logs)}: no {'fresh ' if choices else ''}verified record")
        return
    for row in rows:
        click.echo(f"{row['task']} on {row['target']}: {format_time(row['seconds'])}, {row['rate']:.1f} {row['rate_unit']} "
                   f"after {row['trials']} trials, config {json.dumps(row['config'])}")
