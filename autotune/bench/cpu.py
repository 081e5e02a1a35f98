"""``autotune bench``: a tuned kernel beside its baseline and the machine's roofline, in one run.

The tuned kernel is compiled and verified like any candidate, then timed with a longer
policy. The numpy baseline runs in its own worker process with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE removed, so OpenBLAS picks its fastest kernel for this CPU; which kernel
ran is reported through threadpoolctl. The roofline probes run with the same thread count.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from measure import LocalBuilder, LocalRunner, MeasureInput, TimingPolicy
from measure.roofline import working_set_bandwidth
from measure.worker import WorkerProcess
from search_space import Config, Target, Task, get_template, template_module

from ..units import format_rate, format_time, rate

BENCH_POLICY = TimingPolicy(warmup=2, min_sample_s=0.05, repeats=9, min_repeats=5, max_total_s=20.0)
FAST_BLAS_ENV: dict[str, str | None] = {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}


def run_numpy_baseline(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: time the operator's numpy baseline with ``threads`` BLAS threads."""
    import importlib

    from threadpoolctl import threadpool_info, threadpool_limits

    from measure.timing import time_calls

    importlib.import_module(payload["module"])
    task = Task.from_dict(payload["task"])
    template = get_template(task.op, payload["kind"])
    inputs = template.make_inputs(task, np.random.default_rng(payload["seed"]))
    with threadpool_limits(limits=payload["threads"]):
        description, call = template.numpy_baseline(task, inputs)
        timing = time_calls(lambda n: [call() for _ in range(n)], TimingPolicy(**payload["policy"]))
        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    blas = pools[0] if pools else {}
    return {"description": description, "costs": timing["costs"], "median": timing["median"],
            "blas": {k: blas.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}}


ABOVE_ROOFLINE = 1.05  # a measured fraction past this says the probe measured the wrong level, not a fast kernel
SPREAD_LIMIT = 0.10  # samples spread wider than this (p20..p80 over the median): the figure may move as much
BUSY_LOAD = 0.75  # load beyond this bench's own threads: another process shares the cores


@dataclass
class BenchResult:
    task: Task
    target: Target
    config: dict[str, Any]
    threads: int
    tuned_s: float  # medians of the timed samples
    baseline_s: float
    baseline: str
    tuned_min_s: float = math.inf  # fastest sample of each: on a busy machine other work only adds time
    baseline_min_s: float = math.inf
    blas: dict[str, Any] = field(default_factory=dict)
    peak_gflops: float = 0.0
    memory_gbs: float = 0.0  # read bandwidth of the level the working set fits in
    memory_level: str = "DRAM"
    error: str = ""
    tuned_spread: float = 0.0  # (p80 - p20) / median of the timed samples
    baseline_spread: float = 0.0
    load: float = 0.0  # the machine's 1-minute load average when the timing ended
    cores: int = 0

    @property
    def unreliable(self) -> list[str]:
        """Why the figures should not be trusted: samples that spread, or other work running."""
        reasons = [f"the {side} samples spread {value * 100:.0f}%"
                   for side, value in (("tuned", self.tuned_spread), ("baseline", self.baseline_spread))
                   if value > SPREAD_LIMIT]
        if self.cores and self.load - self.threads > BUSY_LOAD:
            reasons.append(f"the load was {self.load:.1f} on {self.cores} cores with {self.threads} thread(s) "
                           "of this bench")
        return reasons

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.tuned_s if self.tuned_s > 0 else 0.0

    @property
    def tuned_gflops(self) -> float:
        return self.task.flops / self.tuned_s / 1e9 if self.tuned_s > 0 else 0.0

    @property
    def baseline_gflops(self) -> float:
        return self.task.flops / self.baseline_s / 1e9 if self.baseline_s > 0 else 0.0

    def _floors(self) -> tuple[float, float]:
        compute = self.task.flops / (self.peak_gflops * 1e9) if self.peak_gflops else 0.0
        memory = self.task.min_bytes / (self.memory_gbs * 1e9) if self.memory_gbs else 0.0
        return compute, memory

    @property
    def roofline_s(self) -> float:
        """The least time the machine allows: compute or memory, whichever binds."""
        return max(self._floors())

    @property
    def bound(self) -> str:
        compute, memory = self._floors()
        return "compute" if compute >= memory else "memory"

    @property
    def roofline_fraction(self) -> float:
        return self.roofline_s / self.tuned_s if self.tuned_s > 0 else 0.0

    @property
    def tuned_gbs(self) -> float:
        return self.task.min_bytes / self.tuned_s / 1e9 if self.tuned_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "op": self.task.op, "task": self.task.key, "shape": self.task.dims, "dtype": self.task.dtype,
            "target": self.target.key, "device": self.target.device_name, "threads": self.threads,
            "config": self.config, "tuned_s": self.tuned_s if math.isfinite(self.tuned_s) else None, "baseline_s": self.baseline_s,
            "baseline": self.baseline, "blas": self.blas, "speedup": self.speedup,
            "tuned_min_s": self.tuned_min_s if math.isfinite(self.tuned_min_s) else None,
            "baseline_min_s": self.baseline_min_s if math.isfinite(self.baseline_min_s) else None,
            "tuned_gflops": self.tuned_gflops, "baseline_gflops": self.baseline_gflops,
            "tuned_gbs": self.tuned_gbs, "peak_gflops": self.peak_gflops, "memory_gbs": self.memory_gbs,
            "memory_level": self.memory_level,
            "bound": self.bound, "roofline_fraction": self.roofline_fraction,
            "roofline_trusted": self.roofline_fraction <= ABOVE_ROOFLINE, "error": self.error,
            "rate": rate(self.task, self.tuned_s)[0], "rate_unit": rate(self.task, self.tuned_s)[1],
            "tuned_spread": self.tuned_spread, "baseline_spread": self.baseline_spread, "load": self.load,
            "cores": self.cores, "unreliable": self.unreliable,
        }

    def summary(self) -> str:
        if self.error:
            return f"{self.task.key}: tuned kernel failed: {self.error}"
        rate = format_rate(self.task, self.tuned_s)
        blas = self.blas.get("architecture") or ""
        ceiling = (f"{self.memory_level} {self.memory_gbs:.0f} GB/s" if self.bound == "memory"
                   else f"{self.peak_gflops:.0f} GFLOP/s")
        if self.roofline_fraction > ABOVE_ROOFLINE:  # no kernel beats the machine: the ceiling was the wrong one
            roofline = (f"faster than the {self.bound} roofline the probes measured ({ceiling}): the working set "
                        f"sits in a faster level than the probe's, so no fraction is given")
        else:
            roofline = f"{self.roofline_fraction * 100:.0f}% of the {self.bound} roofline ({ceiling})"
        return (f"{self.task.key} threads={self.threads}: tuned {format_time(self.tuned_s)} ({rate}), "
                f"baseline {format_time(self.baseline_s)} ({self.baseline}{', ' + blas if blas else ''}), "
                f"speedup {self.speedup:.2f}x, {roofline}" + self.warning())

    def warning(self) -> str:
        reasons = self.unreliable
        return f"; UNRELIABLE: {', '.join(reasons)}: measure again on a quiet machine" if reasons else ""


