"""Cold or warm timing, decided from the working set, and the roofline level a working set gets."""
from __future__ import annotations

from dataclasses import replace

import pytest

from measure import LocalBuilder, LocalRunner, MeasureInput, TimingPolicy
from measure.roofline import working_set_bandwidth
from measure.timing import (MAX_COLD_CYCLE, MAX_LAST_LEVEL_CACHE, cache_condition, condition_of, last_level_cache_bytes,
                            policy_for, warm_policy)
from search_space import Task, get_template

MIB = 1 << 20
ROOF = {"peak_gflops": 100.0, "l2_gbs": 300.0, "l3_gbs": 150.0, "read_gbs": 40.0}


@pytest.fixture
def cpu(host):
    """The host's target with plausible, fixed caches: 2 MiB of L2 per core, a 32 MiB L3."""
    return replace(host, cores=4, l2_bytes=2 * MIB, l3_bytes=32 * MIB)


def test_a_working_set_between_half_and_all_of_l3_is_held_to_l3_bandwidth(cpu):
    for nbytes in (17 * MIB, 24 * MIB, 32 * MIB):  # above the old 50% cut, within L3
        assert working_set_bandwidth(ROOF, nbytes, cpu, threads=1) == ("L3", 150.0)
    assert working_set_bandwidth(ROOF, 33 * MIB, cpu, threads=1) == ("DRAM", 40.0)


def test_l2_counts_each_thread_s_core(cpu):
    assert working_set_bandwidth(ROOF, 2 * MIB, cpu, threads=1) == ("L2", 300.0)
    assert working_set_bandwidth(ROOF, 3 * MIB, cpu, threads=1)[0] == "L3"
    assert working_set_bandwidth(ROOF, 3 * MIB, cpu, threads=2)[0] == "L2"  # two cores' L2: 4 MiB


def test_an_implausible_reported_l3_is_counted_at_most_the_cap(cpu):
    vm = replace(cpu, l3_bytes=480 * MIB)  # what this project's 2-core development VM reports
    assert last_level_cache_bytes(vm) == MAX_LAST_LEVEL_CACHE == 256 * MIB
    assert working_set_bandwidth(ROOF, 200 * MIB, vm, threads=1)[0] == "L3"
    assert working_set_bandwidth(ROOF, 400 * MIB, vm, threads=1)[0] == "DRAM"
    assert cache_condition(400 * MIB, vm) == "cold"  # llama-100m's float32 weights
    assert cache_condition(3 * MIB, vm) == "warm"    # the tiny preset


def test_the_condition_follows_the_last_level_cache(cpu):
    assert last_level_cache_bytes(cpu) == 32 * MIB
    assert cache_condition(32 * MIB, cpu) == "warm"
    assert cache_condition(32 * MIB + 1, cpu) == "cold"
    no_l3 = replace(cpu, l3_bytes=0)
    assert last_level_cache_bytes(no_l3) == 4 * 2 * MIB  # every core's L2
    assert cache_condition(9 * MIB, no_l3) == "cold"


def test_policies_for_each_condition(cpu):
    base = TimingPolicy(repeats=3)
    cold, warm = policy_for("cold", cpu, base), policy_for("warm", cpu, replace(base, cold_bytes=123))
    assert cold.cold_bytes == 2 * cpu.l3_bytes and cold.repeats == 3 and cold.cache == "cold"
    # cold for a model: one pass, as far back as the model leaves its weights, at least the cache
    assert policy_for("cold", cpu, base, pass_bytes=400 * MIB).cold_bytes == 400 * MIB
    assert policy_for("cold", cpu, base, pass_bytes=3 * MIB).cold_bytes == 32 * MIB
    assert policy_for("cold", cpu, base, pass_bytes=4400 * MIB).cold_bytes == MAX_COLD_CYCLE
    vm = replace(cpu, l3_bytes=480 * MIB)  # counted as the capped 256 MiB, twice that with no model
    assert policy_for("cold", vm, base).cold_bytes == 2 * MAX_LAST_LEVEL_CACHE
    # a model's timing (a pass given) leaves activations where the kernel before wrote them
    assert not policy_for("cold", cpu, base).activations_in_cache
    assert policy_for("cold", cpu, base, pass_bytes=MIB).activations_in_cache
    assert policy_for("warm", cpu, base, pass_bytes=MIB).activations_in_cache
    assert warm.cold_bytes == 0 and warm.repeats == 3 and warm == warm_policy(base)
    assert condition_of(cold) == "cold" and condition_of(warm) == "warm" and condition_of(TimingPolicy()) == "warm"
    assert condition_of(TimingPolicy(cold_bytes=1 << 20)) == "cold"  # policies from before the label
    # warm, as a model that fits: copies filling what one pass touches, at most half the cache
    in_l3 = policy_for("warm", cpu, base, pass_bytes=3 * MIB)
    assert in_l3.cold_bytes == 3 * MIB and condition_of(in_l3) == "warm"
    assert policy_for("warm", cpu, base, pass_bytes=400 * MIB).cold_bytes == 16 * MIB
    with pytest.raises(ValueError, match="unknown cache condition"):
        policy_for("lukewarm", cpu)


def test_the_runner_records_the_condition_it_timed_in(host, fast_policy):
    task = Task.make("gemv", {"M": 1, "N": 64, "K": 128})
    inp = MeasureInput(task, get_template("gemv", "cpu").default(task, host), host)
    small_l3 = replace(host, l3_bytes=4 * MIB)
    policies = {"cold": policy_for("cold", small_l3, fast_policy),
                "warm": policy_for("warm", small_l3, fast_policy),
                "warm, a pass of 1 MiB": policy_for("warm", small_l3, fast_policy, pass_bytes=MIB)}
    found = {}
    with LocalBuilder(n_parallel=1) as builder:
        builds = builder.build([inp])
        for name, policy in policies.items():
            with LocalRunner(policy=policy) as runner:
                (result,) = runner.run([inp], builds)
            assert result.ok, result.message
            found[name] = result.stats
    assert found["cold"]["cache"] == "cold" and found["cold"]["input_copies"] > 1
    assert found["warm"]["cache"] == "warm" and "input_copies" not in found["warm"]
    in_bytes = 4 * (128 + 64 * 128)
    assert found["warm, a pass of 1 MiB"]["cache"] == "warm"
    assert found["warm, a pass of 1 MiB"]["input_copies"] == -(-MIB // in_bytes)


def test_best_of_makes_each_sample_the_fastest_of_several_runs(monkeypatch):
    import measure.timing as timing

    runs = iter([0.004, 0.001, 0.003] * 100)  # seconds each run of the inner calls takes
    clock = [0.0]

    def run_n(n):
        clock[0] += next(runs)

    monkeypatch.setattr(timing.time, "perf_counter", lambda: clock[0])
    base = TimingPolicy(warmup=0, min_sample_s=0.0, repeats=4, min_repeats=4, max_total_s=1.0)
    plain = timing.time_calls(run_n, base, first_call_s=0.01)
    best = timing.time_calls(run_n, replace(base, best_of=3), first_call_s=0.01)
    assert plain["repeats"] == 4 and "best_of" not in plain and max(plain["costs"]) == pytest.approx(0.004)
    assert best["costs"] == pytest.approx([0.001] * 4) and best["best_of"] == 3
