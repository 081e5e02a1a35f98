"""Attention templates beyond the generic CPU contract: runtime lengths (one kernel at
several T or L), grouped-query ratios, head dims, causality, batches, split-KV and
large-magnitude inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from measure import LocalBuilder, LocalRunner, MeasureError, MeasureInput
from measure.cpu_kernel import allocate_args, load_object
from measure.verify import check_output
from search_space import Task, get_template


@pytest.fixture(scope="module")
def machinery(fast_policy):
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy, timeout_s=120) as runner:
        yield builder, runner


def configs(template, task, host, rng, n_random: int = 1, **fixed):
    """The default and ``n_random`` sampled configs, each with the ``fixed`` knob values."""
    space = template.space(task, host)
    out = []
    for config in [template.default(task, host)] + space.sample(rng, n_random):
        values = dict(config.as_dict(), **fixed)
        if space.accepts(values):
            out.append(space.from_values(values))
    assert out, f"no config of {task.key} takes {fixed}"
    return out


def verify_all(machinery, inputs: list[MeasureInput]) -> None:
    builder, runner = machinery
    results = runner.run(inputs, builder.build(inputs))
    failures = [(i.task.key, str(i.config), r.error.name, r.message) for i, r in zip(inputs, results) if not r.ok]
    assert not failures, failures


def load_kernel(machinery, task: Task, config, host):
    builder, _ = machinery
    build = builder.build([MeasureInput(task, config, host)])[0]
    assert build.error == MeasureError.NO_ERROR, build.message
    return build.source, load_object(Path(build.artifact).read_bytes(), build.source, host)


def run_at(template, source, kernel, task: Task, dims: dict[str, int], seed: int = 0, scale: float = 1.0) -> str | None:
    """Run one compiled kernel on inputs of ``dims``; None when it matches the reference."""
    sized = task.with_dims(**dims)
    inputs = template.make_inputs(sized, np.random.default_rng(seed))
    inputs = {k: (v * np.float32(scale)).astype(v.dtype) for k, v in inputs.items()}
    buffers = allocate_args(source, sized.dims, inputs, poison=True)
    kernel(buffers, sized.dims)
    want = template.reference(sized, inputs)["O"]
    return check_output("O", buffers["O"], want, template.tolerance(sized))


# --------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("causal", [True, False])
def test_prefill_dynamic_t_one_kernel_many_lengths(machinery, host, causal):
    template = get_template("attention_prefill", "cpu")
    task = Task.make("attention_prefill", {"B": 2, "T": 64, "H": 8, "HKV": 2, "D": 40},
                     attrs={"causal": causal}, dynamic=["T"])
    rng = np.random.default_rng(1)
    for config in configs(template, task, host, rng, n_random=2):
        source, kernel = load_kernel(machinery, task, config, host)
        assert [a.name for a in source.args if a.role == "scalar"] == ["T"]
        for t in (1, 2, 17, 64, 65, 150):
            problem = run_at(template, source, kernel, task, {"T": t}, seed=t)
            assert problem is None, (str(config), t, problem)


def test_prefill_dynamic_t_compiles_no_t(host):
    template = get_template("attention_prefill", "cpu")
    small = Task.make("attention_prefill", {"B": 1, "T": 300, "H": 8, "HKV": 2, "D": 64}, dynamic=["T"])
    large = small.with_dims(T=1000)
    config = template.default(small, host)
    same = template.space(large, host).from_values(config.as_dict())
    assert template.render(small, config, host).code == template.render(large, same, host).code
    static = Task.make("attention_prefill", small.dims)
    assert not [a for a in template.render(static, config, host).args if a.role == "scalar"]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [64, 128])
def test_prefill_gqa_ratios_and_head_dims(machinery, host, causal, D):
    template = get_template("attention_prefill", "cpu")
    rng = np.random.default_rng(D)
    inputs = []
    # ratios 1, 4, 8 (H = HKV included), paired so that every two of causality, head dim and
    # ratio meet in some task: ratio 4 where causal and D = 128 differ, 1 and 8 where they agree
    # (6 tasks over the four tests, not every triple's 12)
    for r, (H, HKV) in enumerate(((4, 4), (8, 2), (8, 1))):
        if (r == 1) != (causal != (D == 128)):
            continue
        task = Task.make("attention_prefill", {"B": 1, "T": 45, "H": H, "HKV": HKV, "D": D},
                         attrs={"causal": causal})
        # the default and one sampled config per task: four such tests sample 6 in all
        inputs += [MeasureInput(task, c, host) for c in configs(template, task, host, rng, n_random=1)]
    verify_all(machinery, inputs)


def test_prefill_reuses_kv_tiles_across_the_group(host):
    """A tile of hs heads reads each K/V row once for all of them: hs > 1 makes fewer tiles."""
    template = get_template("attention_prefill", "cpu")
    task = Task.make("attention_prefill", {"B": 1, "T": 256, "H": 32, "HKV": 8, "D": 128})
    space = template.space(task, host)
    assert space.knob("hs").values == (1, 2, 4)
    base = template.default(task, host).as_dict()
    grouped = template.features(task, space.from_values(dict(base, hs=4, bq=16)), host)
    alone = template.features(task, space.from_values(dict(base, hs=1, bq=16)), host)
    assert grouped["bytes_moved"] < alone["bytes_moved"]


# --------------------------------------------------------------------------- decode

@pytest.mark.parametrize("split", [1, 4])
def test_decode_one_kernel_every_length(machinery, host, split):
    template = get_template("attention_decode", "cpu")
    task = Task.make("attention_decode", {"B": 3, "H": 8, "HKV": 2, "D": 72, "S": 300, "L": 300},
                     dynamic=["S", "L"])
    rng = np.random.default_rng(split)
    for config in configs(template, task, host, rng, n_random=2, split=split):
        source, kernel = load_kernel(machinery, task, config, host)
        assert [a.name for a in source.args if a.role == "scalar"] == ["S", "L"]
        for length in (1, 2, 15, 37, 64, 129, 299, 300):
            problem = run_at(template, source, kernel, task, {"L": length}, seed=length)
            assert problem is None, (str(config), length, problem)
        # a cache of another capacity: S is the row stride, read at run time too
        assert run_at(template, source, kernel, task, {"S": 97, "L": 50}) is None


@pytest.mark.parametrize("D", [64, 128])
def test_decode_gqa_ratios_batches_and_head_dims(machinery, host, D):
    template = get_template("attention_decode", "cpu")
    rng = np.random.default_rng(D)
    inputs = []
    for r, (B, H, HKV) in enumerate(((1, 4, 4), (4, 8, 2), (2, 16, 2))):  # ratios 1, 4, 8; B > 1
        # every ratio at every length, each pair at one of the head dims, so that each head dim
        # also meets every ratio and every length: 9 tasks over the two tests, not 18
        for n, length in enumerate((1, 77, 256)):
            if (r + n) % 2 != (D == 128):
                continue
            task = Task.make("attention_decode", {"B": B, "H": H, "HKV": HKV, "D": D, "S": 256, "L": length})
            inputs += [MeasureInput(task, c, host) for c in configs(template, task, host, rng, n_random=1)]
    verify_all(machinery, inputs)


def test_decode_with_more_splits_than_rows(machinery, host):
    """Splits left empty by a short L contribute nothing, and never NaN."""
    template = get_template("attention_decode", "cpu")
    task = Task.make("attention_decode", {"B": 2, "H": 4, "HKV": 1, "D": 32, "S": 1024, "L": 1024})
    config = template.space(task, host).from_values(dict(template.default(task, host).as_dict(), split=32))
    source, kernel = load_kernel(machinery, task, config, host)
    for length in (1, 3, 31, 33):
        assert run_at(template, source, kernel, task, {"L": length}, seed=length) is None


# --------------------------------------------------------------------------- sliding window

@pytest.mark.parametrize("window", [1, 16, 33])
def test_prefill_with_a_sliding_window_every_length(machinery, host, window):
    """Keys more than ``window`` positions behind a query are masked: blocks skipped before the
    window, masked on both edges across it (rows that see no key of a block stay finite), at
    lengths below, at and past the window, with tiles and blocks that do not divide it."""
    template = get_template("attention_prefill", "cpu")
    task = Task.make("attention_prefill", {"B": 2, "T": 80, "H": 4, "HKV": 2, "D": 40},
                     attrs={"window": window}, dynamic=["T"])
    rng = np.random.default_rng(window)
    for config in configs(template, task, host, rng, n_random=2, bq=8, bk=16) + configs(template, task, host, rng,
                                                                                           n_random=1):
        source, kernel = load_kernel(machinery, task, config, host)
        for length in (1, window, window + 1, 70, 80):
            problem = run_at(template, source, kernel, task, {"T": length}, seed=length)
            assert problem is None, (str(config), length, problem)


@pytest.mark.parametrize("split", [1, 4])
def test_decode_with_a_sliding_window_reads_only_the_window(machinery, host, split):
    """The query at L - 1 sees rows L - window .. L - 1; the splits cut that range. NaN in
    the rows before the window would show in the output if any were read."""
    template = get_template("attention_decode", "cpu")
    task = Task.make("attention_decode", {"B": 2, "H": 8, "HKV": 2, "D": 64, "S": 300, "L": 300},
                     attrs={"window": 70}, dynamic=["S", "L"])
    for config in configs(template, task, host, np.random.default_rng(split), n_random=1, split=split):
        source, kernel = load_kernel(machinery, task, config, host)
        for length in (1, 20, 70, 71, 200, 300):
            sized = task.with_dims(L=length)
            inputs = template.make_inputs(sized, np.random.default_rng(length))
            inputs["K"][:, :, :max(0, length - 70)] = np.nan  # rows before the window
            inputs["V"][:, :, :max(0, length - 70)] = np.nan
            buffers = allocate_args(source, sized.dims, inputs, poison=True)
            kernel(buffers, sized.dims)
            want = template.reference(sized, inputs)["O"]
            assert np.isfinite(want).all()
            problem = check_output("O", buffers["O"], want, template.tolerance(sized))
            assert problem is None, (str(config), length, problem)


@pytest.mark.parametrize("op, shape, attrs, runs", [
    ("attention_prefill", {"B": 1, "T": 70, "H": 4, "HKV": 2, "D": 40}, {"softcap": 2.0}, [{"T": 70}, {"T": 9}]),
    ("attention_prefill", {"B": 1, "T": 70, "H": 4, "HKV": 1, "D": 32}, {"softcap": 2.0, "window": 16},
     [{"T": 70}]),
    ("attention_prefill", {"B": 1, "T": 40, "H": 2, "HKV": 2, "D": 32}, {"softcap": 2.0, "causal": False},
     [{"T": 40}]),
    ("attention_decode", {"B": 2, "H": 8, "HKV": 2, "D": 64, "S": 200, "L": 200}, {"softcap": 2.0},
     [{"L": 200}, {"L": 3}]),
    ("attention_decode", {"B": 1, "H": 4, "HKV": 1, "D": 64, "S": 200, "L": 200}, {"softcap": 2.0, "window": 70},
     [{"L": 200}]),
], ids=["prefill", "prefill-window", "prefill-full", "decode", "decode-window"])
def test_soft_capped_scores(machinery, host, op, shape, attrs, runs):
    """Gemma 2's soft-capping: scores capped at 2 (inputs scaled by 4 so that most reach the
    cap); the uncapped result is far from the capped reference, so the check can fail."""
    template = get_template(op, "cpu")
    task = Task.make(op, shape, attrs=attrs, dynamic=["T"] if op == "attention_prefill" else ["S", "L"])
    uncapped = Task.make(op, shape, attrs={k: v for k, v in attrs.items() if k != "softcap"})
    inputs = {k: v * np.float32(4.0) for k, v in template.make_inputs(uncapped, np.random.default_rng(0)).items()}
    assert np.abs(template.reference(task, inputs)["O"] - template.reference(uncapped, inputs)["O"]).max() > 0.1
    for config in configs(template, task, host, np.random.default_rng(1), n_random=2):
        source, kernel = load_kernel(machinery, task, config, host)
        for dims in runs:
            problem = run_at(template, source, kernel, task, dims, scale=4.0)
            assert problem is None, (str(config), dims, problem)


def test_a_window_is_a_count_and_needs_causal_prefill():
    template = get_template("attention_prefill", "cpu")
    for attrs, message in (({"window": -1}, "window = -1 must be a number of positions"),
                           ({"window": 2.5}, "window = 2.5"),
                           ({"window": 8, "causal": False}, "a window needs causal attention")):
        with pytest.raises(ValueError, match=message):
            template.check(Task.make("attention_prefill", {"B": 1, "T": 16, "H": 2, "HKV": 1, "D": 16}, attrs=attrs))


# --------------------------------------------------------------------------- stability

@pytest.mark.parametrize("op, shape", [
    ("attention_prefill", {"B": 1, "T": 70, "H": 4, "HKV": 2, "D": 64}),
    ("attention_decode", {"B": 2, "H": 4, "HKV": 2, "D": 64, "S": 200, "L": 150}),
])
def test_large_magnitude_inputs_stay_finite_and_accurate(machinery, host, op, shape):
    """Scaled scores with a spread of about a hundred: exp only ever sees s - max <= 0, so
    nothing overflows, and the result still matches the float64 reference."""
    template = get_template(op, "cpu")
    task = Task.make(op, shape)
    for config in configs(template, task, host, np.random.default_rng(3), n_random=2):
        source, kernel = load_kernel(machinery, task, config, host)
        assert run_at(template, source, kernel, task, {}, scale=6.0) is None, str(config)


# --------------------------------------------------------------------------- bounds

GUARDED_RUN = r"""
import ctypes, json, mmap, sys
import numpy as np
from measure.cpu_kernel import allocate_args, compile_and_load
from measure.verify import check_output
from search_space import Target, Task, get_template

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
keep = []