def bench(task: Task, target: Target, config: Config, threads: int, seed: int = 0,
          policy: TimingPolicy = BENCH_POLICY) -> BenchResult:
    inp = MeasureInput(task, config, target)
    with LocalBuilder(n_parallel=1) as builder, LocalRunner(timeout_s=600, policy=policy, seed=seed) as runner:
        result = runner.run([inp], builder.build([inp]))[0]
    payload = {"task": task.to_dict(), "kind": target.kind, "seed": seed, "threads": threads,
               "module": template_module(task.op, target.kind),
               "policy": {k: getattr(policy, k) for k in policy.__dataclass_fields__}}
    baseline_worker = WorkerProcess(env=FAST_BLAS_ENV, name="autotune-baseline")
    try:
        base = baseline_worker.call("autotune.bench.cpu:run_numpy_baseline", payload, 1800)
        roof = baseline_worker.call("measure.roofline:measure_roofline",
                                    {"target": target.to_dict(), "threads": threads}, 600)
    finally:
        baseline_worker.close()
    load = os.getloadavg()[0]
    level, bandwidth = working_set_bandwidth(roof, task.min_bytes, target, threads)
    return BenchResult(task, target, config.as_dict(), threads,
                       tuned_s=result.median if result.ok else math.inf,
                       baseline_s=base["median"], baseline=base["description"], blas=base["blas"],
                       tuned_min_s=min(result.costs) if result.ok else math.inf,
                       baseline_min_s=min(base["costs"]),
                       peak_gflops=roof["peak_gflops"], memory_gbs=bandwidth, memory_level=level,
                       error="" if result.ok else f"{result.error.name}: {result.message}",
                       tuned_spread=spread(result.costs) if result.ok else 0.0, baseline_spread=spread(base["costs"]),
                       load=load, cores=len(os.sched_getaffinity(0)))


def spread(costs) -> float:
    """(p80 - p20) / median of timed samples: how far one run's figure may move."""
    if len(costs) < 2:
        return 0.0
    p20, median, p80 = np.percentile(costs, [20, 50, 80])
    return float((p80 - p20) / median) if median > 0 else 0.0

