"""The model's tasks and the scheduler that spreads one budget over them (synthetic timings)."""
from __future__ import annotations

from collections import Counter

import pytest
from fakes import SyntheticRunner

from autotune.model_tasks import DECODE_STEPS, model_tasks
from autotune.scheduler import TaskScheduler
from autotune.tune_model import warn_unmeasured_defaults
from records import RecordLog
from runtime.model_config import PRESETS
from search_space import Target, get_template

TINY = PRESETS["tiny"]


def test_model_tasks_are_distinct_and_weighted_by_use():
    tasks = {t.key: t for t in model_tasks(TINY, [128], [1], [512, 1024])}
    assert len(tasks) == len({t.task.key for t in tasks.values()})
    layers = TINY.num_hidden_layers
    qkv_prefill = tasks["gemm/float32/M=128,N=256,K=128"]  # Q, K and V as one projection: 128 + 2 x 64 rows
    assert qkv_prefill.weight == layers and qkv_prefill.uses == {"prefill T=128": layers}
    o_prefill = tasks["gemm/float32/M=128,N=128,K=128"]
    assert o_prefill.weight == layers
    attention = [t for t in tasks.values() if t.task.op == "attention_decode"]
    assert len(attention) == 2  # one per KV length, each run half of the decode steps
    assert all(t.weight == layers * DECODE_STEPS / 2 for t in attention)
    gemv = tasks["gemv/float32/M=1,N=512,K=128"]  # the LM head: once per prefill and per decode step
    assert gemv.weight == 1 + DECODE_STEPS
    assert all(t.task.op != "add" for t in tasks.values())  # residual adds are fused into the norm


def test_every_task_starts_from_its_default_and_the_budget_follows_the_gradient(tmp_path):
    target = Target.host()
    tasks = model_tasks(TINY, [128], [1], [512])
    # gemv dominates the workload (many decode steps, slow synthetic times): it should get most trials
    runner = SyntheticRunner({"gemv": 1e-3, "gemm": 1e-4})
    log = RecordLog(tmp_path / "m.jsonl")
    scheduler = TaskScheduler(tasks, target, "random", seed=0, batch=4)
    summary = scheduler.tune(120, runner, runner, log)
    records = log.records()
    assert summary.trials == summary.measured == len(records) == 120
    first = {}
    for record in records:
        first.setdefault(record.task.key, record)
    assert set(first) == {t.key for t in tasks}  # every task measured
    for task in tasks:  # ... and its template default first
        template = get_template(task.task.op, "cpu")
        assert first[task.key].config == template.default(task.task, target).as_dict(), task.key
    per_task = Counter(r.task.key for r in records)
    gemv = sum(n for key, n in per_task.items() if key.startswith("gemv/"))
    gemm = sum(n for key, n in per_task.items() if key.startswith("gemm/"))
    assert gemv > 2 * gemm
    assert summary.history[-1][1] <= summary.history[len(tasks)][1]  # the estimate only falls


def test_a_resumed_job_counts_the_log_and_never_measures_a_config_twice(tmp_path):
    target = Target.host()
    tasks = model_tasks(TINY, [64], [1], [256])
    log = RecordLog(tmp_path / "m.jsonl")
    runner = SyntheticRunner({"gemv": 1e-4})
    TaskScheduler(tasks, target, "random", seed=1, batch=4).tune(30, runner, runner, log)
    again = SyntheticRunner({"gemv": 1e-4})
    summary = TaskScheduler(tasks, target, "random", seed=1, batch=4).tune(50, again, again, log)
    records = log.records()
    assert summary.resumed == 30 and summary.measured == 20 and len(records) == 50
    assert len({(r.task.key, r.config_index) for r in records}) == 50
    assert not set(again.calls) & set(runner.calls)


