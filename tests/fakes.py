"""Fakes for tests, in one place.

``FaultProbe`` is a real CPU template whose ``mode`` knob renders kernels that really
misbehave: one never ends, one writes far outside its arrays (the worker dies of SIGSEGV),
one computes a wrong answer, one is not valid LLVM IR, and two are correct (one slowly). Each compiles and runs like any candidate.
"""
from __future__ import annotations

import numpy as np

from search_space import ArgSpec, Config, ConfigSpace, KernelSource, Knob, Target, Task, Template, register_template
from search_space.codegen import llvm as cg

FAULT_OP = "fault_probe"
MODES = ("ok", "hang", "crash", "wrong", "slow", "badir")


@register_template
class FaultProbe(Template):
    """Y[i] = 2 * X[i], or a deliberate failure chosen by the ``mode`` knob."""

    op = FAULT_OP
    target_kind = "cpu"
    dims = ("N",)
    example_shape = {"N": 1024}
    description = "test-only template with injected faults"

    def flops(self, task: Task) -> float:
        return float(task.dims["N"])

    def min_bytes(self, task: Task) -> float:
        return 8.0 * task.dims["N"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {"X": rng.uniform(-1, 1, task.dims["N"]).astype(np.float32)}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": 2.0 * inputs["X"].astype(np.float64)}

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
        if mode == "hang":
            with kb.loop(0, 1, 0, name="forever"):  # step 0: the condition never changes
                kb.store(kb.fadd(kb.load(y, 0), cg.f32(1.0)), y, 0)
        kb.ret()
        return KernelSource("llvm", str(module), "fault", args)


# ----------------------------------------------------------------------------- recorded sweeps
# Replay tests run every tuner against measurements recorded here, on this machine, by a real
# sweep: ``autotune.replay.ReplayRunner`` answers each candidate with its recorded result, as
# Kernel Tuner's simulation mode does, so tuners are tested without measuring again.

SMALL_SWEEPS = {  # two shapes of one operator: 60 configs each with one thread
    "target": ("gemv", {"M": 2, "N": 48, "K": 96}),
    "other": ("gemv", {"M": 3, "N": 40, "K": 200}),
}


def record_sweep(path, op: str, shape: dict, policy, threads: int = 1, seed: int = 0):
    """Measure every config of ``op`` at ``shape`` (``threads`` only) into the log at ``path``."""
    from autotune.tuners import SweepTuner
    from measure import LocalBuilder, LocalRunner
    from records import RecordLog

    task, target = Task.make(op, shape), Target.host()
    tuner = SweepTuner(task, target, seed=seed, restrict={"threads": [threads]})
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
