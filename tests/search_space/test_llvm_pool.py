"""The persistent worker pool of parallel CPU kernels (``search_space.codegen.llvm_pool``):
right answers over many calls, a thread count that stays put however many calls and kernels,
concurrent callers, fork()ed children, and the copy linked into an exported library."""
from __future__ import annotations

import ctypes
import dataclasses
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.cpu_kernel import allocate_args, compile_and_load, load_object
from search_space import ArgSpec, KernelSource, Task, get_template
from search_space.codegen import llvm as cg
from search_space.codegen import llvm_pool

GEMV = Task.make("gemv", {"M": 1, "N": 256, "K": 512})


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def counting_source(threads: int, chunks: int, name: str = "k") -> KernelSource:
    """Y[c] += 1 and S[c] = share for every chunk c, the chunks split over ``threads``."""
    module = cg.new_module(name)
    body, kb = cg.chunk_body(module, "body", n_pointers=2, n_scalars=0)
    y, s, begin, end, thread = body.args
    with kb.loop(begin, end, 1) as c:
        kb.store(kb.fadd(kb.load(y, c), cg.f32(1.0)), y, c)
        kb.store(kb.b.sitofp(thread, cg.F32), s, c)
    kb.ret()
    cg.parallel_entry(module, name, body, n_pointers=2, n_scalars=0, threads=threads, n_chunks=chunks)
    return KernelSource("llvm", str(module), name, (ArgSpec("Y", "in", "float32", (chunks,)),
                                                    ArgSpec("S", "in", "float32", (chunks,))))


