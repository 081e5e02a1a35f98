"""Ranking quality figures: pairwise accuracy and top-k recall."""
from __future__ import annotations

import math

import numpy as np

from cost_model import batch_quality, pairwise_accuracy, topk_recall


def test_pairwise_accuracy_counts_ordered_pairs():
    measured = np.array([1.0, 2.0, 3.0, 4.0])
    assert pairwise_accuracy(measured * 10, measured) == 1.0
    assert pairwise_accuracy(-measured, measured) == 0.0
    assert pairwise_accuracy(np.array([1.0, 2.0, 4.0, 3.0]), measured) == 5 / 6
    # pairs closer than the margin do not count: only (1, 3), (1, 4), (2, 4) differ by > 60%
    assert pairwise_accuracy(np.array([1.0, 2.0, 4.0, 3.0]), measured, margin=0.6) == 1.0
    assert math.isnan(pairwise_accuracy(np.ones(3), np.ones(3)))
    # a model that scores every candidate alike is at chance, not always wrong
    assert pairwise_accuracy(np.zeros(5), np.arange(1.0, 6.0)) == 0.5
    assert pairwise_accuracy(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == (0.5 + 1 + 1) / 3


def test_topk_recall_and_failures():
    measured = np.array([5.0, 0.0, 3.0, 9.0, 1.0, 0.0, 2.0, 7.0])
    predicted = np.array([8.0, 1.0, 2.0, 7.0, 0.0, 0.0, 0.0, 3.0])
    assert topk_recall(predicted, measured, 2) == 0.5  # measured top 2: 9, 7; predicted: 8(->5), 7(->9)
    assert topk_recall(predicted, measured, 3) == 1.0
    assert math.isnan(topk_recall(predicted, np.zeros(8), 2)), "nothing verified: undefined"
    # ties across the top-k boundary fill it at random: the chance, not the first by position
    assert topk_recall(np.zeros(8), np.arange(1.0, 9.0), 2) == 0.25
    assert topk_recall(np.array([5.0, 1.0, 1.0, 1.0]), np.array([4.0, 1.0, 1.5, 3.0]), 2) == (1 + 1 / 3) / 2
    quality = batch_quality(predicted, measured)
    assert quality["k"] == 2 and quality["topk_recall"] == 0.5
    assert 0.5 < quality["pairwise_accuracy"] < 1.0
    assert batch_quality(np.ones(4), np.zeros(4)) == {}


def test_predicted_and_measured_of_different_lengths_are_named():
    import pytest

    with pytest.raises(ValueError, match=r"one length: got shapes \(5,\) and \(4,\)"):
        pairwise_accuracy(np.arange(5), np.arange(4))
    with pytest.raises(ValueError, match="one length"):
        topk_recall(np.arange(3), np.arange(4), 1)
