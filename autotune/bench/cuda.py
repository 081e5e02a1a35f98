"""``autotune bench --target cuda``: a tuned CUDA kernel beside the vendor's, and the GPU's
roofline, all measured in one run.

The tuned kernel is built and verified like any candidate, then timed by the CUDA runner
with a longer policy (events around each launch, L2 flushed before each). The vendor
baseline (``cuda_baselines``: cuBLAS, tinygemm, SDPA, torch row ops) runs in its own worker
process with torch, on the same inputs, timed the same way and checked against the same
reference. The ceilings: streaming bandwidth and float32 FFMA peak from probe kernels
(``measure.cuda_roofline``), the tensor-core peak from cuBLAS on 8192^3 products; without
torch (or when a probe fails) the H200 values measured on 2026-11-28 (``DOCUMENTED``) stand in, and ``ceilings_source``
says which numbers were measured.
"""
from __future__ import annotations

import ast
import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from measure import CudaRunner, LocalBuilder, MeasureInput, TimingPolicy
from measure.backends.cuda import visible_device
from measure.cuda_roofline import DOCUMENTED
from measure.worker import WorkerCrash, WorkerError, WorkerProcess, WorkerTimeout
from search_space import Config, Target, Task, template_module

from ..units import format_rate, format_time
from .cpu import BenchResult, spread

BENCH_CUDA_POLICY = TimingPolicy(warmup=5, min_sample_s=0.0, repeats=200, min_repeats=20, max_total_s=3.0)
TENSOR_CORE_OPS = ("gemm", "gemm_q4", "gemv_q4", "attention_prefill", "attention_decode")


def torch_available() -> bool:
    """Whether a GPU build of torch (CUDA or ROCm) is installed. Decided from its
    ``torch/version.py`` without importing torch here (the baselines run in worker processes):
    a CPU build, such as the one the test extra installs, has no vendor kernels to offer."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return False
    try:
        tree = ast.parse((Path(list(spec.submodule_search_locations)[0]) / "version.py").read_text())
    except (OSError, SyntaxError, ValueError):
        return True  # cannot tell: the worker tries, and reports what it finds
    builds = {}
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Constant):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(target, ast.Name) and target.id in ("cuda", "hip"):
                    builds[target.id] = node.value.value
    return not builds or any(value is not None for value in builds.values())


def measure_ceilings(target: Target, device: int = 0, use_torch: bool | None = None) -> dict[str, Any]:
    """Streaming GB/s, float32 and tensor-core GFLOP/s of GPU ``device``, measured now where possible."""
    use_torch = torch_available() if use_torch is None else use_torch
    ceilings: dict[str, Any] = dict(DOCUMENTED)
    measured: set[str] = set()
    notes = []
    env = {"CUDA_VISIBLE_DEVICES": visible_device(device)}
    probe = WorkerProcess(env=env, name="autotune-cuda-probe")
    try:
        out = probe.call("measure.cuda_roofline:measure_cuda_roofline", {"target": target.to_dict()}, 300)
        ceilings.update(stream_gbs=out["stream_gbs"], fp32_gflops=out["fp32_gflops"])
        measured |= {"stream_gbs", "fp32_gflops"}
    except (WorkerError, WorkerCrash, WorkerTimeout) as exc:
        notes.append(f"probes failed ({exc})")
    finally:
        probe.close()
    if use_torch:
        peak = WorkerProcess(env=env, name="autotune-cuda-peak")
        try:
            out = peak.call("autotune.bench.cuda_baselines:tensor_core_peak", {}, 600)
            ceilings.update(bf16_gflops=out["bf16_gflops"], fp16_gflops=out["fp16_gflops"],
                            fp32_matmul_gflops=out["fp32_matmul_gflops"])
            measured |= {"bf16_gflops", "fp16_gflops"}
        except (WorkerError, WorkerCrash, WorkerTimeout) as exc:
            notes.append(f"cuBLAS peak failed ({exc})")
        finally:
            peak.close()
    parts = []
    if measured:
        parts.append("measured now: " + ", ".join(sorted(measured)) +
                     " (stream and FFMA probes; tensor cores = cuBLAS 8192^3)")
    documented = sorted(set(DOCUMENTED) - measured)
    ceilings["documented"] = documented  # the stand-ins, said beside any figure that uses one
    if documented:
        parts.append("H200 values measured on 2026-11-28 (not this GPU): " + ", ".join(documented))
    ceilings["source"] = "; ".join(parts + notes)
    return ceilings


def compute_peak(task: Task, ceilings: dict[str, Any]) -> float:
    """GFLOP/s the op could reach: tensor cores for half-precision matrix ops, else FFMA."""
    if task.op in TENSOR_CORE_OPS and task.dtype in ("float16", "bfloat16"):
        return float(ceilings["bf16_gflops" if task.dtype == "bfloat16" else "fp16_gflops"])
    return float(ceilings["fp32_gflops"])


@dataclass
class CudaBenchResult(BenchResult):
    """``BenchResult`` for a GPU: the baseline is the vendor's; memory is HBM."""

    baseline_check: str = ""
    sm_clock_mhz: int = 0
    ceilings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(baseline_check=self.baseline_check, sm_clock_mhz=self.sm_clock_mhz, ceilings=self.ceilings)
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def summary(self) -> str:
        if self.error:
            return f"{self.task.key}: tuned kernel failed: {self.error}"
        rate = format_rate(self.task, self.tuned_s)
        vendor = (f"{self.baseline} {format_time(self.baseline_s)}, tuned/vendor speedup {self.speedup:.2f}x"
                  if math.isfinite(self.baseline_s) else self.baseline)
        check = f" (vendor check: {self.baseline_check})" if self.baseline_check else ""
        roof = (f"{self.memory_gbs:.0f} GB/s streaming" if self.bound == "memory"
                else f"{self.peak_gflops / 1e3:.0f} TFLOP/s peak")
        stand_ins = self.ceilings.get("documented") or []
        if (self.bound == "memory" and "stream_gbs" in stand_ins) or (
                self.bound != "memory" and any(k.endswith("_gflops") for k in stand_ins)):
            roof += ", an H200's measured on 2026-11-28: no probe ran here"
        return (f"{self.task.key} on {self.target.device_name}: tuned {format_time(self.tuned_s)} ({rate}); "
                f"{vendor}{check}; {self.roofline_fraction * 100:.0f}% of the {self.bound} roofline ({roof})"
                + self.warning())


