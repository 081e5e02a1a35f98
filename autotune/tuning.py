"""One task's tuning: a tuner, a builder, a runner, the log, MLflow and a progress bar.

The progress bar and MLflow also show the cost model's live quality: how well its ranking
of each batch, made before the batch was measured, matched the measured ranking.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from cost_model import batch_quality
from cost_model.transfer import best_configs_elsewhere, throughput_of
from measure import MeasureInput, MeasureResult
from records import CodeCheck, Record, RecordLog, select_best, stale_configs
from search_space import Config, Target, Task, get_template

from .progress import ProgressDisplay
from .resume_notes import REMEASURE, ResumeNote
from .tuners import TuneSummary, Tuner, make_tuner
from .tuners.base import _tell
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
            # the share of pairs it ordered as they measured (0.5: chance), its top k found
            model = f"model ranked the last batch: pairs {self.quality['pairwise_accuracy']:.2f} (0.5 = chance)"
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
            if "pairwise_accuracy" in record.model and record.tuner == tuner.name:  # not another tuner's, resumed
                self.quality = record.model
        self.display.update(first + len(records), self._figures(), line=True)

    def close(self) -> None:
        self.display.close()


class MLflowCallback:
    """Per-trial metrics into the job's MLflow run, sent per batch; a tracking failure never
    stops the job (after one, the run sends nothing more: see ``MLflowRun``). ``flush`` sends
    what the log got since the last batch was sent (a batch the job did not finish: each trial
    in the log is a point in the run too). It reads the log rather than counting candidates: a
    signal can land between a record's write and any callback."""

    def __init__(self, run, log: RecordLog | None = None, task: Task | None = None, target: Target | None = None):
        self.run, self.log = run, log
        self.key = (task.key, target.key) if task is not None and target is not None else None
        self.at_start = len(self._logged()) if self.key is not None else 0  # the task's records before the job
        self.in_batch = 0  # measured since the last batch was sent
        self.sent = 0      # records this job measured that the run holds
        self.next_step = 0

    def _logged(self) -> list[Record]:
        return [r for r in self.log.records(warn=False) if (r.task.key, r.target.key) == self.key]

    def measured(self, record: Record, trial: int) -> None:
        self.in_batch += 1

    def __call__(self, tuner, inputs, results, records, first) -> None:
        self.run.log_trials_or_stop(records, first)
        self.sent += self.in_batch  # none for the records resumed from the log (the first call)
        self.in_batch = 0
        self.next_step = first + len(records)

    def flush(self) -> None:
        if self.key is None:
            return
        try:
            unsent = self._logged()[self.at_start + self.sent:]
        except (OSError, ValueError):  # best effort: the log holds them in any case
            return
        if unsent:
            self.run.log_trials_or_stop(unsent, self.next_step)
            self.sent += len(unsent)
            self.next_step += len(unsent)


