"""tune-model and run from the command line, on real kernels of the tiny preset."""
from __future__ import annotations

import json

import pytest
from fakes import copied_store
from test_cli import assert_usage_error, run

from records import RecordLog


@pytest.fixture(scope="module")
def tiny_log(tmp_path_factory, mlflow_tables):
    """A tune-model job of the tiny preset, logged to a temporary MLflow store."""
    folder = tmp_path_factory.mktemp("tiny")
    copied_store(mlflow_tables, folder)
    proc = run("tune-model", "--model", "tiny", "--prefill-tokens", "16", "--decode-batch", "1", "--kv-len", "64",
               "--trials-total", "30", "--batch", "4", "--log", "tiny.jsonl", "--quiet", "--json",
               "--tracking-uri", f"sqlite:///{folder}/mlflow.db", cwd=folder)
    return folder, json.loads(proc.stdout)


def test_tune_model_measures_every_task_within_the_budget(tiny_log):
    folder, summary = tiny_log
    records = RecordLog(folder / "tiny.jsonl").records()
    assert summary["trials"] == len(records) == 30
    assert len(summary["tasks"]) == 20 and all(t["trials"] >= 1 for t in summary["tasks"])
    assert all(t["best_ms"] > 0 for t in summary["tasks"])
    assert abs(sum(t["share"] for t in summary["tasks"]) - 1.0) < 1e-6
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    (run_info,) = client.search_runs(client.get_experiment_by_name("llm-autotune").experiment_id)
    assert run_info.data.params["model"] == "tiny" and run_info.data.params["tasks"] == "20"
    assert len(client.get_metric_history(run_info.info.run_id, "gflops")) == 30
    assert {a.path for a in client.list_artifacts(run_info.info.run_id)} >= {"tiny.jsonl", "model_tasks.json"}


def test_a_resumed_tune_model_only_adds_trials(tiny_log, tmp_path):
    folder, _ = tiny_log
    log = tmp_path / "again.jsonl"
    log.write_text((folder / "tiny.jsonl").read_text())
    proc = run("tune-model", "--model", "tiny", "--prefill-tokens", "16", "--kv-len", "64", "--trials-total", "34",
               "--batch", "4", "--log", str(log), "--quiet", "--no-mlflow", "--json", cwd=tmp_path)
    summary = json.loads(proc.stdout)
    assert summary["resumed"] == 30 and summary["measured"] == 4
    records = RecordLog(log).records()
    assert len({(r.task.key, r.config_index) for r in records}) == len(records) == 34


def test_run_on_the_tuned_log_matches_the_reference_and_the_defaults(tiny_log):
    folder, _ = tiny_log
    proc = run("run", "--log", "tiny.jsonl", "--model", "tiny", "--prompt-tokens", "11", "--new-tokens", "6",
               "--compare", "--json", cwd=folder)
    out = json.loads(proc.stdout)
    assert out["kernels"]["tuned"] == 20 and out["kernels"]["untuned"] == 0
    assert out["kernels"]["prefill_padded_to"] == 11  # its own length: the prefill GEMMs read M at run time
    assert len(out["token_ids"][0]) == 6
    for side in ("reference", "defaults"):
        assert out[side]["logits"]["max_rel"] < 1e-4, side
        assert out[side]["logits"]["same_tokens"], side
        assert out[f"decode_speedup_vs_{side}"] > 0
    assert out["decode_tokens_per_s"] > 0 and out["reference"]["blas"]["internal_api"] == "openblas"


def test_q4_model_tunes_and_runs_against_the_dequantised_reference(tmp_path):
    run("tune-model", "--model", "tiny", "--quantize", "q4", "--group-size", "32", "--prefill-tokens", "24",
        "--kv-len", "32", "--trials-total", "21", "--batch", "2", "--log", "q4.jsonl", "--quiet", "--no-mlflow",
        cwd=tmp_path)
    ops = {r.task.op for r in RecordLog(tmp_path / "q4.jsonl").records()}
    assert {"gemm_q4", "gemv_q4"} <= ops and not ops & {"gemm", "gemv"}
    out = json.loads(run("run", "--log", "q4.jsonl", "--model", "tiny", "--prompt-ids", "5,6,7,8,9",
                         "--new-tokens", "4", "--compare", "--json", cwd=tmp_path).stdout)
    # q4 and its group of 32 come from the kernels: packed at the default 128, none of them would run
    assert out["quantize"] == "q4" and out["kernels"]["untuned"] == 0, out["kernels"]
    assert out["reference"]["logits"]["max_rel"] < 1e-4 and out["reference"]["logits"]["same_tokens"]


@pytest.mark.parametrize("args, message", [
    (["tune-model", "--model", "no-such-model"], "not a preset"),
    (["tune-model", "--model", "no/such/config.json"], "model config no/such/config.json does not exist"),
    (["tune-model", "--model", "."], "model folder . has no config.json"),
    (["tune-model", "--model", "tiny", "--threads", "4096"], "--threads 4096: "),
    (["run", "--model", "tiny", "--lib", "lib", "--target", "bogus"], "unknown target 'bogus'"),
    (["tune-model", "--model", "tiny", "--prefill-tokens", "12,x"], "malformed --prefill-tokens"),
    (["tune-model", "--model", "tiny", "--kv-len", "64,64"], "names a size twice"),
    (["tune-model", "--model", "tiny", "--trials-total", "0"], "--trials-total must be >= 1"),
    (["tune-model", "--model", "tiny", "--log", "/no/such/dir/x.jsonl"], "does not exist"),
    (["run", "--model", "tiny"], "either --lib DIR"),
    (["run", "--model", "tiny", "--lib", "/no/such/lib"], "no manifest.json"),
    (["run", "--model", "tiny", "--log", "/no/such/log.jsonl"], "does not exist"),
])
def test_bad_model_input_is_one_line_and_exit_2(args, message, tmp_path):
    assert_usage_error(run(*args, cwd=tmp_path, check=False), message)


