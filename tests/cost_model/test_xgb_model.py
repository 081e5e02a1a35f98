"""XGBCostModel refuses input it would otherwise train on silently (or fail on deep inside xgboost)."""
from __future__ import annotations

import numpy as np
import pytest

from cost_model import XGBConfig, XGBCostModel

X = np.arange(12, dtype=np.float32).reshape(6, 2)
Y = np.arange(1.0, 7.0)


@pytest.mark.parametrize("features, throughput, kwargs, message", [
    (X, Y[:4], {}, r"throughput has shape \(4,\): expected one value per row of features \(6\)"),
    (X[:0], Y[:0], {}, "no row"),
    (X[0], Y[:1], {}, "2-D array"),
    (X, Y, {"groups": np.zeros(5)}, r"groups has shape \(5,\)"),
    (X, np.full(6, np.nan), {}, "no finite value"),
    (X, Y, {"feature_names": ["a", "b", "c"]}, "names 3 column"),
])
def test_fit_refuses_input_that_does_not_pair_up(features, throughput, kwargs, message):
    with pytest.raises(ValueError, match=message):
        XGBCostModel(XGBConfig(num_rounds=2)).fit(features, throughput, **kwargs)


def test_fit_and_predict_on_good_input():
    model = XGBCostModel(XGBConfig(num_rounds=2)).fit(X, Y, feature_names=["a", "b"])
    assert model.predict(X).shape == (6,)


def test_load_names_the_path_given(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no saved cost model at \S*nope\.json$"):
        XGBCostModel.load(str(tmp_path / "nope.json"))
    XGBCostModel(XGBConfig(num_rounds=2)).fit(X, Y, feature_names=["a", "b"]).save(str(tmp_path / "m.json"))
    (tmp_path / "m.json.meta.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"m\.json has no \S*m\.json\.meta\.json"):
        XGBCostModel.load(str(tmp_path / "m.json"))
