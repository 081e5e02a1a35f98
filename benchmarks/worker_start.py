"""What starting workers costs: N workers started, one empty job each, closed; forked from a
zygote (the default) against fresh interpreters (``AUTOTUNE_WORKER_ZYGOTE=0``), in one run.

    python benchmarks/worker_start.py [--workers 8] [--rounds 5]

Each round runs both ways, each in a process of its own (a first start, as a tuning job or a
CLI command pays it), and reports the wall time and the CPU time of that process and all it
started (workers and zygote included, since each is reaped before the process ends).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, resource, sys, time
start = time.perf_counter()
from measure.worker import WorkerProcess, close_all, close_idle_zygotes
workers = [WorkerProcess() for _ in range(int(sys.argv[1]))]
for worker in workers:
    worker.call("time:sleep", 0, 120)
close_all(workers)
close_idle_zygotes()  # reaped, so its CPU time counts below
wall = time.perf_counter() - start
usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
print(json.dumps({"wall_s": wall, "cpu_s": sum(u.ru_utime + u.ru_stime for u in usage)}))
"""


def one(workers: int, zygote: bool) -> dict:
    env = dict(os.environ, AUTOTUNE_WORKER_ZYGOTE="1" if zygote else "0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(workers)], env=env, capture_output=True, text=True,
                          check=True, timeout=600)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"zygote": [], "spawn": []}
    for _ in range(args.rounds):  # interleaved, so a change in the machine's load hits both
        runs["zygote"].append(one(args.workers, True))
        runs["spawn"].append(one(args.workers, False))
    print(f"{args.workers} workers, median of {args.rounds} rounds (CPU: the process and all it started)")
    print("| start | wall | CPU |\n| --- | --- | --- |")
    for name, items in runs.items():
        wall = statistics.median(r["wall_s"] for r in items)
        cpu = statistics.median(r["cpu_s"] for r in items)
        print(f"| {name} | {wall:.2f} s | {cpu:.2f} core-s |")
    ratio = statistics.median(r["cpu_s"] for r in runs["spawn"]) / statistics.median(r["cpu_s"] for r in runs["zygote"])
    print(f"spawn / zygote CPU: {ratio:.1f}x")


if __name__ == "__main__":
    main()