def test_q4_needs_dims_that_are_multiples_of_the_group(tmp_path):
    config = {"hidden_size": 96, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 1,
              "vocab_size": 50}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run("tune-model", "--model", str(tmp_path / "config.json"), "--quantize", "q4", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "not a multiple of the group size 128" in proc.stderr


DEPLOYED_MODEL = """
import json, sys
import numpy as np
import runtime
from runtime.llama import LlamaModel
from runtime.model_config import load_model_config
from runtime.weights import ModelWeights

config = load_model_config("tiny")
with runtime.load(sys.argv[1]) as library:
    out = LlamaModel(config, ModelWeights.random(config, seed=7), library).generate(np.array([[3, 1, 4, 1, 5]]), 4)
heavy = ("search_space", "measure", "records", "autotune", "cost_model", "llvmlite", "xgboost", "optuna", "mlflow")
print(json.dumps({"tokens": out.tokens.tolist(), "logits": out.logits.tolist(),
                  "imported": sorted({m.split(".")[0] for m in sys.modules if m.split(".")[0] in heavy})}))
"""


@pytest.mark.tools("cc")
def test_the_exported_library_runs_the_model_with_numpy_only(tiny_log, tmp_path):
    """tune-model, export, then run in a process that has numpy and the runtime and nothing else."""
    import numpy as np
    from fakes import run_numpy_only

    from runtime.model_config import PRESETS
    from runtime.reference import ReferenceModel
    from runtime.weights import ModelWeights

    folder, _ = tiny_log
    run("export", "--log", str(folder / "tiny.jsonl"), "--out", str(tmp_path / "lib"), cwd=tmp_path)
    out = json.loads(run("run", "--lib", "lib", "--model", "tiny", "--prompt-tokens", "12", "--new-tokens", "5",
                         "--compare", "--json", cwd=tmp_path).stdout)
    assert out["kernels"] == {"tuned": 20, "untuned": 0, "prefill_padded_to": 12, "decode_mode": "host"}
    assert out["reference"]["logits"]["max_rel"] < 1e-4 and out["reference"]["logits"]["same_tokens"]
    proc = run_numpy_only(tmp_path, DEPLOYED_MODEL, str(tmp_path / "lib"))
    assert proc.returncode == 0, proc.stderr
    deployed = json.loads(proc.stdout)
    assert deployed["imported"] == []
    reference = ReferenceModel(PRESETS["tiny"], ModelWeights.random(PRESETS["tiny"], seed=7)).generate(
        np.array([[3, 1, 4, 1, 5]]), 4)
    logits = np.asarray(deployed["logits"])
    assert np.abs(logits - reference.logits).max() / np.abs(reference.logits).max() < 1e-4
    assert deployed["tokens"] == reference.tokens.tolist()


def test_list_tasks_names_every_kernel_of_a_preset_with_its_uses(tmp_path):
    rows = json.loads(run("tune-model", "--model", "llama-2-7b", "--prefill-tokens", "128,512", "--decode-batch",
                          "1,8", "--kv-len", "512,4096", "--list-tasks", "--json", cwd=tmp_path).stdout)
    by_key = {r["task"]: r for r in rows}
    assert len(by_key) == len(rows)
    # the MLP's down projection in a 512-token prefill: a CPU prefill's GEMMs read M at run time
    down = by_key["gemm/float32/M~=512,N=4096,K=11008"]
    assert down["calls_per_pass"] == {"prefill T=512": 32} and down["weight"] == 32
    assert "gemm/float32/M~=128,N=4096,K=11008" in by_key  # each prefill size is a bucket of its own
    attention = [r for r in rows if r["op"] == "attention_decode"]
    assert len(attention) == 4  # two batch sizes x two KV lengths
    assert not (tmp_path / "tune.jsonl").exists()  # nothing was tuned


@pytest.mark.tools("cc")
def test_a_prompt_of_any_length_runs_tuned_kernels_only(tmp_path):
    """On the CPU a prefill's GEMMs read their M at run time, so a prompt of any length, shorter,
    longer or between the sizes the model was tuned at (8 and 128 tokens), runs at its own
    length on tuned kernels (each GEMM from the nearest tuned size), with no padding."""
    run("tune-model", "--model", "tiny", "--prefill-tokens", "8,128", "--decode-batch", "1", "--kv-len", "256",
        "--tuner", "random", "--trials-total", "30", "--batch", "4", "--log", "t.jsonl", "--quiet", "--no-mlflow",
        cwd=tmp_path)
    run("export", "--log", "t.jsonl", "--out", "lib", cwd=tmp_path)
    for tokens, padded in ((1, 1), (3, 3), (16, 16), (17, 17), (100, 100), (200, 200)):
        proc = run("run", "--lib", "lib", "--model", "tiny", "--prompt-ids", ",".join(["7"] * tokens),
                   "--new-tokens", "2", "--json", cwd=tmp_path)
        out = json.loads(proc.stdout)
        assert "UntunedShapeWarning" not in proc.stderr and "not in the kernel library" not in proc.stderr, tokens
        assert out["kernels"]["untuned"] == 0 and out["kernels"]["prefill_padded_to"] == padded, (tokens, out["kernels"])
