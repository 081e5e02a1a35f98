"""How a mixture of experts routes each token (``ModelConfig.num_experts``), as transformers'
Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Granite MoE and ERNIE 4.5 MoE routers do: a softmax over
every expert's logit in float32, the ``experts_per_token`` most probable experts (ERNIE 4.5: of
the highest probability plus a bias of each), their probabilities as the weights of their
outputs, renormalised to sum 1 where ``norm_topk_prob`` says (Mixtral always does).

The tuned decoder (``runtime.llama``) and the numpy reference both route with ``route``, so
they pick the same experts from the same logits; the parity tests check it against
transformers itself.
"""
from __future__ import annotations

import numpy as np


# transformers' floor of the sum the top probabilities are renormalised by (ERNIE 4.5's moe_norm_min;
# without a selection bias no such sum comes near it)
NORM_MIN = 1e-12


def route(logits: np.ndarray, experts_per_token: int, normalise: bool,
          selection_bias: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(experts [rows, k] int64, the top first; weights [rows, k] float32) of router ``logits``
    [rows, E]: the most probable experts, or with ``selection_bias`` [E] (ERNIE 4.5's) those of the
    highest probability plus bias, weighted by their probabilities alone."""
    logits = np.asarray(logits, dtype=np.float32)
    k = experts_per_token
    if logits.ndim != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"route: logits of shape {logits.shape} cannot pick {k} experts per token")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    scores = probabilities if selection_bias is None else probabilities + np.asarray(selection_bias, np.float32)
    # the k largest, in descending order (a stable sort: ties go to the lower expert, as torch.topk's do on CPU)
    chosen = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probabilities, chosen, axis=1)
    if normalise:
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), np.float32(NORM_MIN))
    return chosen, weights.astype(np.float32)


def rows_by_expert(experts: np.ndarray, weights: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{expert: (the rows routed to it, in order; their weights)} for the experts some row picked."""
    rows = np.repeat(np.arange(experts.shape[0]), experts.shape[1])
    flat, flat_weights = experts.reshape(-1), weights.reshape(-1)
    order = np.argsort(flat, kind="stable")
    groups: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    boundaries = np.flatnonzero(np.diff(flat[order])) + 1
    for group in np.split(order, boundaries):
        if group.size:
            groups[int(flat[group[0]])] = (rows[group], flat_weights[group])
    return groups
