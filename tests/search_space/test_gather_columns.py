"""The ``gather_columns`` CPU template: Y[m, j] = X[m, P[j]], exactly, for the default and
configs that change rows, threads, unroll, vector width, the gather form and the stores, each
kernel tuned at one row count and run at others (M is a runtime argument).

Kernels are compiled by the builder's worker processes, then loaded here so that one compiled
kernel can be called at several row counts (as in ``test_rowwise_templates``).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.cpu_kernel import allocate_args, load_object
from search_space import Task, get_template


@pytest.fixture(scope="module")
def builder():
    with LocalBuilder(n_parallel=2) as b:
        yield b


def load_kernels(builder, host, task, configs) -> list:
    """Build ``task``'s kernels of ``configs`` in worker processes and load each here."""
    inputs = [MeasureInput(task, c, host) for c in configs]
    builds = builder.build(inputs)
    problems = [(str(i.config), b.message) for i, b in zip(inputs, builds) if b.error != MeasureError.NO_ERROR]
    assert not problems, problems
    return [load_object(Path(b.artifact).read_bytes(), b.source, host) for b in builds]


def run(kernel, task, inputs) -> np.ndarray:
    buffers = allocate_args(kernel.source, task.dims, inputs)  # Y poisoned with NaN first
    kernel(buffers, task.dims)
    return buffers["Y"]


def configs_of(space, default) -> list:
    """The default and a few changes of it the space accepts (rows, threads, unroll, vec, gather, stores)."""
    most = {name: max(space.knob(name).values) for name in ("rows", "threads", "unroll")}
    changes = [dict(rows=most["rows"], threads=most["threads"]),
               dict(gather="intrinsic", unroll=most["unroll"], rows=min(2, most["rows"])),
               dict(gather="loads", vec=min(space.knob("vec").values), unroll=most["unroll"], rows=most["rows"]),
               dict(gather="intrinsic", threads=most["threads"]),
               dict(stores="streaming", rows=most["rows"])]
    configs = [default]
    for change in changes:
        values = dict(default.as_dict(), **change)
        if space.accepts(values) and space.from_values(values) not in configs:
            configs.append(space.from_values(values))
    return configs


@pytest.mark.parametrize("shape", [{"M": 3, "N": 7}, {"M": 5, "N": 1000}], ids=str)
def test_gather_columns_is_exact_at_runtime_row_counts(shape, host, builder):
    host = dataclasses.replace(host, l3_bytes=256)  # the data outgrows it: streaming stores on offer
    template = get_template("gather_columns", "cpu")
    task = Task.make("gather_columns", shape, dynamic=["M"])
    space = template.space(task, host)
    configs = configs_of(space, template.default(task, host))
    assert len(configs) >= 3
    assert {c["gather"] for c in configs} == {"loads", "intrinsic"}
    assert {c["stores"] for c in configs} == {"cached", "streaming"}
    for config, kernel in zip(configs, load_kernels(builder, host, task, configs)):
        assert [(a.name, a.dtype) for a in kernel.source.args if a.role == "scalar"] == [("M", "int64")]
        for count in (1, 2, shape["M"], 9, 17):  # below, at and above the tuned row count
            sized = task.with_dims(M=count)
            rng = np.random.default_rng(count)
            feed = template.make_inputs(sized, rng)
            if count == 9:  # not a permutation: columns repeated and left out
                feed["P"] = rng.integers(0, shape["N"], shape["N"]).astype(np.int32)
            assert np.array_equal(run(kernel, sized, feed), template.reference(sized, feed)["Y"]), (str(config), count)
        # the tuned row count is not compiled in
        assert template.render(task.with_dims(M=40), config, host).code == kernel.source.code


@pytest.mark.parametrize("dynamic", [(), ("M",)], ids=["static", "dynamic"])
def test_every_config_of_one_element(dynamic, host, builder):
    template = get_template("gather_columns", "cpu")
    task = Task.make("gather_columns", {"M": 1, "N": 1}, dynamic=dynamic)
    configs = list(template.space(task, host))
    feed = {"X": np.array([[2.5]], dtype=np.float32), "P": np.array([0], dtype=np.int32)}
    for config, kernel in zip(configs, load_kernels(builder, host, task, configs)):
        assert run(kernel, task, feed).tolist() == [[2.5]], str(config)
