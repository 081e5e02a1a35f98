"""The captured decode step on a real GPU (marked ``gpu``: it skips where there is none, and runs
in ``benchmarks/gpu_check.sh``). Programmatic edges let a kernel start before the one ahead of it
has finished; a kernel that read its input too early would show here as tokens or logits that
differ from the same step captured without them."""
from __future__ import annotations

import numpy as np
import pytest

from export import TunedKernels
from runtime.llama import LlamaModel
from runtime.model_config import ModelConfig
from runtime.weights import ModelWeights
from search_space import Target

SMALL = ModelConfig(name="small", hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, num_hidden_layers=3, vocab_size=1000)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", ["none", "q4"])
def test_programmatic_edges_decode_what_the_plain_graph_decodes_on_the_gpu(quantize):
    weights = ModelWeights.random(SMALL, seed=3)
    if quantize == "q4":
        weights = weights.quantize_q4(128)
    prompts = np.random.default_rng(0).integers(0, SMALL.vocab_size, (2, 12))
    with TunedKernels.defaults(Target.cuda(0)) as kernels:
        model = LlamaModel(SMALL, weights, kernels, dtype="float16")
        model.programmatic_launch = False
        plain = model.generate(prompts, 24)
        assert model.decode_mode == "graph" and model.programmatic_edges == 0
        model.programmatic_launch = True
        for _ in range(3):  # a kernel reading its input too early would not do so every time
            joined = model.generate(prompts, 24)
            assert model.decode_mode == "graph" and model.programmatic_error is None
            # five kernels a layer, each joined to the one before (the first Q/K/V follows the
            # copies in; the LM head makes up for it)
            assert model.programmatic_edges == 5 * SMALL.num_hidden_layers
            scale = np.abs(plain.logits).max()
            assert np.abs(joined.logits - plain.logits).max() <= 1e-3 * scale
            np.testing.assert_array_equal(joined.tokens, plain.tokens)


@pytest.mark.gpu
def test_an_act_order_gptq_checkpoint_decodes_the_references_tokens_on_the_gpu(tmp_path):
    """GPTQ with act-order (gather_columns before the Q/K/V, output and gate/up projections, down's
    order in gate/up's rows) and zero points, in float16: the tokens of the reference computed on
    the same rounded weights."""
    import dataclasses

    from runtime.reference import ReferenceModel
    from test_int4_checkpoints import ASYMMETRIC, save_int4

    config, _ = save_int4(tmp_path, dataclasses.replace(ASYMMETRIC, int4_act_order=True))
    weights = ModelWeights.load(config, tmp_path)
    prompts = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9))
    want = ReferenceModel(config, weights.rounded("float16")).generate(prompts, 16)
    with TunedKernels.defaults(Target.cuda(0)) as kernels:
        model = LlamaModel(config, weights, kernels, dtype="float16")
        got = model.generate(prompts, 16)
    assert model.decode_mode == "graph"
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert np.abs(got.logits - want.logits).max() < 2e-2 * np.abs(want.logits).max()


@pytest.mark.gpu
def test_a_generation_across_longropes_original_context_decodes_the_references_tokens_on_the_gpu():
    """Phi-3's longrope with an original context of 16: a 10-token prompt and 14 new tokens cross it
    (the short graph, the sequence run again as a long prompt, then the long graph); float32, the
    reference's tokens and logits."""
    from runtime.reference import ReferenceModel

    config = ModelConfig.from_hf_dict({
        "architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_act": "silu", "hidden_size": 256,
        "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
        "vocab_size": 500, "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": False,
        "original_max_position_embeddings": 16,
        "rope_scaling": {"type": "longrope", "short_factor": [1.0 + i / 8 for i in range(32)],
                         "long_factor": [1.0 + 4 * i for i in range(32)]}}, "phi3-small")
    weights = ModelWeights.random(config, seed=4)
    prompts = np.random.default_rng(3).integers(0, config.vocab_size, (2, 10))
    want = ReferenceModel(config, weights).generate(prompts, 14)
    with TunedKernels.defaults(Target.cuda(0)) as kernels:
        model = LlamaModel(config, weights, kernels)
        got = model.generate(prompts, 14)
    assert model.decode_mode == "graph"
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert np.abs(got.logits - want.logits).max() < 1e-3 * np.abs(want.logits).max()