class Tracking:
    """A job's MLflow run, best effort: when the store cannot be reached at the start the job
    tunes without it (the log holds every record), with one warning through ``note``.

    ``finish`` ends the run (FINISHED, FAILED, or KILLED when interrupted) with the log as an
    artifact, and says through ``note`` where the run is (what ``export --mlflow-run`` needs),
    or that it could not be ended.
    """

    def __init__(self, job, note: Callable[[str], None]):
        self.run = None
        self.note = note
        self.unavailable = ""  # why the store asked for was not used, when it was not
        if not job.mlflow:
            return
        from records.mlflow_tracking import MLflowRun, error_text, resolve_tracking_uri

        uri = resolve_tracking_uri(job.tracking_uri)
        try:
            check_reachable(uri)
            try:
                self.run = MLflowRun(uri, experiment=job.experiment, run_name=job.name, params=job.params(),
                                     tags=job.tags())
            except Exception as exc:
                if "RESOURCE_ALREADY_EXISTS" not in f"{getattr(exc, 'error_code', '')} {exc}":
                    raise
                # a team's jobs share a server: another one created the experiment since we looked
                self.run = MLflowRun(uri, experiment=job.experiment, run_name=job.name, params=job.params(),
                                     tags=job.tags())
        except Exception as exc:  # tracking is a convenience; the log is the source of truth
            reason = error_text(exc)
            self.unavailable = f"{uri} was unavailable"
            if "must be in the 'active' state" in reason:  # the store answers; the experiment was deleted
                note(f"autotune: warning: MLflow experiment {job.experiment!r} at {uri} is deleted: restore it "
                     "(mlflow experiments restore) or name another with --experiment; tuning without MLflow, "
                     "every record goes to the log")
                self.unavailable = f"experiment {job.experiment!r} at {uri} is deleted"
                return
            note(f"autotune: warning: MLflow at {uri} is unavailable ({reason}); tuning without it, "
                 "every record goes to the log")

    def finish(self, finish_run: Callable, status: str) -> None:
        if self.run is None:
            if self.unavailable:
                self.note(f"MLflow: this job was not tracked ({self.unavailable}); the log holds "
                          "every record")
            return
        run = self.run
        # the reason of a failure during the job was in its warning: the one line says it once
        stopped_earlier = bool(run.failure)
        if not run.failure:  # after a failure nothing is sent: a dead server would cost each call its retries
            if status == "KILLED":  # interrupted: the job ends within seconds, whatever the store does
                ending = threading.Thread(target=self._end, args=(finish_run, status), daemon=True)
                ending.start()
                ending.join(INTERRUPTED_FINISH_S)
                if ending.is_alive():
                    run.failure = f"no answer within {INTERRUPTED_FINISH_S:g} s of the interrupt"
            else:
                self._end(finish_run, status)
        if run.ended:
            self.note(f"MLflow run {run.run_id} ({run.ended.lower()}) in {run.uri}")
        else:
            reason = "its tracking stopped during the job" if stopped_earlier else run.failure or "no reply"
            self.note(f"autotune: warning: MLflow run {run.run_id} could not be ended ({reason}); it stays "
                      f"RUNNING in {run.uri}, the log holds every record")

    def _end(self, finish_run: Callable, status: str) -> None:
        finish_run(self.run, status)  # the closing figures and the log (it may end the run too)
        try:
            self.run.finish(status)  # a step of its own: a failed upload leaves no run RUNNING
        except Exception:  # run.failure says why
            pass


# how long an interrupted job waits for its MLflow run to take the log and end
INTERRUPTED_FINISH_S = 5.0


def check_reachable(uri: str, timeout_s: float = 5.0, writing: bool = True) -> None:
    """A tracking store that cannot be used fails here at once, with a ConnectionError that
    says why, not after MLflow's minutes of retries: a server that does not answer an HTTP
    request (a dead one, or one that takes connections and never replies), an SQLite store
    that is a directory, is in a directory that does not exist, or (``writing``) cannot be
    written."""
    from records.mlflow_tracking import sqlite_store

    store = sqlite_store(uri)
    if store is not None:  # SQLAlchemy would retry opening it for minutes
        _check_sqlite_store(store, writing)
    if urlparse(uri).scheme in ("http", "https"):
        _check_server(uri, timeout_s)


def _check_sqlite_store(store: Path, writing: bool) -> None:
    folder = store.parent
    if store.is_dir():
        raise ConnectionError(f"the tracking store {store} is a directory, not an SQLite file")
    # a typo in the path would otherwise create a new folder and an empty store there (as the
    # log refuses a missing directory, so does the store)
    if not folder.is_dir():
        raise ConnectionError(f"the tracking store's directory {folder} does not exist")
    if not writing:
        if store.exists() and not os.access(store, os.R_OK):
            raise ConnectionError(f"the tracking store {store} is not readable")
        return
    if store.exists() and not os.access(store, os.R_OK | os.W_OK):
        raise ConnectionError(f"the tracking store {store} is not writable")
    if not os.access(folder, os.W_OK | os.X_OK):  # SQLite writes its journal beside the store
        raise ConnectionError(f"the tracking store's directory {folder} is not writable")


