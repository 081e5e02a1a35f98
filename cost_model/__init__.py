"""Cost models that predict which candidates are fast: features and the XGBoost ranker."""
from __future__ import annotations

from .features import ANALYTIC_FEATURES, CONTEXT_FEATURES, FeatureExtractor
from .xgb_model import XGBConfig, XGBCostModel, normalize_per_group, pairwise_accuracy

__all__ = ["ANALYTIC_FEATURES", "CONTEXT_FEATURES", "FeatureExtractor", "XGBConfig", "XGBCostModel",
           "normalize_per_group", "pairwise_accuracy"]
