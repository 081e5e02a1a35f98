"""How a mixture of experts routes each token (``ModelConfig.num_experts``), as transformers'
Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE routers do: a softmax over every expert's logit in
float32, the ``experts_per_token`` most probable experts, their probabilities as the weights of
their outputs, renormalised to sum 1 where ``norm_topk_prob`` says (Mixtral always does).

The tuned decoder (``runtime.llama``) and the numpy reference both route with ``route``, so
they pick the same experts from the same logits; the parity tests check it against
transformers itself.
"""
from __future__ import annotations

import numpy as np


def route(logits: np.ndarray, experts_per_token: int, normalise: bool) -> tuple[np.ndarray, np.ndarray]:
    """(experts [rows, k] int64, most probable first; weights [rows, k] float32) of router
    ``logits`` [rows, E]."""
    logits = np.asarray(logits, dtype=np.float32)
    k = experts_per_token
    if logits.ndim != 2 or not 1 <= k <= logits.shape[1]:
        raise ValueError(f"route: logits of shape {logits.shape} cannot pick {k} experts per token")
    shifted = logits - logits.max(axis=1, keepdims=True)
    probabilities = np.exp(shifted)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    # the k largest, in descending order (a stable sort: ties go to the lower expert, as torch.topk's do on CPU)
    chosen = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probabilities, chosen, axis=1)
    if normalise:
        weights = weights / weights.sum(axis=1, keepdims=True)
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
