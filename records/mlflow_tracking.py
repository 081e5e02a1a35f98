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
import re
import tempfile
import threading
import time
import warnings
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


# MLflow's own HTTP defaults (7 retries with exponential backoff, 120 s a request) stalled a
# job for minutes when its server died or hung. With these a call to a dead server fails in
# about 4 s, to a hung one in about 35 s, and then the run sends nothing more (the log keeps
# every record). A user's own settings of these variables win.
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# and no progress bar when a run's log is downloaded (stderr is for errors), no usage reports
OUR_SETTINGS = {**HTTP_DEFAULTS, "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}

# schema-migration chatter and run links are not the user's business: warnings only
QUIET_LOGGERS = ("mlflow", "alembic")

_settings_lock = threading.Lock()
_settings_users = 0
_settings_made: dict[str, str] = {}  # the variables of OUR_SETTINGS this module set
_logger_levels: dict[str, int] = {}  # the levels QUIET_LOGGERS had before


@contextmanager
def our_settings():
    """OUR_SETTINGS where the environment has none of its own, and QUIET_LOGGERS at warnings
    only, while calls of ours to MLflow run: MLflow reads the variables at each request. Put
    back after the last of those calls ends, so the process's other MLflow calls (a notebook's
    own) keep MLflow's defaults."""
    global _settings_users
    import mlflow  # noqa: F401  (sets its loggers' levels when first imported: before they are saved)

    with _settings_lock:
        _settings_users += 1
        if _settings_users == 1:
            for name in QUIET_LOGGERS:
                logger = logging.getLogger(name)
                _logger_levels[name] = logger.level
                logger.setLevel(logging.WARNING)
        for name, value in OUR_SETTINGS.items():
            if name not in os.environ:
                os.environ[name] = _settings_made[name] = value
    try:
        yield
    finally:
        with _settings_lock:
            _settings_users -= 1
            if _settings_users == 0:
                for name, value in _settings_made.items():
                    if os.environ.get(name) == value:  # not set again by someone else meanwhile
                        del os.environ[name]
                _settings_made.clear()
                for name, level in _logger_levels.items():
                    logger = logging.getLogger(name)
                    if logger.level == logging.WARNING:  # not set again by someone else meanwhile
                        logger.setLevel(level)
                _logger_levels.clear()


def error_text(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: its first line, cut at a word when longer than ``limit``."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "") or type(exc).__name__
    if len(text) <= limit:
        return text
    # a failed HTTP request ends its long line with the cause: "... [Errno 111] Connection refused')"
    cause = re.findall(r"\[Errno -?\d+\][^'\"()]*", text)
    tail = f" … {cause[-1].strip()}" if cause else " …"
    return text[:max(limit - len(tail), limit // 2)].rsplit(" ", 1)[0] + tail


def _text(value: Any) -> str:
    """A parameter, tag or name as UTF-8 text: a path that is not valid UTF-8 (a surrogate-
    escaped byte) would fail the store's encoder, so its odd bytes are written as \\xNN."""
    text = str(value)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _client(uri: str):
    """A client of the store at ``uri``: call it, and the client, within ``our_settings()``."""
    from mlflow import MlflowClient

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
    except OSError:  # no such folder: MLflow creates it (the CLI refuses such a store first, check_reachable)
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


class TrackingStopped(RuntimeError):
    """A call to a run whose tracking failed before: nothing is sent any more."""


class MLflowRun:
    """A tuning job's MLflow run. ``log_trials`` after each batch; ``finish`` at the end.

    After one call to the store fails, ``failure`` says why and every later call raises
    TrackingStopped at once: a dead server would cost each call its retries. An artifact that
    cannot be written (an OSError: a local folder, or a server that answered no) leaves the
    run usable, so that it can still be ended."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, params: dict[str, Any] | None = None,
                 tags: dict[str, str] | None = None):
        self.uri = resolve_tracking_uri(tracking_uri)
        self.failure = ""  # why tracking stopped: once set, nothing more is sent
        self.ended = ""  # the status the run was ended with
        with _store_setup_lock(self.uri), our_settings():
            self.client = _client(self.uri)
            self.experiment_id = experiment_id(self.client, experiment, self.uri)
        run = self._send(self.client.create_run, self.experiment_id, run_name=_text(run_name) if run_name else None,
                         tags={_text(k): _text(v) for k, v in (tags or {}).items()})
        self.run_id: str = run.info.run_id
        self.best_gflops = 0.0
        if params:
            try:
                self.log_params(params)
            except Exception:  # no job will end this run: it must not stay RUNNING
                try:
                    with our_settings():
                        self.client.set_terminated(self.run_id, status="FAILED")
                except Exception:
                    pass
                raise

    def _send(self, call, *args, artifact: bool = False, **kwargs):
        """Every call to the store goes through here (see the class)."""
        if self.failure:
            raise TrackingStopped(f"tracking of MLflow run {self.run_id} stopped: {self.failure}")
        try:
            with our_settings():
                return call(*args, **kwargs)
        except Exception as exc:
            if not (artifact and isinstance(exc, OSError)):
                self.failure = error_text(exc)
            raise

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        self._send(self.client.log_batch, self.run_id,
                   params=[Param(_text(k), _text(v)[:6000]) for k, v in params.items()])

    def log_trials_or_stop(self, records: Iterable[Record], first_step: int,
                           extra: dict[str, float] | None = None) -> None:
        """``log_trials`` for a job's per-batch callback: a failure is one warning (the job tunes
        on, its log holds every record), and nothing is sent after it."""
        if self.failure:
            return
        try:
            self.log_trials(records, first_step, extra)
        except Exception as exc:
            self.failure = self.failure or error_text(exc)
            warnings.warn(f"MLflow logging stopped ({self.failure}); tuning on, every record goes to the log",
                          stacklevel=3)

    @contextmanager
    def closing_uploads(self):
        """Around a job's closing uploads (its figures, its log): one warning when they fail
        while the store still answers; a store that is gone is said by whoever ends the run."""
        try:
            yield
        except Exception as exc:
            if not self.failure:
                warnings.warn(f"MLflow: could not store the log in run {self.run_id}: {error_text(exc)}",
                              stacklevel=4)

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
            self._send(self.client.log_batch, self.run_id, metrics=metrics[start:start + 900])

    def log_artifact(self, path: str | os.PathLike) -> None:
        self._send(self.client.log_artifact, self.run_id, str(path), artifact=True)

    def log_json(self, name: str, data: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(data, indent=2))
            self._send(self.client.log_artifact, self.run_id, str(path), artifact=True)

    def finish(self, status: str = "FINISHED") -> None:
        """End the run (once: a second call does nothing)."""
        if not self.ended:
            self._send(self.client.set_terminated, self.run_id, status=status)
            self.ended = status


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


class StoreUnavailable(ConnectionError):
    """The MLflow store could not be opened or read."""


def records_from_run(run_id: str, tracking_uri: str | None = None) -> list[Record]:
    """Read a job's records back from the tuning log(s) its MLflow run keeps as artifacts.

    Raises RunNotFound for a run the store does not hold, FileNotFoundError for a run
    without a tuning log and StoreUnavailable for a store that cannot be opened or read."""
    uri = resolve_tracking_uri(tracking_uri)
    if not _store_exists(uri):
        raise RunNotFound(f"no MLflow store at {uri}")
    with our_settings():
        return _records_of_run(run_id, uri)


def _records_of_run(run_id: str, uri: str) -> list[Record]:
    from .log import RecordLog

    try:
        client = _client(uri)
    except Exception as exc:  # an unsupported URI, a store that cannot be opened
        raise StoreUnavailable(f"cannot open the MLflow store {uri}: {error_text(exc)}") from None
    try:
        client.get_run(run_id)
    except Exception as exc:  # MlflowException for an unknown or malformed id
        raise RunNotFound(f"no MLflow run {run_id} in {uri} ({error_text(exc)})") from None
    records: list[Record] = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            logs = _log_artifacts(client, run_id)
            local = [client.download_artifacts(run_id, name, tmp) for name in logs]
        except Exception as exc:
            raise StoreUnavailable(f"cannot read the artifacts of MLflow run {run_id} in {uri}: "
                                   f"{error_text(exc)}") from None
        if not logs:
            raise FileNotFoundError(f"MLflow run {run_id} has no .jsonl tuning log among its artifacts")
        for name, path in zip(logs, local):
            report = RecordLog(path).load(warn=False)
            # the downloaded copy is deleted below: the warning names the run's artifact instead
            if message := report.warning(f"MLflow run {run_id}: {name}"):
                warnings.warn(message, stacklevel=3)  # the caller of records_from_run
            records.extend(report.records)
    return records
