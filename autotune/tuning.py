"""One tuning job: a tuner, a builder, a runner, the log, MLflow and a progress bar."""
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
        self.progress.start()

    def _best_text(self) -> str:
        return f"best {self.best:.1f} GFLOP/s" if self.best else ""

    def __call__(self, tuner: Tuner, inputs: list[MeasureInput], results: list[MeasureResult],
                 records: list[Record], first: int) -> None:
        for record in records:
            self.best = max(self.best, record.gflops)
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
                   tuner_options: dict | None = None, params: dict | None = None) -> TuneSummary:
    """Tune one task: ``tuner_options`` go to the tuner's constructor, ``params`` to MLflow too."""
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
        finally:
            if bar is not None:
                bar.close()
            if run is not None:
                _finish_run(run, log, status, locals().get("summary"))
    return summary


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
