"""Cost models that predict which candidates are fast: features, the XGBoost ranker,
pre-training on other tasks (transfer), and measures of how well a model ranks."""
from __future__ import annotations

from .features import (ANALYTIC_FEATURES, CONTEXT_FEATURES, SHARED_FEATURES, TARGET_FEATURES, FeatureExtractor,
                       build_features)
from .quality import LIVE_MARGIN, batch_quality, pairwise_accuracy, topk_recall
from .xgb_model import XGBConfig, XGBCostModel, normalize_per_group

__all__ = ["ANALYTIC_FEATURES", "CONTEXT_FEATURES", "FeatureExtractor", "LIVE_MARGIN", "SHARED_FEATURES",
           "TARGET_FEATURES", "XGBConfig", "XGBCostModel", "batch_quality", "build_features", "normalize_per_group",
           "pairwise_accuracy", "topk_recall"]
