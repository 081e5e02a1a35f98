"""The ``autotune`` command line.

Bad input ends with one line on stderr and exit code 2, never a traceback; set
AUTOTUNE_DEBUG=1 to see the traceback of an unexpected internal error.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import click

EXIT_USAGE = 2


class UserError(click.ClickException):
    """Bad input: reported as one line, exit code 2."""

    exit_code = EXIT_USAGE


def _err(message: str) -> None:
    click.echo(f"autotune: error: {message}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the click group, turning every failure into one line."""
    try:
        cli.main(args=argv, prog_name="autotune", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        _err("aborted")
        sys.exit(130)
    except click.ClickException as exc:
        _err(exc.format_message().replace("\n", " "))
        sys.exit(EXIT_USAGE if isinstance(exc, (click.UsageError, UserError)) else exc.exit_code)
    except KeyboardInterrupt:
        _err("interrupted; every measured record is in the log")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # an internal error: still one line unless asked for more
        if os.environ.get("AUTOTUNE_DEBUG"):
            raise
        _err(f"internal error: {type(exc).__name__}: {exc} (set AUTOTUNE_DEBUG=1 for a traceback)")
        sys.exit(1)
    sys.exit(0)


# ----------------------------------------------------------------------------- helpers


def resolve_target(name: str, compile_only: bool = False):
    from search_space import Target

    if name in ("cpu", "host", "llvm"):
        return Target.host()
    if name == "cuda" or name.startswith("sm_"):
        if compile_only or name.startswith("sm_"):
            try:
                return Target.from_name("sm_90a" if name == "cuda" else name)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        try:
            return Target.cuda(0)
        except Exception as exc:
            raise UserError(f"cuda target unavailable: {exc}") from None
    raise UserError(f"unknown target {name!r}: use cpu, cuda or an arch like sm_90a")


def resolve_task(op: str, shape: str, dtype: str, target_kind: str, dynamic: str = "",
                 attrs: tuple[str, ...] | list[str] = ()):
    from search_space import Task, get_template, parse_shape

    try:
        template = get_template(op, target_kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dynamic_dims = parse_dynamic(dynamic, template)
    attr_values = parse_attrs(attrs, template)
    try:
        dims = parse_shape(shape)
        task = Task.make(op, dims, dtype, attrs=attr_values, dynamic=dynamic_dims)
        template.check(task)
    except ValueError as exc:
        raise UserError(f"bad --shape{'/--attr' if attr_values else ''} for {op}: {exc}") from None
    return template, task


def parse_dynamic(text: str, template) -> list[str]:
    """``--dynamic M`` or ``M,N``: dims the kernel takes at run time; checked against the operator."""
    if not text:
        return []
    dims = [item.strip() for item in text.split(",")]
    if any(not d for d in dims):
        raise UserError(f"malformed --dynamic {text!r}: expected DIM[,DIM] like M")
    for d in dims:
        if d not in template.dims:
            raise UserError(f"--dynamic {d}: {template.op} has no dim {d} (dims {','.join(template.dims)})")
        if d not in template.dynamic_dims:
            can = ",".join(template.dynamic_dims) or "none"
            raise UserError(f"--dynamic {d}: {template.op} cannot take {d} at run time (dynamic dims: {can})")
    if len(set(dims)) != len(dims):
        raise UserError(f"--dynamic {text!r} names a dim twice")
    return dims


def parse_attrs(items, template) -> dict[str, Any]:
    """``--attr KEY=VALUE`` items: VALUE as JSON when it parses (true, 1e-6), else a string.

    Keys must be attributes of the operator and values of the type of its default (an
    integer is accepted where a float is expected).
    """
    attrs: dict[str, Any] = {}
    defaults = template.default_attrs
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key or not text.strip():
            raise UserError(f"malformed --attr {item!r}: expected KEY=VALUE like eps=1e-6")
        if key in attrs:
            raise UserError(f"--attr {key} given twice")
        if key not in defaults:
            known = ", ".join(sorted(defaults)) or "none"
            raise UserError(f"--attr {key}: {template.op} has no attribute {key} (attributes: {known})")
        try:
            value = json.loads(text)
        except ValueError:
            value = text.strip()
        want = defaults[key]
        if want is None:
            ok = True
        elif isinstance(want, bool):
            ok = isinstance(value, bool)
        elif isinstance(want, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            value = float(value) if ok else value
        elif isinstance(want, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, type(want))
        if not ok:
            raise UserError(f"--attr {key}={text}: expected a {type(want).__name__} like {json.dumps(want)}")
        attrs[key] = value
    return attrs


def open_log(path: str):
    from records import LogWriteError, RecordLog

    log = RecordLog(path)
    try:
        log.check_writable()
    except LogWriteError as exc:
        raise UserError(str(exc)) from None
    return log


def read_log(path: str):
    from records import RecordLog

    if not Path(path).exists():
        raise UserError(f"log {path} does not exist")
    if Path(path).is_dir():
        raise UserError(f"log {path} is a directory")
    report = RecordLog(path).load(warn=False)
    if report.bad_lines:
        click.echo(f"autotune: warning: {path}: skipped {report.bad_lines} unreadable line(s) "
                   f"(first at line {report.first_bad_line})", err=True)
    return report.records


def load_logs(paths) -> list:
    """Records of every log in ``paths`` (each must exist; .jsonl.gz is read through gzip)."""
    records = []
    for path in paths:
        records.extend(read_log(path))
    return records


class ManyValues(click.Option):
    """An option that takes every word after it up to the next option, and may be repeated:
    ``--transfer-from a.jsonl b.jsonl`` (what a shell glob expands to) or one value per flag."""

    def __init__(self, *args, **kwargs):
        kwargs["multiple"] = True
        super().__init__(*args, **kwargs)

    def add_to_parser(self, parser, ctx) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            option = parser._long_opt.get(name) or parser._short_opt.get(name)
            if option is None:
                continue
            process = option.process

            def greedy(value, state, process=process) -> None:
                process(value, state)
                while state.rargs and not state.rargs[0].startswith("-"):
                    process(state.rargs.pop(0), state)

            option.process = greedy


def _json_default(value: Any):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def echo_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default))


def cost_model_options(tuner: str, transfer_from, load_model: str | None, save_model: str | None, template, task,
                       target, seed: int) -> tuple[dict, dict]:
    """The xgb tuner's pre-trained base model (--load-model, then --transfer-from) as tuner
    options, and what to tell MLflow about it."""
    from .tuning import pretrained_model

    if not (transfer_from or load_model or save_model):
        return {}, {}
    if tuner != "xgb":
        raise UserError("--transfer-from, --load-model and --save-model need --tuner xgb")
    if save_model and not Path(save_model).resolve().parent.is_dir():
        raise UserError(f"--save-model {save_model}: directory {Path(save_model).parent} does not exist")
    if load_model and not (Path(load_model).is_file() and Path(load_model + ".meta.json").is_file()):
        raise UserError(f"--load-model {load_model}: no saved model there (saved as PATH and PATH.meta.json)")
    records = load_logs(transfer_from) if transfer_from else []
    try:
        base, note = pretrained_model(records, load_model, template, task, target, seed)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if note:
        click.echo(note, err=True)
    params = {"transfer_from": list(transfer_from or []), "load_model": load_model or ""}
    return ({"base_model": base} if base is not None else {}), params


def thread_restriction(template, task, target, threads: int | None) -> dict | None:
    """``--threads N`` as a space restriction ({"threads": [N]}), checked against the space."""
    if threads is None:
        return None
    space = template.space(task, target)
    if "threads" not in space.names:
        raise UserError(f"{task.op} has no threads knob")
    if threads not in space.knob("threads").values:
        raise UserError(f"--threads {threads}: {task.op} on this machine takes {list(space.knob('threads').values)}")
    return {"threads": [threads]}


def positive(ctx, param, value):
    if value is not None and value < 1:
        raise UserError(f"--{param.name.replace('_', '-')} must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="llm-autotune", prog_name="autotune")
def cli() -> None:
    """Autotune LLM operator kernels with learned cost models."""


@cli.command()
@click.option("--target", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def ops(target: str, as_json: bool) -> None:
    """List the operator templates for a target."""
    from search_space import format_shape, list_templates

    kind = "cuda" if target == "cuda" or target.startswith("sm_") else target
    if kind not in ("cpu", "cuda"):
        raise UserError(f"unknown target {target!r}: use cpu or cuda")
    templates = list_templates(kind)
    rows = [{"op": t.op, "dims": list(t.dims), "example_shape": format_shape(t.example_shape),
             "dtypes": list(t.dtypes), "dynamic_dims": list(t.dynamic_dims), "attrs": dict(t.default_attrs),
             "description": t.description}
            for t in templates]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"no templates for target {kind} yet")
        return
    width = max(len(r["op"]) for r in rows)
    for r in rows:
        attrs = " ".join(f"--attr {k}={json.dumps(v)}" for k, v in r["attrs"].items())
        click.echo(f"{r['op']:<{width}}  dims {','.join(r['dims']):<24} e.g. --shape {r['example_shape']:<32} "
                   f"{'/'.join(r['dtypes'])}  {r['description']}" + (f" ({attrs})" if attrs else ""))


@cli.command()
@click.option("--op", required=True, help="operator, see `autotune ops`")
@click.option("--shape", required=True, help="dims, e.g. M=256,N=256,K=256")
@click.option("--dtype", default="float32", show_default=True)
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="operator attribute, repeatable; VALUE is JSON when it parses (residual=true, eps=1e-6)")
@click.option("--dynamic", default="", metavar="DIM[,DIM]",
              help="dims the kernel takes at run time; --shape gives the size tuned at")
@click.option("--target", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--tuner", default="xgb", show_default=True,
              type=click.Choice(["xgb", "random", "grid", "optuna-tpe", "optuna-cmaes"]))
@click.option("--trials", default=64, show_default=True, type=int, callback=positive,
              help="total trials for this task, records already in the log included")
@click.option("--batch", default=8, show_default=True, type=int, callback=positive)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--log", "log_path", default="tune.jsonl", show_default=True, help="JSONL tuning log (resumed)")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db]")
@click.option("--no-mlflow", is_flag=True, help="do not log to MLflow")
@click.option("--experiment", default="llm-autotune", show_default=True, help="MLflow experiment")
@click.option("--build-timeout", default=60.0, show_default=True, type=float)
@click.option("--run-timeout", default=20.0, show_default=True, type=float)
@click.option("--threads", default=None, type=int, callback=positive,
              help="search only configs with this many threads")
