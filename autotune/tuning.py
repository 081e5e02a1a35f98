"""One task's tuning: a tuner, a builder, a runner, the log, MLflow and a progress bar.

The progress bar and MLflow also show the cost model's live quality: how well its ranking
of each batch, made before the batch was measured, matched the measured ranking.
"""
from __future__ import annotations

import time
import warnings
from contextlib import contextmanager
from typing import Callable

from measure import MeasureInput, MeasureResult
from records import Record, RecordLog, stale_configs
from search_space import Target, Task, get_template

from .progress import ProgressDisplay
from .tuners import TuneSummary, Tuner, make_tuner
from .units import format_rate


class ProgressCallback:
    """Progress over the trial budget, advancing per measured candidate: compiling or
    measuring, the best rate so far and the cost model's ranking of the last batch."""

    def __init__(self, task: Task, total: int, stream=None):
        self.task = task
        self.display = ProgressDisplay(task.key, total, stream)
        self.best_s = float("inf")
        self.quality: dict = {}
        self.batch, self.in_batch = 0, 0

    def _figures(self, phase: str = "") -> str:
        parts = [phase] if phase else []
        if self.best_s < float("inf"):
            parts.append(f"best {format_rate(self.task, self.best_s)}")
        if "pairwise_accuracy" in self.quality:  # the model's ranking of the last batch
            model = f"model: pairwise {self.quality['pairwise_accuracy']:.2f}"
            if "topk_recall" in self.quality:
                model += f", top-{self.quality['k']} {self.quality['topk_recall']:.2f}"
            parts.append(model)
        return "  ".join(parts)

    def building(self, n: int) -> None:
        self.batch, self.in_batch = n, 0
        self.display.update(figures=self._figures(f"compiling {n}"))

    def measured(self, record: Record, trial: int) -> None:
        self.in_batch += 1
        if record.ok:
            self.best_s = min(self.best_s, record.seconds)
        self.display.update(trial, self._figures(f"measuring {self.in_batch}/{self.batch}"))

    def __call__(self, tuner: Tuner, inputs: list[MeasureInput], results: list[MeasureResult],
                 records: list[Record], first: int) -> None:
        for record in records:
            if record.ok:
                self.best_s = min(self.best_s, record.seconds)
            if "pairwise_accuracy" in record.model:
                self.quality = record.model
        self.display.update(first + len(records), self._figures(), line=True)

    def close(self) -> None:
        self.display.close()


class MLflowCallback:
    """Per-trial metrics into the job's MLflow run; a tracking failure never stops the job."""

    def __init__(self, run):
        self.run = run
        self.failed = False

    def __call__(self, tuner, inputs, results, records, first) -> None:
        if self.failed:
            return
        try:
            self.run.log_trials(records, first)
        except Exception as exc:  # the log already holds these records
            self.failed = True
            warnings.warn(f"MLflow logging stopped: {exc}", stacklevel=2)


