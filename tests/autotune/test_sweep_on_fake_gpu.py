"""A sweep measures on any target the tuner does: here the CUDA one, on the fake GPU."""
from __future__ import annotations

import pytest

from records import RecordLog


def test_a_sweep_measures_its_sample_on_the_cuda_target(fake_gpu, tmp_path):
    from autotune.cli import main

    log = tmp_path / "sweep.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "--op", "rmsnorm", "--shape", "M=2,N=256", "--target", "cuda", "--sample", "3", "--seed", "1",
              "--log", str(log), "--no-mlflow", "--quiet"])
    assert exit_info.value.code == 0
    records = RecordLog(log).records()
    assert len(records) == 3 and len({r.config_index for r in records}) == 3
    assert all(r.target.kind == "cuda" and r.ok for r in records), [r.error for r in records]


def test_a_sampled_sweep_of_a_space_too_large_to_enumerate_plans_without_enumerating():
    """The CUDA gemm space at 4096^3 (millions of configs, about 1% valid): the plan is the first
    valid configs of a seeded permutation, so it is valid, distinct, the same for a seed, and a
    shorter sample is a prefix of a longer one (a sweep cut short is a uniform subset)."""
    import time

    from autotune.tuners.simple import SweepTuner
    from search_space import Target, Task, get_template

    target, template = Target.from_name("sm_90a"), get_template("gemm", "cuda")
    task = Task.make("gemm", {"M": 4096, "N": 4096, "K": 4096}, "float16")
    start = time.perf_counter()
    plan = SweepTuner(task, target, template, seed=4, sample=60).plan
    assert time.perf_counter() - start < 30  # enumerating the space would take minutes
    space = template.space(task, target)
    assert len(space) > space.ENUMERATE_LIMIT
    assert len(plan) == len(set(plan)) == 60 and all(space.is_valid(space.get(i)) for i in plan)
    assert SweepTuner(task, target, template, seed=4, sample=25).plan == plan[:25]
    assert SweepTuner(task, target, template, seed=5, sample=25).plan != plan[:25]
