"""Compile-only reports of CUDA kernels, no GPU needed: ``autotune tune --compile-only`` and
``autotune.compile_only_report`` from Python.

Builds the template default and a sample of the space with nvcc, checks each against the
target's limits (``measure.resources``) and reports per config what ptxas says: registers,
static and dynamic shared memory, spills, stack, plus the launch shape. Nothing runs.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.backends import get_backend
from search_space import Target, Task, get_template


def compile_only_report(task: Task, target: Target, n_configs: int = 16, seed: int = 0,
                        build_timeout: float = 60.0, restrict: dict | None = None) -> list[dict[str, Any]]:
    """One row per config, ``n_configs`` in all: the default, the template's seed schedules,
    then sampled ones; each only where the space (limited to ``restrict``, ``--restrict``'s knob
    values) takes it. The seeds come before the samples because a narrow restriction of a
    large space may leave too few valid configs for random draws to find. ``target``: a CUDA
    arch (``Target.from_name("sm_90a")``); nvcc must be on the PATH. ValueError when the target
    has no resource report (the CPU) or no config of the space is valid."""
    if not get_backend(target.kind).resource_report:
        raise ValueError(f"compile-only reports are for CUDA targets (Target.from_name('sm_90a')), not {target.key}")
    template = get_template(task.op, target.kind)
    space = template.space(task, target)
    if restrict:
        space = space.restrict(**restrict)
    configs = space.accepted([{}, *template.seed_configs(task, target)],
                             template.default(task, target).as_dict())[:n_configs]
    configs += space.sample(np.random.default_rng(seed), n_configs - len(configs), exclude={c.index for c in configs})
    if not configs:
        raise ValueError("no config of the space is valid with these knob values")
    inputs = [MeasureInput(task, c, target) for c in configs]
    with LocalBuilder(timeout_s=build_timeout) as builder:
        builds = builder.build(inputs)
    rows = []
    for config, build in zip(configs, builds):
        stats = build.stats or {}
        launch = build.source.launch_dims if build.source is not None else {}
        block = launch.get("block", ())
        row = {
            "config": config.as_dict(),
            "status": build.error.name,
            "registers": stats.get("registers"),
            "smem_static": stats.get("smem_bytes"),
            "smem_dynamic": launch.get("smem"),
            "spill_stores": stats.get("spill_stores"),
            "spill_loads": stats.get("spill_loads"),
            "stack_bytes": stats.get("stack_bytes"),
            "threads": math.prod(block) if block else None,
            "grid": list(launch["grid"]) if "grid" in launch else None,
            "nvcc_s": stats.get("nvcc_s"),
            "cached": build.cached,
            "message": build.message,
        }
        rows.append(row)
    return rows


def format_compile_report(task: Task, target: Target, rows: list[dict[str, Any]]) -> str:
    ok = sum(1 for r in rows if r["status"] == MeasureError.NO_ERROR.name)
    lines = [f"{task.key} for {target.arch}: {ok} of {len(rows)} configs build and fit the target"]
    for r in rows:
        config = ",".join(f"{k}={v}" for k, v in r["config"].items())
        if r["registers"] is None:
            lines.append(f"  {r['status']:<16} {config}: {r['message']}")
            continue
        spills = (r["spill_stores"] or 0) + (r["spill_loads"] or 0)
        smem = f"{r['smem_static'] or 0}+{r['smem_dynamic'] or 0}"
        line = (f"  {r['status']:<16} regs {r['registers']:>3}  smem {smem:>12} B  spills {spills:>4} B  "
                f"stack {r['stack_bytes'] or 0:>4} B  threads {r['threads']:>4}  grid {r['grid']}  {config}")
        if r["status"] != MeasureError.NO_ERROR.name:
            line += f": {r['message']}"
        lines.append(line)
    return "\n".join(lines)
