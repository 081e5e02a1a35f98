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
