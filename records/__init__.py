"""Tuning records: the JSONL log, best-config lookup, pandas, MLflow tracking, library export."""
from __future__ import annotations

from .export import ExportError, ExportFailed, ExportSummary, export_library
from .log import LoadReport, LogWriteError, RecordLog, best, best_records, load_records, to_dataframe
from .record import Record

__all__ = ["ExportError", "ExportFailed", "ExportSummary", "LoadReport", "LogWriteError", "Record", "RecordLog",
           "best", "best_records", "export_library", "load_records", "to_dataframe"]
