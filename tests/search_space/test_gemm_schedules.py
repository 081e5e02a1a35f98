"""The float32 gemm schedule's variants on awkward shapes: both micro-kernels (dot products
along K, outer products with a transposed W panel), X packing in either block order, W
blocks split over threads in either order; and a dynamic M (a prefill's token rows), one
kernel for every row count."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from measure import MeasureError, MeasureInput
from measure.cpu_kernel import allocate_args, load_object
from measure.verify import check_output
from search_space import Task, get_template
from test_attention_templates import GUARDED_RUN  # noqa: E402  (same directory)
from test_quant_templates import every_knob_value  # noqa: E402


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


# (op, dtype, attrs, knob values) of dynamic-M kernels: the M edge in every piece (mr 6: 4, 2
# and 1 rows; mr 3: 2 and 1), both micro-kernels, X packed in both block orders, M blocks and
# threads, and the bfloat16, weight-only (bfloat16 and float16 W) and int4 variants of the
# schedule; every tile fits the 16 vector registers of an AVX2 host
DYNAMIC_M = [
    ("gemm", "float32", None, dict(kernel="dot", mr=6, nr=1, xpack=0, order="nkm", inner="nm", mc=32, threads=1)),
    ("gemm", "float32", None, dict(kernel="dot", mr=3, nr=4, xpack=1, order="mnk", inner="mn", mc=32, threads=2)),
    ("gemm", "float32", None, dict(kernel="outer", mr=6, nr=1, xpack=1, order="nkm", inner="mn", mc=0, nc=48, threads=2,
                                   pack=1)),
    ("gemm", "float32", None, dict(kernel="outer", mr=4, nr=1, xpack=1, order="mnk", inner="nm", mc=64, threads=1,
                                   pack=1, kc=256)),
    ("gemm", "bfloat16", None, dict(dot="widen", mr=3, nr=2, xpack=1, order="mnk", mc=32, threads=2)),
    ("gemm", "float32", {"weight": "bfloat16"}, dict(kernel="dot", mr=4, nr=2, xpack=0, order="nkm", kc=256)),
    ("gemm_q4", "float32", {"group_size": 32}, dict(compute="f32", mr=6, nr=1, xpack=1, order="mnk", mc=32, threads=2)),
    ("gemm_q4", "float32", {"group_size": 32}, dict(compute="i16", mr=3, nr=2, xpack=1, order="nkm", mc=32, nc=48, threads=2)),
    ("gemm_q4", "float32", {"group_size": 64}, dict(compute="i16", mr=6, nr=1, xpack=1, order="mnk", mc=64, threads=1,
                                                    kc=256)),
    ("gemm", "float32", {"weight": "float16"}, dict(kernel="dot", mr=3, nr=2, xpack=1, order="mnk", mc=32, pack=0,
                                                    threads=2)),
    ("gemm", "float32", {"weight": "float16"}, dict(kernel="outer", mr=6, nr=1, xpack=1, order="nkm", nc=48, pack=1,
                                                    kc=256, threads=2)),
]


def offered(space, values: dict) -> dict:
    """``values`` less gemm_q4's ``compute`` where the host has no AVX2: there the int16 path
    is not in the space and the case runs the float path."""
    return {k: v for k, v in values.items() if k != "compute" or "compute" in space.names}
ROW_COUNTS = (1, 2, 3, 7, 13, 64, 100, 128, 150)


def dynamic_m_kernel(op: str, dtype: str, attrs, values: dict, host):
    template = get_template(op, "cpu")
    task = Task.make(op, {"M": 128, "N": 70, "K": 512 if op == "gemm_q4" else 300}, dtype, attrs, dynamic=["M"])
    space = template.space(task, host)
    config = space.from_values(dict(template.default(task, host).as_dict(), **offered(space, values)))
    assert space.is_valid(config), space.violations(config)
    return template, task, config


def test_a_dynamic_m_gemm_serves_every_row_count(host, machinery):
    """One kernel, tuned at M = 128, computes Y for any number of rows, below and above it."""
    builder, _ = machinery
    kernels = [dynamic_m_kernel(*case, host) for case in DYNAMIC_M]
    builds = builder.build([MeasureInput(task, config, host) for _, task, config in kernels])
    for (template, task, config), build in zip(kernels, builds):
        assert build.error == MeasureError.NO_ERROR, build.message
        assert [a.name for a in build.source.args if a.role == "scalar"] == ["M"]
        kernel = load_object(Path(build.artifact).read_bytes(), build.source, host)
        for rows in ROW_COUNTS:
            sized = task.with_dims(M=rows)
            inputs = template.make_inputs(sized, np.random.default_rng(rows))
            buffers = allocate_args(build.source, sized.dims, inputs, poison=True)
            kernel(buffers, sized.dims)
            problem = check_output("Y", buffers["Y"], template.reference(sized, inputs)["Y"],
                                   template.tolerance(sized), task.dtype)
            assert problem is None, (task.key, str(config), rows, problem)


@pytest.mark.parametrize("case", [DYNAMIC_M[1], DYNAMIC_M[2], DYNAMIC_M[6], DYNAMIC_M[7]],
                         ids=["dot", "outer", "q4", "q4-int16"])
def test_a_dynamic_m_gemm_touches_nothing_past_its_rows(case, host):
    """At a few rows, the kernel tuned at 128 reads and writes only those rows: every array
    ends at a page that kills the process when touched."""
    op, dtype, attrs, values = case
    template, task, _ = dynamic_m_kernel(*case, host)
    values = offered(template.space(task, host), values)
    run = {"op": op, "dtype": dtype, "shape": {"M": 128, "N": 70, "K": 512 if op == "gemm_q4" else 300},
           "attrs": attrs or {}, "dynamic": ["M"], "values": values, "runs": [{"M": 1}, {"M": 5}, {"M": 33}],
           "output": "Y"}
    proc = subprocess.run([sys.executable, "-c", GUARDED_RUN, json.dumps(run)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])


def test_m_is_dynamic_on_the_cpu_only():
    from search_space import Target

    for op, attrs in (("gemm", None), ("gemm_q4", {"group_size": 32})):
        task = Task.make(op, {"M": 128, "N": 64, "K": 64}, "float16", attrs, dynamic=["M"])
        with pytest.raises(ValueError, match="cannot be dynamic"):
            get_template(op, "cuda").space(task, Target.from_name("sm_90a"))


def test_a_dynamic_m_bfloat16_gemm_keeps_k_in_one_block(host):
    """A bfloat16 Y summed over several K blocks needs a float32 copy of Y sized by M, which a
    dynamic M has no bound for: such configs are not in the space."""
    template = get_template("gemm", "cpu")
    task = Task.make("gemm", {"M": 128, "N": 64, "K": 1100}, "bfloat16", dynamic=["M"])
    space = template.space(task, host)
    assert not space.accepts(dict(template.default(task, host).as_dict(), kc=512))
    assert template.default(task, host).as_dict()["kc"] == 0