def guarded(array):
    # a copy that ends where an unreadable, unwritable page begins
    pages = -(-array.nbytes // PAGE) + 1
    buf = mmap.mmap(-1, pages * PAGE)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    assert libc.mprotect(base + (pages - 1) * PAGE, PAGE, 0) == 0
    out = np.frombuffer(buf, np.uint8, array.nbytes, (pages - 1) * PAGE - array.nbytes)
    out = out.view(array.dtype).reshape(array.shape)
    out[...] = array
    keep.append(buf)
    return out

case = json.loads(sys.argv[1])
host = Target.host()
template = get_template(case["op"], "cpu")
task = Task.make(case["op"], case["shape"], case.get("dtype", "float32"), attrs=case["attrs"], dynamic=case["dynamic"])
space = template.space(task, host)
config = space.from_values(dict(template.default(task, host).as_dict(), **case["values"]))
assert space.is_valid(config), space.violations(config)
source = template.render(task, config, host)
kernel = compile_and_load(source, host)
for dims in case["runs"]:
    sized = task.with_dims(**dims)
    inputs = template.make_inputs(sized, np.random.default_rng(0))
    buffers = {k: guarded(v) for k, v in allocate_args(source, sized.dims, inputs).items()}
    kernel(buffers, sized.dims)
    out = case.get("output", "O")
    problem = check_output(out, buffers[out], template.reference(sized, inputs)[out], template.tolerance(sized),
                           task.dtype)
    if problem:
        sys.exit(f"{config} at {dims}: {problem}")
"""


@pytest.mark.parametrize("op, shape, attrs, dynamic, values, runs", [
    ("attention_prefill", {"B": 2, "T": 37, "H": 6, "HKV": 3, "D": 20}, {}, [], {}, [{}]),
    ("attention_prefill", {"B": 1, "T": 37, "H": 4, "HKV": 4, "D": 33}, {"causal": False}, [],
     {"vec": 8, "bq": 8, "bk": 16, "mr": 3, "nr": 3}, [{}]),
    ("attention_prefill", {"B": 2, "T": 64, "H": 8, "HKV": 1, "D": 24}, {}, ["T"], {"hs": 8, "bq": 4, "nr": 2},
     [{"T": 1}, {"T": 5}, {"T": 64}, {"T": 70}]),
    ("attention_decode", {"B": 2, "H": 6, "HKV": 2, "D": 33, "S": 90, "L": 90}, {}, [], {"split": 4, "prefetch": 16},
     [{"S": 90, "L": 90}, {"S": 41, "L": 41}, {"S": 1, "L": 1}]),
    ("attention_decode", {"B": 1, "H": 8, "HKV": 1, "D": 64, "S": 300, "L": 300}, {}, [],
     {"kr": 2, "hr": 4, "vec": 8, "nv": 2, "bk": 32}, [{"S": 300, "L": 300}, {"S": 77, "L": 77}]),
])
def test_nothing_is_read_or_written_past_the_arrays(op, shape, attrs, dynamic, values, runs):
    """Every array ends at an inaccessible page: a read or write past its end kills the
    process. Decode runs with S = L, so no cache row past L is touched either."""
    import json
    import subprocess
    import sys

    case = {"op": op, "shape": shape, "attrs": attrs, "dynamic": dynamic, "values": values, "runs": runs}
    proc = subprocess.run([sys.executable, "-c", GUARDED_RUN, json.dumps(case)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
