"""Every CPU template: its kernels compile, run and match numpy, edges included."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from cost_model import ANALYTIC_FEATURES
from measure import LocalBuilder, LocalRunner, MeasureError, MeasureInput
from search_space import Task, get_template, list_templates

CPU_OPS = sorted(t.op for t in list_templates("cpu") if type(t).__module__.startswith("search_space.templates"))


def random_shape(op: str, rng: np.random.Generator) -> dict[str, int]:
    template = get_template(op, "cpu")
    example = template.example_shape
    shape = {}
    for dim in template.dims:
        top = max(2, min(example[dim], 300))
        shape[dim] = int(rng.integers(1, top + 1))
    return shape


def smallest_legal_shape(op: str) -> dict[str, int]:
    """All dims 1 where legal; else the legal shape of 1s and 2s with the fewest 2s (rope: D even)."""
    template = get_template(op, "cpu")
    for values in sorted(itertools.product((1, 2), repeat=len(template.dims)), key=sum):
        shape = dict(zip(template.dims, values))
        try:
            template.check(Task.make(op, shape))
        except ValueError:
            continue
        return shape
    raise AssertionError(f"{op}: no legal shape with dims of 1 and 2")


def legal_shapes(op: str, n: int, seed: int) -> list[dict[str, int]]:
    template = get_template(op, "cpu")
    rng = np.random.default_rng(seed)
    out = [smallest_legal_shape(op)]
    while len(out) < n:
        shape = random_shape(op, rng)
        try:
            template.check(Task.make(op, shape))
        except ValueError:
            continue
        out.append(shape)
    return out


@pytest.fixture(scope="module")
def machinery(fast_policy):
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy, timeout_s=60) as runner:
        yield builder, runner


@pytest.mark.parametrize("op", CPU_OPS)
def test_template_contract(op, host):
    template = get_template(op, "cpu")
    assert template.op == op and template.dims and template.example_shape
    task = Task.make(op, template.example_shape)
    space = template.space(task, host)
    default = template.default(task, host)
    assert space.is_valid(default) and default in space
    features = template.features(task, default, host)
    assert set(features) <= set(ANALYTIC_FEATURES), set(features) - set(ANALYTIC_FEATURES)
    assert all(math.isfinite(float(v)) for v in features.values())
    source = template.render(task, default, host)
    assert source.lang == "llvm" and source.entry in source.code
    assert [a.role for a in source.args].count("out") >= 1


@pytest.mark.parametrize("op", CPU_OPS)
def test_kernels_match_numpy_on_20_random_shapes(op, host, machinery):
    builder, runner = machinery
    template = get_template(op, "cpu")
    rng = np.random.default_rng(7)
    inputs = []
    for shape in legal_shapes(op, 20, seed=11):
        task = Task.make(op, shape)
        space = template.space(task, host)
        configs = [template.default(task, host)] + space.sample(rng, 1)
        inputs += [MeasureInput(task, c, host) for c in configs]
    builds = builder.build(inputs)
    results = runner.run(inputs, builds)
    failures = [(i.task.key, str(i.config), r.error.name, r.message) for i, r in zip(inputs, results) if not r.ok]
    assert not failures, failures
    assert all(r.median > 0 for r in results)


def test_knobs_change_the_generated_code(host):
    for op in CPU_OPS:
        template = get_template(op, "cpu")
        task = Task.make(op, template.example_shape)
        space = template.space(task, host)
        default = template.default(task, host)
        base = template.render(task, default, host).code
        changed = 0
        for neighbor in space.neighbors(default):
            changed += template.render(task, neighbor, host).code != base
        assert changed == len(space.neighbors(default)), f"{op}: some knob does not change the code"


def test_gemv_rejects_large_m(host):
    with pytest.raises(ValueError, match="decode"):
        get_template("gemv", "cpu").space(Task.make("gemv", {"M": 17, "N": 8, "K": 8}), host)
