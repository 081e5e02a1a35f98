"""The plain-torch decoder that ``benchmarks/gpu_model.py`` measures the runtime against on the
GPU (speed, and logits in float32): here on torch's CPU build, it computes what the numpy
reference computes, for Llama, Qwen3's head norms, Granite's scalars, Gemma 2 and 3 (windows shorter
than the prompt, soft-capping) and SmolLM3's layers without rope, over a prompt and a decode step, so
a device session never spends its time comparing with a wrong baseline."""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from runtime.model_config import PRESETS
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights, device_shapes, fused_parts

torch = pytest.importorskip("torch")

TINY = PRESETS["tiny"]
QWEN3_TINY = dataclasses.replace(TINY, name="tiny-qwen3", qk_norm=True, rms_norm_eps=1e-6, rope_theta=1e6)
GRANITE_TINY = dataclasses.replace(TINY, name="tiny-granite", embedding_multiplier=12.0, residual_multiplier=0.22,
                                   attention_multiplier=0.015625, logits_scaling=8.0)
GEMMA_COMMON = dict(offset_norms=True, activation="gelu_tanh", embedding_multiplier=TINY.hidden_size ** 0.5,
                    post_norms=True, attention_multiplier=0.125, tie_word_embeddings=True, sliding_window=4,
                    local_layers=(0,))
GEMMA3_TINY = dataclasses.replace(TINY, name="tiny-gemma3", qk_norm=True, rope_theta=1e6, local_rope_theta=1e4,
                                  **GEMMA_COMMON)
GEMMA2_TINY = dataclasses.replace(TINY, name="tiny-gemma2", attn_softcap=0.02, final_softcap=0.2,
                                  local_rope_theta=TINY.rope_theta, **GEMMA_COMMON)
SMOLLM3_TINY = dataclasses.replace(TINY, name="tiny-smollm3", nope_layers=(1,))
# Phi-4-mini's partial rotary: 24 of the 32 dims of a head turn, the rest pass through
PARTIAL_TINY = dataclasses.replace(TINY, name="tiny-partial-rotary", partial_rotary_factor=0.75)
OLMO2_TINY = dataclasses.replace(TINY, name="tiny-olmo2", qk_norm=True, qk_norm_span="projection", pre_norms=False,
                                 post_norms=True)


@pytest.fixture(scope="module")
def gpu_model(monkeypatch_module):
    monkeypatch_module.setenv("GPU_MODEL_DEVICE", "cpu")  # read as the script is imported
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_model.py"
    spec = importlib.util.spec_from_file_location("gpu_model_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.mark.parametrize("config", [TINY, QWEN3_TINY, GRANITE_TINY, GEMMA3_TINY, GEMMA2_TINY, SMOLLM3_TINY,
                                    OLMO2_TINY, PARTIAL_TINY],
                         ids=lambda c: c.name)
def test_the_torch_baseline_computes_what_the_reference_computes(gpu_model, config):
    weights = ModelWeights.random(config, seed=5)
    # named as the decoder reads them on the device: Q/K/V and gate/up stacked
    stored = {name: torch.from_numpy(np.concatenate([weights[p] for p in fused_parts(name)]))
              for name in device_shapes(config)}
    stored["model.embed_tokens.weight"] = torch.from_numpy(weights["model.embed_tokens.weight"])
    baseline = gpu_model.TorchLlama(torch, config, stored.__getitem__, torch.float32)
    reference = ReferenceModel(config, weights)
    prompt = np.array([7, 300, 12, 45, 9, 101])
    cache = baseline.new_cache(len(prompt) + 1)
    caches = [(np.zeros(c.shape, np.float32), np.zeros(c.shape, np.float32)) for c, _ in cache]
    with torch.no_grad():
        ours = baseline.forward(torch.from_numpy(prompt), 0, cache)[-1].numpy()
        step = baseline.forward(torch.tensor([33]), len(prompt), cache)[-1].numpy()
    want = reference.forward(prompt[None], 0, caches)[0]
    want_step = reference.forward(np.array([[33]]), len(prompt), caches)[0]
    scale = np.abs(want).max()
    assert np.abs(ours - want).max() < 1e-4 * scale and np.abs(step - want_step).max() < 1e-4 * scale
    # what each family adds matters at this scale: without it the logits differ
    undone = {"qk_norm": dict(qk_norm=False, qk_norm_span="head"), "attn_softcap": dict(attn_softcap=None),
              "final_softcap": dict(final_softcap=None), "sliding_window": dict(sliding_window=None),
              "nope_layers": dict(nope_layers=())}
    for field, change in undone.items():
        if not getattr(config, field):
            continue
        plain = gpu_model.TorchLlama(torch, dataclasses.replace(config, **change), stored.__getitem__, torch.float32)
        with torch.no_grad():
            other = plain.forward(torch.from_numpy(prompt), 0, plain.new_cache(len(prompt)))[-1].numpy()
        assert np.abs(other - want).max() > 20 * 1e-4 * scale, field
