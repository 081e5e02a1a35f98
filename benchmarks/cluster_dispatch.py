"""How fast the driver of a clustered job dispatches, and what clustering buys compiles.

Three parts, each on this machine:

1. dispatch: a local Ray instance with N logical GPUs and N runner actors that only sleep
   (``SleepingRunner``: each "measurement" sleeps ``--sleep-ms``), driven by the driver of a
   ``tune-model`` job (``ClusterRounds``: 24 tasks, rounds of 8, the random tuner, build tasks
   that only render), which logs every record (fsync) as a job does. Candidates per second
   against the ideal N / sleep, and the driver's own time per candidate: its CPU time (its
   Ray threads included) and the fsyncs of its log-writer thread beside it; the longer of the
   two is what the driver alone could sustain.
2. compiles: ``RayCluster.build`` of real LLVM gemm candidates (fresh kernel cache) on a Ray
   instance with 1, then 2 CPUs: the wall-time speedup of fanning builds out.
3. the driver's own costs at scale: one fsynced log append, one MLflow ``log_trials`` batch
   to a local SQLite store, and the xgb tuner's refit + next batch as its records grow
   (real measurements: the gemm sweep in ``benchmarks/data``).

    python benchmarks/cluster_dispatch.py [--runners 1,8,64] [--sleep-ms 50] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import numpy as np  # noqa: E402

from measure import BuildResult, MeasureInput, MeasureResult  # noqa: E402
from records import Record, RecordLog  # noqa: E402
from search_space import Target, Task, get_template  # noqa: E402


class SleepingRunner:
    """A runner actor that measures nothing: each candidate sleeps ``sleep_s`` (a GPU's time to
    load, verify and time one), so only the driver and Ray's dispatch are measured."""

    sleep_s = 0.05

    def __init__(self, kind, slot, cores_per_runner, timeout_s, seed, check=True, prepare_timeout_s=600.0):
        self.slot = slot

    def describe(self):
        import ray

        return {"target": Target.from_name("sm_90a"), "node": ray.get_runtime_context().get_node_id(), "cores": [],
                "pid": os.getpid()}

    def set_policy(self, policy):
        pass

    def measure(self, inp, build, artifact, module):
        time.sleep(self.sleep_s)
        return MeasureResult((self.sleep_s,), run_s=self.sleep_s, stats={"digest": build.digest})


_SOURCES: dict = {}  # per build worker: one rendered source per task, reused by its candidates


def noop_build(inp, module, timeout_s, reserved):
    """A build task that compiles nothing: the task's default kernel, rendered once per worker,
    stands in for every candidate of the task (the sleeping runners never load it)."""
    import ray

    source = _SOURCES.get(inp.task.key)
    if source is None:
        template = get_template(inp.task.op, inp.target.kind)
        source = _SOURCES[inp.task.key] = template.render(inp.task, template.default(inp.task, inp.target), inp.target)
    build = BuildResult("", source, f"noop-{inp.task.key}-{inp.config.index}", 0.0)
    return {"build": build, "node": ray.get_runtime_context().get_node_id(), "cores": []}, b"artifact"


class TimedLog(RecordLog):
    """The job's log, keeping how long its appends (each fsynced) took and when each ended."""

    def __init__(self, path):
        super().__init__(path)
        self.append_s, self.written = 0.0, []

    def append(self, records) -> None:
        start = time.perf_counter()
        super().append(records)
        self.written.append(time.perf_counter())
        self.append_s += self.written[-1] - start

    def steady_rate(self) -> float:
        """Records per second between the 10th and the 90th percentile of their writes: the
        rate once the runners are fed, without the start (Ray starting the build workers)
        and the last round's tail."""
        t = self.written
        a, b = len(t) // 10, len(t) * 9 // 10
        return (b - a) / (t[b] - t[a])


