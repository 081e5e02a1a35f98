"""One tuning job: a tuner, a builder, a runner, the log, MLflow and a progress bar.

The progress bar and MLflow also show the cost model's live quality: how well its ranking
of each batch, made before the batch was measured, matched the measured ranking.
"""
from __future__ import annotations

import sys
import warnings
from contextlib import ExitStack
from measure import LocalBuilder, LocalRunner, MeasureInput, MeasureResult
from records import Record, RecordLog
from search_space import Target, Task

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


def run_tuning_job(task: Task, target: Target, tuner_name: str, trials: int, batch: int, seed: int,
                   log: RecordLog, tracking_uri: str | None = None, use_mlflow: bool = True,
                   experiment: str = "llm-autotune", build_timeout: float = 60.0, run_timeout: float = 20.0,
                   progress: bool = True, builder: LocalBuilder | None = None,
                   runner: LocalRunner | None = None, restrict: dict | None = None,
                   tuner_options: dict | None = None, params: dict | None = None,
                   save_model: str | None = None) -> TuneSummary:
    """Tune one task: ``tuner_options`` go to the tuner's constructor, ``params`` to MLflow too;
    ``save_model``: where to save the xgb tuner's cost model at the end."""
    tuner = make_tuner(tuner_name, task, target, seed=seed, restrict=restrict, **(tuner_options or {}))
    callbacks = []
    run = None
    if use_mlflow:
        from records.mlflow_tracking import MLflowRun

        run = MLflowRun(tracking_uri, experiment=experiment, run_name=f"{tuner_name}:{task.key}",
                        params={"op": task.op, "task": task.key, "shape": task.dims, "dtype": task.dtype,
                                "target": target.key, "device": target.device_name, "tuner": tuner_name,
                                "trials": trials, "batch": batch, "seed": seed, "log": str(log.path),
                                "restrict": restrict or {}, **(params or {})},
                        tags={"task": task.key, "target": target.key})
        callbacks.append(MLflowCallback(run))
    bar = None
    with ExitStack() as stack:
        builder = builder or stack.enter_context(LocalBuilder(timeout_s=build_timeout))
        runner = runner or stack.enter_context(LocalRunner(timeout_s=run_timeout, seed=seed))
        if progress:
            bar = ProgressCallback(task, trials)
            callbacks.append(bar)
        status = "FAILED"
        try:
            summary = tuner.tune(trials, builder, runner, batch_size=batch, log=log, callbacks=callbacks)
            status = "FINISHED"
            if save_model:
                _save_model(tuner, save_model)
        finally:
            if bar is not None:
                bar.close()
            if run is not None:
                _finish_run(run, log, status, locals().get("summary"))
    return summary


def _save_model(tuner: Tuner, path: str) -> None:
    model = getattr(tuner, "model", None)
    if model is None or not model.fitted:
        warnings.warn(f"no cost model to save to {path}: too few verified trials to fit one", stacklevel=2)
        return
    model.save(path)


def pretrained_model(records: list[Record], load_model: str | None, template, task: Task, target: Target,
                     seed: int = 0):
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
