"""A bfloat16 or float16 model on the CPU from the command line: tune-model, export, run
(weight-only linear layers, float32 everything else), and 16-bit weights under q4 refused in one
line."""
from __future__ import annotations

import json

import pytest
from test_cli import assert_usage_error, run

from records import RecordLog


@pytest.mark.tools("cc")
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_16_bit_model_tunes_exports_and_runs_against_the_rounded_reference(dtype, tmp_path):
    run("tune-model", "--model", "tiny", "--dtype", dtype, "--prefill-tokens", "16", "--kv-len", "64",
        "--trials-total", "21", "--batch", "4", "--log", "w16.jsonl", "--quiet", "--no-mlflow", cwd=tmp_path)
    tasks = {r.task for r in RecordLog(tmp_path / "w16.jsonl").records()}
    assert len(tasks) == 20 and {t.dtype for t in tasks} == {"float32"}
    assert {t.attr.get("weight") for t in tasks if t.op in ("gemv", "gemm")} == {dtype}
    run("export", "--log", "w16.jsonl", "--out", "lib", cwd=tmp_path)
    manifest = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    linear = [k for k in manifest["kernels"] if k["op"] in ("gemv", "gemm")]
    assert linear and all(next(a for a in k["args"] if a["name"] == "W")["dtype"] == dtype for k in linear)
    # --dtype auto finds the 16-bit weights in the library's linear layers
    out = json.loads(run("run", "--lib", "lib", "--model", "tiny", "--prompt-tokens", "12", "--new-tokens", "32",
                         "--compare", "--json", cwd=tmp_path).stdout)
    assert out["dtype"] == dtype
    assert out["kernels"] == {"tuned": 20, "untuned": 0, "prefill_padded_to": 12, "decode_mode": "host"}
    assert out["reference"]["logits"]["max_rel"] < 1e-5 and out["reference"]["logits"]["same_tokens"]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_cpu_refuses_16_bit_weights_under_q4_in_one_line(dtype, tmp_path):
    args = ["--dtype", dtype, "--quantize", "q4"]
    message = f"q4 on the CPU runs in float32 (its int4 codes are the weights): drop the {dtype}"
    assert_usage_error(run("tune-model", "--model", "tiny", "--list-tasks", *args, cwd=tmp_path, check=False), message)