def expected_shares(threads: int, chunks: int) -> list[float]:
    return [float(next(t for t in range(threads) if c < chunks * (t + 1) // threads)) for c in range(chunks)]


@pytest.fixture(scope="module")
def gemv_kernels(host):
    """20 distinct gemv candidates, all with threads=2, built in worker processes."""
    target = dataclasses.replace(host, cores=2)
    template = get_template("gemv", "cpu")
    space = template.space(GEMV, target).restrict(threads=[2])
    configs = space.sample(np.random.default_rng(0), 20)
    with LocalBuilder(n_parallel=2) as builder:
        builds = builder.build([MeasureInput(GEMV, config, target) for config in configs])
    assert all(b.error == MeasureError.NO_ERROR for b in builds), [b.message for b in builds]
    assert all(b.source.launch_dims["threads"] == 2 for b in builds)
    return [(b.source, Path(b.artifact).read_bytes()) for b in builds], target


def gemv_case(seed: int):
    rng = np.random.default_rng(seed)
    inputs = {"X": rng.standard_normal((1, 512)).astype(np.float32),
              "W": rng.standard_normal((256, 512)).astype(np.float32)}
    return inputs, inputs["X"].astype(np.float64) @ inputs["W"].astype(np.float64).T


def test_pool_module_verifies_for_both_architectures():
    import llvmlite.binding as llvm

    for machine in ("x86_64", "aarch64"):
        module = llvm.parse_assembly(str(llvm_pool.pool_module(machine)))
        module.verify()
        assert llvm_pool.POOL_RUN in {f.name for f in module.functions if not f.is_declaration}


@pytest.mark.parametrize("threads, chunks", [(2, 7), (3, 64), (8, 5)])
def test_every_chunk_once_on_its_share_over_many_calls(host, threads, chunks):
    kernel = compile_and_load(counting_source(threads, chunks), host)
    y = np.zeros(chunks, dtype=np.float32)
    s = np.full(chunks, -1.0, dtype=np.float32)
    for _ in range(50):
        kernel({"Y": y, "S": s}, {})
    assert y.tolist() == [50.0] * chunks
    assert s.tolist() == expected_shares(threads, chunks)


def test_gemv_right_over_many_calls_without_new_threads(gemv_kernels):
    builds, target = gemv_kernels
    source, obj = builds[0]
    kernel = load_object(obj, source, target)
    inputs, want = gemv_case(1)
    buffers = allocate_args(source, GEMV.dims, inputs)
    kernel(buffers, GEMV.dims)
    before = os_threads()
    for _ in range(200):
        buffers["Y"].fill(np.nan)
        kernel(buffers, GEMV.dims)
        np.testing.assert_allclose(buffers["Y"], want, rtol=1e-4, atol=1e-3)
    kernel.repeat(buffers, GEMV.dims, 2000)
    assert os_threads() == before


def test_threads_do_not_grow_with_the_kernels_loaded(gemv_kernels):
    builds, target = gemv_kernels
    inputs, want = gemv_case(2)
    before = os_threads()
    for source, obj in builds:  # each one its own MCJIT engine, dropped after use
        kernel = load_object(obj, source, target)
        buffers = allocate_args(source, GEMV.dims, inputs)
        for _ in range(5):
            kernel(buffers, GEMV.dims)
        np.testing.assert_allclose(buffers["Y"], want, rtol=1e-4, atol=1e-3)
        del kernel
    assert os_threads() - before <= 1  # at most the one worker threads=2 needs, if none existed yet
    time.sleep(0.05)  # the workers fall asleep: none of the code they run was in the engines freed above
    source, obj = builds[-1]
    kernel = load_object(obj, source, target)
    buffers = allocate_args(source, GEMV.dims, inputs)
    kernel(buffers, GEMV.dims)
    np.testing.assert_allclose(buffers["Y"], want, rtol=1e-4, atol=1e-3)


def test_concurrent_callers_all_get_right_answers(host, gemv_kernels):
    builds, target = gemv_kernels
    kernels = [load_object(obj, source, target) for source, obj in builds[:2]]
    counting = compile_and_load(counting_source(4, 64), host)
    errors: list[str] = []

    def caller(i: int) -> None:
        kernel = kernels[i % 2]
        inputs, want = gemv_case(10 + i)
        buffers = allocate_args(kernel.source, GEMV.dims, inputs)
        y, s = np.zeros(64, dtype=np.float32), np.zeros(64, dtype=np.float32)
        for n in range(100):
            buffers["Y"].fill(np.nan)
            kernel(buffers, GEMV.dims)  # ctypes releases the GIL: calls overlap
            if not np.allclose(buffers["Y"], want, rtol=1e-4, atol=1e-3):
                errors.append(f"caller {i}: wrong gemv at call {n}")
                return
            counting({"Y": y, "S": s}, {})
        if y.tolist() != [100.0] * 64 or s.tolist() != expected_shares(4, 64):
            errors.append(f"caller {i}: wrong chunks")

    callers = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(60)
    assert not any(t.is_alive() for t in callers), "a caller hangs"
    assert not errors, errors


def _wait_child(pid: int, timeout_s: float = 30.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hangs in a threaded kernel")


def _child_checks(kernel, chunks: int) -> int:
    y = np.zeros(chunks, dtype=np.float32)
    s = np.zeros(chunks, dtype=np.float32)
    for _ in range(20):
        kernel({"Y": y, "S": s}, {})
    return 0 if y.tolist() == [20.0] * chunks and s.tolist() == expected_shares(4, chunks) else 1


def test_forked_child_runs_threaded_kernels(host):
    kernel = compile_and_load(counting_source(4, 64), host)
    y, s = np.zeros(64, dtype=np.float32), np.zeros(64, dtype=np.float32)
    kernel({"Y": y, "S": s}, {})  # the parent's pool has its workers
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = _child_checks(kernel, 64)
        finally:
            os._exit(code)
    assert _wait_child(pid) == 0
    kernel({"Y": y, "S": s}, {})  # and the parent's pool still works
    assert y.tolist() == [2.0] * 64


def test_fork_while_another_thread_holds_the_pool(host):
    kernel = compile_and_load(counting_source(4, 4096), host)
    stop = threading.Event()

    def busy() -> None:
        y, s = np.zeros(4096, dtype=np.float32), np.zeros(4096, dtype=np.float32)
        while not stop.is_set():
            kernel({"Y": y, "S": s}, {})

    thread = threading.Thread(target=busy)
    thread.start()
    try:
        for _ in range(5):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    code = _child_checks(kernel, 4096)
                finally:
                    os._exit(code)
            assert _wait_child(pid) == 0
    finally:
        stop.set()
        thread.join()


@pytest.mark.tools("cc")
def test_exported_library_links_one_hidden_pool(tmp_path, host):
    from export.library_writer import link_shared_library
    from measure.compile_llvm import compile_library_object

    objects = []
    for i in range(3):
        source = counting_source(4, 64, name=f"k{i}")
        path = tmp_path / f"k{i}.o"
        path.write_bytes(compile_library_object(source.code, source.entry, f"kernel_{i}", host))
        objects.append(path)
    library = tmp_path / "libk.so"
    link_shared_library(objects, library)
    lib = ctypes.CDLL(str(library))
    with pytest.raises(AttributeError):
        getattr(lib, llvm_pool.POOL_RUN)  # hidden: each library has its own, nothing to interpose
    y, s = np.zeros(64, dtype=np.float32), np.zeros(64, dtype=np.float32)
    args = [ctypes.c_void_p(y.ctypes.data), ctypes.c_void_p(s.ctypes.data)]
    getattr(lib, "kernel_0")(*args)
    before = os_threads()
    for _ in range(100):
        for i in range(3):
            getattr(lib, f"kernel_{i}")(*args)
    assert y.tolist() == [301.0] * 64 and s.tolist() == expected_shares(4, 64)
    assert os_threads() == before


FRESH_PROCESS = r"""
import os, sys, time
import numpy as np
sys.path.insert(0, os.getcwd())
from search_space import Target
from measure.cpu_kernel import compile_and_load
from test_llvm_pool import counting_source, os_threads

def idle_states():
    me = str(os.getpid())
    for _ in range(40):  # a spin lasts 50 us; a loaded machine may take a while to run it out
        time.sleep(0.05)
        states = sorted(open(f"/proc/self/task/{t}/stat").read().rsplit(")", 1)[1].split()[0]
                        for t in os.listdir("/proc/self/task") if t != me)
        if set(states) == {"S"}:
            break
    return states

host = Target.host()
y, s = np.zeros(64, dtype=np.float32), np.zeros(64, dtype=np.float32)
start = os_threads()
kernel = compile_and_load(counting_source(4, 64), host)
kernel({"Y": y, "S": s}, {})
after_one = os_threads()
for _ in range(200):
    kernel({"Y": y, "S": s}, {})
after_calls = os_threads()
for i in range(20):
    other = compile_and_load(counting_source(2 + i % 3, 64, name=f"k{i}"), host)
    for _ in range(5):
        other({"Y": y, "S": s}, {})
    del other
after_kernels = os_threads()
print(start, after_one, after_calls, after_kernels, "".join(idle_states()))
"""


def test_one_pool_per_process_whose_idle_workers_sleep(tmp_path):
    """In a fresh process: a threads=4 kernel starts exactly 3 workers, which 200 more calls
    and 20 more kernels (2..4 threads) reuse; idle, every worker sleeps."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=f"{root}{os.pathsep}{Path(__file__).parent}")
    proc = subprocess.run([sys.executable, "-c", FRESH_PROCESS], cwd=root, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    start, after_one, after_calls, after_kernels, states = proc.stdout.split()
    assert int(after_one) == int(start) + 3
    assert int(after_calls) == int(after_kernels) == int(after_one)
    assert set(states) == {"S"}, states  # no thread spins (or runs) while nothing is called
