"""Pieces of ``autotune bench --target cuda`` that need no GPU: baselines for every operator,
the roofline probes compile, results read well without a vendor baseline."""
from __future__ import annotations

import json
import math

import pytest

from autotune.bench.cuda import CudaBenchResult, compute_peak, torch_available
from autotune.bench.cuda_baselines import BASELINES
from measure.compile_cuda import compile_to_cubin
from measure.cuda_roofline import DOCUMENTED, probe_sources
from search_space import Target, Task, list_operators

SM90 = Target.from_name("sm_90a")


def test_every_llm_operator_has_a_vendor_baseline():
    ops = {o.op for o in list_operators() if type(o).__module__.startswith("search_space.ops")}
    assert ops, "no operators registered"
    assert ops <= set(BASELINES), sorted(ops - set(BASELINES))


@pytest.mark.parametrize("attrs", [{"norm": "rmsnorm", "eps": 1e-6}, {"act": "swiglu", "norm": "rmsnorm", "eps": 1e-6},
                                   {"act": "swiglu", "residual": True}])
def test_the_gemv_baseline_does_what_a_fused_gemv_does(attrs):
    """The vendor baseline of a fused decode GEMV computes the same Y around the vendor matmul
    (run here on torch's CPU build)."""
    import numpy as np
    import torch

    from search_space import get_template

    task = Task.make("gemv", {"M": 2, "N": 16, "K": 64}, "float32", attrs)
    template = get_template("gemv", "cuda")
    inputs = template.make_inputs(task, np.random.default_rng(0))
    _, call = BASELINES["gemv"](torch, task, {k: torch.from_numpy(v) for k, v in inputs.items()}, template)
    np.testing.assert_allclose(call().numpy(), template.reference(task, inputs)["Y"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("span", ["head", "projection"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_the_qk_norm_baseline_does_what_the_kernel_does(dtype, span):
    """q heads by GQ, k heads by GK (each head, or the whole q and k projections), v heads as
    they were (torch's CPU build)."""
    import numpy as np
    import torch

    from measure.verify import check_output
    from search_space import get_template

    task = Task.make("qk_norm", {"T": 3, "H": 4, "HKV": 2, "D": 64}, dtype, {"span": span})
    template = get_template("qk_norm", "cuda")
    inputs = template.make_inputs(task, np.random.default_rng(0))
    _, call = BASELINES["qk_norm"](torch, task, {k: torch.from_numpy(v) for k, v in inputs.items()}, template)
    y = call().float().numpy()
    assert not check_output("Y", y, template.reference(task, inputs)["Y"], template.tolerance(task), "float32")
    np.testing.assert_array_equal(y[:, 6:], inputs["X"][:, 6:].astype(np.float32))   # the v heads, exactly


def test_the_rope_append_attention_baseline_does_what_the_fused_kernel_does():
    """Ragged positions, one past the cache, NaN in the rows no kernel may read (torch's CPU build)."""
    import numpy as np
    import torch

    from autotune.bench.cuda_baselines import _as_outputs
    from measure.verify import check_output
    from search_space import get_template

    task = Task.make("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 16, "S": 12, "L": 9}, "float32",
                     {"theta": 500000.0, "scale": 0.3})
    template = get_template("rope_append_attention", "cuda")
    inputs = template.make_inputs(task, np.random.default_rng(0))
    _, call = BASELINES["rope_append_attention"](torch, task, {k: torch.from_numpy(v) for k, v in inputs.items()},
                                                 template)
    reference = template.reference(task, inputs)
    for name, value in _as_outputs(task, call()).items():
        assert not check_output(name, value.numpy(), reference[name], 1e-4, "float32"), name


@pytest.mark.tools("nvcc")
@pytest.mark.parametrize("name", ["stream", "fma"])
def test_roofline_probes_compile(name):
    data, stats = compile_to_cubin(probe_sources()[name], SM90)
    assert data[:4] == b"\x7fELF" and stats["registers"] > 0 and stats["spill_stores"] == 0


def test_peaks_follow_the_unit_that_does_the_work():
    ceilings = dict(DOCUMENTED)
    assert compute_peak(Task.make("gemm", {"M": 8, "N": 8, "K": 8}, "bfloat16"), ceilings) == DOCUMENTED["bf16_gflops"]
    assert compute_peak(Task.make("gemm", {"M": 8, "N": 8, "K": 8}, "float16"), ceilings) == DOCUMENTED["fp16_gflops"]
    assert compute_peak(Task.make("gemm", {"M": 8, "N": 8, "K": 8}, "float32"), ceilings) == DOCUMENTED["fp32_gflops"]
    assert compute_peak(Task.make("softmax", {"M": 8, "N": 8}, "float16"), ceilings) == DOCUMENTED["fp32_gflops"]


def test_result_without_a_vendor_baseline_is_valid_json_and_readable():
    task = Task.make("gemv", {"M": 1, "N": 11008, "K": 4096}, "float16")
    result = CudaBenchResult(task, SM90, {"warps": 4}, threads=0, tuned_s=30e-6, baseline_s=math.nan,
                             baseline="no vendor baseline (torch is not importable)",
                             peak_gflops=DOCUMENTED["fp16_gflops"], memory_gbs=DOCUMENTED["stream_gbs"],
                             memory_level="HBM", ceilings=dict(DOCUMENTED, source="H200 values measured on 2026-11-28 (not this GPU)"))
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert data["baseline_s"] is None and data["speedup"] is None and data["bound"] == "memory"
    assert 0.7 < data["roofline_fraction"] < 0.8  # 90 MB in 30 us against 4.09 TB/s
    assert "no vendor baseline" in result.summary() and "GB/s" in result.summary()
    # a roofline of stand-in values says so in the text too, not only in --json's ceilings
    assert "no probe ran here" not in result.summary()
    result.ceilings["documented"] = ["stream_gbs"]
    assert "an H200's measured on 2026-11-28: no probe ran here" in result.summary()


@pytest.mark.parametrize("version_py, available", [
    ("cuda: Optional[str] = '12.8'\nhip: Optional[str] = None\n", True),
    ("cuda: Optional[str] = None\nhip: Optional[str] = '6.2'\n", True),
    ("__version__ = '2.13.0+cpu'\ncuda: Optional[str] = None\nhip: Optional[str] = None\n", False),
], ids=["cuda", "rocm", "cpu"])
def test_only_a_gpu_build_of_torch_offers_vendor_baselines(version_py, available, tmp_path, monkeypatch):
    """A CPU build (the test extra installs one) must not be asked for cuBLAS: read from its
    version.py, without importing torch."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("raise ImportError('torch must not be imported here')\n")
    (tmp_path / "torch" / "version.py").write_text("from typing import Optional\n" + version_py)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(__import__("sys").modules, "torch", raising=False)
    assert torch_available() is available

