"""The whole model flow on the CUDA path, on the fake GPU: tune-model through the CUDA runner,
export to cubins, the decoder on device buffers. ``tests/fake_pycuda`` stands in for pycuda
(host memory as device memory, kernels on the CPU emulator), so this checks the plumbing
(the plan's CUDA kernels, launches, device copies of the KV cache) that a GPU run relies on;
the ``gpu`` machine runs the same on the hardware (``benchmarks/gpu_check.sh``)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from fakes import FAKE_GPU_TARGET, register_library

import runtime
from autotune import ModelWorkload, TuningJob, run_job
from measure import CudaRunner
from export import export_library
from records import RecordLog
from runtime.llama import LlamaModel
from runtime.model_config import ModelConfig
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="building cubins needs nvcc")

# few distinct kernels: every projection is 64 x 64, the LM head too, prefill linears are gemv
MICRO = ModelConfig(name="micro", hidden_size=64, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=64)


def test_the_model_tunes_exports_and_runs_on_cuda_kernels(fake_gpu, tmp_path):
    log = RecordLog(tmp_path / "cuda.jsonl")
    workload = ModelWorkload(MICRO, prefill_tokens=(8,), decode_batch=(1,), kv_len=(16,))
    with CudaRunner(timeout_s=300) as runner:
        job = TuningJob(FAKE_GPU_TARGET, model=workload, tuner="random", trials=12, batch=2, log=log.path,
                        mlflow=False)
        summary = run_job(job, progress=False, runner=runner)
    assert len(summary.tasks) == 12 and summary.trials == 12 and not summary.given_up
    assert all(s.best is not None for s in summary.summaries)
    export_library(log.records(), tmp_path / "lib", "cuda")
    register_library(fake_gpu, tmp_path / "lib")

    weights = ModelWeights.random(MICRO, seed=1)
    prompts = np.array([[5, 9, 2, 33, 7]])  # padded to the tuned 8 tokens
    with runtime.load(tmp_path / "lib") as library:
        model = LlamaModel(MICRO, weights, library)
        assert model.arrays.kind == "cuda" and model.padded_tokens(1, 5) == 8
        out = model.generate(prompts, 4)
    assert all(k.tuned for k in model.used.values())
    reference = ReferenceModel(MICRO, weights).generate(prompts, 4)
    error = np.abs(out.logits - reference.logits).max() / np.abs(reference.logits).max()
    assert error < 1e-4, error
    np.testing.assert_array_equal(out.tokens, reference.tokens)
