"""An XGBoost cost model that ranks candidates by predicted throughput.

Labels are throughputs normalised per task (the task's best measured = 1, failures = 0),
so tasks of different sizes can train one model; candidates of a task form one ranking
group. The model only has to order candidates well, hence a ranking objective.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class XGBConfig:
    """Hyper-parameters in one place.

    ``rank:pairwise`` takes real-valued labels (rank:ndcg would need integers). XGBoost 3
    builds its pairs from the top of each list by default ("topk"); on tuning data that
    ranks held-out configs worse the more data it sees (0.72 pairwise accuracy after 200
    gemm measurements here), while pairs drawn over the whole list ("mean", 64 per
    sample) reach 0.84.
    """

    objective: str = "rank:pairwise"
    pair_method: str = "mean"
    pairs_per_sample: int = 64
    num_rounds: int = 80
    max_depth: int = 6
    eta: float = 0.2
    subsample: float = 1.0
    min_child_weight: float = 1.0
    gamma: float = 0.0001
    extra: dict = field(default_factory=dict)

    def params(self, seed: int) -> dict:
        params = {"objective": self.objective, "max_depth": self.max_depth, "eta": self.eta,
                  "subsample": self.subsample, "min_child_weight": self.min_child_weight,
                  "gamma": self.gamma, "seed": seed, "nthread": 1, "verbosity": 0,
                  "tree_method": "hist"}
        if self.objective.startswith("rank:"):
            params["lambdarank_pair_method"] = self.pair_method
            params["lambdarank_num_pair_per_sample"] = self.pairs_per_sample
        params.update(self.extra)
        return params


def normalize_per_group(throughput: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Each group's throughputs divided by that group's best (all zeros stay zeros)."""
    labels = np.zeros_like(throughput, dtype=np.float64)
    for g in np.unique(groups):
        mask = groups == g
        top = float(np.max(throughput[mask])) if mask.any() else 0.0
        if top > 0:
            labels[mask] = throughput[mask] / top
    return labels


class XGBCostModel:
    """fit(features, throughput, groups) then predict(features) -> scores (higher = faster)."""

    def __init__(self, config: XGBConfig | None = None, seed: int = 0):
        self.config = config or XGBConfig()
        self.seed = seed
        self.booster = None
        self.feature_names: list[str] | None = None
        self._base = None  # a pre-trained booster to continue from (transfer)

    @property
    def fitted(self) -> bool:
        return self.booster is not None

    def fit(self, features: np.ndarray, throughput: np.ndarray, groups: np.ndarray | None = None,
            feature_names: Sequence[str] | None = None) -> "XGBCostModel":
        import xgboost as xgb

        features = np.asarray(features, dtype=np.float32)
        throughput = np.asarray(throughput, dtype=np.float64)
        groups = np.zeros(len(throughput), dtype=np.int64) if groups is None else np.asarray(groups)
        order = np.argsort(groups, kind="stable")  # xgboost wants qid sorted
        labels = normalize_per_group(throughput, groups)[order]
        self.feature_names = list(feature_names) if feature_names is not None else None
        data = xgb.DMatrix(features[order], label=labels, qid=groups[order], missing=np.nan,
                           feature_names=self.feature_names)
        self.booster = xgb.train(self.config.params(self.seed), data, num_boost_round=self.config.num_rounds,
                                 xgb_model=self._base)
        return self

    def predict(self, features: np.ndarray) -> np.ndarray:
        import xgboost as xgb

        if self.booster is None:
            raise RuntimeError("the cost model has not been fitted")
        data = xgb.DMatrix(np.asarray(features, dtype=np.float32), missing=np.nan,
                           feature_names=self.feature_names)
        return self.booster.predict(data)

    def importance(self) -> dict[str, float]:
        if self.booster is None:
            return {}
        return {k: float(v) for k, v in self.booster.get_score(importance_type="gain").items()}

    def save(self, path: str) -> None:
        import json

        if self.booster is None:
            raise RuntimeError("nothing to save: the cost model has not been fitted")
        self.booster.save_model(path)
        with open(path + ".meta.json", "w") as f:
            json.dump({"config": asdict(self.config), "feature_names": self.feature_names}, f)

    @classmethod
    def load(cls, path: str, seed: int = 0) -> "XGBCostModel":
        import json

        import xgboost as xgb

        with open(path + ".meta.json") as f:
            meta = json.load(f)
        model = cls(XGBConfig(**meta["config"]), seed)
        model.booster = xgb.Booster()
        model.booster.load_model(path)
        model.feature_names = meta["feature_names"]
        return model


def pairwise_accuracy(predicted: np.ndarray, measured: np.ndarray, margin: float = 0.0) -> float:
    """Share of pairs with different measured values that the prediction orders the same way.

    With ``margin`` > 0 only pairs whose measured values differ by more than that relative
    amount count: pairs closer than the timing noise are coin flips for any model.
    """
    predicted = np.asarray(predicted, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    dp = predicted[:, None] - predicted[None, :]
    dm = measured[:, None] - measured[None, :]
    mask = dm > margin * np.abs(measured[None, :])
    if not mask.any():
        return float("nan")
    return float(np.mean(dp[mask] > 0))
