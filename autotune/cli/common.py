"""What the commands share: parsing targets, tasks, dims and attributes, opening logs,
printing JSON. Every bad input becomes a ``UserError`` (one line, exit code 2)."""
from __future__ import annotations

import json
import math
import os
import stat
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from runtime.abi import attr_kind, attr_value_fits

from .group import CLUSTER_KEY, UserError


def resolve_target(name: str, compile_only: bool = False):
    from search_space import Target

    if name in ("cpu", "host", "llvm"):
        return Target.host()
    if name == "cuda" or name.startswith("sm_"):
        # on a cluster the runners say which GPUs they are: this machine need not have one
        if compile_only or cluster_options_given().get("cluster"):
            try:
                return Target.from_name("sm_90a" if name == "cuda" else name)
            except ValueError as exc:
                raise UserError(str(exc)) from None
        # what measures runs on this machine's GPU: an arch without one would record every
        # candidate as failed, and a rerun would take those failures as done
        try:
            gpu = Target.cuda(0)
        except Exception as exc:
            raise UserError(f"cuda target unavailable: {exc}") from None
        if name.startswith("sm_") and gpu.arch != name:
            raise UserError(f"--target {name}: this machine's GPU 0 is {gpu.arch} ({gpu.device_name}); "
                            "measure with --target cuda")
        return gpu
    raise UserError(f"unknown target {name!r}: use cpu, cuda or an arch like sm_90a")


def refuse_other_targets(records, target, name: str, what: str) -> None:
    """Logs none of whose records is for ``target`` (another machine's, a GPU's): not one of their
    kernels could run here, so the command would run template defaults only. ``name`` is the
    --target given, ``what`` the option and file(s) said first."""
    keys = {r.target.key for r in records}
    if keys and target.key not in keys:
        raise UserError(f"{what}: no record is for {target.key} (--target {name}); the logs are of "
                        f"{', '.join(sorted(keys))}: run on that machine with its --target")


def require_compiler(target) -> None:
    """What builds kernels for ``target`` is here (nvcc for CUDA), else one line."""
    from autotune.job import JobError, check_compiler

    try:
        check_compiler(target)
    except JobError as exc:
        raise UserError(str(exc)) from None


def resolve_task(op: str, shape: str, dtype: str, target_kind: str, dynamic: str = "",
                 attrs: tuple[str, ...] | list[str] = ()):
    from search_space import Task, get_template, parse_shape

    try:
        template = get_template(op, target_kind)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    dynamic_dims = parse_dynamic(dynamic, template)
    attr_values = parse_attrs(attrs, template)
    if dtype not in template.dtypes:  # said of --dtype, not of the shape
        raise UserError(f"--dtype {dtype}: {op} on {target_kind} takes {', '.join(template.dtypes)}")
    try:
        dims = parse_shape(shape)
        task = Task.make(op, dims, dtype, attrs=attr_values, dynamic=dynamic_dims)
        template.check(task)
    except ValueError as exc:
        raise UserError(f"bad --shape{'/--attr' if attr_values else ''} for {op}: {exc}") from None
    check_fits_in_memory(task)
    return template, task