def test_a_task_that_never_verifies_is_given_up_and_the_rest_go_on(tmp_path):
    tasks = model_tasks(TINY, [64], [1], [256])
    runner = SyntheticRunner({"gemv": 1e-4}, failing=("swiglu",))
    with pytest.warns(UserWarning, match="swiglu.*no candidate verified.*RUNTIME_ERROR"):
        summary = TaskScheduler(tasks, Target.host(), "random", seed=2, batch=2).tune(80, runner, runner)
    assert summary.trials == 80
    assert all("swiglu" in key for key in summary.given_up) and summary.given_up
    swiglu = [s for t, s in zip(summary.tasks, summary.summaries) if t.task.op == "swiglu"]
    assert all(s.trials <= 3 * 2 for s in swiglu)


def test_a_model_job_holds_its_log_like_a_single_task_job(tmp_path):
    from records import LogLockedError

    tasks = model_tasks(TINY, [128], [1], [512])
    runner = SyntheticRunner({"gemv": 1e-3, "gemm": 1e-4})
    log = RecordLog(tmp_path / "m.jsonl")
    with log.lock():  # another job has the log
        with pytest.raises(LogLockedError, match="in use by another tuning job"):
            TaskScheduler(tasks, Target.host(), "random", seed=0, batch=4).tune(8, runner, runner, log)
    assert log.records() == []
    summary = TaskScheduler(tasks, Target.host(), "random", seed=0, batch=4).tune(8, runner, runner, log)
    assert summary.trials == 8


def test_the_first_round_takes_the_default_within_a_restriction(tmp_path):
    # the default of a long task runs on every core; --threads 1 keeps the rest of it
    target = Target.host()
    gemms = [t for t in model_tasks(TINY, [128], [1], [512]) if t.task.op == "gemm"]
    tasks = [max(gemms, key=lambda t: t.task.dims["N"])]  # W splits into blocks for both threads
    runner = SyntheticRunner({"gemm": 1e-4})
    log = RecordLog(tmp_path / "m.jsonl")
    TaskScheduler(tasks, target, "random", seed=0, batch=2, restrict={"threads": [1]}).tune(2, runner, runner, log)
    default = get_template("gemm", "cpu").default(tasks[0].task, target).as_dict()
    assert default["threads"] == target.cores
    assert log.records()[0].config == dict(default, threads=1)


def test_a_resumed_task_measures_a_default_its_log_lacks(tmp_path):
    """A log tuned under ``--threads 1`` (or before the template's default changed) has no
    record of today's default: the resumed job's first round of the task measures it."""
    target = Target.host()
    gemms = [t for t in model_tasks(TINY, [128], [1], [512]) if t.task.op == "gemm"]
    tasks = [max(gemms, key=lambda t: t.task.dims["N"])]
    runner = SyntheticRunner({"gemm": 1e-4})
    log = RecordLog(tmp_path / "m.jsonl")
    TaskScheduler(tasks, target, "random", seed=0, batch=2, restrict={"threads": [1]}).tune(4, runner, runner, log)
    default = get_template("gemm", "cpu").default(tasks[0].task, target).as_dict()
    assert default["threads"] == target.cores > 1
    assert default not in [r.config for r in log.records()]
    # with no budget left the job measures nothing, and says which tasks lack their default
    spent = TaskScheduler(tasks, target, "random", seed=0, batch=2)
    assert spent.tune(4, runner, runner, log).measured == 0
    notes = []
    warn_unmeasured_defaults(spent, notes.append)
    assert spent.unmeasured_defaults() == [tasks[0].key] and "1 task(s)" in notes[0] and tasks[0].key in notes[0]
    scheduler = TaskScheduler(tasks, target, "random", seed=0, batch=2)
    summary = scheduler.tune(6, runner, runner, log)
    assert summary.resumed == 4 and summary.measured == 2
    assert log.records()[4].config == default and scheduler.unmeasured_defaults() == []
    again = TaskScheduler(tasks, target, "random", seed=0, batch=2).tune(8, runner, runner, log)
    assert again.measured == 2 and len([r for r in log.records() if r.config == default]) == 1


