"""Every CUDA template renders valid CUDA C that nvcc compiles for sm_90a (no GPU needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cost_model import ANALYTIC_FEATURES
from measure import LocalBuilder, MeasureError, MeasureInput
from search_space import Target, Task, list_templates

CUDA_TEMPLATES = sorted((t for t in list_templates("cuda") if type(t).__module__.startswith("search_space.templates")),
                        key=lambda t: t.op)
SM90 = Target.from_name("sm_90a")


def example_tasks(template) -> list[Task]:
    tasks = []
    for dtype in template.dtypes:
        shape = dict(template.example_shape)
        task = Task.make(template.op, shape, dtype, dynamic=template.dynamic_dims)
        template.check(task)
        tasks.append(task)
    return tasks


@pytest.mark.parametrize("template", CUDA_TEMPLATES, ids=lambda t: t.op)
def test_cuda_template_contract(template):
    for task in example_tasks(template):
        space = template.space(task, SM90)
        default = template.default(task, SM90)
        assert space.is_valid(default)
        features = template.features(task, default, SM90)
        assert set(features) <= set(ANALYTIC_FEATURES), set(features) - set(ANALYTIC_FEATURES)
        assert all(math.isfinite(float(v)) for v in features.values())
        source = template.render(task, default, SM90)
        assert source.lang == "cuda" and f'extern "C" __global__' in source.code
        names = [a.name for a in source.args if a.role in ("in", "out")]
        assert names == [a.name for a in template.signature(task)]
        launch = source.launch_dims
        assert {"grid", "block"} <= set(launch) and math.prod(launch["block"]) <= SM90.max_threads_per_block


@pytest.mark.tools("nvcc")
@pytest.mark.parametrize("template", CUDA_TEMPLATES, ids=lambda t: t.op)
def test_cuda_template_compiles_for_sm90a(template):
    """The default config of every dtype and a sampled config of one dtype go through nvcc
    (a sample of the whole space over the suite: the seed, and so the dtype and the config,
    differ per template; each nvcc call costs about a second)."""
    rng = np.random.default_rng(sum(map(ord, template.op)))
    tasks = example_tasks(template)
    inputs = [MeasureInput(task, template.default(task, SM90), SM90) for task in tasks]
    sampled = tasks[int(rng.integers(len(tasks)))]
    inputs += [MeasureInput(sampled, c, SM90) for c in template.space(sampled, SM90).sample(rng, 1)]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    failures = [(i.task.key, str(i.config), b.error.name, b.message) for i, b in zip(inputs, builds)
                if b.error != MeasureError.NO_ERROR]
    assert not failures, failures
    assert all(b.stats.get("registers", 0) > 0 for b in builds)
