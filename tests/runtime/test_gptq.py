"""GPTQ checkpoints: int4 layers packed as AutoGPTQ packs them (qweight, qzeros, scales, g_idx),
loaded into the q4 format without a float copy, run against the reference decoder computing with
the weights the codes stand for; what the q4 kernels cannot compute is refused by name."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from runtime.llama import LlamaModel
from runtime.model_config import PRESETS, ModelConfig, load_model_config
from runtime.plan import check_quantize, decode_calls, prefill_calls
from runtime.reference import ReferenceModel
from runtime.weights import ModelWeights, expected_shapes, q4_linear_names

GROUP = 64
GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": GROUP, "sym": True, "desc_act": False,
        "damp_percent": 0.01, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": "model"}
CONFIG = dataclasses.replace(PRESETS["tiny"], name="tiny-gptq", gptq_group_size=GROUP)


def pack_gptq(w: np.ndarray, group: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """AutoGPTQ's packing of W[N, K], written out the way its QuantLinear.pack loops: symmetric
    codes (zero 8, stored as 7), each row of qweight eight consecutive k's codes of one n, the
    first in the low bits; qzeros eight consecutive n's zeros. Also the weights they stand for."""
    n, k = w.shape
    groups = w.reshape(n, k // group, group)
    scales = (np.abs(groups).max(axis=2) / 7).astype(np.float16)                    # [N, G]
    codes = np.clip(np.round(groups / scales[..., None].astype(np.float32)) + 8, 0, 15).astype(np.uint32)
    codes = codes.reshape(n, k)
    intweight = codes.T                                                               # [K, N]
    qweight = np.zeros((k // 8, n), np.uint32)
    for row in range(k // 8):
        for j in range(8):
            qweight[row] |= intweight[8 * row + j] << np.uint32(4 * j)
    zeros = np.full((k // group, n), 8 - 1, np.uint32)
    qzeros = np.zeros((k // group, n // 8), np.uint32)
    for col in range(n // 8):
        for j in range(8):
            qzeros[:, col] |= zeros[:, 8 * col + j] << np.uint32(4 * j)
    stands_for = ((codes.astype(np.float32) - 8).reshape(n, k // group, group)
                  * scales.astype(np.float32)[..., None]).reshape(n, k)
    return ({"qweight": qweight.view(np.int32), "qzeros": qzeros.view(np.int32), "scales": scales.T.copy(),
             "g_idx": (np.arange(k) // group).astype(np.int32)}, stands_for)


def save_gptq(folder, config: ModelConfig = CONFIG, seed: int = 3, edit=None):
    """A GPTQ checkpoint of random weights in ``folder``: (its config, the float weights the codes
    stand for by linear name); ``edit(tensors)`` changes the tensors before they are written."""
    from safetensors.numpy import save_file

    weights = ModelWeights.random(config, seed=seed)
    tensors, stands_for = {}, {}
    for name in expected_shapes(config):
        if name in q4_linear_names(config):
            parts, stands_for[name] = pack_gptq(weights[name], GROUP)
            tensors.update({name[: -len("weight")] + part: t for part, t in parts.items()})
        else:
            tensors[name] = weights[name].astype(np.float16)
    if edit is not None:
        edit(tensors)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    hf = {**dataclasses.replace(config, gptq_group_size=None).to_hf_dict(), "quantization_config": GPTQ}
    (folder / "config.json").write_text(json.dumps(hf))
    return load_model_config(folder), stands_for


def test_a_gptq_config_is_read_written_back_and_leaves_the_lm_head_unquantised():
    config = ModelConfig.from_hf_dict({**dataclasses.replace(CONFIG, gptq_group_size=None).to_hf_dict(),
                                       "quantization_config": GPTQ}, CONFIG.name)
    assert config == CONFIG and ModelConfig.from_hf_dict(config.to_hf_dict(), CONFIG.name) == config
    for calls in (decode_calls(config, 1, 64, "q4", GROUP), prefill_calls(config, 16, "q4", GROUP)):
        ops = {call.role: call.spec.op for call in calls}
        assert ops["lm_head"] in ("gemv", "gemm") and ops["qkv_proj"] in ("gemv_q4", "gemm_q4")
    with pytest.raises(ValueError, match="GPTQ checkpoint .int4, group size 64.: it runs with --quantize q4 "
                                         "--group-size 64, not --quantize none"):
        check_quantize(config, "none")
    with pytest.raises(ValueError, match="not --quantize q4 --group-size 128"):
        check_quantize(config, "q4", 128)


@pytest.mark.parametrize("change, message", [
    ({"quant_method": "awq"}, "quant_method = 'awq' is not implemented; supported: gptq"),
    ({"bits": 8}, "quantization_config.bits = 8 is not implemented; supported: 4"),
    ({"sym": False}, "quantization_config.sym = false is not implemented"),
    ({"desc_act": True}, "quantization_config.desc_act = true is not implemented"),
    ({"group_size": -1}, "quantization_config.group_size = -1 is not implemented; supported: 32, 64, 128"),
    ({"group_size": 128.0}, "quantization_config.group_size = 128.0 is not implemented; supported: 32, 64, 128"),
    ({"checkpoint_format": "gptq_v2"}, "checkpoint_format = 'gptq_v2' is not implemented"),
    ({"lm_head": True}, "quantization_config.lm_head = true is not implemented"),
    ({"something_new": 1}, "quantization_config.something_new = 1 is not implemented"),
])
def test_a_quantization_the_kernels_do_not_compute_is_refused(change, message):
    data = {**dataclasses.replace(CONFIG, gptq_group_size=None).to_hf_dict(), "quantization_config": {**GPTQ, **change}}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig.from_hf_dict(data, "m", source="config.json")


def test_a_gptq_checkpoint_loads_as_int4_codes_and_generates_the_references_tokens(tmp_path, default_kernels):
    config, stands_for = save_gptq(tmp_path)
    weights = ModelWeights.load(config, tmp_path)
    # no float copy of an int4 layer; the LM head (not quantised by GPTQ) is a float tensor
    assert set(weights.quantized) == set(stands_for) and not set(stands_for) & set(weights.tensors)
    assert "lm_head.weight" in weights.tensors and weights.group_size == GROUP
    for name, want in stands_for.items():
        np.testing.assert_array_equal(weights.linear(name), want)
    assert weights.quantize_q4(GROUP) is weights
    prompts = np.random.default_rng(4).integers(0, config.vocab_size, (2, 7))
    model = LlamaModel(config, weights, default_kernels)
    ours = model.generate(prompts, 16)
    reference = ReferenceModel(config, weights).generate(prompts, 16)
    np.testing.assert_array_equal(ours.tokens, reference.tokens)
    assert np.abs(ours.logits - reference.logits).max() < 1e-4 * np.abs(reference.logits).max()
    ops = {kernel.spec.op for kernel in model.used.values()}
    assert {"gemv_q4", "gemv"} <= ops  # the layers on int4 codes, the LM head on floats


def test_a_gptq_checkpoint_runs_on_the_cuda_path(tmp_path, fake_gpu):
    from fakes import FAKE_GPU_TARGET

    from export import TunedKernels

    config, _ = save_gptq(tmp_path)
    weights = ModelWeights.load(config, tmp_path)
    prompts = np.array([[5, 9, 2, 33, 7]])
    reference = ReferenceModel(config, weights).generate(prompts, 12)
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        model = LlamaModel(config, weights, kernels)
        out = model.generate(prompts, 12)
    assert model.decode_mode == "graph"
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    assert np.abs(out.logits - reference.logits).max() < 1e-3 * np.abs(reference.logits).max()


def _asymmetric(tensors):
    name = next(n for n in tensors if n.endswith("qzeros"))
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = np.int32(0x77777776)  # one zero point of 7 (stored 6)


def _act_order(tensors):
    name = next(n for n in tensors if n.endswith("g_idx"))
    tensors[name] = tensors[name][::-1].copy()


@pytest.mark.parametrize("edit, message", [
    (_asymmetric, "zero points other than 8 .asymmetric codes. are not implemented"),
    (_act_order, "g_idx puts weights out of group order .act-order. - not implemented"),
    (lambda t: t.pop("model.layers.1.mlp.down_proj.qzeros"), "model.layers.1.mlp.down_proj.qzeros is missing"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.qweight": t["model.layers.0.mlp.up_proj.qweight"].astype(
        np.float32)}), r"qweight is float32 \(16, 384\), expected int32 \(16, 384\)"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": np.zeros((384, 128), np.float16)}),
     "does not use: model.layers.0.mlp.up_proj.weight"),
])
def test_a_gptq_checkpoint_the_kernels_cannot_compute_is_refused(edit, message, tmp_path):
    config, _ = save_gptq(tmp_path, edit=edit)
    with pytest.raises(ValueError, match=message):
        ModelWeights.load(config, tmp_path)


def test_g_idx_may_be_left_out(tmp_path):
    def drop(tensors):
        for name in [n for n in tensors if n.endswith("g_idx")]:
            del tensors[name]

    config, stands_for = save_gptq(tmp_path, edit=drop)
    weights = ModelWeights.load(config, tmp_path)
    name = next(iter(stands_for))
    np.testing.assert_array_equal(weights.linear(name), stands_for[name])


def test_tune_model_and_run_take_the_quantisation_from_a_gptq_checkpoint(tmp_path):
    """No --quantize needed: tune-model tunes int4 layers and a float LM head, run runs the
    checkpoint on them; asking for unquantised layers is one line and exit 2."""
    import os
    import subprocess
    import sys

    save_gptq(tmp_path)
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    cli = [sys.executable, "-m", "autotune.cli"]
    tuned = subprocess.run(cli + ["tune-model", "--model", ".", "--trials-total", "12", "--prefill-tokens", "8",
                                  "--kv-len", "16", "--log", "t.jsonl", "--no-mlflow", "--quiet", "--json"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert tuned.returncode == 0, tuned.stderr
    ops = {json.loads(line)["task"]["op"] for line in (tmp_path / "t.jsonl").read_text().splitlines()}
    assert {"gemv_q4", "gemv"} <= ops  # the layers int4, the LM head float
    ran = subprocess.run(cli + ["run", "--log", "t.jsonl", "--model", ".", "--weights", ".", "--prompt-tokens", "6",
                                "--new-tokens", "4", "--compare", "--json"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["quantize"] == "q4" and report["reference"]["logits"]["same_tokens"]
    refused = subprocess.run(cli + ["tune-model", "--model", ".", "--quantize", "none", "--log", "u.jsonl",
                                    "--no-mlflow", "--quiet"], capture_output=True, text=True, cwd=tmp_path, env=env,
                             timeout=600)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and lines[0].startswith("autotune: error: ") and lines[0].endswith(
        "is a GPTQ checkpoint (int4, group size 64): it runs with --quantize q4 --group-size 64, not --quantize none")


def test_weights_held_as_int4_codes_only_are_not_saved_as_a_float_checkpoint(tmp_path):
    config, _ = save_gptq(tmp_path / "gptq")
    with pytest.raises(ValueError, match="is held as int4 codes only; save writes float checkpoints"):
        ModelWeights.load(config, tmp_path / "gptq").save(tmp_path / "out")
    assert not (tmp_path / "out").exists()
