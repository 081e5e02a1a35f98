"""Making a task's reference and checking a candidate's outputs leave the cores to the timing
that follows them: no OpenBLAS thread is woken (they spin for about 0.1 s after a call)."""
from __future__ import annotations

import subprocess
import sys

OTHERS_CPU = r"""
import os, time
import numpy as np

def others_cpu() -> float:
    # CPU seconds of this process's threads other than the main one (OpenBLAS's workers)
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) != os.getpid():
            fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")
"""

CHECK = OTHERS_CPU + r"""
from measure.verify import check_output

want = np.random.default_rng(0).standard_normal(1 << 21)
got = (want + 1e-7).astype(np.float32)
np.dot(want[:100000], want[:100000])  # OpenBLAS starts its threads
time.sleep(0.5)  # and they go to sleep
before = others_cpu()
for _ in range(20):
    assert check_output("Y", got, want, 1e-4) is None
time.sleep(0.3)
print(others_cpu() - before)
"""


def test_checking_a_large_output_wakes_no_blas_thread():
    """A BLAS call (np.linalg.norm's dot) on a large output woke OpenBLAS's threads, which spin
    for about 0.1 s after it: on a two-core machine a two-thread candidate timed right after its
    check ran at one thread's speed. Here 20 checks of 2M elements used 0.57 s of other threads'
    CPU before; none now."""
    assert others_cpu_during(CHECK) < 0.1


REFERENCE = OTHERS_CPU + r"""
from measure.task_data import task_data
from search_space import Task

np.dot(np.ones(100000), np.ones(100000))  # OpenBLAS starts its threads
time.sleep(0.5)
before = others_cpu()
task_data(Task.make("gemm", {"M": 256, "N": 1024, "K": 1024}), "cpu", 0)  # a float64 matmul
time.sleep(0.3)
print(others_cpu() - before)
"""


def test_a_cpu_tasks_reference_runs_on_one_blas_thread():
    """Made once per task, just before its first candidates are timed: on OpenBLAS's threads,
    they would still spin while the first parallel candidate is timed."""
    assert others_cpu_during(REFERENCE) < 0.05


def others_cpu_during(script: str) -> float:
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout)