def available_memory() -> int:
    """Bytes this machine can still allocate (MemAvailable), or 0 where nobody can tell."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_fits_in_memory(task) -> None:
    """A task whose arrays cannot be allocated would record a RUNTIME_ERROR for every trial:
    refuse it up front. Measuring holds the inputs and outputs, a float64 reference of the
    outputs and a poisoned copy: about three times the bytes the operator moves."""
    need = 3 * task.min_bytes
    have = available_memory()
    if have and need > have:
        raise UserError(f"{task.key} needs about {need / 2**30:.1f} GiB for its inputs, outputs and reference; "
                        f"this machine has {have / 2**30:.1f} GiB available")


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
    integer is accepted where a float is expected, and in a list).
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
        if not attr_value_fits(want, value):
            raise UserError(f"--attr {key}={text}: expected a {attr_kind(want)} like {json.dumps(want)}")
        if isinstance(want, tuple):  # a list of factors (longrope's): floats, as a model's config gives them
            value = [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
        attrs[key] = float(value) if isinstance(want, float) else value
    return attrs


def _check_named(path: str) -> None:
    if not path.strip():  # Path("") is the working directory: an unset $VAR
        raise UserError("--log is empty: name the log file")


def open_log(path: str):
    from records import LogWriteError, RecordLog

    _check_named(path)
    log = RecordLog(path)
    try:
        log.check_writable()
    except LogWriteError as exc:
        raise UserError(str(exc)) from None
    return log


def read_log(path: str):
    from records import LogReadError, RecordLog

    _check_named(path)
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"log {path} does not exist") from None
    except OSError as exc:  # a name too long, ...
        raise UserError(f"cannot read log {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(found.st_mode):
        raise UserError(f"log {path} is a directory")
    try:
        report = RecordLog(path).load(warn=False)
    except LogReadError as exc:  # a FIFO or a device: refused rather than read forever
        raise UserError(str(exc)) from None
    except OSError as exc:  # e.g. no permission
        raise UserError(f"cannot read log {path}: {exc.strerror or exc}") from None
    if message := report.warning(path):
        click.echo(f"autotune: warning: {message}", err=True)
    return report.records


def report_stale(stale: list, logs, allow_stale: bool) -> None:
    """The StaleRecordsWarnings (one per task, ``records.stale_warnings``) as warnings on
    stderr, and, when stale records were skipped that today's space still has, how to measure
    them again or use them."""
    for warning in stale:
        click.echo(f"autotune: warning: {warning}", err=True)
    if any(warning.remeasurable for warning in stale) and not allow_stale:
        log = str(logs[0]) if len(logs) == 1 else "LOG"
        if log.endswith(".gz"):  # archived logs are read-only
            again = "in a plain copy of the log (`autotune tune --remeasure-stale --log COPY.jsonl`)"
        else:
            again = f"with `autotune tune --remeasure-stale --log {log}`"
        click.echo(f"autotune: measure stale records again {again}, or use them with --allow-stale", err=True)


@contextmanager
def stale_warnings_reported(logs, allow_stale: bool):
    """The StaleRecordsWarnings raised inside (by export or TunedKernels), as the command's
    warning lines (also when it fails)."""
    from records import StaleRecordsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", StaleRecordsWarning)
        try:
            yield
        finally:
            report_stale([w.message for w in caught if issubclass(w.category, StaleRecordsWarning)],
                         logs, allow_stale)
            for w in caught:  # every other warning as it would have been shown
                if not issubclass(w.category, StaleRecordsWarning):
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


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


def echo_json(data: Any) -> None:
    """``data`` as strict JSON (``autotune.strict_json``: NaN and Infinity as null)."""
    from ..strict_json import dumps

    click.echo(dumps(data, indent=2))


def restriction(template, task, target, threads: int | None, items=()) -> dict | None:
    """``--threads N`` and ``--restrict KNOB=V[,V...]`` as one space restriction, checked
    against the space: values are matched by their text (``vec=8,16``, ``stores=cached``)."""
    space = template.space(task, target)
    allowed: dict[str, list] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name or not text.strip():
            raise UserError(f"malformed --restrict {item!r}: expected KNOB=VALUE[,VALUE] like vec=8,16")
        if name not in space.names:
            raise UserError(f"--restrict {name}: {task.op} has no knob {name} (knobs: {', '.join(space.names)})")
        if name in allowed:  # as --attr: the later would silently replace the earlier
            raise UserError(f"--restrict {name} given twice: list its values in one, {name}=A,B")
        offered = {str(v).lower(): v for v in space.knob(name).values}
        wanted = [w.strip().lower() for w in text.split(",")]
        unknown = [w for w in wanted if w not in offered]
        if unknown:
            raise UserError(f"--restrict {name}={text}: {task.op} on this machine takes "
                            f"{', '.join(map(str, space.knob(name).values))}")
        allowed[name] = [offered[w] for w in wanted]
    if threads is not None:
        if "threads" in allowed:
            raise UserError("--threads and --restrict threads=... both given: use one")
        if "threads" not in space.names:
            raise UserError(f"{task.op} has no threads knob")
        if threads not in space.knob("threads").values:
            raise UserError(f"--threads {threads}: {task.op} on this machine takes {list(space.knob('threads').values)}")
        allowed["threads"] = [threads]
    try:
        restricted = space.restrict(**allowed) if allowed else None
    except ValueError as exc:
        raise UserError(f"--restrict: {exc}") from None
    # a restriction no valid config survives would run zero trials and look like success
    if restricted is not None and not restricted.has_valid_config():
        given = " and ".join(w for w, on in (("--restrict", items), ("--threads", threads is not None)) if on)
        raise UserError(f"{given}: no config of {task.op}'s space at {task.key} is valid with these knob values")
    return allowed or None


def positive(ctx, param, value):
    if value is not None and value < 1:
        raise UserError(f"--{param.name.replace('_', '-')} must be >= 1, got {value}")
    return value


def seed_option(ctx, param, value):
    """A seed is what numpy's generators take: an int >= 0."""
    if value is not None and value < 0:
        raise UserError(f"--seed must be an int >= 0, got {value}")
    return value


