"""MLflow tracking: one run per tuning job, a metric point per trial, the log as artifact.

The embedded default is a SQLite store in the working directory (``sqlite:///mlflow.db``)
with artifacts in ``mlartifacts/`` beside it; any tracking server works by URI. mlflow is
imported only here, so the rest of the project (and the runtime) never pays for it.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from .record import Record

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "llm-autotune"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_store(uri: str) -> Path | None:
    """The file of a local SQLite store (``sqlite:///PATH``), or None for any other store."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _artifact_root(uri: str) -> str | None:
    """Keep artifacts next to a SQLite store instead of wherever the process happens to run."""
    store = sqlite_store(uri)
    return (store.resolve().parent / "mlartifacts").as_uri() if store is not None else None


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient  # configures mlflow's loggers: quieten them afterwards

    for name in ("mlflow", "alembic"):  # schema-migration chatter is not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


@contextmanager
def _store_setup_lock(uri: str):
    """Jobs that start together on one new SQLite store would both create its schema (and an
    experiment), and the loser's half-done migration breaks the store for every later job:
    they take turns here. The lock is on the store's folder, so nothing is written for it."""
    store = sqlite_store(uri)
    if store is None:
        yield
        return
    try:
        fd = os.open(store.resolve().parent, os.O_RDONLY)
    except OSError:  # no such folder: the store fails to open on its own, with its own message
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


def experiment_id(client, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_artifact_root(uri))


class MLflowRun:
    """A tuning job's MLflow run. ``log_trials`` after each batch; ``finish`` at the end."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        with _store_setup_lock(self.uri):
            self.client = _client(self.uri)
            self.experiment_id = experiment_id(self.client, experiment, self.uri)
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags or {})
        self.run_id: str = run.info.run_id
        self.best_gflops = 0.0
        if params:
            self.log_params(params)

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])

    def log_trials(self, records: Iterable[Record], first_step: int,
                   extra: dict[str, float] | None = None) -> None:
        """One point per trial at ``step`` = its trial number: its GFLOP/s and the best so far;
        at the last trial of a batch ranked by a cost model, that ranking's ``model_pairwise_accuracy``
        and ``model_topk_recall``."""
        from mlflow.entities import Metric

        metrics = []
        now = int(time.time() * 1000)
        for step, record in enumerate(records, start=first_step):
            gflops = record.gflops
            self.best_gflops = max(self.best_gflops, gflops)
            metrics.append(Metric("gflops", gflops, now, step))
            metrics.append(Metric("best_gflops", self.best_gflops, now, step))
            metrics.append(Metric("ok", 1.0 if record.ok else 0.0, now, step))
            if record.ok:
                metrics.append(Metric("seconds", record.seconds, now, step))
            for key in ("pairwise_accuracy", "topk_recall"):  # the cost model's ranking of the batch
                if key in record.model:
                    metrics.append(Metric(f"model_{key}", float(record.model[key]), now, step))
        for key, value in (extra or {}).items():
            metrics.append(Metric(key, float(value), now, first_step))
        for start in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 900])

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def log_json(self, name: str, data: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self.client.log_artifact(self.run_id, str(path))

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


class RunNotFound(LookupError):
    """No MLflow run with that id in the store."""


def _store_exists(uri: str) -> bool:
    """A SQLite store that is not there would be created empty by MLflow: say so instead."""
    store = sqlite_store(uri)
    return store is None or store.is_file()


def _log_artifacts(client, run_id: str, folder: str | None = None) -> list[str]:
    """Paths of the run's tuning logs (``.jsonl``, ``.jsonl.gz``), in every artifact folder."""
    found = []
    for item in client.list_artifacts(run_id, folder):
        if item.is_dir:
            found.extend(_log_artifacts(client, run_id, item.path))
        elif item.path.endswith((".jsonl", ".jsonl.gz")):
            found.append(item.path)
    return sorted(found)


def records_from_run(run_id: str, tracking_uri: str | None = None) -> list[Record]:
    """Read a job's records back from the tuning log(s) its MLflow run keeps as artifacts.

    Raises RunNotFound for a run the store does not hold and FileNotFoundError for a run
    without a tuning log."""
    from .log import RecordLog

    uri = resolve_tracking_uri(tracking_uri)
    if not _store_exists(uri):
        raise RunNotFound(f"no MLflow store at {uri}")
    client = _client(uri)
    try:
        client.get_run(run_id)
    except Exception as exc:  # MlflowException for an unknown or malformed id
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RunNotFound(f"no MLflow run {run_id} in {uri} ({reason})") from None
    logs = _log_artifacts(client, run_id)
    if not logs:
        raise FileNotFoundError(f"MLflow run {run_id} has no .jsonl tuning log among its artifacts")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for errors
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in logs:
            local = client.download_artifacts(run_id, name, tmp)
            records.extend(RecordLog(local).records())
    return records
