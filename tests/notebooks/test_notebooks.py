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


def run_cells(name: str, cells: list[int], folder: Path, extra: str = "") -> list[str]:
    """Cells ``cells`` of notebook ``name`` (then ``extra``) run in ``folder``: the text they print."""
    book = nbformat.read(NOTEBOOKS / name, as_version=4)
    book.cells = [book.cells[i] for i in cells] + ([nbformat.v4.new_code_cell(extra)] if extra else [])
    NotebookClient(book, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()
    return [o.get("text", "") for cell in book.cells for o in cell.get("outputs", []) if o.get("output_type") == "stream"]


def small_log(folder: Path) -> Path:
    """Three verified gemm records, one per value of a numeric knob (in an order text would sort as well)."""
    from measure import MeasureResult
    from records import Record

    log = RecordLog(folder / "tune.jsonl")
    task = Task.make("gemm", {"M": 64, "N": 64, "K": 64})
    log.append([Record(task, Target.host(), {"vec": vec}, i, MeasureResult((1e-5 * (i + 1),)), tuner="random")
                for i, vec in enumerate((16, 4, 8))])
    return log.path


def test_explore_skips_mlflow_without_a_store_and_orders_knob_values_as_numbers(tmp_path, monkeypatch):
    small_log(tmp_path)
    for key in ("AUTOTUNE_LOG", "MLFLOW_TRACKING_URI", "AUTOTUNE_TASK"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AUTOTUNE_PLOTS", str(tmp_path / "plots"))
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    printed = run_cells("explore_tuning_log.ipynb", [1, 3, 7, 11, 12], tmp_path, "print(list(stats.index))")
    assert not (tmp_path / "mlflow.db").exists()  # reading MLflow would have made an empty store
    assert any("no MLflow store" in text for text in printed), printed
    assert printed[-1].strip() == "['4', '8', '16']"


def test_cost_model_says_in_one_line_when_no_record_is_of_the_task(tmp_path, monkeypatch):
    from nbclient.exceptions import CellExecutionError

    small_log(tmp_path)
    monkeypatch.delenv("AUTOTUNE_LOG", raising=False)
    monkeypatch.setenv("AUTOTUNE_TASK", "gemm/float32/M=1,N=1,K=1")
    monkeypatch.setenv("AUTOTUNE_PLOTS", str(tmp_path / "plots"))
    with pytest.raises(CellExecutionError) as error:
        run_cells("cost_model.ipynb", [1], tmp_path)
    assert error.value.ename == "RuntimeError", error.value.evalue  # not pandas' argmax of an empty sequence
    assert error.value.evalue.startswith("no verified record of AUTOTUNE_TASK=gemm/float32/M=1,N=1,K=1 in")