def check_tracking(tracking_uri: str | None, no_mlflow: bool) -> None:
    """``--tracking-uri`` and ``--no-mlflow`` are alternatives: with both, one of them would be
    silently ignored."""
    if tracking_uri is not None and no_mlflow:
        raise UserError(f"--tracking-uri {tracking_uri} and --no-mlflow contradict each other: give one of them")
    if tracking_uri is not None and not tracking_uri.strip():  # MLflow would take "" for its default store
        raise UserError("--tracking-uri is empty: name the store (sqlite:///mlflow.db, http://HOST:PORT) or give --no-mlflow")


def check_timeouts(**timeouts: float) -> None:
    """``--build-timeout``/``--run-timeout``: finite seconds > 0 (0 or NaN would record every
    candidate as timed out, and a resumed job would never measure them again)."""
    for name, value in timeouts.items():
        if not math.isfinite(value) or value <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a number of seconds > 0, got {value}")


def job_options(experiment: str):
    """The options every command that runs a tuning job takes alike: where its runs go in
    MLflow (``--tracking-uri``, ``--no-mlflow``, ``--experiment``) and how long a candidate may
    build and run before it is recorded as timed out."""
    options = [
        click.option("--tracking-uri", default=None,
                     help="MLflow tracking URI [default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db]"),
        click.option("--no-mlflow", is_flag=True, help="do not log to MLflow"),
        click.option("--experiment", default=experiment, show_default=True, help="MLflow experiment"),
        click.option("--build-timeout", default=60.0, show_default=True, type=float,
                     help="seconds a candidate may take to compile before it is recorded as BUILD_TIMEOUT"),
        click.option("--run-timeout", default=20.0, show_default=True, type=float,
                     help="seconds a candidate may take to run (its check and timing) before it is recorded as "
                          "RUN_TIMEOUT"),
    ]

    def decorate(command):
        for option in reversed(options):  # listed in --help in this order
            command = option(command)
        return command
    return decorate


def timing_options(repeats: int | None = None, min_sample_ms: float | None = None):
    """``--repeats`` and ``--min-sample-ms``: how long each candidate is timed. Without a
    default, the target's own timing is kept (``timing_policy``)."""
    kept = " [default: the target's timing: 7 on the cpu, up to 50 on a GPU]"
    def decorate(command):
        command = click.option(
            "--min-sample-ms", default=min_sample_ms, show_default=min_sample_ms is not None, type=float,
            help="cpu: shortest timed sample; a config's calls are repeated until a sample lasts this long"
                 + ("" if min_sample_ms is not None else " [default: 5]"))(command)
        return click.option(
            "--repeats", default=repeats, show_default=repeats is not None, type=int, callback=positive,
            help="timed samples per config (many short samples keep a clean minimum on a busy machine)"
                 + ("" if repeats is not None else kept))(command)
    return decorate


def timing_policy(repeats: int | None, min_sample_ms: float | None, run_timeout: float, base):
    """The ``TimingPolicy`` that ``base`` (the timing a job would use) becomes with the options
    given; None when neither is given (the job keeps its own). A CPU sample lasts at least
    ``min_sample_ms``; a GPU sample is one launch after an L2 flush, so there it has no meaning."""
    from dataclasses import replace

    check_timeouts(run_timeout=run_timeout)  # before it bounds the samples
    if repeats is None and min_sample_ms is None:
        return None
    if min_sample_ms is not None:
        if base.min_sample_s == 0:
            raise UserError("--min-sample-ms is for the cpu target: on a GPU each sample is one launch after an "
                            "L2 flush (--repeats sets how many)")
        if not math.isfinite(min_sample_ms) or min_sample_ms <= 0:
            raise UserError(f"--min-sample-ms must be a number of milliseconds > 0, got {min_sample_ms}")
    repeats = base.repeats if repeats is None else repeats
    sample_s = base.min_sample_s if min_sample_ms is None else min_sample_ms / 1e3
    if repeats * sample_s * base.best_of >= run_timeout:  # every candidate would be recorded as timed out
        raise UserError(f"{repeats} samples (--repeats) of at least {sample_s * 1e3:g} ms (--min-sample-ms)"
                        + (f", each the best of {base.best_of} runs," if base.best_of > 1 else "")
                        + f" take longer than --run-timeout {run_timeout:g} s")
    return replace(base, repeats=repeats, min_sample_s=sample_s, min_repeats=min(base.min_repeats, repeats))


