"""What a bench line says beside its figures: the rate that matters, the spread, the load."""
from __future__ import annotations

from search_space import Target, Task


def test_a_figure_whose_samples_spread_or_whose_machine_is_busy_is_flagged():
    from autotune.bench.cpu import BenchResult, spread

    task = Task.make("gemv", {"M": 1, "N": 4096, "K": 4096})
    steady = BenchResult(task, Target.host(), {}, 1, tuned_s=1e-3, baseline_s=2e-3, baseline="numpy",
                         tuned_spread=spread([1.0e-3, 1.01e-3, 0.99e-3, 1.0e-3]), baseline_spread=0.02, load=1.2,
                         cores=2, memory_gbs=20.0)
    assert steady.unreliable == [] and "UNRELIABLE" not in steady.summary()
    noisy = BenchResult(task, Target.host(), {}, 1, tuned_s=1e-3, baseline_s=2e-3, baseline="numpy",
                        tuned_spread=spread([1e-3, 2e-3, 3e-3, 4e-3, 5e-3]), baseline_spread=0.02, load=3.5,
                        cores=2, memory_gbs=20.0)
    assert noisy.tuned_spread > 0.5
    text = noisy.summary()
    assert "UNRELIABLE" in text and "tuned samples spread" in text and "load was 3.5 on 2 cores" in text
    data = noisy.to_dict()
    assert data["tuned_spread"] == noisy.tuned_spread and data["load"] == 3.5 and len(data["unreliable"]) == 2
    assert data["rate_unit"] == "GB/s" and "GB/s" in text


def test_a_fraction_above_the_roofline_is_said_in_words_not_printed():
    from autotune.bench.cpu import BenchResult

    task = Task.make("gemv", {"M": 1, "N": 256, "K": 256})
    seconds_at_roofline = task.min_bytes / 100e9
    fast = BenchResult(task, Target.host(), {}, 1, tuned_s=seconds_at_roofline / 1.5, baseline_s=1e-5,
                       baseline="numpy", memory_gbs=100.0, memory_level="L2")
    assert fast.roofline_fraction > 1.4 and not fast.to_dict()["roofline_trusted"]
    assert "faster than the memory roofline" in fast.summary() and "%" not in fast.summary()
    fair = BenchResult(task, Target.host(), {}, 1, tuned_s=seconds_at_roofline / 0.8, baseline_s=1e-5,
                       baseline="numpy", memory_gbs=100.0, memory_level="L2")
    assert "80% of the memory roofline (L2 100 GB/s)" in fair.summary()
