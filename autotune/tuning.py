"""One task's tuning: a tuner, a builder, a runner, the log, MLflow and a progress bar.

The progress bar and MLflow also show the cost model's live quality: how well its ranking
of each batch, made before the batch was measured, matched the measured ranking.
"""
from __future__ import annotations

import sys
import warnings

from measure import MeasureInput, MeasureResult
from records import Record, RecordLog
from search_space import Target, Task, get_template

from .tuners import TuneSummary, Tuner, make_tuner


class ProgressCallback:
    """A rich progress bar over the trial budget, showing the best throughput so far."""

    def __init__(self, task: Task, total: int):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[best]}"),
                                 console=Console(file=sys.stderr), transient=False)
        self.bar = self.progress.add_task(task.key, total=total, best="")
        self.best = 0.0
        self.quality: dict = {}
        self.progress.start()

    def _best_text(self) -> str:
        text = f"best {self.best:.1f} GFLOP/s" if self.best else ""
        if "pairwise_accuracy" in self.quality:  # the model's ranking of the last batch
            text += f"  model: pairwise {self.quality['pairwise_accuracy']:.2f}"
            if "topk_recall" in self.quality:
                text += f", top-{self.quality['k']} {self.quality['topk_recall']:.2f}"
        return text

    def __call__(self, tuner: Tuner, inputs: list[MeasureInput], results: list[MeasureResult],
                 records: list[Record], first: int) -> None:
        for record in records:
            self.best = max(self.best, record.gflops)
            if "pairwise_accuracy" in record.model:
                self.quality = record.model
        self.progress.update(self.bar, completed=first + len(records), best=self._best_text())

    def close(self) -> None:
        self.progress.stop()


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


def start_tracking(job):
    """The job's MLflow run, or None when the job does not track."""
    if not job.mlflow:
        return None
    from records.mlflow_tracking import MLflowRun

    return MLflowRun(job.tracking_uri, experiment=job.experiment, run_name=job.name, params=job.params(),
                     tags=job.tags())


def tune_task(job, log: RecordLog, builder, runner, tuner_options: dict, progress: bool) -> TuneSummary:
    """One task of ``job`` (a ``TuningJob``, see ``autotune.job.run_job``): the tuner's loop
    with the log, MLflow and a progress bar as callbacks."""
    tuner = make_tuner(job.tuner, job.task, job.target, seed=job.seed, restrict=job.restrict, **tuner_options)
    callbacks = []
    run = start_tracking(job)
    if run is not None:
        callbacks.append(MLflowCallback(run))
    bar = ProgressCallback(job.task, job.trials) if progress else None
    if bar is not None:
        callbacks.append(bar)
    status, summary = "FAILED", None
    try:
        summary = tuner.tune(job.trials, builder, runner, batch_size=job.batch, log=log, callbacks=callbacks)
        status = "FINISHED"
        if job.save_model:
            _save_model(tuner, job.save_model)
    finally:
        if bar is not None:
            bar.close()
        if run is not None:
            _finish_run(run, log, status, summary)
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
