"""Fakes for tests, in one place.

``FaultProbe`` is a real CPU template whose ``mode`` knob renders kernels that really
misbehave: one never ends, one writes far outside its arrays (the worker dies of SIGSEGV),
one computes a wrong answer, one writes the right answer and then zeroes its input, one is
not valid LLVM IR, and two are correct (one slowly). Each compiles and runs like any candidate.
Both fault probes also fail before any kernel runs when asked by the task's ``inputs``
attribute: making the task's inputs raises, or kills the process that makes them.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from measure.timing import TimingPolicy
from search_space import ArgSpec, Config, ConfigSpace, KernelSource, Knob, Target, Task, Template, register_template
from search_space.codegen import llvm as cg

FAULT_OP = "fault_probe"
# scribble and oob before slow: a grid over the modes measures a correct kernel right after them
MODES = ("ok", "hang", "crash", "wrong", "scribble", "oob", "slow", "badir")


INPUT_FAULTS = ("ok", "raise", "crash")


def make_probe_inputs(task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """X for a fault probe, unless the task's ``inputs`` attribute asks making it to fail."""
    fault = task.attr.get("inputs", "ok")
    if fault == "raise":
        raise ValueError("making the inputs failed on purpose")
    if fault == "crash":
        os.abort()
    return {"X": rng.uniform(-1, 1, task.dims["N"]).astype(np.float32)}


