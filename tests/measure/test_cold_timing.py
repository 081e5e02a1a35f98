"""Timing with the inputs out of cache: the kernel cycles over copies of its inputs."""
from __future__ import annotations

import numpy as np

from measure import LocalBuilder, LocalRunner, MeasureInput, TimingPolicy, cold_policy
from measure.cpu_kernel import allocate_args, compile_and_load
from measure.backends.cpu import cold_copies
from search_space import Task, get_template


def test_the_rotating_harness_calls_each_set_of_pointers_in_turn(host):
    task = Task.make("gemv", {"M": 2, "N": 24, "K": 40})
    template = get_template("gemv", "cpu")
    source = template.render(task, template.default(task, host), host)
    kernel = compile_and_load(source, host)
    rng = np.random.default_rng(0)
    sets = []
    for _ in range(3):
        inputs = {"X": rng.standard_normal((2, 40)).astype(np.float32),
                  "W": rng.standard_normal((24, 40)).astype(np.float32)}
        buffers = allocate_args(source, task.dims, inputs)
        if sets:
            buffers["Y"] = sets[0]["Y"]  # outputs are shared: the last call's inputs decide them
        sets.append(buffers)
    for n in (1, 2, 3, 5):
        kernel.rotate(sets, task.dims, n)
        last = sets[(n - 1) % 3]
        np.testing.assert_allclose(sets[0]["Y"], last["X"] @ last["W"].T, rtol=1e-4, atol=1e-4)


def test_the_pointer_table_is_built_once_not_in_every_timed_sample(host, monkeypatch):
    # building it walks every set in Python (microseconds a set): inside run(n) that time would
    # be counted as the kernel's, on every sample
    task = Task.make("gemv", {"M": 1, "N": 24, "K": 40})
    template = get_template("gemv", "cpu")
    source = template.render(task, template.default(task, host), host)
    kernel = compile_and_load(source, host)
    buffers = allocate_args(source, task.dims, template.make_inputs(task, np.random.default_rng(0)))
    sets = [buffers] + [dict(buffers, W=buffers["W"].copy()) for _ in range(7)]
    walks = []
    argv = kernel._argv
    monkeypatch.setattr(kernel, "_argv", lambda bufs, dims: walks.append(1) or argv(bufs, dims))
    run = kernel.rotation(sets, task.dims)
    built = len(walks)
    for n in (1, 5, 100):
        run(n)
    assert built >= len(sets) and len(walks) == built
    np.testing.assert_allclose(buffers["Y"], buffers["X"] @ buffers["W"].T, rtol=1e-4, atol=1e-4)

def test_copies_fill_the_cold_bytes_up_to_a_cap(host):
    task = Task.make("gemv", {"M": 1, "N": 256, "K": 256})
    template = get_template("gemv", "cpu")
    source = template.render(task, template.default(task, host), host)
    buffers = allocate_args(source, task.dims, template.make_inputs(task, np.random.default_rng(0)))
    in_bytes = 4 * (256 + 256 * 256)
    assert len(cold_copies(source, buffers, 0)) == 1
    assert len(cold_copies(source, buffers, 10 * in_bytes)) == 10
    assert len(cold_copies(source, buffers, 1000 * in_bytes)) == 64
    copies = cold_copies(source, buffers, 3 * in_bytes)
    assert copies[1]["W"] is not buffers["W"] and copies[1]["Y"] is buffers["Y"]
    np.testing.assert_array_equal(copies[2]["W"], buffers["W"])
    assert cold_policy(host).cold_bytes == 2 * host.l3_bytes


def test_a_cold_measurement_verifies_and_says_how_many_copies_it_cycled(host):
    task = Task.make("gemv", {"M": 1, "N": 512, "K": 512})
    inp = MeasureInput(task, get_template("gemv", "cpu").default(task, host), host)
    policy = TimingPolicy(warmup=1, min_sample_s=0.0005, repeats=3, min_repeats=3, cold_bytes=8 << 20)
    with LocalBuilder(n_parallel=1) as builder, LocalRunner(policy=policy) as runner:
        result = runner.run([inp], builder.build([inp]))[0]
    assert result.ok, result.message
    assert result.stats["input_copies"] == -(-(8 << 20) // (4 * (512 + 512 * 512)))