def dispatch(runners: int, sleep_s: float, trials_total: int, folder: Path, build_cpus: int = 4) -> dict:
    """A model job's driver (``ClusterRounds`` over 24 CUDA gemv tasks, random tuner, no-op
    builds) on ``runners`` sleeping runner actors: candidates per second, and the driver's
    own time per candidate (its CPU, its Ray threads included, and its log's fsyncs)."""
    import ray

    from autotune.model_tasks import ModelTask
    from autotune.scheduler import ClusterRounds, TaskScheduler
    from autotune.tuning import measure_on_cluster, written_by_a_thread
    from measure.cluster import open_cluster

    SleepingRunner.sleep_s = sleep_s
    ray.init(num_cpus=runners + build_cpus, num_gpus=runners, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 << 20)
    try:
        with open_cluster("ray", runner_class=SleepingRunner, build_function=noop_build) as cluster:
            start = time.perf_counter()
            (target,) = cluster.start_runners("cuda")
            placed_s = time.perf_counter() - start
            tasks = [ModelTask(Task.make("gemv", {"M": 1, "N": 512 * (i + 1), "K": 4096}), weight=1.0)
                     for i in range(24)]
            scheduler = TaskScheduler(tasks, target, tuner="random", batch=8)
            log = TimedLog(folder / f"dispatch-{runners}.jsonl")
            start, cpu, main_cpu = time.perf_counter(), time.process_time(), time.thread_time()
            with written_by_a_thread(log) as writer:  # as the job's driver writes its log
                run = ClusterRounds(scheduler, trials_total, cluster, log, writer=writer)
                measure_on_cluster(cluster, run.next_rounds)
            summary = run.summary()
            wall = time.perf_counter() - start
            # the driver's own work: its CPU (all its threads, Ray's too) and, beside it on the
            # writer thread, the fsyncs: what it alone could sustain is the longer of the two
            cpu_s = time.process_time() - cpu
            main_s = time.thread_time() - main_cpu
            driver_s = max(cpu_s, log.append_s)
    finally:
        ray.shutdown()
    n = summary.measured
    rate = log.steady_rate()
    return {"runners": runners, "candidates": n, "wall_s": wall, "per_s": rate, "ideal_per_s": runners / sleep_s,
            "efficiency": rate / (runners / sleep_s), "placement_s": placed_s, "cpu_ms": cpu_s / n * 1e3,
            "main_thread_cpu_ms": main_s / n * 1e3, "fsync_ms": log.append_s / n * 1e3,
            "driver_ceiling_per_s": n / driver_s}


def compile_speedup(cpus_list: list[int], n: int) -> list[dict]:
    import ray

    from measure.cluster import open_cluster

    target = Target.host()
    task = Task.make("gemm", {"M": 256, "N": 256, "K": 256})
    space = get_template("gemm", "cpu").space(task, target)
    configs = space.sample(np.random.default_rng(7), n + 4)
    warm = [MeasureInput(task, c, target) for c in configs[:4]]
    timed = [MeasureInput(task, c, target) for c in configs[4:]]
    rows = []
    for cpus in cpus_list:
        with tempfile.TemporaryDirectory() as cache:
            os.environ["AUTOTUNE_CACHE_DIR"] = cache  # nothing cached: every build compiles
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, object_store_memory=100 << 20)
            try:
                with open_cluster("ray") as cluster:
                    cluster.build(warm)  # starts the Ray workers and their compiler processes
                    start = time.perf_counter()
                    builds = cluster.build(timed)
                    wall = time.perf_counter() - start
            finally:
                ray.shutdown()
        ok = sum(1 for b in builds if b.error.name == "NO_ERROR")
        compile_s = sum(b.build_s for b in builds)
        rows.append({"cpus": cpus, "builds": len(timed), "ok": ok, "wall_s": wall, "sum_build_s": compile_s})
    return rows