@click.option("--transfer-from", "transfer_from", cls=ManyValues,
              help="xgb: pre-train the cost model on these logs of other shapes/operators first")
@click.option("--load-model", default=None, help="xgb: start from a cost model saved by --save-model")
@click.option("--save-model", default=None, help="xgb: save the cost model here when the job ends")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--compile-only", is_flag=True,
              help="cuda or sm_XX: build --trials configs and check their resources; run nothing")
@click.option("--json", "as_json", is_flag=True, help="with --compile-only: print a JSON list")
@click.option("--cold-cache", is_flag=True,
              help="cpu: time with the inputs out of cache, as in a model (tune-model always does)")
def tune(op, shape, dtype, attrs, dynamic, target, tuner, trials, batch, seed, log_path, tracking_uri, no_mlflow,
         experiment, build_timeout, run_timeout, threads, transfer_from, load_model, save_model, quiet, compile_only,
         as_json, cold_cache) -> None:
    """Tune one operator instance; every measurement goes to the log."""
    from .tuning import run_tuning_job

    compile_only = compile_only or target.startswith("sm_")
    tgt = resolve_target(target, compile_only)
    if compile_only and tgt.kind != "cuda":
        raise UserError("--compile-only is for CUDA targets: use --target cuda or an arch like sm_90a")
    if tgt.kind == "cuda" and threads is not None:
        raise UserError("--threads is for the cpu target")
    template, task = resolve_task(op, shape, dtype, tgt.kind, dynamic, attrs)
    if compile_only:
        from .cuda_cli import compile_only_report, format_compile_report

        rows = compile_only_report(template, task, tgt, trials, seed, build_timeout)
        click.echo(json.dumps(rows, indent=2, default=_json_default) if as_json
                   else format_compile_report(task, tgt, rows))
        if not any(r["status"] == "NO_ERROR" for r in rows):
            sys.exit(1)
        return
    restrict = thread_restriction(template, task, tgt, threads)
    log = open_log(log_path)
    model_options, model_params = cost_model_options(tuner, transfer_from, load_model, save_model, template, task,
                                                     tgt, seed)
    runner = None
    if tgt.kind == "cuda":
        from measure import CudaRunner

        runner = CudaRunner(timeout_s=run_timeout, seed=seed)
    elif cold_cache:
        from measure import LocalRunner, cold_policy

        runner = LocalRunner(timeout_s=run_timeout, seed=seed, policy=cold_policy(tgt))
    try:
        summary = run_tuning_job(task, tgt, tuner, trials, batch, seed, log,
                                 tracking_uri=None if no_mlflow else tracking_uri, use_mlflow=not no_mlflow,
                                 experiment=experiment, build_timeout=build_timeout, run_timeout=run_timeout,
                                 progress=not quiet, restrict=restrict, runner=runner, tuner_options=model_options,
                                 params=model_params, save_model=save_model)
    finally:
        if runner is not None:
            runner.close()
    best = summary.best
    click.echo(f"{task.key}: {summary.trials} trials ({summary.resumed} resumed from the log, "
               f"{summary.measured} measured now, {summary.failed} failed) in {summary.wall_s:.1f} s; "
               f"compile share {summary.compile_share * 100:.0f}%")
    if best is None:
        click.echo("no candidate verified; nothing is best")
    else:
        click.echo(f"best: {best.seconds * 1e3:.4f} ms, {best.gflops:.1f} GFLOP/s, config {json.dumps(best.config)}")
    click.echo(f"log: {log.path}")


