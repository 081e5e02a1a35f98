"""tune-model times candidates cold or warm as the model runs them, and says which everywhere
(what a tune-model job says and records of it: test_cli_model.py, on the job it tunes there)."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_cli import run

import autotune.job
from autotune import JobError, ModelWorkload, TuningJob
from autotune.bench.model_run import RunReport, run_condition, tuned_condition
from autotune.model_tasks import pass_bytes, weight_bytes
from runtime.generation import Generation
from runtime.abi import MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION
from runtime.model_config import PRESETS, load_model_config
from search_space import Task

MIB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]
TINY = PRESETS["tiny"]
LLAMA_100M = load_model_config(ROOT / "benchmarks" / "models" / "llama-100m")


@pytest.fixture
def cpu(host):
    return replace(host, l2_bytes=2 * MIB, l3_bytes=32 * MIB)


def test_a_pass_touches_the_weights_the_activations_and_the_cache():
    assert LLAMA_100M.tie_word_embeddings
    assert weight_bytes(LLAMA_100M) == 4 * LLAMA_100M.parameters  # tied: the table is read once, as the head
    assert weight_bytes(TINY) == 4 * (TINY.parameters - TINY.vocab_size * TINY.hidden_size)  # untied: no table
    assert weight_bytes(TINY, "q4", 128) < weight_bytes(TINY) / 6
    longer = pass_bytes(TINY, 1, 1, 1024) - pass_bytes(TINY, 1, 1, 512)
    assert longer == 4 * 2 * TINY.num_hidden_layers * TINY.kv_size * 512
    assert 2 * MIB < ModelWorkload(TINY).working_set_bytes() < 4 * MIB
    assert ModelWorkload(LLAMA_100M).working_set_bytes() > 390 * MIB


def test_a_model_that_fits_in_cache_is_timed_warm_and_one_that_does_not_cold(cpu):
    tiny, big = TuningJob(cpu, model=ModelWorkload(TINY)), TuningJob(cpu, model=ModelWorkload(LLAMA_100M))
    assert tiny.cache_condition() == "warm" and big.cache_condition() == "cold"
    vm = replace(cpu, l3_bytes=480 * MIB)  # an implausible L3 is capped: 400 MB of weights stay cold
    assert TuningJob(vm, model=ModelWorkload(LLAMA_100M)).cache_condition() == "cold"
    assert TuningJob(vm, model=ModelWorkload(TINY)).cache_condition() == "warm"
    assert TuningJob(cpu, model=ModelWorkload(TINY), cache="cold").cache_condition() == "cold"
    assert TuningJob(cpu, model=ModelWorkload(LLAMA_100M), cache="warm").cache_condition() == "warm"
    assert tiny.params()["cache"] == "warm" and big.params()["working_set_bytes"] > 390 * MIB
    # copies filling what one pass touches, so each call finds its weights where the model
    # leaves them: in the cache level that holds a small model, as far back as a large one's
    for job, cold_bytes in ((tiny, ModelWorkload(TINY).working_set_bytes()),
                            (big, ModelWorkload(LLAMA_100M).working_set_bytes())):
        runner = autotune.job._runner(job)
        try:  # a model job's samples are best-of-3 unless the job gives its own timing
            assert runner.policy.cold_bytes == cold_bytes and runner.policy.best_of == 3
            assert runner.policy.cache == job.cache_condition()
        finally:
            runner.close()


def test_operator_jobs_keep_their_timing(cpu):
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 64})
    assert TuningJob(cpu, task).cache_condition() == "warm"
    assert TuningJob(cpu, task, cache="cold").cache_condition() == "cold"
    runner = autotune.job._runner(TuningJob(cpu, task, cache="cold"))
    try:
        assert runner.policy.cold_bytes == 2 * cpu.l3_bytes and runner.policy.best_of == 1
    finally:
        runner.close()
    gpu = TuningJob(replace(cpu, kind="cuda"), model=ModelWorkload(TINY))
    assert gpu.cache_condition() is None and "cache" not in gpu.params()
    with pytest.raises(JobError, match="unknown cache condition 'hot'"):
        TuningJob(cpu, task, cache="hot")
    job = TuningJob(cpu, model=ModelWorkload(TINY, (16,), (1,), (64,)), cache="warm", trials=5)
    back = TuningJob.from_dict(json.loads(json.dumps(job.to_dict())))
    assert back == job and back.cache == "warm" and back.params() == job.params()


def test_tune_warns_when_it_resumes_records_of_another_cache_condition(tmp_path):
    """A cold job resuming warm records would report a warm time as its best."""
    common = ["tune", "--op", "rmsnorm", "--shape", "M=4,N=256", "--tuner", "random", "--log", "t.jsonl",
              "--no-mlflow", "--quiet"]
    proc = run(*common, "--trials", "2", cwd=tmp_path)
    assert "mixes both" not in proc.stderr
    proc = run(*common, "--trials", "3", "--cold-cache", cwd=tmp_path)
    assert "2 records timed warm" in proc.stderr and "this job times cold" in proc.stderr and "mixes both" in proc.stderr
    proc = run(*common, "--trials", "4", "--cold-cache", cwd=tmp_path)  # the warm ones are still there: said again
    assert "2 records timed warm" in proc.stderr


def _library(folder: Path, conditions) -> str:
    folder.mkdir()
    kernels = [{"measured": {"device": "x", **({"cache": c} if c else {})}} for c in conditions]
    (folder / "manifest.json").write_text(json.dumps({"format": MANIFEST_FORMAT, "schema": MANIFEST_SCHEMA_VERSION,
                                                      "kernels": kernels}))
    return str(folder)


def test_run_reports_the_condition_the_library_was_tuned_for(tmp_path):
    assert tuned_condition(_library(tmp_path / "warm", ["warm", "warm"])) == "warm"
    assert tuned_condition(_library(tmp_path / "mixed", ["warm", "cold", None])) == "cold+warm"
    assert tuned_condition(_library(tmp_path / "old", [None])) is None
    condition, touched, cache = run_condition(TINY, 1, 128, 160, "none", 128)
    assert 2 * MIB < touched < 4 * MIB and condition == ("warm" if touched <= cache else "cold")
    gen = Generation(np.zeros((1, 2), dtype=np.int64), np.zeros((1, 2, 4), dtype=np.float32), 1e-3, 1e-3, 64, 1)
    report = RunReport("tiny", "lib", "none", 1, 64, 2, gen, tuned_for="cold", runs_in=("warm", 3 * MIB, 256 * MIB))
    line = report.summary().splitlines()[1]
    assert "kernels tuned cold" in line and "this run is warm" in line and "tune-model --cache warm" in line
    assert report.to_dict()["cache"] == {"tuned_for": "cold", "runs_in": "warm", "pass_bytes": 3 * MIB,
                                         "cache_bytes": 256 * MIB}
    report.tuned_for = None
    assert "do not say" in report.summary().splitlines()[1]


def test_a_run_report_says_what_it_cannot_compare_and_writes_strict_json():
    """NaN logits (a checkpoint holding NaN) give token 0 on both sides: not "same tokens";
    one new token has no decode step: no rate, no ratio, and null (not NaN) in the JSON."""
    import json

    from autotune.strict_json import dumps

    nan = Generation(np.zeros((1, 1), dtype=np.int64), np.full((1, 1, 4), np.nan, np.float32), 1e-3, 0.0, 64, 0)
    report = RunReport("tiny", "lib", "none", 1, 64, 1, nan, reference=nan)
    text = report.summary()
    assert "logits not finite" in text and "same tokens" not in text and "no decode step" in text, text
    written = dumps(report.to_dict())
    assert "NaN" not in written and "Infinity" not in written  # not JSON: parsers outside Python refuse them
    data = json.loads(written)
    assert data["reference"]["logits"]["same_tokens"] is False and data["decode_speedup_vs_reference"] is None