def driver_costs(folder: Path) -> dict:
    from autotune.tuners import XGBTuner
    from records.mlflow_tracking import MLflowRun

    sweep = RecordLog(ROOT / "benchmarks/data/gemm_M128_N768_K512.jsonl.gz").records(warn=False)
    log = RecordLog(folder / "appends.jsonl")
    start = time.perf_counter()
    for record in sweep[:200]:
        log.append([record])
    append_s = (time.perf_counter() - start) / 200
    run = MLflowRun(f"sqlite:///{folder / 'mlflow.db'}", experiment="bench", run_name="dispatch")
    batch = sweep[:64]
    run.log_trials(batch, 0)  # the first call creates the store's tables
    times = []
    for i in range(5):
        start = time.perf_counter()
        run.log_trials(batch, 64 * (i + 1))
        times.append(time.perf_counter() - start)
    run.finish()
    mlflow_s = statistics.median(times)
    target, task = sweep[0].target, sweep[0].task
    tuner = XGBTuner(task, target, seed=0)
    refits = []
    for first in range(0, 384, 64):
        chunk = sweep[first:first + 64]
        start = time.perf_counter()
        tuner.update([r.to_measure_input(tuner.space) for r in chunk], [r.result for r in chunk])
        tuner.next_batch(64)
        refits.append((first + 64, time.perf_counter() - start))
    return {"append_s": append_s, "mlflow_batch64_s": mlflow_s, "refit_next_batch_s": refits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runners", default="1,8,64")
    parser.add_argument("--sleep-ms", type=float, default=50.0)
    parser.add_argument("--per-runner", type=int, default=8, help="candidates per runner")
    parser.add_argument("--min-candidates", type=int, default=400, help="candidates per case at least")
    parser.add_argument("--compile-configs", type=int, default=16)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    sleep_s = args.sleep_ms / 1e3
    results = {"dispatch": [], "compile": [], "driver": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for runners in [int(x) for x in args.runners.split(",")]:
            row = dispatch(runners, sleep_s, max(args.min_candidates, args.per_runner * runners), folder)
            results["dispatch"].append(row)
            print(json.dumps(row), file=sys.stderr)
        results["compile"] = compile_speedup([1, 2], args.compile_configs)
        print(json.dumps(results["compile"]), file=sys.stderr)
        results["driver"] = driver_costs(folder)
    if not args.markdown:
        print(json.dumps(results, indent=2))
        return
    print("| runner actors | candidates | wall s | candidates/s (steady) | ideal (runners / sleep) | efficiency | "
          "driver CPU ms per candidate (main thread) | fsync ms per record | the driver alone: candidates/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results["dispatch"]:
        print(f"| {r['runners']} | {r['candidates']} | {r['wall_s']:.2f} | {r['per_s']:.0f} | {r['ideal_per_s']:.0f} | "
              f"{r['efficiency'] * 100:.0f}% | {r['cpu_ms']:.2f} ({r['main_thread_cpu_ms']:.2f}) | "
              f"{r['fsync_ms']:.2f} | {r['driver_ceiling_per_s']:.0f} |")
    print()
    print("| build CPUs | builds | wall s | sum of build times s | speedup |")
    print("| --- | --- | --- | --- | --- |")
    base = results["compile"][0]["wall_s"]
    for r in results["compile"]:
        print(f"| {r['cpus']} | {r['ok']}/{r['builds']} | {r['wall_s']:.2f} | {r['sum_build_s']:.2f} | "
              f"{base / r['wall_s']:.2f}x |")
    d = results["driver"]
    print()
    print(f"- log append (fsync) per record: {d['append_s'] * 1e3:.2f} ms")
    print(f"- MLflow log_trials of 64 records (SQLite store): {d['mlflow_batch64_s'] * 1e3:.0f} ms")
    print("- xgb refit + next batch of 64: " + ", ".join(f"{n} records {s:.2f} s" for n, s in d["refit_next_batch_s"]))


if __name__ == "__main__":
    main()
