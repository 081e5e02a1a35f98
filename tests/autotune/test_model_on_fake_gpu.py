"""The whole model flow on the CUDA path, on the fake GPU: tune-model through the CUDA runner,
export to cubins, the decoder on device buffers. ``tests/fake_pycuda`` stands in for pycuda
(host memory as device memory, kernels on the CPU emulator), so this checks the plumbing
(the plan's CUDA kernels, launches, device copies of the KV cache) that a GPU run relies on;
the ``gpu`` machine runs the same on the hardware (``benchmarks/gpu_check.sh``)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from fakes import FAKE_GPU_TARGET, FAKE_GPU_TIMING, register_library

import runtime
from autotune import ModelWorkload, TuningJob, run_job
from measure import CudaRunner
from export import export_library
from records import RecordLog
from runtime import cuda_graph
from runtime.llama import LlamaModel
from runtime.model_config import ModelConfig
from runtime.reference import ReferenceModel
from runtime.sampling import Sampling
from runtime.weights import DeviceWeights, ModelWeights, device_shapes, fused_parts

pytestmark = pytest.mark.tools("nvcc")

# few distinct kernels: projections of 64 inputs (Q/K/V and gate/up fused: 192 and 128 outputs), the
# LM head too, prefill linears are gemv
MICRO = ModelConfig(name="micro", hidden_size=64, intermediate_size=64, num_attention_heads=2,
                    num_key_value_heads=2, head_dim=32, num_hidden_layers=2, vocab_size=64)
SAMPLING = Sampling(temperature=0.9, top_k=20, top_p=0.95, seed=4)


def test_the_model_tunes_exports_and_runs_on_cuda_kernels(fake_gpu, tmp_path, monkeypatch):
    log = RecordLog(tmp_path / "cuda.jsonl")
    workload = ModelWorkload(MICRO, prefill_tokens=(8,), decode_batch=(1,), kv_len=(16,), resident=True)
    with CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        job = TuningJob(FAKE_GPU_TARGET, model=workload, tuner="random", trials=16, batch=2, log=log.path,
                        mlflow=False)
        summary = run_job(job, progress=False, runner=runner)
    assert len(summary.tasks) == 15 and summary.trials == 16 and not summary.given_up
    # attention takes over rope_append in the captured step
    assert {"rope_append_attention", "argmax"} <= {t.task.op for t in summary.tasks}
    assert not {"rope_append", "attention_decode"} & {t.task.op for t in summary.tasks}
    # the decode step's norms and residual adds run inside its GEMVs
    assert {(t.task.attr.get("norm"), t.task.attr.get("residual"), t.task.attr.get("act")) for t in summary.tasks
            if t.task.op == "gemv" and t.task.dims["M"] == 1} >= {("rmsnorm", None, None), (None, True, None),
                                                                  ("rmsnorm", None, "swiglu")}
    assert not any(t.task.op == "swiglu" and t.task.dims["M"] == 1 for t in summary.tasks)
    assert all(s.best is not None for s in summary.summaries)
    export_library(log.records(), tmp_path / "lib", "cuda")
    register_library(fake_gpu, tmp_path / "lib")

    weights = ModelWeights.random(MICRO, seed=1)
    prompts = np.array([[5, 9, 2, 33, 7]])  # padded to the tuned 8 tokens
    import pycuda.driver as fake_driver

    with runtime.load(tmp_path / "lib") as library:
        model = LlamaModel(MICRO, weights, library)
        assert model.arrays.kind == "cuda" and model.padded_tokens(1, 5) == 8
        replays = fake_driver.COUNTS["graph_launches"]
        out = model.generate(prompts, 4)
        # every decode step was one replay of the captured step, which the fake ran kernel by kernel
        assert fake_driver.COUNTS["graph_launches"] - replays == 3 and model.decode_mode == "graph"
        # sampled: the captured step hands its logits to the host for the draws, kept or not; and
        # ended at the last id that was new to the sequence
        sampled = model.generate(prompts, 6, keep_logits=False, sampling=SAMPLING)
        row = list(sampled.tokens[0])
        at = max(i for i, token in enumerate(row) if token not in row[:i])
        ended = model.generate(prompts, 6, keep_logits=False, sampling=SAMPLING, stop_ids=[row[at]])
        assert model.decode_mode == "graph" and at > 0 and ended.tokens.shape == (1, at + 1)
        np.testing.assert_array_equal(ended.tokens[0], row[:at + 1])

        # where the driver cannot capture, the same kernels run issued one by one
        def no_graphs(drv):
            raise cuda_graph.CudaGraphError("cuStreamBeginCapture failed: not supported")
        monkeypatch.setattr(cuda_graph, "_driver_graphs", no_graphs)
        eager = LlamaModel(MICRO, weights, library)
        np.testing.assert_array_equal(eager.generate(prompts, 4).logits, out.logits)
        assert eager.decode_mode == "resident"
        monkeypatch.undo()
        # the same weights handed over on the device, as another framework holding them would
        on_device = {name: model.arrays.upload(np.concatenate([weights[part] for part in fused_parts(name)]))
                     for name in device_shapes(MICRO)}
        shared = DeviceWeights(MICRO, on_device, weights["model.embed_tokens.weight"])
        np.testing.assert_array_equal(LlamaModel(MICRO, shared, library).generate(prompts, 4).logits, out.logits)
        with pytest.raises(ValueError, match=r"qkv_proj.weight has shape \(64,\), expected \(192, 64\)"):
            DeviceWeights(MICRO, {**on_device, "model.layers.0.self_attn.qkv_proj.weight": on_device["model.norm.weight"]},
                          weights["model.embed_tokens.weight"])
    assert all(k.tuned for k in model.used.values())
    reference = ReferenceModel(MICRO, weights).generate(prompts, 4)
    error = np.abs(out.logits - reference.logits).max() / np.abs(reference.logits).max()
    assert error < 1e-4, error
    np.testing.assert_array_equal(out.tokens, reference.tokens)
    np.testing.assert_array_equal(sampled.tokens, ReferenceModel(MICRO, weights).generate(prompts, 6, SAMPLING).tokens)


# Stated tolerances of a half-precision model against float32 computed from the same rounded
# weights: activations and the KV cache are rounded at every kernel boundary (float16 keeps 11
# significant bits, bfloat16 8), the kernels accumulate in float32.
HALF_TOLERANCE = {"float16": 5e-3, "bfloat16": 4e-2}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_half_precision_model_keeps_the_float32_tokens(fake_gpu, tmp_path, dtype):
    log = RecordLog(tmp_path / "cuda.jsonl")
    workload = ModelWorkload(MICRO, prefill_tokens=(8,), decode_batch=(1,), kv_len=(48,), dtype=dtype, resident=True)
    assert {t.task.dtype for t in workload.tasks()} == {dtype}
    with CudaRunner(timeout_s=300, policy=FAKE_GPU_TIMING) as runner:
        # every task's default and one pick of the tuner (each trial compiles a kernel of its own)
        job = TuningJob(FAKE_GPU_TARGET, model=workload, tuner="random", trials=16, batch=4, log=log.path,
                        mlflow=False)
        summary = run_job(job, progress=False, runner=runner)
    assert not summary.given_up
    export_library(log.records(), tmp_path / "lib", "cuda")
    register_library(fake_gpu, tmp_path / "lib")

    weights = ModelWeights.random(MICRO, seed=3)
    prompts = np.array([[5, 9, 2, 33, 7]])
    with runtime.load(tmp_path / "lib") as library:
        model = LlamaModel(MICRO, weights, library, dtype=dtype)
        out = model.generate(prompts, 32)
    assert {k.spec.dtype for k in model.used.values()} == {dtype}
    reference = ReferenceModel(MICRO, weights.rounded(dtype)).generate(prompts, 32)
    assert_keeps_the_tokens(out, reference, dtype)


def assert_keeps_the_tokens(out, reference, dtype: str) -> None:
    """A half-precision generation ``out`` against the float32 ``reference`` on the same rounded
    weights: the same greedy tokens, except that a step where the reference's two best logits
    lie within our rounding error of each other may pick the other one; from there on the two
    sequences differ, so logits are compared up to and including that step."""
    assert out.logits.dtype == np.float32
    steps = out.tokens.shape[1]
    flip = next((i for i in range(steps) if out.tokens[0, i] != reference.tokens[0, i]), steps)
    compared = slice(0, min(flip + 1, steps))
    error = np.abs(out.logits[0, compared] - reference.logits[0, compared]).max(axis=-1)
    assert error.max() / np.abs(reference.logits).max() < HALF_TOLERANCE[dtype], error
    if flip < steps:
        best = np.sort(reference.logits[0, flip])[-2:]
        assert best[1] - best[0] <= 2 * error[-1], f"step {flip} picked another token without a near tie"
    assert flip >= steps // 2, flip  # most of the generation agrees token for token


# Llama's attention_bias and mlp_bias: every projection of a layer has a bias
BIASED = dataclasses.replace(MICRO, name="micro-biased", qkv_bias=True, o_bias=True, mlp_bias=True)


def test_a_model_with_projection_biases_decodes_the_reference_tokens_on_cuda(fake_gpu):
    """The bias_add kernels after each projection, in prefill and in the captured resident step,
    with the weights uploaded from the host and handed over on the device."""
    from export import TunedKernels

    weights = ModelWeights.random(BIASED, seed=2)
    # the fused-norm test's two sequences: its GEMVs and attention kernels are these, compiled once
    prompts = np.array([[5, 9, 2, 33, 7], [40, 1, 17, 8, 60]])
    reference = ReferenceModel(BIASED, weights).generate(prompts, 6)
    unbiased = ReferenceModel(MICRO, ModelWeights(MICRO, {n: t for n, t in weights.tensors.items()
                                                          if not n.endswith(".bias")})).generate(prompts, 6)
    assert np.abs(unbiased.logits - reference.logits).max() > 0.1  # the biases matter here
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        model = LlamaModel(BIASED, weights, kernels)
        out = model.generate(prompts, 6)
        assert model.decode_mode == "graph"
        # one bias_add per width: q/k/v (192), o and down (64), gate/up (128)
        assert {k.spec.dims["N"] for k in model.used.values() if k.spec.op == "bias_add"} == {192, 64, 128}
        on_device = {name: model.arrays.upload(np.concatenate([weights[part] for part in fused_parts(name)]))
                     for name in device_shapes(BIASED)}
        assert "model.layers.1.mlp.gate_up_proj.bias" in on_device
        shared = DeviceWeights(BIASED, on_device, weights["model.embed_tokens.weight"])
        np.testing.assert_array_equal(LlamaModel(BIASED, shared, kernels).generate(prompts, 6).logits, out.logits)
        missing = {n: a for n, a in on_device.items() if n != "model.layers.0.self_attn.qkv_proj.bias"}
        with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.qkv_proj\.bias is missing"):
            DeviceWeights(BIASED, missing, weights["model.embed_tokens.weight"])
    error = np.abs(out.logits - reference.logits).max() / np.abs(reference.logits).max()
    assert error < 1e-4, error
    np.testing.assert_array_equal(out.tokens, reference.tokens)


# Qwen3: an RMSNorm of each query and key head before the rotary embedding; one KV head
QWEN3 = dataclasses.replace(MICRO, name="micro-qwen3", num_key_value_heads=1, qk_norm=True)


def test_a_qwen3_model_in_half_precision_keeps_the_float32_tokens_on_cuda(fake_gpu):
    """Qwen3's qk_norm kernel in float16, in prefill and in the captured fused step (its GEMVs
    take the other norms, attention the rotary embedding), on weights uploaded from the host and
    on weights handed over on the device."""
    from export import TunedKernels

    weights = ModelWeights.random(QWEN3, seed=4)
    prompts = np.array([[5, 9, 2, 33, 7]])
    reference = ReferenceModel(QWEN3, weights.rounded("float16")).generate(prompts, 24)
    plain = dataclasses.replace(QWEN3, qk_norm=False)
    unnormed = ReferenceModel(plain, ModelWeights(plain, {n: t for n, t in weights.tensors.items()
                                                          if not n.endswith(("q_norm.weight", "k_norm.weight"))}))
    assert np.abs(unnormed.generate(prompts, 24).logits - reference.logits).max() > 0.1  # the norms matter here
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        model = LlamaModel(QWEN3, weights, kernels, dtype="float16")
        out = model.generate(prompts, 24)
        assert model.decode_mode == "graph"
        used = {(k.spec.op, k.spec.dtype) for k in model.used.values()}
        assert {("qk_norm", "float16"), ("rope_append_attention", "float16")} <= used
        # the head norms sit between two programmatic kernels and join the graph as they do
        assert all(k.programmatic for k in model.used.values() if k.spec.op == "qk_norm")
        assert model.programmatic_edges > 0 and model.programmatic_error is None
        on_device = {name: model.arrays.upload(np.concatenate([weights[part] for part in fused_parts(name)])
                                               .astype(np.float16)) for name in device_shapes(QWEN3)}
        assert on_device["model.layers.1.self_attn.k_norm.weight"].shape == (QWEN3.head_dim,)
        shared = DeviceWeights(QWEN3, on_device, weights["model.embed_tokens.weight"].astype(np.float16))
        np.testing.assert_array_equal(LlamaModel(QWEN3, shared, kernels, dtype="float16").generate(prompts, 24).logits,
                                      out.logits)
    assert_keeps_the_tokens(out, reference, "float16")


def generate_on_defaults(config, dtype: str):
    """(model, its generation, the float32 reference's on the same rounded weights): 24 tokens after a
    5-token prompt on the template defaults, the decode step captured as a graph."""
    from export import TunedKernels

    weights = ModelWeights.random(config, seed=5)
    prompts = np.array([[5, 9, 2, 33, 7]])
    reference = ReferenceModel(config, weights.rounded(dtype)).generate(prompts, 24)
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        model = LlamaModel(config, weights, kernels, dtype=dtype)
        out = model.generate(prompts, 24)
    assert model.decode_mode == "graph"
    return model, out, reference


# Gemma 3: GeGLU, norms by 1 + weight (the heads' too), each sublayer's output normalised before its
# residual add, a sliding layer rotating with its own base, embeddings times 8, softmax scale 1/4
GEMMA3 = dataclasses.replace(MICRO, name="micro-gemma3", qk_norm=True, post_norms=True, offset_norms=True,
                             activation="gelu_tanh", embedding_multiplier=8.0, attention_multiplier=0.25,
                             rope_theta=1e6, local_layers=(0,), local_rope_theta=1e4, tie_word_embeddings=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_gemma3_model_in_half_precision_keeps_the_float32_tokens_on_cuda(fake_gpu, dtype):
    """Gemma 3's kernels in 16 bits (geglu, the output norms, two rope kernels), in prefill and in
    the captured step, against the float32 reference on the same rounded weights. The gains
    uploaded are 1 + weight rounded to the model's precision (bfloat16 keeps 8 bits of it)."""
    model, out, reference = generate_on_defaults(GEMMA3, dtype)
    used = {(k.spec.op, k.spec.dtype) for k in model.used.values()}
    assert {("geglu", dtype), ("qk_norm", dtype)} <= used and ("swiglu", dtype) not in used
    assert {k.spec.attr.get("theta", 1e4) for k in model.used.values() if k.spec.op == "rope_append"} == {1e4, 1e6}
    assert_keeps_the_tokens(out, reference, dtype)


# OLMo 3: no input norms (each sublayer's output normalised and added), the whole q and k projections
# normalised, a sliding layer with a 3-token window and the default rope, a full one rotating with YaRN
OLMO3 = dataclasses.replace(MICRO, name="micro-olmo3", qk_norm=True, qk_norm_span="projection", pre_norms=False,
                            post_norms=True, sliding_window=3, local_layers=(0,), local_rope_theta=1e4,
                            rope_type="yarn", rope_factor=8.0, rope_original_max_position_embeddings=4,
                            rope_beta_fast=32.0, rope_beta_slow=1.0, rope_truncate=True, rope_attention_factor=1.2)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_an_olmo3_model_in_half_precision_keeps_the_float32_tokens_on_cuda(fake_gpu, dtype):
    """OLMo 3's kernels in 16 bits (qk_norm over whole projections, post norms and residual adds,
    windowed attention in the sliding layer, YaRN's scaled rotation in the full one), in prefill and
    in the captured step, against the float32 reference on the same rounded weights."""
    model, out, reference = generate_on_defaults(OLMO3, dtype)
    used = {k.spec.op: k.spec for k in model.used.values()}
    assert used["qk_norm"].attr["span"] == "projection" and used["add"].dtype == dtype
    assert {k.spec.attr.get("rope_type", "default") for k in model.used.values() if k.spec.op == "rope_append"} == {
        "default", "yarn"}
    assert any(k.spec.attr.get("window") == 3 for k in model.used.values() if k.spec.op == "attention_decode")
    assert_keeps_the_tokens(out, reference, dtype)


def test_device_weights_that_carry_gemmas_folds_run_as_host_weights_do(fake_gpu):
    """DeviceWeights(..., folded=True): norm gains of 1 + weight and the scaled embedding table
    made by the caller, as the runtime would have uploaded them, give the host weights' logits
    bit for bit; the same tensors unfolded are refused."""
    from export import TunedKernels
    from runtime.weights import is_norm_gain

    weights = ModelWeights.random(GEMMA3, seed=6)
    prompts = np.array([[5, 9, 2, 33, 7]])
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        model = LlamaModel(GEMMA3, weights, kernels, dtype="float16")
        out = model.generate(prompts, 6)
        # each weight in the model's precision first, as the runtime takes a checkpoint's, then 1 + it
        half = {name: np.concatenate([weights[part] for part in fused_parts(name)]).astype(np.float16)
                for name in device_shapes(GEMMA3)}
        folded = {name: model.arrays.upload((w.astype(np.float32) + 1).astype(np.float16) if is_norm_gain(name) else w)
                  for name, w in half.items()}
        table = (weights["model.embed_tokens.weight"] * np.float32(8.0)).astype(np.float16)
        shared = LlamaModel(GEMMA3, DeviceWeights(GEMMA3, folded, table, folded=True), kernels, dtype="float16")
        np.testing.assert_array_equal(shared.generate(prompts, 6).logits, out.logits)
        with pytest.raises(ValueError, match=r"DeviceWeights\(\.\.\., folded=True\)"):
            LlamaModel(GEMMA3, DeviceWeights(GEMMA3, folded, table), kernels, dtype="float16")


class WithoutFusedNorms:
    """A provider as a library that lacks one of the fused GEMVs: the LM head's (N = 64 with the
    norm), the last of them the decode step asks for."""

    def __init__(self, kernels):
        self.kernels, self.kind = kernels, kernels.kind

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        if op.startswith("gemv") and "norm" in (attrs or {}) and shape["N"] == MICRO.vocab_size:
            raise LookupError(f"no fused {op} in this library")
        return self.kernels.get(op, shape, dtype, attrs, dynamic)

    def specs(self):
        return self.kernels.specs()


class TunedBeforeRopeAttention(WithoutFusedNorms):
    """Kernels tuned before attention took over rope_append (a tuning log that lists rope_append
    and the programmatic attention but no rope_append_attention): that pair runs, though the
    fused kernel could be compiled at its default."""

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        return self.kernels.get(op, shape, dtype, attrs, dynamic)

    def specs(self):
        from runtime.abi import KernelSpec

        c = MICRO
        dims = {"B": 2, "H": c.num_attention_heads, "HKV": c.num_key_value_heads, "D": c.head_dim, "S": 16}
        return [KernelSpec.make("rope_append", dims, "float32", dynamic=("S",)),
                KernelSpec.make("attention_decode", {**dims, "L": 16}, "float32",
                                {"lengths": "per_sequence", "programmatic": True}, ("S", "L"))]


class WithoutProgrammaticAttention(WithoutFusedNorms):
    """A library from before attention took a programmatic launch (and over rope_append): its
    fused GEMVs still run."""

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        if op == "rope_append_attention" or (op == "attention_decode" and (attrs or {}).get("programmatic")):
            raise LookupError(f"no {op} of these attributes in this library")
        return self.kernels.get(op, shape, dtype, attrs, dynamic)


class Asked:
    """A provider that notes every kernel asked of it, at the dims asked (``model.used`` holds
    what served them: a kernel compiled at other values of its runtime dims may)."""

    def __init__(self, provider):
        self.provider, self.kind, self.asked = provider, provider.kind, []

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        self.asked.append((op, dict(shape)))
        return self.provider.get(op, shape, dtype, attrs, dynamic)

    def specs(self):
        return self.provider.specs()


@pytest.mark.parametrize("quantize", ["none", "q4"])
def test_the_decode_gemvs_fuse_the_norms_where_the_library_has_them(fake_gpu, quantize):
    """The captured step with the norms and residual adds inside the GEMVs (float and int4), and
    with a library that lacks those GEMVs, the same step with its RMSNorm kernels: both decode
    the reference tokens."""
    from export import TunedKernels

    weights = ModelWeights.random(MICRO, seed=6)
    if quantize == "q4":
        weights = weights.quantize_q4(32)
    prompts = np.array([[5, 9, 2, 33, 7], [40, 1, 17, 8, 60]])  # two sequences: M = 2 in the GEMVs
    reference = ReferenceModel(MICRO, weights).generate(prompts, 5)
    import pycuda.driver as fake_driver

    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        layers = MICRO.num_hidden_layers
        # (provider, whether the GEMVs fuse the norms, programmatic edges per layer)
        providers = [(kernels, True, 5), (WithoutFusedNorms(kernels), False, 1)]
        if quantize == "none":  # the attention kernels are the same either way
            providers[1:1] = [(TunedBeforeRopeAttention(kernels), True, 6),
                              (WithoutProgrammaticAttention(kernels), True, 5)]
        for provider, fused, per_layer in providers:
            provider = Asked(provider)
            model = LlamaModel(MICRO, weights, provider)
            captures = len(fake_driver.EDGES_OF_CAPTURES)
            out = model.generate(prompts, 5)
            assert model.decode_mode == "graph"
            # programmatic edges join each kernel built for them to the kernel before it: with the
            # fusions every GEMV but the first layer's Q/K/V (after the copies in; the LM head makes
            # up for it) and attention (rope_append_attention, or rope_append and the programmatic
            # attention, or rope_append alone); without them, rope_append only. Every such kernel
            # waits for the one before.
            edges = fake_driver.EDGES_OF_CAPTURES[captures:]
            assert len(edges) == 1 and model.programmatic_error is None
            assert all(waits for _, _, waits in edges[0]), edges[0]
            assert model.programmatic_edges == len(edges[0]) == per_layer * layers, (type(provider.provider), edges[0])
            norms = {spec.split("/")[0] for spec in model.used
                     if spec.startswith("gemv") and ('norm="rmsnorm"' in spec or "residual=true" in spec)}
            assert norms == ({"gemv_q4" if quantize == "q4" else "gemv"} if fused else set()), norms
            # the prefill keeps its RMSNorm kernels; the decode step (M = 2 rows) has them only unfused
            decode_norms = [dims for op, dims in provider.asked if op == "rmsnorm" and dims["M"] == 2]
            assert bool(decode_norms) != fused, decode_norms
            error = np.abs(out.logits - reference.logits).max() / np.abs(reference.logits).max()
            assert error < 1e-4, error
            np.testing.assert_array_equal(out.tokens, reference.tokens)
        if quantize == "q4":  # the graph logic below is the same for both
            return
        # plain graphs where the model asks for them, or where the driver refuses programmatic edges
        model.programmatic_launch = False
        np.testing.assert_array_equal(model.generate(prompts, 3).logits, out.logits[:, :3])
        assert model.decode_mode == "graph" and model.programmatic_edges == 0

        asked = []

        def refused(stream):
            asked.append(stream)
            raise fake_driver.LogicError("cuStreamUpdateCaptureDependencies failed: not supported")
        api = fake_driver.graph_api
        fake_driver.graph_api = lambda: type("NoEdges", (type(api()),), {"programmatic_edge": lambda self, s: refused(s)})()
        try:
            refusing = LlamaModel(MICRO, weights, kernels)
            for _ in range(2):  # the refusal is remembered: the second generation does not ask again
                np.testing.assert_array_equal(refusing.generate(prompts, 3).tokens, out.tokens[:, :3])
                assert refusing.decode_mode == "graph" and refusing.programmatic_edges == 0
                assert "not supported" in refusing.programmatic_error and len(asked) == 1
        finally:
            fake_driver.graph_api = api
    # what `autotune run` reports of it
    from autotune.bench.model_run import RunReport, decode_path

    # MICRO's steps: 2 layers of 9 kernels and the first norm without the fusions (the last provider
    # above), 2 of 5 with them; then the LM head and argmax
    for decoder, line in ((model, "one CUDA graph per token, 21 kernels, 0 programmatic edges"),
                          (refusing, "12 kernels, 0 programmatic edges (the driver refused them: LogicError: "
                                     "cuStreamUpdateCaptureDependencies failed: not supported)")):
        report = RunReport(MICRO.name, "lib", quantize, 2, 5, 5, out, {"tuned": 1, **decode_path(decoder)})
        (decode,) = report.decode_lines()
        assert decode.startswith("  decode: one CUDA graph per token") and line in decode and decode in report.summary()


def test_device_weights_of_a_model_with_granites_scalars_are_refused(fake_gpu):
    """The runtime folds Granite's scalars into the weights it uploads; weights already on the
    device are used as they lie, so they cannot carry them: refused, saying so."""
    from export import TunedKernels
    from runtime.arrays import arrays_for

    config = dataclasses.replace(MICRO, name="micro-granite", residual_multiplier=0.5)
    weights = ModelWeights.random(config, seed=1)
    arrays = arrays_for("cuda")
    on_device = {name: arrays.upload(np.concatenate([weights[part] for part in fused_parts(name)]))
                 for name in device_shapes(config)}
    shared = DeviceWeights(config, on_device, weights["model.embed_tokens.weight"])
    with TunedKernels.defaults(FAKE_GPU_TARGET) as kernels:
        with pytest.raises(ValueError, match=r"^micro-granite: Granite's embedding_multiplier, residual_multiplier "
                                             r"and logits_scaling, and Gemma's embedding scale and norms by 1 \+ "
                                             r"weight, are folded into the weights as they are uploaded"):
            LlamaModel(config, shared, kernels)
        LlamaModel(config, weights, kernels).generate(np.array([[5, 9, 2]]), 2)  # host weights: folded
        # ERNIE 4.5's q and k rows are permuted as they load, which weights on the device are not
        interleaved = dataclasses.replace(MICRO, name="micro-ernie", rope_interleaved=True)
        with pytest.raises(ValueError, match=r"ERNIE 4.5's and Helium's q and k rows are loaded with each head's "
                                             r"rotary pairs as halves"):
            LlamaModel(interleaved, DeviceWeights(interleaved, on_device, weights["model.embed_tokens.weight"]),
                       kernels)
