"""How well a cost model orders candidates: pairwise accuracy and top-k recall.

Both compare a predicted score (higher = faster) with measured throughput (failures = 0).
They are computed live on every batch a model-based tuner proposes (before the batch is
measured the model has ranked it; afterwards the measurements rank it) and offline on
held-out configs of a sweep.
"""
from __future__ import annotations

import math

import numpy as np

# measured throughputs closer than this (relative) are within timing noise on a busy machine:
# such pairs are coin flips for any model and are left out of the live figures
LIVE_MARGIN = 0.05


def _paired(predicted, measured) -> tuple[np.ndarray, np.ndarray]:
    """Both as float arrays of one value per candidate; ValueError when they do not pair up."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    if predicted.ndim != 1 or measured.ndim != 1 or len(predicted) != len(measured):
        raise ValueError(f"predicted and measured must be 1-D of one length: got shapes {predicted.shape} "
                         f"and {measured.shape}")
    return predicted, measured


def pairwise_accuracy(predicted: np.ndarray, measured: np.ndarray, margin: float = 0.0) -> float:
    """Share of pairs with different measured values that the prediction orders the same way;
    a pair the prediction ties counts a half (a coin flip: a model that scores every candidate
    alike, as one fitted on too few points does, is at chance, 0.5, not always wrong).

    With ``margin`` > 0 only pairs whose measured values differ by more than that relative
    amount count: pairs closer than the timing noise are coin flips for any model. NaN
    when no pair counts.
    """
    predicted, measured = _paired(predicted, measured)
    dp = predicted[:, None] - predicted[None, :]
    dm = measured[:, None] - measured[None, :]
    mask = dm > margin * np.abs(measured[None, :])
    if not mask.any():
        return float("nan")
    return float(np.mean((dp[mask] > 0) + 0.5 * (dp[mask] == 0)))


def topk_recall(predicted: np.ndarray, measured: np.ndarray, k: int) -> float:
    """Share of the ``k`` fastest measured candidates that the model also put in its top ``k``.
    Predictions tied across the top-k boundary fill its last places at random: each tied
    candidate counts for its chance of being in (not the first ones by position).

    NaN when nothing was measured faster than zero (every candidate failed).
    """
    predicted, measured = _paired(predicted, measured)
    k = min(k, len(measured), int(np.sum(measured > 0)))
    if k < 1:
        return float("nan")
    best_measured = np.zeros(len(measured), dtype=bool)
    best_measured[np.argsort(-measured, kind="stable")[:k]] = True
    threshold = np.sort(predicted)[::-1][k - 1]
    above, tied = predicted > threshold, predicted == threshold
    chance = (k - above.sum()) / tied.sum()  # of each candidate at the threshold to be in the top k
    return float((np.sum(above & best_measured) + chance * np.sum(tied & best_measured)) / k)


def batch_k(n: int) -> int:
    """The k of a batch's top-k recall: a quarter of the batch, at least one."""
    return max(1, n // 4)


def batch_quality(predicted, measured, margin: float = LIVE_MARGIN) -> dict[str, float]:
    """Pairwise accuracy and top-k recall of one batch; figures that are undefined are left out."""
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    k = batch_k(len(measured))
    out = {"pairwise_accuracy": pairwise_accuracy(predicted, measured, margin),
           "topk_recall": topk_recall(predicted, measured, k)}
    out = {name: value for name, value in out.items() if math.isfinite(value)}
    if "topk_recall" in out:
        out["k"] = k
    return out
