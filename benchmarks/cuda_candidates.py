"""Measure the seed configs of the CUDA matmul templates (``Template.seed_configs``) and append them to a tuning log.

    python benchmarks/cuda_candidates.py --log tune.jsonl

A small tuning budget on a space of 10^5 configs may never try the schedules that are
known to suit Hopper (large warpgroup-MMA tiles, deep pipelines). These are measured and
verified like any candidate (the CUDA runner), recorded with tuner name ``candidates``, and
compete with the tuner's records in ``autotune best`` / ``bench``. Configs a space rejects
for a shape are skipped.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# the configs measured for each case are its template's seed configs (``Template.seed_configs``)
CASES = [
    "gemm:M=4096,N=4096,K=4096:float16", "gemm:M=4096,N=4096,K=4096:bfloat16", "gemm:M=512,N=11008,K=4096:float16",
    "gemm:M=4096,N=4096,K=4096:float32", "gemv:M=1,N=11008,K=4096:float16", "gemv:M=1,N=28672,K=8192:float16",
    "gemv_q4:M=1,N=11008,K=4096:float16", "gemv_q4:M=1,N=28672,K=8192:float16",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True)
    parser.add_argument("--cases", nargs="*", default=list(CASES), help="keys of CASES to measure")
    args = parser.parse_args()

    from measure import CudaRunner, LocalBuilder, MeasureInput
    from records import Record, RecordLog
    from search_space import Target, Task, get_template, parse_shape

    target = Target.cuda(0)
    log = RecordLog(args.log)
    with LocalBuilder(timeout_s=300) as builder, CudaRunner(timeout_s=60) as runner:
        for case in args.cases:
            op, shape, dtype = case.split(":")
            template = get_template(op, "cuda")
            task = Task.make(op, parse_shape(shape), dtype)
            space = template.space(task, target)
            done = {r.config_index for r in log.records() if r.task.key == task.key and r.target.key == target.key}
            seeds = space.accepted(template.seed_configs(task, target), template.default(task, target).as_dict())
            inputs = [MeasureInput(task, c, target) for c in seeds if c.index not in done]
            builds = builder.build(inputs)
            results = runner.run(inputs, builds)
            log.append([Record.from_measure(i, r, "candidates") for i, r in zip(inputs, results)])
            ok = [(r.median, str(i.config)) for i, r in zip(inputs, results) if r.ok]
            failed = [(str(i.config), r.error.name, r.message[:120]) for i, r in zip(inputs, results) if not r.ok]
            best = min(ok) if ok else None
            print(f"{case}: {len(ok)} of {len(inputs)} verified"
                  + (f", best {best[0] * 1e3:.4f} ms {best[1]}" if best else ""), flush=True)
            for item in failed:
                print(f"  failed: {item}", flush=True)


if __name__ == "__main__":
    main()
