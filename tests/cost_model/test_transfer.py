"""Pre-training on other tasks, continuing on a new one, saving and loading."""
from __future__ import annotations

import numpy as np
import pytest

from cost_model import FeatureExtractor, XGBConfig, XGBCostModel
from cost_model.transfer import pretrain, training_set
from fakes import recorded_space
from records import RecordLog


def test_training_set_groups_tasks_and_skips_what_templates_lost(sweep_logs):
    target = recorded_space(sweep_logs["target"])
    columns = FeatureExtractor(target.template, target.task, target.target, target.space).names
    other = RecordLog(sweep_logs["other"]).records()
    records = other + RecordLog(sweep_logs["target"]).records()
    stale = records[0].__class__(**{**records[0].__dict__, "config": dict(records[0].config, rows=3)})
    data = training_set(records + [stale], columns)
    assert len(data) == len(records) and data.skipped == 1 and len(data.tasks) == 2
    assert sorted(np.unique(data.groups)) == [0, 1] and data.features.shape == (len(records), len(columns))
    only_other = training_set(records, columns, exclude=[(target.task.key, target.target.key)])
    assert len(only_other) == len(other) and only_other.tasks[0].startswith("gemv/float32/M=3")


def test_continuing_from_a_base_keeps_its_trees(sweep_logs, tmp_path):
    target = recorded_space(sweep_logs["target"])
    extractor = FeatureExtractor(target.template, target.task, target.target, target.space)
    other = training_set(RecordLog(sweep_logs["other"]).records(), extractor.names)
    config = XGBConfig(num_rounds=20)
    base = pretrain(other, config)
    assert base.n_trees == 20
    indices = sorted(target.results)[:16]
    X = extractor.matrix([target.space.get(i) for i in indices])
    y = np.array([target.task.flops / target.results[i].median for i in indices])
    model = XGBCostModel(config, base=base)
    assert model.fitted and np.allclose(model.predict(X), base.predict(X)), "before fitting it is the base"
    model.fit(X, y, feature_names=extractor.names)
    assert model.n_trees == 40 and base.n_trees == 20, "fitting adds trees to a copy of the base"
    with pytest.raises(ValueError, match="laid out"):
        XGBCostModel(config, base=base).fit(X[:, :-1], y, feature_names=extractor.names[:-1])
    path = str(tmp_path / "model.json")
    model.save(path)
    loaded = XGBCostModel.load(path)
    assert loaded.feature_names == extractor.names and loaded.n_trees == 40
    assert np.allclose(loaded.predict(X), model.predict(X))
    # rows of other columns are refused, not scored as if they were the model's
    with pytest.raises(ValueError, match="the model takes rows of"):
        loaded.predict(X[:, :-1])
    renamed = ["knob.other", *extractor.names[1:]]
    with pytest.raises(ValueError, match="laid out as another model's: column 'knob.other'"):
        loaded.predict(X, renamed)
    assert np.allclose(loaded.predict(X, extractor.names), model.predict(X))
