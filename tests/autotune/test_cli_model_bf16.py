"""A bfloat16 model on the CPU from the command line: tune-model, export, run (weight-only
linear layers, float32 everything else), and float16 refused in one line."""
from __future__ import annotations

import json

import pytest
from test_cli import assert_usage_error, run

from records import RecordLog


@pytest.mark.tools("cc")
def test_a_bfloat16_model_tunes_exports_and_runs_against_the_rounded_reference(tmp_path):
    run("tune-model", "--model", "tiny", "--dtype", "bfloat16", "--prefill-tokens", "16", "--kv-len", "64",
        "--trials-total", "21", "--batch", "4", "--log", "bf16.jsonl", "--quiet", "--no-mlflow", cwd=tmp_path)
    tasks = {r.task for r in RecordLog(tmp_path / "bf16.jsonl").records()}
    assert len(tasks) == 20 and {t.dtype for t in tasks} == {"float32"}
    assert {t.attr.get("weight") for t in tasks if t.op in ("gemv", "gemm")} == {"bfloat16"}
    run("export", "--log", "bf16.jsonl", "--out", "lib", cwd=tmp_path)
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    linear = [k for k in manifest["kernels"] if k["op"] in ("gemv", "gemm")]
    assert linear and all(next(a for a in k["args"] if a["name"] == "W")["dtype"] == "bfloat16" for k in linear)
    # --dtype auto finds bfloat16 in the library's linear layers
    out = json.loads(run("run", "--lib", "lib", "--model", "tiny", "--prompt-tokens", "12", "--new-tokens", "32",
                         "--compare", "--json", cwd=tmp_path).stdout)
    assert out["dtype"] == "bfloat16"
    assert out["kernels"] == {"tuned": 20, "untuned": 0, "prefill_padded_to": 12, "decode_mode": "host"}
    assert out["reference"]["logits"]["max_rel"] < 1e-5 and out["reference"]["logits"]["same_tokens"]
    assert_usage_error(run("run", "--lib", "lib", "--model", "tiny", "--dtype", "float16", cwd=tmp_path, check=False),
                       "--dtype float16: the CPU kernels have no float16")


@pytest.mark.parametrize("args, message", [
    (["--dtype", "float16"], "--dtype float16: the CPU kernels have no float16: use float32 or bfloat16"),
    (["--dtype", "bfloat16", "--quantize", "q4"], "q4 on the CPU runs in float32"),
])
def test_the_cpu_refuses_float16_and_bfloat16_q4_in_one_line(args, message, tmp_path):
    assert_usage_error(run("tune-model", "--model", "tiny", "--list-tasks", *args, cwd=tmp_path, check=False), message)
