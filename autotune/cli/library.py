"""``autotune export``: the best verified kernel of every task as a library directory.
"""
from __future__ import annotations

import sys

import click

from ..units import format_bytes, format_rate, format_time
from .common import ManyValues, UserError, echo_json, load_logs, stale_warnings_reported
from .group import cli, error_line


def _records(logs, run_id: str | None, tracking_uri: str | None) -> list:
    if bool(logs) == bool(run_id):
        raise UserError("give the records with either --log LOG [LOG...] or --mlflow-run RUN_ID")
    if logs:
        return load_logs(logs)
    from records.mlflow_tracking import RunNotFound, records_from_run, resolve_tracking_uri

    from ..tuning import check_reachable

    try:  # a server that does not answer is said so at once (not after MLflow's retries, as "no run")
        check_reachable(resolve_tracking_uri(tracking_uri), writing=False)
    except ConnectionError as exc:
        raise UserError(f"--mlflow-run {run_id}: {exc}") from None
    try:
        return records_from_run(run_id, tracking_uri)
    except ConnectionError as exc:  # StoreUnavailable: an unsupported URI, a store that cannot be read
        raise UserError(f"--mlflow-run {run_id}: {exc}") from None
    except (RunNotFound, FileNotFoundError) as exc:
        raise UserError(str(exc).strip('"')) from None


@cli.command("export")
@click.option("--log", "logs", cls=ManyValues, metavar="LOG [LOG...]", help="JSONL tuning log(s)")
@click.option("--mlflow-run", "run_id", default=None, help="read the records from this MLflow run's log artifact(s)")
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db]")
@click.option("--out", "out_dir", required=True, help="library directory (an earlier library there is replaced)")
@click.option("--target", default=None,
              help="cpu, cuda, an arch (sm_90a) or a target key [default: the records' only target]")
@click.option("--no-verify", is_flag=True, help="do not check the exported CPU kernels against numpy")
@click.option("--allow-stale", is_flag=True,
              help="use records of code this version no longer builds for their config (with a warning)")
@click.option("--json", "as_json", is_flag=True, help="print the exported kernels as JSON")
def export(logs, run_id, tracking_uri, out_dir, target, no_verify, allow_stale, as_json) -> None:
    """Compile the best verified config of every task into a kernel library (manifest.json,
    one shared library or cubins, sources, a C header) that `runtime.load` runs with numpy only.
    Stale records (measured on code this version no longer builds for their config) are
    skipped, with one warning per task."""
    from export import ExportError, ExportFailed, export_library
    from search_space import Task

    records = _records(logs, run_id, tracking_uri)
    try:
        with stale_warnings_reported(logs or [], allow_stale):
            summary = export_library(records, out_dir, target, verify=not no_verify, allow_stale=allow_stale)
    except ExportFailed as exc:
        error_line(str(exc))
        sys.exit(1)
    except ExportError as exc:
        raise UserError(str(exc)) from None
    if as_json:
        echo_json({"path": str(summary.path), "target": summary.target.key, "bytes": summary.total_bytes,
                   "library": str(summary.library) if summary.library else None, "verified": summary.verified,
                   "kernels": [{k: e[k] for k in ("entry", "task", "op", "config", "seconds", "gflops")}
                               for e in summary.kernels]})
        return
    checked = (f"all {summary.verified} checked against numpy" if summary.verified == len(summary.kernels)
               else "not checked here")
    click.echo(f"exported {len(summary.kernels)} kernel(s) for {summary.target.key} to {summary.path} "
               f"({format_bytes(summary.total_bytes)}; {checked}) in {summary.seconds:.1f} s")
    if summary.library is not None:
        click.echo(f"  {summary.library.name}  {format_bytes(summary.library.stat().st_size)}; header llm_autotune_kernels.h")
    for entry in summary.kernels:
        task = Task.make(entry["op"], entry["dims"], entry["dtype"], entry["attrs"], entry["dynamic"])
        click.echo(f"  {entry['entry']}  {entry['task']}  {format_time(entry['seconds'])}  "
                   f"{format_rate(task, entry['seconds'])}")
    for note in summary.notes:
        click.echo(f"  note: {note}")