@cli.command()
@click.option("--log", "log_path", required=True, help="JSONL tuning log")
@click.option("--json", "as_json", is_flag=True)
def best(log_path: str, as_json: bool) -> None:
    """Print the best verified config per task in a log."""
    from records import best_records

    records = read_log(log_path)
    winners = sorted(best_records(records).values(), key=lambda r: (r.task.op, r.task.key))
    rows = [{"task": r.task.key, "op": r.task.op, "shape": r.task.dims, "dtype": r.task.dtype,
             "target": r.target.key, "device": r.target.device_name, "seconds": r.seconds,
             "gflops": r.gflops, "config": r.config,
             "trials": sum(1 for x in records if x.task.key == r.task.key and x.target.key == r.target.key)}
            for r in winners]
    if as_json:
        echo_json(rows)
        return
    if not rows:
        click.echo(f"{log_path}: no verified record")
        return
    for row in rows:
        click.echo(f"{row['task']} on {row['target']}: {row['seconds'] * 1e3:.4f} ms, {row['gflops']:.1f} GFLOP/s "
                   f"after {row['trials']} trials, config {json.dumps(row['config'])}")


@cli.command()
@click.option("--op", required=True)
@click.option("--shape", required=True)
@click.option("--dtype", default="float32", show_default=True)
@click.option("--attr", "attrs", multiple=True, metavar="KEY=VALUE",
              help="operator attribute, repeatable; VALUE is JSON when it parses (residual=true, eps=1e-6)")