class DoublesX:
    """What both fault probes compute when nothing fails: Y[i] = 2 * X[i]."""

    dims = ("N",)
    default_attrs = {"inputs": "ok"}
    attr_docs = {"inputs": f"one of {INPUT_FAULTS}: making the inputs works, raises, or crashes"}

    def flops(self, task: Task) -> float:
        return float(task.dims["N"])

    def min_bytes(self, task: Task) -> float:
        return 8.0 * task.dims["N"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return make_probe_inputs(task, rng)

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": 2.0 * inputs["X"].astype(np.float64)}


@register_template
class FaultProbe(DoublesX, Template):
    """Y[i] = 2 * X[i], or a deliberate failure chosen by the ``mode`` knob."""

    op = FAULT_OP
    target_kind = "cpu"
    example_shape = {"N": 1024}
    description = "test-only template with injected faults"

    def numpy_baseline(self, task, inputs):
        x = inputs["X"]
        y = np.empty_like(x)
        return "numpy multiply", lambda: np.multiply(x, 2.0, out=y)

    def space(self, task: Task, target: Target) -> ConfigSpace:
        return ConfigSpace([Knob("mode", MODES), Knob("repeat", (1, 2, 3, 4))])

    def default(self, task: Task, target: Target) -> Config:
        return self.space(task, target).from_values({"mode": "ok", "repeat": 1})

    def features(self, task, config, target):
        return {"unroll": float(config["repeat"])}

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        n = task.dims["N"]
        mode = config["mode"]
        args = (ArgSpec("X", "in", "float32", ("N",)), ArgSpec("Y", "out", "float32", ("N",)))
        if mode == "badir":
            return KernelSource("llvm", "define void @fault(ptr %x, ptr %y) {\n  ret i32 0\n}\n", "fault", args)
        module = cg.new_module("fault")
        fn = cg.kernel_function(module, "fault", n_pointers=2)
        kb = cg.KernelBuilder(fn)
        b = kb.b
        x, y = fn.args
        scale = 3.0 if mode == "wrong" else 2.0
        passes = 2000 if mode == "slow" else config["repeat"]
        with kb.loop(0, passes, 1, name="p"):
            with kb.loop(0, n, 1, name="i") as i:
                kb.store(kb.fmul(kb.load(x, i), cg.f32(scale)), y, i)
        if mode == "crash":
            kb.store(cg.f32(1.0), y, cg.i64(1 << 40))  # far outside any mapping: SIGSEGV
        if mode == "oob":  # Y is right, and one float past its end is written too
            kb.store(cg.f32(1.0), y, cg.i64(n))
        if mode == "scribble":  # Y is right, but X is zeroed: the next candidate would read zeros
            with kb.loop(0, n, 1, name="z") as i:
                kb.store(cg.f32(0.0), x, i)
        if mode == "hang":
            with kb.loop(0, 1, 0, name="forever"):  # step 0: the condition never changes
                kb.store(kb.fadd(kb.load(y, 0), cg.f32(1.0)), y, 0)
        kb.ret()
        return KernelSource("llvm", str(module), "fault", args)


# ----------------------------------------------------------------------------- CUDA faults

CUDA_FAULT_OP = "cuda_fault_probe"
CUDA_MODES = ("ok", "oob", "hang", "wrong", "trap", "fat", "slow", "scribble")


@register_template
class CudaFaultProbe(DoublesX, Template):
    """Y[i] = 2 * X[i] on the GPU, or a deliberate failure chosen by ``mode``:

    ``oob`` writes far outside Y (an illegal address: a sticky error that poisons the
    context), ``hang`` never ends, ``wrong`` computes 3 * X, ``trap`` executes a trap
    instruction, ``fat`` asks for more shared memory than any GPU has (caught after
    compiling, before running), ``slow`` is correct but loops, ``scribble`` writes the right Y
    and then zeroes X. The space has no launch constraints, so every mode reaches the builder
    and the runner.
    """

    op = CUDA_FAULT_OP
    target_kind = "cuda"
    example_shape = {"N": 4096}
    description = "test-only CUDA template with injected faults"

    def signature(self, task: Task):
        return (ArgSpec("X", "in", "float32", ("N",)), ArgSpec("Y", "out", "float32", ("N",)))

    def space(self, task: Task, target: Target) -> ConfigSpace:
        return ConfigSpace([Knob("mode", CUDA_MODES), Knob("block", (128, 256))])

    def default(self, task: Task, target: Target) -> Config:
        return self.space(task, target).from_values({"mode": "ok", "block": 128})

    def features(self, task, config, target):
        return {"threads": float(config["block"])}

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        from search_space.codegen.cuda import PREAMBLE, kernel_params

        mode, block = config["mode"], config["block"]
        n = task.dims["N"]
        args = self.signature(task)
        scale = "3.0f" if mode == "wrong" else "2.0f"
        extra = {
            "oob": "if (i == 0) Y[(1LL << 36) + 12345] = 1.0f;",
            "hang": "if (i == 0) { while (true) { asm volatile(\"nanosleep.u32 1000;\"); } }",
            "trap": "if (i == 0) asm volatile(\"trap;\");",
            # the loop's result is only compared, never stored: v (and so Y) stays exact, but the
            # compiler must run the loop (feeding it back into v drifted Y by 0.25%: a wrong answer)
            "slow": "float w = v; for (int r = 0; r < 20000; ++r) w = w * 1.0000001f + 1e-30f;\n"
                    "  if (w == 12345.0f) v = 0.0f;  // |w| stays below 2",
        }.get(mode, "")
        # Y is right, but X is zeroed after each thread has read its element
        scribble = f"if (i < {n}) const_cast<float*>(X)[i] = 0.0f;" if mode == "scribble" else ""
        smem = 300 << 10 if mode == "fat" else 0
        code = PREAMBLE + f"""
extern "C" __global__ void fault({kernel_params(args)}) {{
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < {n} ? X[i] : 0.0f;
  {extra}
  if (i < {n}) Y[i] = {scale} * v;
  {scribble}
}}
"""
        launch = (("block", (block, 1, 1)), ("grid", (-(-n // block), 1, 1)), ("smem", smem))
        return KernelSource("cuda", code, "fault", args, launch)


# ----------------------------------------------------------------------------- recorded sweeps
# Replay tests run every tuner against measurements recorded here, on this machine, by a real
# sweep: ``autotune.replay.ReplayRunner`` answers each candidate with its recorded result, as
# Kernel Tuner's simulation mode does, so tuners are tested without measuring again.

SMALL_SWEEPS = {  # two shapes of one operator: 56-80 configs each (one thread, vec 4 or 8), by the host's registers
    "target": ("gemv", {"M": 2, "N": 48, "K": 300}),
    "other": ("gemv", {"M": 3, "N": 40, "K": 400}),
}
SWEEP_RESTRICT = {"threads": [1], "vec": [4, 8]}  # the same knob values on AVX2 and AVX-512 hosts


def record_sweep(path, op: str, shape: dict, policy, restrict: dict | None = None, seed: int = 0):
    """Measure every config of ``op`` at ``shape`` (within ``restrict``) into the log at ``path``."""
    from autotune.tuners import SweepTuner
    from measure import LocalBuilder, LocalRunner
    from records import RecordLog

    task, target = Task.make(op, shape), Target.host()
    tuner = SweepTuner(task, target, seed=seed, restrict=restrict or SWEEP_RESTRICT)
    log = RecordLog(path)
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=policy, timeout_s=30) as runner:
        tuner.tune(len(tuner.plan), builder, runner, batch_size=16, log=log)
    return log


def recorded_space(path, statistic: str = "median"):
    """The one task recorded in the log at ``path``, ready for replay."""
    from autotune.replay import RecordedSpace
    from records import RecordLog

    (space,) = RecordedSpace.from_records(RecordLog(path).records(), statistic)
    return space


class SyntheticRunner:
    """Answers every candidate with a made-up time: ``base[op]`` seconds times a factor in
    [1, 2) fixed by the config's index, so a task's configs differ and searching pays off.
    Tasks whose op is in ``failing`` always fail. Nothing is compiled or run: for testing
    drivers (the model scheduler) where only the bookkeeping is under test."""

    def __init__(self, base: dict[str, float], failing: tuple[str, ...] = ()):
        self.base = base
        self.failing = failing
        self.calls: list[tuple[str, int]] = []

    def build(self, inputs):
        from measure import BuildResult

        return [BuildResult(None, None) for _ in inputs]

    def run(self, inputs, builds):
        from measure import MeasureError, MeasureResult

        out = []
        for inp in inputs:
            self.calls.append((inp.task.key, inp.config.index))
            if inp.task.op in self.failing:
                out.append(MeasureResult.failed(MeasureError.RUNTIME_ERROR, "synthetic failure"))
                continue
            factor = 1.0 + ((inp.config.index * 2654435761) % 1000) / 1000.0
            seconds = self.base.get(inp.task.op, 1e-5) * factor
            out.append(MeasureResult((seconds, seconds, seconds)))
        return out


def spin_forever(started_file: str) -> None:
    """A worker job that hangs at 100% CPU, as a runaway candidate does; it first creates
    ``started_file`` so that a test knows the worker is busy with it."""
    Path(started_file).touch()
    while True:
        pass


def copied_store(tables: Path, folder: Path, name: str = "mlflow.db") -> str:
    """The URI of an MLflow SQLite store at folder/name, a copy of the empty store ``tables``
    (the ``mlflow_tables`` fixture)."""
    shutil.copyfile(tables, folder / name)
    return f"sqlite:///{folder / name}"


def process_facts(variable: str) -> dict:
    """A worker job: who the worker is, who started it, and one variable of its environment."""
    return {"pid": os.getpid(), "parent": os.getppid(), "variable": os.environ.get(variable)}


def lines_in(log) -> int:
    """The lines a job's log holds so far: 0 while there is none (a job checking that it can
    write its log makes an empty one and removes it again)."""
    try:
        return log.read_text().count("\n")
    except FileNotFoundError:
        return 0


def burn_cpu(seconds: float) -> float:
    """A worker job that spends ``seconds`` of CPU time; returns the worker's whole CPU time."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass
    return time.process_time()


def die_by_signal(signum: int) -> None:
    """A worker job that kills its own worker, as a candidate that crashes does."""
    os.kill(os.getpid(), signum)


def no_hang(fn, seconds: float = 10.0):
    """``fn()`` in a daemon thread: a regression that blocks (opening a FIFO) fails instead of hanging."""
    out: dict = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            out["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def run_numpy_only(tmp_path, script: str, *args: str, timeout: float = 300):
    """Run ``script`` in a fresh ``python -I -S`` that can import only numpy and a copy of the
    ``runtime`` package: what a deployment of an exported library has. Returns the process."""
    import shutil
    import subprocess
    import sys

    import numpy

    import runtime

    site = tmp_path / "site"
    if not site.exists():
        site.mkdir()
        shutil.copytree(Path(runtime.__file__).parent, site / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
        numpy_dir = Path(numpy.__file__).parent
        for name in ("numpy", "numpy.libs"):  # numpy.libs holds the OpenBLAS numpy's wheel links against
            if (numpy_dir.parent / name).exists():
                (site / name).symlink_to(numpy_dir.parent / name)
    path = tmp_path / "deploy.py"
    path.write_text(f"import sys\nsys.path[:] = [{str(site)!r}] + [p for p in sys.path if 'site-packages' not in p]\n"
                    + script)
    return subprocess.run([sys.executable, "-I", "-S", str(path), *args], capture_output=True, text=True,
                          cwd=tmp_path, timeout=timeout)


FAKE_PYCUDA = Path(__file__).resolve().parent / "fake_pycuda"
# Timing on the fake GPU measures the emulator: tests whose subject is not timing take 3 samples
# (the CUDA default takes 10-50, each after a 64 MiB L2 flush)
FAKE_GPU_TIMING = TimingPolicy(warmup=1, min_sample_s=0.0, repeats=3, min_repeats=3, max_total_s=0.2)
FAKE_GPU_TARGET = Target(kind="cuda", arch="sm_90a", device_name="Fake GPU (CPU emulator)", sm_count=2,
                         max_threads_per_block=1024, max_shared_memory_per_block=227 << 10,
                         max_registers_per_block=65536, l2_bytes=1 << 20, clock_mhz=1980)


def register_library(registry: Path, folder: Path) -> None:
    """Tell the fake which source each of the library's cubins was built from."""
    for entry in json.loads((folder / "manifest.json").read_text())["kernels"]:
        cubin = (folder / entry["cubin"]).read_bytes()
        source = {"lang": "cuda", "code": (folder / entry["source"]).read_text(), "entry": entry["symbol"],
                  "args": entry["args"], "launch": entry["launch"]}
        (registry / (hashlib.sha256(cubin).hexdigest() + ".json")).write_text(json.dumps(source))


# ----------------------------------------------------------------------------- calls into a library, in a child


ATTEMPT = r"""
import json, sys
import numpy as np
import runtime

def attempt(call):
    try:
        call()
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"

library = runtime.load(sys.argv[1])
rng = np.random.default_rng(0)
def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)
out = {}
"""


def run_library_attempts(tmp_path, library, body: str) -> dict:
    """Run ``body`` (which fills ``out`` using ``attempt(lambda: ...)``) against ``library`` in a
    fresh numpy-only process, so a call that would crash kills the child, not the test run."""
    import json
    import textwrap

    proc = run_numpy_only(tmp_path, textwrap.dedent(ATTEMPT) + textwrap.dedent(body) + "\nprint(json.dumps(out))\n",
                          str(library), timeout=120)
    assert proc.returncode == 0, f"the child died (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return json.loads(proc.stdout)