class Tracking:
    """A job's MLflow run, best effort: when the store cannot be reached at the start the job
    tunes without it (the log holds every record), with one warning through ``note``.

    ``finish`` ends the run (FINISHED, FAILED, or KILLED when interrupted) with the log as an
    artifact, and says through ``note`` where the run is (what ``export --mlflow-run`` needs).
    """

    def __init__(self, job, note: Callable[[str], None]):
        self.run = None
        self.note = note
        self.unavailable = ""  # the store asked for, when it could not be reached
        if not job.mlflow:
            return
        from records.mlflow_tracking import MLflowRun, resolve_tracking_uri

        uri = resolve_tracking_uri(job.tracking_uri)
        try:
            check_reachable(uri)
            self.run = MLflowRun(uri, experiment=job.experiment, run_name=job.name, params=job.params(),
                                 tags=job.tags())
        except Exception as exc:  # tracking is a convenience; the log is the source of truth
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
            self.unavailable = uri
            note(f"autotune: warning: MLflow at {uri} is unavailable ({reason}); tuning without it, "
                 "every record goes to the log")

    def finish(self, finish_run: Callable, status: str) -> None:
        if self.run is None:
            if self.unavailable:
                self.note(f"MLflow: this job was not tracked ({self.unavailable} was unavailable); the log holds "
                          "every record")
            return
        finish_run(self.run, status)
        self.note(f"MLflow run {self.run.run_id} ({status.lower()}) in {self.run.uri}")


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """A tracking server that does not answer fails here at once, not after MLflow's minutes
    of retries."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"no tracking server answers at {parsed.hostname}:{port}: "
                              f"{exc.strerror or exc}") from None


def ended_by(exc: BaseException | None) -> str:
    """The MLflow status of a job that stopped with ``exc`` (None: it finished)."""
    if exc is None:
        return "FINISHED"
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


@contextmanager
def observed(job, note: Callable[[str], None], bar, finish_run: Callable):
    """A job's MLflow run (best effort) and progress bar around its work. Yields the
    ``Tracking`` and a dict to put the summary in; however the work ends, the bar closes and
    the run ends with the matching status through ``finish_run(run, status, summary)``."""
    tracking, outcome, stopped_by = Tracking(job, note), {"summary": None}, None
    try:
        yield tracking, outcome
    except BaseException as exc:
        stopped_by = exc
        raise
    finally:
        if bar is not None:
            bar.close()
        tracking.finish(lambda run, status: finish_run(run, status, outcome["summary"]), ended_by(stopped_by))


def tune_task(job, log: RecordLog, builder, runner, tuner_options: dict, progress: bool,
              note: Callable[[str], None]) -> TuneSummary:
    """One task of ``job`` (a ``TuningJob``, see ``autotune.job.run_job``): the tuner's loop
    with the log, MLflow and a progress bar as callbacks."""
    tuner = make_tuner(job.tuner, job.task, job.target, seed=job.seed, restrict=job.restrict, **tuner_options)
    bar = ProgressCallback(job.task, job.trials) if progress else None
    with observed(job, note, bar, lambda run, status, summary: _finish_run(run, log, status, summary)) as (
            tracking, outcome):
        callbacks = [c for c in (MLflowCallback(tracking.run) if tracking.run else None, bar) if c is not None]
        outcome["summary"] = tuner.tune(job.trials, builder, runner, batch_size=job.batch, log=log,
                                        callbacks=callbacks)
        if job.save_model:
            _save_model(tuner, job.save_model)
    return outcome["summary"]


REMEASURE = "remeasure"  # the tuner name of records that measured a stale record's config again


def remeasure_task(job, log: RecordLog, builder, runner, progress: bool, note: Callable[[str], None]) -> TuneSummary:
    """Measure again, on today's code, the configs of ``job.task``'s stale records in ``log``
    (``records.stale_configs``). Each new record is appended as soon as it is measured; the
    stale records stay in the log (nothing measured is ever dropped), and once a config has a
    fresh record its stale ones are superseded. The summary counts the new records only."""
    task, target = job.task, job.target
    summary = TuneSummary(task, target)
    summary.started = time.perf_counter()
    with log.lock():  # one job per log, as for tuning
        again, lost = stale_configs(log.records(warn=False), task, target)
        if lost:
            note(f"autotune: warning: {task.key}: {lost} stale config(s) are not in today's space of {task.op}: "
                 "they cannot be measured again")
        space = get_template(task.op, target.kind).space(task, target)
        bar = ProgressCallback(task, len(again)) if progress and again else None
        with observed(job, note, bar, lambda run, status, s: _finish_run(run, log, status, s)) as (tracking, outcome):
            tracked = MLflowCallback(tracking.run) if tracking.run else None
            for start in range(0, len(again), job.batch):
                inputs = [MeasureInput(task, r.to_config(space), target) for r in again[start:start + job.batch]]
                if bar is not None:
                    bar.building(len(inputs))
                builds = builder.build(inputs)
                results, records = [], []
                for inp, build in zip(inputs, builds):
                    result = runner.run([inp], [build])[0]  # one at a time, logged at once
                    record = Record.from_measure(inp, result, REMEASURE)
                    log.append([record])
                    results.append(result)
                    records.append(record)
                    summary.measured += 1
                    summary.build_s += result.build_s
                    summary.run_s += result.run_s
                    if bar is not None:
                        bar.measured(record, summary.measured)
                first, summary.trials = summary.trials, summary.measured
                summary.failed += sum(1 for r in results if not r.ok)
                summary.records.extend(records)
                for callback in (tracked, bar):
                    if callback is not None:
                        callback(None, inputs, results, records, first)
            summary.wall_s = time.perf_counter() - summary.started
            ok = [r for r in summary.records if r.ok]
            summary.best = min(ok, key=lambda r: r.seconds) if ok else None
            outcome["summary"] = summary
    return summary


def _save_model(tuner: Tuner, path: str) -> None:
    model = getattr(tuner, "model", None)
    if model is None or not model.fitted:
        warnings.warn(f"no cost model to save to {path}: too few verified trials to fit one", stacklevel=2)
        return
    model.save(path)


def pretrained_model(records: list[Record], load_model: str | None, task: Task, target: Target, seed: int = 0):
    """The base model of an xgb job and a note for the user: loaded from ``load_model`` (saved
    by an earlier job), then pre-trained on ``records`` of other tasks (this task's own records
    are left out: they are resumed from the log instead). (None, "") when neither is given.

    Raises ValueError when the saved model cannot be read or nothing can be learned from ``records``.
    """
    from cost_model import FeatureExtractor, XGBCostModel
    from cost_model.transfer import pretrain, training_set

    base, note = None, ""
    if load_model:
        try:
            base = XGBCostModel.load(load_model, seed)
        except Exception as exc:
            raise ValueError(f"--load-model {load_model}: {exc}") from None
        note = f"loaded the cost model {load_model} ({base.n_trees} trees)"
    if records:
        template = get_template(task.op, target.kind)
        space = template.space(task, target)
        columns = base.feature_names if base is not None else FeatureExtractor(template, task, target, space).names
        data = training_set(records, columns, exclude=[(task.key, target.key)])
        try:
            base = pretrain(data, seed=seed, base=base)
        except ValueError as exc:
            raise ValueError(f"--transfer-from: {exc}") from None
        note = (note + "; " if note else "") + (
            f"pre-trained the cost model on {len(data)} records of {len(data.tasks)} other task(s)"
            + (f" ({data.skipped} outside today's spaces, skipped)" if data.skipped else ""))
    return base, note


def _finish_run(run, log: RecordLog, status: str, summary: TuneSummary | None) -> None:
    try:
        if summary is not None:
            run.log_trials([], 0, extra={"trials": summary.trials, "failed": summary.failed,
                                         "wall_s": summary.wall_s, "compile_share": summary.compile_share})
            if summary.best is not None:
                run.log_json("best_config.json", {"task": summary.task.key, "target": summary.target.key,
                                                  "config": summary.best.config, "seconds": summary.best.seconds,
                                                  "gflops": summary.best.gflops})
        if log.path.exists():
            run.log_artifact(log.path)
        run.finish(status)
    except Exception as exc:
        warnings.warn(f"MLflow: could not finish run {run.run_id}: {exc}", stacklevel=2)
