"""Every CPU template: its kernels compile, run and match numpy, edges included."""
from __future__ import annotations

import math

import numpy as np
import pytest

from runtime.abi import canonical_attrs
from cost_model import ANALYTIC_FEATURES
from measure import MeasureInput
from search_space import Task, get_template, list_templates

CPU_OPS = sorted(t.op for t in list_templates("cpu") if type(t).__module__.startswith("search_space.templates"))


# where the example shape is the smallest case of a range that has code paths of its own
TOPS = {"gemv": {"M": 16}, "gemv_q4": {"M": 16}, "attention_prefill": {"T": 160, "H": 16}}  # attention: T^2 work


def random_shape(op: str, rng: np.random.Generator) -> dict[str, int]:
    """Dims up to min(example, 300) (or TOPS); half of them multiples of a random power of two (never
    above that cap), so that operators whose dims must divide by something (group sizes,
    even head dims) get legal shapes often enough to sample by rejection."""
    template = get_template(op, "cpu")
    example = template.example_shape
    shape = {}
    for dim in template.dims:
        top = TOPS.get(op, {}).get(dim) or max(2, min(example[dim], 300))
        step = 2 ** int(rng.integers(1, 8)) if rng.random() < 0.5 else 1
        step = min(step, 1 << (top.bit_length() - 1))  # a step above top would exceed the cap
        shape[dim] = step * int(rng.integers(1, top // step + 1))
    return shape


def is_legal(task: Task) -> bool:
    try:
        get_template(task.op, "cpu").check(task)
    except ValueError:
        return False
    return True


def smallest_legal(task: Task) -> Task:
    """Shrink each dim of a legal task to its smallest legal value (twice over, since one
    dim's limit may depend on another's): all ones where the operator allows it."""
    for _ in range(2):
        for dim, size in task.dims.items():
            task = next(t for t in (task.with_dims(**{dim: v}) for v in range(1, size + 1)) if is_legal(t))
    return task


def legal_tasks(op: str, n: int, seed: int, dtype: str = "float32",
                attrs: tuple[dict, ...] = ({},)) -> list[Task]:
    """``n`` random legal tasks, the i-th with attributes ``attrs[i % len(attrs)]``; the
    first shrunk to the smallest legal size."""
    rng = np.random.default_rng(seed)
    out: list[Task] = []
    while len(out) < n:
        task = Task.make(op, random_shape(op, rng), dtype, attrs[len(out) % len(attrs)])
        if is_legal(task):
            out.append(task)
    return [smallest_legal(out[0])] + out[1:]


Q4_OPS = ("gemv_q4", "gemm_q4")
# random shapes per variant: the smallest legal one and nine more, most with a tail past every
# tile and vector (ten, not twenty: compiling them is most of this file's time)
N_SHAPES = 10
# (op, dtype, attributes cycled over the shapes): every CPU operator at its defaults, and
# the variants with code paths of their own; each gets N_SHAPES random shapes
VARIANTS = [(op, "float32", ({},)) for op in CPU_OPS if op not in Q4_OPS] + [
    ("gemm", "bfloat16", ({},)),
    ("gemv", "bfloat16", ({},)),
    ("rmsnorm", "float32", ({"residual": True},)),
] + [(op, "float32", ({"group_size": g, "zero_point": False}, {"group_size": g, "zero_point": True}))
     for op in Q4_OPS for g in (32, 64, 128)]


def variant_id(variant) -> str:
    op, dtype, attrs = variant
    group = attrs[0].get("group_size")
    return op + ("" if dtype == "float32" else f"-{dtype}") + (f"-g{group}" if group else "") + (
        "-residual" if attrs[0].get("residual") else "")


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


def test_every_operator_has_a_random_shape_variant():
    assert {v[0] for v in VARIANTS} == set(CPU_OPS)


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_kernels_match_numpy_on_random_shapes(variant, host, machinery):
    """One config per shape, the default and a sampled one in turn (the smallest shape gets
    the default), all compiled by one builder's worker pool and run by one runner worker:
    outputs poisoned, checked against the reference. Compiling dominates, hence one each."""
    op, dtype, attrs = variant
    builder, runner = machinery
    template = get_template(op, "cpu")
    rng = np.random.default_rng(7)
    tasks = legal_tasks(op, N_SHAPES, seed=11, dtype=dtype, attrs=attrs)
    assert len({t.key for t in tasks}) == N_SHAPES
    assert all(v == 1 for d, v in tasks[0].dims.items() if d not in ("K", "D"))  # the smallest legal size
    assert {tuple(sorted(canonical_attrs(op, a).items())) for a in attrs} == {tuple(sorted(t.attr.items())) for t in tasks}
    if "HKV" in template.dims:
        assert any(t.dims["H"] > t.dims["HKV"] > 1 for t in tasks)  # grouped-query shapes
    inputs = []
    for i, task in enumerate(tasks):
        space = template.space(task, host)
        config = template.default(task, host) if i % 2 == 0 else space.sample(rng, 1)[0]
        inputs.append(MeasureInput(task, config, host))
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
