"""The notebooks run top to bottom on logs made here: short real tuning jobs (with MLflow in a
temporary SQLite store) and a real sweep of another shape to transfer from."""
from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from autotune import TuningJob, run_job
from fakes import SMALL_SWEEPS, copied_store
from measure import LocalBuilder, LocalRunner
from records import RecordLog
from search_space import Target, Task

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
PLOTS = {
    "explore_tuning_log.ipynb": ["best_so_far.png", "throughput_by_knob.png", "errors.png", "mlflow_runs.png"],
    "cost_model.ipynb": ["predicted_vs_measured.png", "feature_importance.png", "ranking_over_job.png",
                         "transfer_effect.png"],
}


@pytest.fixture(scope="module")
def study(tmp_path_factory, sweep_logs, fast_policy, mlflow_tables):
    folder = tmp_path_factory.mktemp("notebook-study")
    uri = copied_store(mlflow_tables, folder)
    op, shape = SMALL_SWEEPS["target"]
    task, target = Task.make(op, shape), Target.host()
    logs = []
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy, timeout_s=30) as runner:
        for tuner, trials in (("xgb", 40), ("random", 16), ("optuna-tpe", 16)):
            log = RecordLog(folder / f"{tuner}.jsonl")
            job = TuningJob(target, task, tuner=tuner, trials=trials, log=log.path, tracking_uri=uri,
                            experiment="notebooks", restrict={"threads": [1]})
            run_job(job, progress=False, builder=builder, runner=runner)
            logs.append(str(log.path))
    logs.append(str(sweep_logs["other"]))
    return {"AUTOTUNE_LOG": os.pathsep.join(logs), "MLFLOW_TRACKING_URI": uri, "AUTOTUNE_EXPERIMENT": "notebooks",
            "AUTOTUNE_TASK": task.key, "folder": folder}


@pytest.mark.parametrize("name", sorted(PLOTS))
def test_notebook_runs_and_plots(name, study, monkeypatch):
    plots = study["folder"] / f"plots-{name.split('.')[0]}"
    for key in ("AUTOTUNE_LOG", "MLFLOW_TRACKING_URI", "AUTOTUNE_EXPERIMENT", "AUTOTUNE_TASK"):
        monkeypatch.setenv(key, study[key])
    monkeypatch.setenv("AUTOTUNE_PLOTS", str(plots))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(book, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(study["folder"])}}).execute()
    for plot in PLOTS[name]:
        data = (plots / plot).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, plot
    errors = [o for cell in book.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