class CudaBench:
    """Benches several tasks on one GPU, sharing the builder, the runner, the vendor's worker
    process (torch is imported once) and the ceilings (measured once)."""

    def __init__(self, target: Target, device: int = 0, seed: int = 0, policy: TimingPolicy = BENCH_CUDA_POLICY,
                 use_torch: bool | None = None, ceilings: dict[str, Any] | None = None):
        self.target, self.device, self.seed, self.policy = target, device, seed, policy
        self.use_torch = torch_available() if use_torch is None else use_torch
        self.ceilings = ceilings or measure_ceilings(target, device, self.use_torch)
        self.builder = LocalBuilder(timeout_s=600)
        self.runner = CudaRunner(devices=(device,), timeout_s=300, policy=policy, seed=seed)
        self.vendor = WorkerProcess(env={"CUDA_VISIBLE_DEVICES": visible_device(device)}, name="autotune-vendor")

    def bench(self, task: Task, config: Config) -> CudaBenchResult:
        inp = MeasureInput(task, config, self.target)
        result = self.runner.run([inp], self.builder.build([inp]))[0]
        baseline, baseline_s, check, versions = "no vendor baseline (no GPU build of torch)", math.nan, "", {}
        if self.use_torch:
            try:
                out = self.vendor.call("autotune.bench.cuda_baselines:run_vendor_baseline",
                                       {"task": task.to_dict(), "seed": self.seed,
                                        "module": template_module(task.op, "cuda"),
                                        "repeats": self.policy.repeats, "max_total_s": self.policy.max_total_s}, 900)
                if "error" in out:
                    baseline = out["error"]
                else:
                    baseline, baseline_s, check = out["description"], out["median"], out["check"]
                    versions = {"torch": out["torch"]}
            except (WorkerError, WorkerCrash, WorkerTimeout) as exc:
                baseline = f"vendor baseline failed: {str(exc).splitlines()[0][:300]}"
        return CudaBenchResult(
            task, self.target, config.as_dict(), threads=0,
            tuned_s=result.median if result.ok else math.inf, baseline_s=baseline_s, baseline=baseline,
            blas=versions, peak_gflops=compute_peak(task, self.ceilings),
            memory_gbs=float(self.ceilings["stream_gbs"]), memory_level="HBM",
            error="" if result.ok else f"{result.error.name}: {result.message}",
            baseline_check=check, sm_clock_mhz=int(result.stats.get("sm_clock_mhz", 0) or 0),
            ceilings=self.ceilings, tuned_spread=spread(result.costs) if result.ok else 0.0)

    def close(self) -> None:
        self.vendor.close()
        self.runner.close()
        self.builder.close()

    def __enter__(self) -> "CudaBench":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bench_cuda(task: Task, target: Target, config: Config, seed: int = 0, device: int = 0,
               policy: TimingPolicy = BENCH_CUDA_POLICY, use_torch: bool | None = None) -> CudaBenchResult:
    """One task: its tuned kernel, the vendor's, the ceilings."""
    with CudaBench(target, device, seed, policy, use_torch) as session:
        return session.bench(task, config)
