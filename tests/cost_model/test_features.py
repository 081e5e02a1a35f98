"""Features shared across operators and targets, and the layout a pre-trained model fixes."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cost_model import SHARED_FEATURES, FeatureExtractor, build_features
from search_space import Target, Task, get_template


def extractor(op: str, shape: dict, target: Target, columns=None) -> FeatureExtractor:
    task = Task.make(op, shape)
    template = get_template(op, target.kind)
    return FeatureExtractor(template, task, target, template.space(task, target), columns=columns)


def test_gemm_and_gemv_share_the_feature_columns(host):
    gemm = extractor("gemm", {"M": 64, "N": 48, "K": 96}, host)
    gemv = extractor("gemv", {"M": 1, "N": 256, "K": 512}, host)
    assert gemm.names[-len(SHARED_FEATURES):] == gemv.names[-len(SHARED_FEATURES):] == list(SHARED_FEATURES)
    assert [n for n in gemm.names if n.startswith("knob.")] == [f"knob.{k.name}" for k in gemm.space.knobs]


def test_derived_features_mean_the_same_everywhere(host):
    ex = extractor("gemm", {"M": 64, "N": 48, "K": 96}, host)
    config = ex.template.default(ex.task, host)
    values = ex.values(config)
    analytic = ex.template.features(ex.task, config, host)
    assert values["bytes_per_flop"] == pytest.approx(analytic["bytes_moved"] / ex.task.flops)
    assert values["l1_fill"] == pytest.approx(analytic["tile_bytes_l1"] / host.l1_bytes)
    assert values["l2_fill"] == pytest.approx(analytic["tile_bytes_l2"] / host.l2_bytes)
    assert values["threads_per_core"] == pytest.approx(config["threads"] / host.cores)
    row = ex.row(config)
    assert row.shape == (len(ex.names),)
    assert row[ex.names.index("knob.mr")] == config["mr"]
    # a string knob becomes the position of its value
    assert row[ex.names.index("knob.order")] == ex.space.knob("order").values.index(config["order"])


def test_ptxas_report_fills_registers_and_spills(host):
    stats = {"registers": 96, "spill_stores": 8, "spill_loads": 4, "smem_bytes": 4096, "nvcc_s": 1.0}
    assert build_features(stats) == {"registers": 96.0, "spills": 12.0, "shared_bytes": 4096.0}
    assert build_features({"median": 1e-3}) == {}  # a CPU measurement has no build features
    assert build_features({**stats, "occupancy": 0.5})["occupancy"] == 0.5
    ex = extractor("gemv", {"M": 1, "N": 256, "K": 512}, host)
    config = ex.template.default(ex.task, host)
    plain, built = ex.row(config), ex.row(config, stats)
    assert math.isnan(plain[ex.names.index("registers")])
    assert built[ex.names.index("registers")] == 96 and built[ex.names.index("spills")] == 12
    assert np.array_equal(ex.row(config), plain, equal_nan=True), "rows with build stats never enter the cache"


def test_a_fixed_layout_fills_knobs_by_name(host):
    gemm = extractor("gemm", {"M": 64, "N": 48, "K": 96}, host)
    gemv = extractor("gemv", {"M": 1, "N": 256, "K": 512}, host, columns=gemm.names)
    assert gemv.names == gemm.names
    config = gemv.template.default(gemv.task, host)
    row = gemv.row(config)
    assert row[gemm.names.index("knob.unroll")] == config["unroll"]  # both operators have it
    assert math.isnan(row[gemm.names.index("knob.mr")])  # only gemm has it
    assert row[gemm.names.index("log2_flops")] == pytest.approx(math.log2(gemv.task.flops))
