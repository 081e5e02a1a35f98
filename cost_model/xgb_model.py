"""An XGBoost cost model that ranks candidates by predicted throughput.

Labels are throughputs normalised per task (the task's best measured = 1, failures = 0),
so tasks of different sizes can train one model; candidates of a task form one ranking
group. The model only has to order candidates well, hence a ranking objective.

A model can start from a pre-trained ``base`` (transfer from other tasks): every fit then
adds its trees to a copy of the base's, so what the base learned stays and the new trees
correct it on the task at hand.
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

    def __init__(self, config: XGBConfig | None = None, seed: int = 0, base: "XGBCostModel | None" = None):
        self.config = config or XGBConfig()
        self.seed = seed
        self.booster = None
        self.base = base if base is not None and base.fitted else None
        self.feature_names: list[str] | None = list(base.feature_names) if self.base and base.feature_names else None

    @property
    def fitted(self) -> bool:
        """True when the model can predict: fitted itself, or given a fitted base."""
        return self.booster is not None or self.base is not None

    @property
    def n_trees(self) -> int:
        booster = self._predictor()
        return booster.num_boosted_rounds() if booster is not None else 0

    def _predictor(self):
        if self.booster is not None:
            return self.booster
        return self.base._predictor() if self.base is not None else None

    def fit(self, features: np.ndarray, throughput: np.ndarray, groups: np.ndarray | None = None,
            feature_names: Sequence[str] | None = None) -> "XGBCostModel":
        """Train on ``features`` (one row per measured config, 2-D) and their ``throughput``
        (higher = faster, failures 0), ranked within each of ``groups`` (one group id per row;
        None: one group). ``feature_names`` name the columns (``FeatureExtractor.names``).
        Returns the model itself. Raises ValueError for empty input, lengths that disagree,
        or a throughput with no finite value (nothing to rank)."""
        import xgboost as xgb

        features = np.asarray(features, dtype=np.float32)
        throughput = np.asarray(throughput, dtype=np.float64)
        groups = np.zeros(len(throughput), dtype=np.int64) if groups is None else np.asarray(groups)
        # xgboost would silently train on a mislaid set (it cuts labels to the rows, or fails deep inside)
        if features.ndim != 2:
            raise ValueError(f"features must be a 2-D array (one row per config), got shape {features.shape}")
        if len(features) == 0:
            raise ValueError("nothing to fit: features has no row")
        if throughput.shape != (len(features),):
            raise ValueError(f"throughput has shape {throughput.shape}: expected one value per row of features "
                             f"({len(features)})")
        if groups.shape != (len(features),):
            raise ValueError(f"groups has shape {groups.shape}: expected one group per row of features ({len(features)})")
        if not np.isfinite(throughput).any():
            raise ValueError("throughput has no finite value: nothing to rank")
        if feature_names is not None and len(list(feature_names)) != features.shape[1]:
            raise ValueError(f"feature_names names {len(list(feature_names))} column(s); features has "
                             f"{features.shape[1]}")
        order = np.argsort(groups, kind="stable")  # xgboost wants qid sorted
        labels = normalize_per_group(throughput, groups)[order]
        names = list(feature_names) if feature_names is not None else None
        if self.base is not None and names is not None and names != self.feature_names:
            raise ValueError("features must be laid out as the base model's (FeatureExtractor(columns=...))")
        self.feature_names = names
        # names stay on this side (see importance): xgboost would check them on every boosting
        # round, and one thread avoids OpenMP spinning on a machine busy with other work
        data = xgb.DMatrix(features[order], label=labels, qid=groups[order], missing=np.nan, nthread=1)
        self.booster = xgb.train(self.config.params(self.seed), data, num_boost_round=self.config.num_rounds,
                                 xgb_model=self.base._predictor() if self.base is not None else None)
        return self

    def predict(self, features: np.ndarray, feature_names: Sequence[str] | None = None) -> np.ndarray:
        """Scores of the rows of ``features`` (higher: faster). Their columns must be the
        model's: fewer, or others (``feature_names``, when given), would be scored as if they
        were, without a word (a model saved for another operator's features)."""
        import xgboost as xgb

        booster = self._predictor()
        if booster is None:
            raise RuntimeError("the cost model has not been fitted")
        features = np.asarray(features, dtype=np.float32)
        if features.ndim != 2 or features.shape[1] != booster.num_features():
            raise ValueError(f"features of shape {features.shape}: the model takes rows of {booster.num_features()} "
                             "columns (FeatureExtractor(columns=model.feature_names) lays them out)")
        if feature_names is not None and self.feature_names is not None and list(feature_names) != self.feature_names:
            differ = [(n, m) for n, m in zip(feature_names, self.feature_names) if n != m]
            said = f": column {differ[0][0]!r} where the model has {differ[0][1]!r}" if differ else ""
            raise ValueError(f"features laid out as another model's{said} "
                             "(FeatureExtractor(columns=model.feature_names) lays them out)")
        data = xgb.DMatrix(features, missing=np.nan, nthread=1)
        return booster.predict(data)

    def importance(self) -> dict[str, float]:
        """Total gain per feature name (features never split on are absent)."""
        booster = self._predictor()
        if booster is None:
            return {}
        names = self.feature_names or []

        def name(key: str) -> str:  # the booster knows features as f0, f1, ...
            index = int(key[1:]) if key.startswith("f") and key[1:].isdigit() else -1
            return names[index] if 0 <= index < len(names) else key

        return {name(k): float(v) for k, v in booster.get_score(importance_type="total_gain").items()}

    def save(self, path: str) -> None:
        """The booster (base trees included) to ``path``, config and feature names beside it."""
        import json

        booster = self._predictor()
        if booster is None:
            raise RuntimeError("nothing to save: the cost model has not been fitted")
        booster.save_model(path)
        with open(path + ".meta.json", "w") as f:
            json.dump({"config": asdict(self.config), "feature_names": self.feature_names}, f)

    @classmethod
    def load(cls, path: str, seed: int = 0) -> "XGBCostModel":
        """The model ``save`` wrote to ``path`` (and ``path.meta.json``). FileNotFoundError naming
        ``path`` when either file is missing."""
        import json
        import os

        import xgboost as xgb

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no saved cost model at {path}")
        if not os.path.isfile(path + ".meta.json"):  # save writes both: the model alone cannot be laid out
            raise FileNotFoundError(f"cost model {path} has no {path}.meta.json beside it (save writes both)")
        with open(path + ".meta.json") as f:
            meta = json.load(f)
        model = cls(XGBConfig(**meta["config"]), seed)
        model.booster = xgb.Booster()
        model.booster.load_model(path)
        names = meta["feature_names"]
        if not isinstance(names, list) or len(names) != model.booster.num_features():
            raise ValueError(f"{path}.meta.json names {len(names) if isinstance(names, list) else 'no'} features; "
                             f"the model takes {model.booster.num_features()}")
        model.feature_names = names
        return model
