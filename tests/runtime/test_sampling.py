"""Choosing the next tokens (runtime.sampling): sampling's distribution as transformers' warpers
make it, draws that follow it, and sequences that end at their stop ids."""
from __future__ import annotations

import numpy as np
import pytest

from export import TunedKernels
from runtime.llama import LlamaModel
from runtime.model_config import PRESETS
from runtime.reference import ReferenceModel
from runtime.sampling import NextTokens, Sampling
from runtime.weights import ModelWeights

LOGITS = np.array([[2.0, 1.5, 1.5, 0.3, -1.0, 0.0, 4.0, -3.0]])


def test_the_distribution_is_transformers_temperature_top_k_then_top_p():
    torch = pytest.importorskip("torch")
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    rng = np.random.default_rng(0)
    for vocab, temperature, top_k, top_p in [(8, 1.0, 0, 1.0), (8, 0.7, 3, 1.0), (8, 1.3, 0, 0.6),
                                             (50, 0.5, 10, 0.9), (3000, 0.8, 0, 0.95), (3000, 2.0, 0, 0.5),
                                             (3000, 1.0, 2000, 0.99)]:
        logits = rng.normal(0, 3, (2, vocab))
        logits[1, :5] = 10.0  # ties at the top
        scores = torch.from_numpy(logits)
        for warper in (TemperatureLogitsWarper(temperature), *([TopKLogitsWarper(top_k)] if top_k else []),
                       *([TopPLogitsWarper(top_p)] if top_p < 1 else [])):
            scores = warper(None, scores)
        want = torch.softmax(scores, dim=-1).numpy()
        got = Sampling(temperature, top_k, top_p).probabilities(logits)
        assert ((got > 0) == (want > 0)).all(), (vocab, temperature, top_k, top_p)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-15)


def test_draws_follow_the_distribution_and_repeat_with_the_seed():
    sampling = Sampling(temperature=0.8, top_k=5, top_p=0.9, seed=3)
    want = sampling.probabilities(LOGITS)[0]
    assert 1 < np.count_nonzero(want) < 5  # the cuts matter here
    rows = np.repeat(LOGITS, 20000, axis=0)
    ids = NextTokens(len(rows), sampling)(rows)
    frequencies = np.bincount(ids, minlength=LOGITS.shape[1]) / len(ids)
    assert (frequencies[want == 0] == 0).all()
    np.testing.assert_allclose(frequencies, want, atol=0.015)
    np.testing.assert_array_equal(NextTokens(len(rows), sampling)(rows), ids)
    other = NextTokens(len(rows), Sampling(0.8, 5, 0.9, seed=4))(rows)
    assert (other != ids).mean() > 0.1


@pytest.mark.parametrize("sampling", [Sampling(top_k=1), Sampling(top_p=1e-6), Sampling(temperature=1e-3)])
def test_sampling_cut_to_one_token_is_greedy(sampling):
    rows = np.random.default_rng(1).normal(0, 2, (64, 300))
    np.testing.assert_array_equal(NextTokens(64, sampling)(rows), rows.argmax(axis=-1))


def test_a_sequence_is_padded_from_its_stop_id_on_and_the_batch_ends_with_the_last():
    chooser = NextTokens(2, stop_ids=[7, 5], vocab=10)
    assert chooser.pad_id == 7  # transformers pads with the first end-of-sequence id when none is said
    steps = [[1, 2], [5, 3], [4, 4], [6, 7], [1, 1]]
    out = []
    for ids in steps[:4]:
        out.append(chooser(None, np.array(ids)))
        assert chooser.all_ended == (len(out) == 4)
    np.testing.assert_array_equal(np.stack(out, axis=1), [[1, 5, 7, 7], [2, 3, 4, 7]])
    assert NextTokens(2, stop_ids=[7], pad_id=0)(None, np.array([7, 1])).tolist() == [7, 1]


@pytest.mark.parametrize("make, message", [
    (lambda: Sampling(temperature=0), r"temperature must be a number > 0, not 0 \(greedy decoding: no sampling\)"),
    (lambda: Sampling(temperature=float("nan")), "temperature must be a number > 0, not nan"),
    (lambda: Sampling(top_k=-1), r"top_k must be an int >= 0 \(0: every token\), not -1"),
    (lambda: Sampling(top_k=2.5), "top_k must be an int >= 0"),
    (lambda: Sampling(top_p=0), r"top_p must be a number in \(0, 1\] \(1: every token\), not 0"),
    (lambda: Sampling(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (lambda: Sampling(seed=-1), "seed must be an int >= 0, not -1"),
    (lambda: NextTokens(1, stop_ids=[10], vocab=10), r"stop_ids must be token ids in 0..9, not 10"),
    (lambda: NextTokens(1, stop_ids=["2"]), r"stop_ids must be token ids >= 0, not '2'"),
    (lambda: NextTokens(1, stop_ids=[1], pad_id=-1), r"pad_id must be token ids >= 0, not -1"),
])
def test_bad_settings_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_the_runtime_and_the_reference_draw_the_same_tokens():
    config = PRESETS["tiny"]
    weights = ModelWeights.random(config, 0)
    prompts = np.array([[5, 9, 2], [7, 7, 1]])
    sampling = Sampling(temperature=0.9, top_p=0.95, seed=2)
    reference = ReferenceModel(config, weights)
    want = reference.generate(prompts, 12, sampling)
    assert not np.array_equal(want.tokens, reference.generate(prompts, 12).tokens)  # not the greedy ones
    with TunedKernels.defaults() as kernels:
        model = LlamaModel(config, weights, kernels)
        np.testing.assert_array_equal(model.generate(prompts, 12, sampling=sampling).tokens, want.tokens)
        got = model.generate(prompts, 12, keep_logits=False, sampling=sampling)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.logits is None