def _check_server(uri: str, timeout_s: float) -> None:
    """Any HTTP answer to GET /health will do (a proxy's 404, a login's 401), short of a 5xx
    from a gateway whose server is down."""
    import http.client
    import ssl
    import urllib.error
    import urllib.request

    from records.mlflow_tracking import error_text

    parsed = urlparse(uri)
    where = f"{parsed.hostname}:{parsed.port or (443 if parsed.scheme == 'https' else 80)}"
    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s).close()
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise ConnectionError(f"the tracking server at {where} answers {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, ssl.SSLError):  # it speaks TLS: MLflow's own TLS settings apply from here
            return
        reason = getattr(exc.reason, "strerror", None) or exc.reason
        raise ConnectionError(f"no tracking server answers at {where}: {reason}") from None
    except TimeoutError:
        raise ConnectionError(f"no tracking server answers at {where}: no reply within {timeout_s:g} s") from None
    except (OSError, http.client.HTTPException) as exc:  # closed without a reply, or not HTTP
        raise ConnectionError(f"no tracking server answers at {where}: {error_text(exc)}") from None


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


def fresh_best(summary: TuneSummary, check: CodeCheck | None = None):
    """Set ``summary.best`` to the record ``autotune best`` and export choose: a resumed record
    measured on code this version no longer builds (stale) is passed over. Returns the choice
    (``records.TaskChoice``: how many stale records were passed over), None without a verified
    record. ``check``: the tuner's (``Tuner.code_check``), which knows the records it resumed."""
    choices = select_best(summary.records, check=check)
    summary.best = choices[0].record if choices else None
    return choices[0] if choices else None


def choose_fresh_best(summary: TuneSummary, note: Callable[[str], None], check: CodeCheck | None = None) -> None:
    """``fresh_best``, and the stale records passed over said, as ``best`` says it."""
    choice = fresh_best(summary, check)
    said = choice.note() if choice else None
    if said:
        again = " (tune --remeasure-stale measures them again)" if choice.remeasurable else ""
        note(f"autotune: warning: {said}{again}")


def tune_task(job, log: RecordLog, builder, runner, tuner_options: dict, progress: bool,
              note: Callable[[str], None]) -> TuneSummary:
    """One task of ``job`` (a ``TuningJob``, see ``autotune.job.run_job``): the tuner's loop
    with the log, MLflow and a progress bar as callbacks."""
    tuner = make_tuner(job.tuner, job.task, job.target, seed=job.seed, restrict=job.restrict, **tuner_options)
    bar = ProgressCallback(job.task, job.trials) if progress else None
    with observed(job, note, bar, lambda run, status, summary: _finish_run(run, log, status, summary)) as (
            tracking, outcome):
        metrics = MLflowCallback(tracking.run, log, job.task, job.target) if tracking.run else None
        callbacks = [c for c in (ResumeNote(job, log, note), metrics, bar) if c is not None]
        try:
            summary = tuner.tune(job.trials, builder, runner, batch_size=job.batch, log=log, callbacks=callbacks,
                                 time_limit_s=job.time_limit, early_stopping=job.early_stopping)
        finally:  # an interrupted batch's records are in the log: in the run too
            if metrics is not None:
                metrics.flush()
        choose_fresh_best(summary, note, tuner.code_check)
        outcome["summary"] = summary
        if job.save_model:
            _save_model(tuner, job.save_model)
    return outcome["summary"]


def remeasure_task(job, log: RecordLog, builder, runner, progress: bool, note: Callable[[str], None]) -> TuneSummary:
    """Measure again, on today's code, the configs of ``job.task``'s stale records in ``log``
    (``records.stale_configs``). Each new record is appended as soon as it is measured; the
    stale records stay in the log (nothing measured is ever dropped), and once a config has a
    fresh record its stale ones are superseded. The summary counts the new records only."""
    task, target = job.task, job.target
    summary = TuneSummary(task, target, tuner=REMEASURE)
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
    """The xgb tuner's model (``XGBTuner.save_model``: a pre-trained one continued on this
    task's measurements, or as it was when too few were made to fit it)."""
    if tuner.ranker() is None:
        warnings.warn(f"no cost model to save to {path}: too few verified trials to fit one", stacklevel=2)
        return
    tuner.save_model(path)


def prior_configs(records, task: Task, target: Target) -> list[dict]:
    """Where an xgb search of ``task`` starts: the two best configs in ``records`` of each of its
    operator's tasks of the same dims (another variant: a GEMV that fuses its norm, another
    dtype; or another operator of the same schedule: attention_decode for rope_append_attention),
    then its template's seed configs for ``target``, then the best configs of its other shapes
    (four each)."""
    records = list(records)
    same = [r for r in records if r.task.dims == task.dims]
    other = [r for r in records if r.task.dims != task.dims]
    return (best_configs_elsewhere(same, task, target, per_task=2)
            + get_template(task.op, target.kind).seed_configs(task, target) + best_configs_elsewhere(other, task, target))


def with_priors(tuner: str, task: Task, target: Target, records, options: dict | None = None) -> dict:
    """A task's tuner options: for xgb, ``prior_configs`` as its ``seeds`` unless given."""
    options = dict(options or {})
    if tuner == "xgb" and "seeds" not in options:
        seeds = prior_configs(records, task, target)
        if seeds:
            options["seeds"] = seeds
    return options


def pretrained_model(records: list[Record], load_model: str | None, task: Task, target: Target, seed: int = 0):
    """The base model of an xgb job and a note for the user: loaded from ``load_model`` (saved
    by an earlier job), then pre-trained on ``records`` of other tasks (this task's own records
    are left out: they are resumed from the log instead). (None, "") when neither is given.

    Raises ValueError when the saved model cannot be read or nothing can be learned from ``records``.
    """
    from cost_model import FeatureExtractor, XGBCostModel
    from cost_model.features import KNOB_PREFIX
    from cost_model.transfer import pretrain, training_set

    base, note = None, ""
    if load_model:
        try:
            base = XGBCostModel.load(load_model, seed)
        except Exception as exc:
            raise ValueError(f"--load-model {load_model}: not a cost model saved by --save-model "
                             f"({type(exc).__name__}: {exc})") from None
        note = f"loaded the cost model {load_model} ({base.n_trees} trees)"
    template = get_template(task.op, target.kind)
    space = template.space(task, target)
    if base is not None:
        # the loaded model's columns become the job's: a knob it never saw would be invisible
        # to every model of the job (a model saved for another operator)
        unseen = [k.name for k in space.knobs if f"{KNOB_PREFIX}{k.name}" not in base.feature_names]
        if unseen:
            raise ValueError(f"--load-model {load_model} was trained without the knobs "
                             f"{', '.join(unseen)} of {task.op}: this job could not "
                             "learn them (pre-train on that model's logs with --transfer-from instead)")
    if records:
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
    """The job's totals, best config and log into its run (``Tracking`` then ends it)."""
    with run.closing_uploads():
        if summary is not None:
            run.log_trials([], 0, extra={"trials": summary.trials, "failed": summary.failed,
                                         "wall_s": summary.wall_s, "compile_share": summary.compile_share})
            if summary.best is not None:
                run.log_json("best_config.json", {"task": summary.task.key, "target": summary.target.key,
                                                  "config": summary.best.config, "seconds": summary.best.seconds,
                                                  "gflops": summary.best.gflops})
        if log.path.exists():
            run.log_artifact(log.path)


# ----------------------------------------------------------------------------- on a cluster


class ClusterRound:
    """One batch of one tuner's configs measured on a cluster (``measure.cluster.RayCluster``):
    what ``Tuner.measure`` does in one call, in three steps, so that other batches (other
    targets, other tasks of a model) are measured meanwhile: ``start`` submits the batch,
    ``measured`` logs each record as its result comes back (in that order, not the batch's),
    ``finish`` lets the tuner learn from the whole batch. ``on_done(round)`` is called by
    ``measure_on_cluster`` when the last result is in."""

    def __init__(self, tuner: Tuner, summary: TuneSummary, configs: list[Config], log: RecordLog | None,
                 callbacks=(), on_done: Callable[["ClusterRound"], None] = lambda r: None):
        self.tuner, self.summary, self.log, self.callbacks, self.on_done = tuner, summary, log, list(callbacks), on_done
        configs = [c for c in configs if c.index not in tuner.visited]
        self.inputs = [MeasureInput(tuner.task, c, tuner.target) for c in configs]
        self.scores = tuner.predict_batch(configs) if configs else None  # ranked before anything is measured
        self.results: list[MeasureResult | None] = [None] * len(configs)
        self.order: list[int] = []  # positions in the order they were measured
        self.records: list[Record] = []
        self.tag = None  # what its driver knows it by (a model's task index)

    @property
    def done(self) -> bool:
        return len(self.records) == len(self.inputs)

    def start(self, cluster) -> dict[int, tuple["ClusterRound", int]]:
        """Submit the batch; returns ticket -> (this round, position)."""
        _tell(self.callbacks, "building", len(self.inputs))
        return {ticket: (self, i) for i, ticket in enumerate(cluster.submit(self.inputs))}

    def measured(self, position: int, result: MeasureResult) -> Record:
        self.results[position] = result
        model = None
        if self.scores is not None:
            model = {"score": float(self.scores[position]), "batch": self.summary.trials}
            if len(self.records) == len(self.inputs) - 1:  # the batch's last result: how good was the ranking?
                model.update(batch_quality(self.scores, [throughput_of(self.tuner.task, r) for r in self.results]))
        inp = self.inputs[position]
        record = Record.from_measure(inp, result, self.tuner.name, model)
        if self.log is not None:
            # at once (or to the log's writer thread): a killed driver loses only what is in flight
            self.log.append([record])
        self.order.append(position)
        self.records.append(record)
        self.summary.build_s += result.build_s
        self.summary.run_s += result.run_s
        _tell(self.callbacks, "measured", record, self.summary.trials + len(self.records))
        return record

    def finish(self, first: int) -> None:
        """Learn from the batch and report it (``first``: the step of its first record)."""
        inputs = [self.inputs[i] for i in self.order]
        results = [self.results[i] for i in self.order]
        self.tuner.update(inputs, results)
        self.summary.trials += len(inputs)
        self.summary.measured += len(inputs)
        self.summary.failed += sum(1 for r in results if not r.ok)
        self.summary.records.extend(self.records)
        for callback in self.callbacks:
            callback(self.tuner, inputs, results, self.records, first)


class LogWriter:
    """A cluster job's log, written by a thread of the driver: each record is still a whole
    line, flushed and fsynced on its own, in the order measured, but the driver goes on
    dispatching while the disk syncs (an fsync takes 0.4-6 ms on a VM's disk, as long as the
    rest of a candidate's dispatch). ``close`` writes what is queued and raises a write error
    the thread met; so does the next ``append`` after one."""

    def __init__(self, log: RecordLog):
        self.log, self.path = log, log.path
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._write, name="autotune-log-writer", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        while (record := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self.log.append([record])
                except BaseException as exc:  # raised in the driver's thread by append or close
                    self._error = exc

    def append(self, records) -> None:
        if self._error is not None:
            raise self._error
        for record in records:
            self._queue.put(record)

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error


@contextmanager
def written_by_a_thread(log: RecordLog):
    """A ``LogWriter`` for ``log``, closed (everything queued written) however the block ends."""
    writer = LogWriter(log)
    try:
        yield writer
    finally:
        writer.close()


def measure_on_cluster(cluster, next_rounds: Callable[[], list[ClusterRound]]) -> None:
    """The driver's loop: submit the rounds ``next_rounds()`` offers (asked again whenever a
    result comes back), hand each result to its round, and call a round's ``on_done`` when it
    is complete; returns when nothing is in flight and nothing more is offered."""
    owners: dict[int, tuple[ClusterRound, int]] = {}
    while True:
        for round_ in next_rounds():
            owners.update(round_.start(cluster))
        if not owners:
            return
        for ticket, result in cluster.wait():
            round_, position = owners.pop(ticket)
            round_.measured(position, result)
            if round_.done:
                round_.on_done(round_)


@dataclass(repr=False)  # TuneSummary's short repr
class ClusterTuneSummary(TuneSummary):
    """One task tuned on several targets of a cluster: the totals, and each target's summary
    (``best`` is the first target's: the one with the most runners)."""

    by_target: list[TuneSummary] = field(default_factory=list)

    @classmethod
    def of(cls, summaries: list[TuneSummary]) -> "ClusterTuneSummary":
        first = summaries[0]
        return cls(first.task, first.target, trials=sum(s.trials for s in summaries),
                   measured=sum(s.measured for s in summaries), resumed=sum(s.resumed for s in summaries),
                   failed=sum(s.failed for s in summaries), resumed_failed=sum(s.resumed_failed for s in summaries),
                   best=first.best, wall_s=max(s.wall_s for s in summaries),
                   build_s=sum(s.build_s for s in summaries), run_s=sum(s.run_s for s in summaries),
                   records=[r for s in summaries for r in s.records], started=first.started, tuner=first.tuner,
                   by_target=summaries)


def tune_task_on_cluster(job, log: RecordLog, cluster, targets: list[Target], tuner_options: dict, progress: bool,
                         note: Callable[[str], None]) -> TuneSummary:
    """``tune_task`` on a cluster: one tuner per target the runners report, each with its
    batch in flight at once (every runner of a target measures a share of it), the job's
    budget for each target. The driver alone writes the log and the MLflow run."""
    task = job.task
    tuners = [make_tuner(job.tuner, task, target, seed=job.seed, restrict=job.restrict, **tuner_options)
              for target in targets]
    bar = ProgressCallback(task, job.trials * len(targets)) if progress else None
    with log.lock(), observed(job, note, bar, lambda run, status, summary: _finish_run(run, log, status, summary)) as (
            tracking, outcome):
        if tracking.run is not None:
            _log_cluster_params(tracking.run, cluster, targets)
        callbacks = [c for c in (MLflowCallback(tracking.run) if tracking.run else None, bar) if c is not None]
        # said once, of the first target's resumed records (the note's first call)
        summaries = [tuner.start(log, callbacks + [ResumeNote(job, log, note)] * (i == 0))
                     for i, tuner in enumerate(tuners)]
        busy, stopped, step = set(), set(), [sum(s.trials for s in summaries)]

        def done(round_: ClusterRound) -> None:
            busy.discard(round_.tuner)
            round_.finish(step[0])
            step[0] += len(round_.inputs)

        with written_by_a_thread(log) as writer:  # all written before the MLflow run takes the log

            def next_rounds() -> list[ClusterRound]:
                rounds = []
                for tuner, summary in zip(tuners, summaries):
                    if tuner in busy or tuner in stopped or summary.trials >= job.trials or not tuner.has_next():
                        continue
                    configs = tuner.next_batch(min(job.batch, job.trials - summary.trials))
                    round_ = ClusterRound(tuner, summary, configs, writer, callbacks, done)
                    if not round_.inputs:  # the tuner has nothing new to offer
                        stopped.add(tuner)
                        continue
                    busy.add(tuner)
                    rounds.append(round_)
                return rounds

            measure_on_cluster(cluster, next_rounds)
        summaries = [tuner.finish(summary) for tuner, summary in zip(tuners, summaries)]
        for tuner, summary in zip(tuners, summaries):  # as tune_task chooses it, stale records passed over
            choose_fresh_best(summary, note, tuner.code_check)
        outcome["summary"] = summaries[0] if len(summaries) == 1 else ClusterTuneSummary.of(summaries)
        if job.save_model:
            _save_model(tuners[0], job.save_model)
    return outcome["summary"]


def _log_cluster_params(run, cluster, targets: list[Target]) -> None:
    """The runners a cluster job measured on, beside the job's own parameters."""
    try:
        run.log_params({"cluster_runners": len(cluster.runners), "cluster_build_cpus": cluster.build_cpus,
                        "cluster_targets": ",".join(t.key for t in targets),
                        "cluster_devices": ",".join(sorted({t.device_name for t in targets}))})
    except Exception as exc:  # tracking never stops a job
        warnings.warn(f"MLflow: could not log the cluster's parameters: {exc}", stacklevel=2)
