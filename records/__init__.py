"""Tuning records: the JSONL log, best-config lookup, pandas, MLflow tracking."""
from __future__ import annotations

from .log import (LoadReport, LogLockedError, LogReadError, LogWriteError, RecordLog, best, best_records,
                  load_records, to_dataframe)
from .record import Record

__all__ = ["LoadReport", "LogLockedError", "LogReadError", "LogWriteError", "Record", "RecordLog", "best",
           "best_records", "load_records", "to_dataframe"]
