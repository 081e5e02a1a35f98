"""Timing with the inputs out of cache: the kernel cycles over copies of its inputs."""
from __future__ import annotations

import numpy as np
import pytest

from measure import LocalBuilder, LocalRunner, MeasureInput, TimingPolicy
from measure.cpu_kernel import allocate_args, compile_and_load
from measure.backends.cpu import cold_copies
from measure.timing import MAX_RESIDENT_COPIES
from search_space import Task, get_template


def gemv_kernel(host, task):
    """The gemv template, its default kernel's source for ``task``, and that kernel loaded."""
    template = get_template("gemv", "cpu")
    source = template.render(task, template.default(task, host), host)
    return template, source, compile_and_load(source, host)

def test_the_rotating_harness_calls_each_set_of_pointers_in_turn(host):
    task = Task.make("gemv", {"M": 2, "N": 24, "K": 40})
    template, source, kernel = gemv_kernel(host, task)
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


def test_each_run_goes_on_from_the_set_after_the_last_one_called(host):
    # a timed sample shorter than the cycle must not touch only its first sets, every sample
    task = Task.make("gemv", {"M": 1, "N": 24, "K": 40})
    template, source, kernel = gemv_kernel(host, task)
    rng = np.random.default_rng(1)
    first = allocate_args(source, task.dims, template.make_inputs(task, rng))
    sets = [first] + [dict(first, X=rng.standard_normal((1, 40)).astype(np.float32)) for _ in range(2)]
    run = kernel.rotation(sets, task.dims)
    for n, last in ((2, 1), (2, 0), (1, 1), (4, 2), (3, 2), (7, 0)):
        run(n)
        np.testing.assert_allclose(first["Y"], sets[last]["X"] @ first["W"].T, rtol=1e-4, atol=1e-4)


def test_the_pointer_table_is_built_once_not_in_every_timed_sample(host, monkeypatch):
    # building it walks every set in Python (microseconds a set): inside run(n) that time would
    # be counted as the kernel's, on every sample
    task = Task.make("gemv", {"M": 1, "N": 24, "K": 40})
    template, source, kernel = gemv_kernel(host, task)
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
    # an operator with no weights named (resident inputs): every input copied, at most 64 times
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


def test_a_model_s_weights_are_copied_as_often_as_the_cycle_needs_and_its_activations_not(host):
    task = Task.make("gemv", {"M": 1, "N": 256, "K": 256})
    template = get_template("gemv", "cpu")
    assert template.resident_inputs(task) == ("W",)
    source = template.render(task, template.default(task, host), host)
    buffers = allocate_args(source, task.dims, template.make_inputs(task, np.random.default_rng(0)))
    w_bytes = buffers["W"].nbytes
    copies = cold_copies(source, buffers, 300 * w_bytes, resident=("W",))
    assert len(copies) == 300  # past MAX_COPIES: in a model the weights are as far back as a pass
    assert all(c["X"] is buffers["X"] for c in copies)  # the activation: where the kernel before left it
    assert len({id(c["W"]) for c in copies}) == 300
    assert len(cold_copies(source, buffers, 10 ** 6 * w_bytes, resident=("W",))) == MAX_RESIDENT_COPIES
    assert len(cold_copies(source, buffers, w_bytes // 2, resident=("W",))) == 1
    # a model's activations are never copied: with no weights named, one set
    assert len(cold_copies(source, buffers, 300 * w_bytes, resident=("W",), activations_in_cache=True)) == 300
    assert cold_copies(source, buffers, 300 * w_bytes, activations_in_cache=True) == [buffers]


def test_a_kv_cache_larger_than_its_rows_is_copied_by_the_rows_a_call_reads(host):
    """attention_decode reads L of the S rows of its cache: a cycle of 40 calls' bytes needs
    40 copies however large S is (counted by capacity, S = 8L gave 5, a cycle that fits in
    one eighth of the bytes asked for)."""
    from search_space.registry import op_definition

    template = get_template("attention_decode", "cpu")
    task = Task.make("attention_decode", {"B": 1, "H": 4, "HKV": 2, "D": 16, "S": 512, "L": 64},
                     dynamic=("S", "L"))
    assert op_definition("attention_decode").resident_read_share(task) == 64 / 512
    assert op_definition("gemv").resident_read_share(Task.make("gemv", {"M": 1, "N": 8, "K": 8})) == 1.0
    source = template.render(task, template.default(task, host), host)
    buffers = allocate_args(source, task.dims, template.make_inputs(task, np.random.default_rng(0)))
    read = (buffers["K"].nbytes + buffers["V"].nbytes) * 64 // 512
    copies = cold_copies(source, buffers, 40 * read, resident=("K", "V"), read_share=64 / 512)
    assert len(copies) == 40
    assert all(c["Q"] is buffers["Q"] for c in copies)
    assert len(cold_copies(source, buffers, 40 * read, resident=("K", "V"))) == 5  # by capacity


def test_a_cold_measurement_verifies_and_says_how_many_copies_it_cycled(host):
    task = Task.make("gemv", {"M": 1, "N": 512, "K": 512})
    inp = MeasureInput(task, get_template("gemv", "cpu").default(task, host), host)
    w_bytes = 4 * 512 * 512
    policy = TimingPolicy(warmup=1, min_sample_s=0.0005, repeats=3, min_repeats=3, cold_bytes=100 * w_bytes)
    with LocalBuilder(n_parallel=1) as builder, LocalRunner(policy=policy) as runner:
        result = runner.run([inp], builder.build([inp]))[0]
    assert result.ok, result.message
    assert result.stats["input_copies"] == 100  # of W, the gemv's weights


@pytest.mark.parametrize("op, shape, attrs, weights", [
    ("gemv", {"M": 1, "N": 64, "K": 64}, {"norm": "rmsnorm", "residual": True}, {"W", "G"}),
    ("gemm_q4", {"M": 8, "N": 64, "K": 128}, {"zero_point": True}, {"WQ", "SCALES", "ZEROS"}),
    ("gemv_q4", {"M": 1, "N": 64, "K": 128}, {"zero_point": False}, {"WQ", "SCALES"}),
    ("attention_decode", {"B": 1, "H": 4, "HKV": 2, "D": 16, "S": 64, "L": 40}, {}, {"K", "V"}),
    ("rmsnorm", {"M": 1, "N": 64}, {}, set()),
])
def test_the_weights_an_operator_names_are_inputs_of_its_signature(op, shape, attrs, weights):
    from search_space.registry import op_definition

    task = Task.make(op, shape, attrs=attrs)
    definition = op_definition(op)
    inputs = {a.name for a in definition.signature(task) if a.role == "in"}
    assert set(definition.resident_inputs(task)) == weights and weights <= inputs