@click.option("--dynamic", default="", metavar="DIM[,DIM]",
              help="dims the kernel takes at run time; --shape gives the size tuned at")
@click.option("--log", "log_path", default=None, help="tuning log; without it the template default is benched")
@click.option("--target", default="cpu", show_default=True, help="cpu or cuda (vendor baselines through torch)")
@click.option("--threads", default=None, type=int, callback=positive,
              help="cpu: threads for both sides [default: the best record's]")
@click.option("--json", "as_json", is_flag=True)
def bench(op, shape, dtype, attrs, dynamic, log_path, target, threads, as_json) -> None:
    """Run the best recorded kernel and the numpy baseline side by side."""
    from records import best_records

    from .bench import bench as run_bench

    tgt = resolve_target(target)
    if tgt.kind == "cuda" and threads is not None:
        raise UserError("--threads is for the cpu target")
    template, task = resolve_task(op, shape, dtype, tgt.kind, dynamic, attrs)
    space = template.space(task, tgt)
    config = None
    if log_path:
        records = [r for r in read_log(log_path) if r.task.key == task.key and r.target.key == tgt.key]
        if threads is not None:
            records = [r for r in records if r.config.get("threads", threads) == threads]
        winner = best_records(records).get((task.key, tgt.key))
        if winner is None:
            raise UserError(f"{log_path} has no verified record for {task.key} on {tgt.key}"
                            + (f" with threads={threads}" if threads else ""))
        config = winner.to_config(space)
    else:
        config = template.default(task, tgt)
        if threads is not None and "threads" in space.names:
            values = dict(config.as_dict(), threads=threads)
            if space.is_valid(values):
                config = space.from_values(values)
    if tgt.kind == "cuda":
        from .cuda_bench import bench_cuda

        result = bench_cuda(task, tgt, config)
    else:
        n_threads = threads or int(config.get("threads", 1) or 1)
        result = run_bench(task, tgt, config, n_threads)
    if as_json:
        echo_json(result.to_dict())
    else:
        click.echo(result.summary())
    if result.error:
        sys.exit(1)


from . import cli_model, cli_research  # noqa: E402,F401  (register tune-model, run, sweep, replay)
from . import cli_export  # noqa: E402,F401  (registers export on the group)

if __name__ == "__main__":
    # run as `python -m autotune.cli`: use the package's module, where every command is registered
    from autotune.cli import main as package_main

    package_main()
