"""MLflow tracking: one run per tuning job, a metric point per trial, the log as artifact.

The embedded default is a SQLite store in the working directory (``sqlite:///mlflow.db``)
with artifacts in ``mlartifacts/`` beside it; any tracking server works by URI. mlflow is
imported only here, so the rest of the project (and the runtime) never pays for it.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable

from .record import Record

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_EXPERIMENT = "llm-autotune"


def resolve_tracking_uri(uri: str | None) -> str:
    """--tracking-uri, else MLFLOW_TRACKING_URI, else the local SQLite default."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _artifact_root(uri: str) -> str | None:
    """Keep artifacts next to a SQLite store instead of wherever the process happens to run."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None


def _client(uri: str):
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from mlflow import MlflowClient  # configures mlflow's loggers: quieten them afterwards

    for name in ("mlflow", "alembic"):  # schema-migration chatter is not the user's business
        logging.getLogger(name).setLevel(logging.WARNING)

    return MlflowClient(tracking_uri=uri)


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


def records_from_run(run_id: str, tracking_uri: str | None = None, artifact: str = "tune.jsonl") -> list[Record]:
    """Read a job's tuning log back from its MLflow run (for export)."""
    from .log import RecordLog

    client = _client(resolve_tracking_uri(tracking_uri))
    names = [a.path for a in client.list_artifacts(run_id)]
    logs = [n for n in names if n.endswith(".jsonl")]
    if not logs:
        raise FileNotFoundError(f"MLflow run {run_id} has no .jsonl tuning log among its artifacts {names}")
    with tempfile.TemporaryDirectory() as tmp:
        records: list[Record] = []
        for name in logs:
            local = client.download_artifacts(run_id, name, tmp)
            records.extend(RecordLog(local).records())
    return records