def refuse_overwriting(option: str, output: str, inputs) -> None:
    """``output`` is not one of the files the command reads (``inputs``): writing a report or a
    model over a log would lose what was measured."""
    target = Path(output).resolve()
    for given in inputs:
        if given and (Path(given).resolve() == target or _same_file(given, output)):
            raise UserError(f"{option} {output} is {given}, which this command reads: writing there would replace it")


def _same_file(a, b) -> bool:
    """Two names of one existing file (a hard link has a path of its own)."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # either is missing (a new output) or unreadable
        return False


def check_model_files(tuner: str, transfer_from, load_model: str | None, save_model: str | None,
                      log: str | None = None) -> None:
    """The xgb tuner's cost-model options name files that exist (or, to save, a file in a
    directory that does, and none that the job reads or writes: ``log`` is the job's log)."""
    if not (transfer_from or load_model or save_model):
        return
    if tuner != "xgb":
        raise UserError("--transfer-from, --load-model and --save-model need --tuner xgb")
    if save_model and not Path(save_model).resolve().parent.is_dir():
        raise UserError(f"--save-model {save_model}: directory {Path(save_model).parent} does not exist")
    if save_model:  # the model is saved at the end of the job: refuse now, not after it
        if Path(save_model).is_dir() or Path(save_model + ".meta.json").is_dir():
            raise UserError(f"--save-model {save_model} is a directory: name the file to save the model as")
        reads = [log, *(transfer_from or ()), load_model, load_model and load_model + ".meta.json"]
        refuse_overwriting("--save-model", save_model, reads)
        refuse_overwriting("--save-model", save_model + ".meta.json", reads)
    if load_model and not (Path(load_model).is_file() and Path(load_model + ".meta.json").is_file()):
        raise UserError(f"--load-model {load_model}: no saved model there (saved as PATH and PATH.meta.json)")
    for path in transfer_from or ():
        if not Path(path).is_file():
            why = "is not a file" if Path(path).exists() else "does not exist"
            raise UserError(f"--transfer-from: log {path} {why}")


def cluster_options_given() -> dict[str, Any]:
    """``--cluster``/``--runner-cpus`` of the running command (``group.cluster_options``)."""
    ctx = click.get_current_context(silent=True)
    return dict(ctx.meta.get(CLUSTER_KEY, {})) if ctx is not None else {}


def make_job(**fields: Any):
    """A ``TuningJob`` from the command's options (``--cluster`` too); a job that cannot run is
    bad input."""
    from autotune.job import JobError, TuningJob

    for name, value in cluster_options_given().items():
        fields.setdefault(name, value)
    if fields.get("runner_cpus") is not None and fields.get("cluster") is None:
        raise UserError("--runner-cpus is for --cluster")
    check_timeouts(**{k: fields[k] for k in ("build_timeout", "run_timeout") if k in fields})
    try:
        return TuningJob(**fields)
    except JobError as exc:
        raise UserError(str(exc)) from None


def run_tuning(job, progress: bool):
    """Run ``job`` as every command does: remarks on stderr, bad input as a UserError."""
    from autotune.job import JobError, run_job
    from measure.cluster import ClusterError
    from records import LogLockedError

    try:
        return run_job(job, progress=progress, note=lambda text: click.echo(text, err=True))
    except (JobError, LogLockedError) as exc:  # a second job took the log since open_log looked
        raise UserError(str(exc)) from None
    except ClusterError as exc:  # unreachable, nothing to measure on, every runner gone: one line
        raise UserError(str(exc)) from None