def test_a_gemv_at_the_memory_floor_leaves_the_rounds_to_a_gemm(tmp_path):
    # timed cold, the decode GEMV runs 100 times as often, but it already reads its weights at
    # the job's best rate (the only streaming task), so another round of it can gain little;
    # Ansor's gradient (headroom = best) would give it nearly every round
    from autotune.model_tasks import ModelTask
    from search_space import Task

    gemv = ModelTask(Task.make("gemv", {"M": 1, "N": 4096, "K": 4096}, "float32"), 100.0)
    gemm = ModelTask(Task.make("gemm", {"M": 128, "N": 4096, "K": 4096}, "float32"), 1.0)
    runner = SyntheticRunner({"gemv": 1e-3, "gemm": 20e-3})
    log = RecordLog(tmp_path / "m.jsonl")
    scheduler = TaskScheduler([gemv, gemm], Target.host(), "random", seed=0, batch=4, epsilon=0.0,
                              weights_from_memory=True)
    scheduler.tune(80, runner, runner, log)
    per_task = Counter(r.task.op for r in log.records())
    assert per_task["gemm"] > per_task["gemv"], per_task
    assert scheduler.memory_floor(0) == pytest.approx(scheduler.best(0))  # the job's fastest streamer
    assert scheduler.memory_floor(1) == 0.0  # compute-bound: no floor from memory
    # timed warm, rates differ by cache level: no floor, Ansor's headroom
    warm = TaskScheduler([gemv, gemm], Target.host(), "random", seed=0, batch=4, epsilon=0.0)
    warm.tune(80, runner, runner, RecordLog(tmp_path / "warm.jsonl"))
    assert warm.memory_floor(0) == 0.0


def test_a_probed_read_rate_gives_a_slow_streaming_task_its_headroom(tmp_path):
    # an int4 GEMV that dequantises slowly reads far below the memory's rate: when it is the
    # job's fastest streamer, only the probe says it is not at the floor
    from autotune.model_tasks import ModelTask
    from autotune.tune_model import memory_read_rate
    from search_space import Task

    notes = []
    rate = memory_read_rate(Target.host(), {"threads": [1]}, notes.append)
    assert rate > 1e9 and not notes  # a real DRAM read rate, over 1 GB/s, probed in a worker

    gemv = ModelTask(Task.make("gemv", {"M": 1, "N": 4096, "K": 4096}, "float32"), 100.0)
    runner = SyntheticRunner({"gemv": 1e-3})
    scheduler = TaskScheduler([gemv], Target.host(), "random", seed=0, batch=4, weights_from_memory=True,
                              read_rate=10 * gemv.task.min_bytes / 1e-3)
    scheduler.tune(4, runner, runner, RecordLog(tmp_path / "m.jsonl"))
    assert scheduler.memory_floor(0) == pytest.approx(gemv.task.min_bytes / scheduler.read_rate)
    assert scheduler.memory_floor(0) < scheduler.best(0) / 10


def test_a_small_budget_gives_its_second_configs_to_the_tasks_likely_to_matter(tmp_path):
    # 3 trials beyond one per task: every task is measured once, and the 3 extra configs go to
    # the tasks with the largest guessed share (runs x a rough time from bytes and flops)
    tasks = model_tasks(TINY, [128], [1], [512])
    runner = SyntheticRunner({})
    log = RecordLog(tmp_path / "m.jsonl")
    scheduler = TaskScheduler(tasks, Target.host(), "random", seed=0, batch=4)
    scheduler.tune(len(tasks) + 3, runner, runner, log)
    per_task = Counter(r.task.key for r in log.records())
    assert set(per_task) == {t.key for t in tasks} and sum(per_task.values()) == len(tasks) + 3
    guessed = sorted(range(len(tasks)), key=lambda i: -scheduler.guessed_share[i])
    assert {key for key, n in per_task.items() if n == 2} == {tasks[i].key for i in guessed[:3]}
    assert log.records()[0].task.key == tasks[guessed[0]].key  # the likeliest to matter goes first
    assert tasks[guessed[0]].task.op in ("gemv", "attention_decode")  # decode, 128 runs per workload
