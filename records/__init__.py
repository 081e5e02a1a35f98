"""Tuning records: the JSONL log, best-config lookup, whether records are stale, pandas, MLflow tracking."""
from __future__ import annotations

from .freshness import (CodeCheck, StaleRecordsWarning, TaskChoice, chosen, select_best, stale_configs,
                        stale_warnings)
from .log import (LoadReport, LogLockedError, LogReadError, LogWriteError, RecordLog, best, best_records,
                  load_records, to_dataframe)
from .record import CodeIdentity, Record

__all__ = ["CodeCheck", "CodeIdentity", "LoadReport", "LogLockedError", "LogReadError", "LogWriteError", "Record",
           "RecordLog", "StaleRecordsWarning", "TaskChoice", "best", "best_records", "chosen", "load_records",
           "select_best", "stale_configs", "stale_warnings", "to_dataframe"]
