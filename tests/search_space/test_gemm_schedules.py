"""The float32 gemm schedule's variants on awkward shapes: both micro-kernels (dot products
along K, outer products with a transposed W panel), X packing in either block order, W
blocks split over threads in either order."""
from __future__ import annotations


from measure import MeasureInput
from search_space import Task, get_template
from test_quant_templates import every_knob_value  # noqa: E402  (same directory)


def test_every_gemm_knob_value_on_an_awkward_shape(host, machinery):
    builder, runner = machinery
    template = get_template("gemm", "cpu")
    task = Task.make("gemm", {"M": 131, "N": 203, "K": 1100})  # no dim a multiple of any tile
    space = template.space(task, host)
    outer = dict(template.default(task, host).as_dict(), kernel="outer", xpack=1, order="mnk", kc=512, mc=32, nc=48)
    assert space.accepts(outer)
    configs = every_knob_value(space, template.default(task, host)) + every_knob_value(space, space.from_values(outer))
    inputs = [MeasureInput(task, c, host) for c in configs]
    results = runner.run(inputs, builder.build(inputs))
    failures = [(str(i.config), r.error.name, r.message) for i, r in zip(inputs, results) if not r.ok]
    assert not failures, failures


def test_outer_kernel_needs_a_packed_w(host):
    space = get_template("gemm", "cpu").space(Task.make("gemm", {"M": 64, "N": 64, "K": 64}), host)
    values = dict(get_template("gemm", "cpu").default(Task.make("gemm", {"M": 64, "N": 64, "K": 64}), host).as_dict(),
                  kernel="outer", pack=0)
    assert not space.accepts(values)
