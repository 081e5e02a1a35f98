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


def route(logits: np.ndarray, experts_per_token: int, normalise: bool, selection_bias: np.ndarray | None = None,
          scoring: str = "softmax", groups: int = 1, groups_per_token: int = 1,
          scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(experts [rows, k] int64, the top first; weights [rows, k] float32) of router ``logits``
    [rows, E]: the experts of the highest scores (a softmax over the logits, or with ``scoring``
    "sigmoid" each logit's sigmoid, as DeepSeek-V3's and GLM-4.5's routers score), with
    ``selection_bias`` [E] (ERNIE 4.5's, GLM-4.5's) those of the highest score plus bias, weighted by
    their scores alone (renormalised where ``normalise`` says), times ``scale`` (GLM-4.5's
    routed_scaling_factor). With ``groups`` > 1 the experts are that many equal groups, and only the
    ``groups_per_token`` groups of the highest sum of their two best biased scores are picked from."""
    logits = np.asarray(logits, dtype=np.float32)
    k = experts_per_token
    rows, count = logits.shape if logits.ndim == 2 else (0, 0)
    if logits.ndim != 2 or not 1 <= k <= count or count % groups or not 1 <= groups_per_token <= groups:
        raise ValueError(f"route: logits of shape {logits.shape} cannot pick {k} experts per token from "
                         f"{groups_per_token} of {groups} groups")
    if scoring == "sigmoid":
        probabilities = 1 / (1 + np.exp(-logits))
    else:
        shifted = logits - logits.max(axis=1, keepdims=True)
        probabilities = np.exp(shifted)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
    scores = probabilities if selection_bias is None else probabilities + np.asarray(selection_bias, np.float32)
    if groups > 1:  # only the experts of the best groups may be picked
        grouped = scores.reshape(rows, groups, count // groups)
        group_scores = np.sort(grouped, axis=2)[:, :, -2:].sum(axis=2)
        kept = np.argsort(-group_scores, axis=1, kind="stable")[:, :groups_per_token]
        mask = np.zeros((rows, groups), dtype=bool)
        np.put_along_axis(mask, kept, True, axis=1)
        scores = np.where(np.repeat(mask, count // groups, axis=1), scores, np.float32(-np.inf))
    # the k largest, in descending order (a stable sort: ties go to the lower expert, as torch.topk's do on CPU)
    chosen = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    weights = np.take_along_axis(probabilities, chosen, axis=1)
    if normalise:
        weights = weights / np.maximum(weights.sum(axis=1, keepdims=True), np.float32(NORM_MIN))
    if scale != 1.0:
        weights = weights * np.float32(scale)
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
