"""Bench CUDA operators against the vendor's kernels (torch: cuBLAS, tinygemm, SDPA, ...) in one run.

    python benchmarks/cuda_ops.py --log tune.jsonl --cases gemm:M=4096,N=4096,K=4096:float16 \
        gemv:M=1,N=11008,K=4096:float16 [--json-out rows.jsonl]

For each case, the best verified record in ``--log`` (else the template default) is timed by
the CUDA runner next to the op's vendor baseline, with the GPU's ceilings measured once at
the start (streaming and FFMA probes, cuBLAS for the tensor-core peak). Prints a markdown
table last: tuned and vendor times, speedup, achieved rate and the fraction of the roofline.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse_case(text: str):
    from search_space import Task, parse_shape

    parts = text.split(":")
    op, shape = parts[0], parts[1]
    dtype = parts[2] if len(parts) > 2 else "float16"
    attrs = json.loads(parts[3]) if len(parts) > 3 else None
    from search_space import get_template

    template = get_template(op, "cuda")
    task = Task.make(op, parse_shape(shape), dtype, attrs)  # static dims, as `autotune tune` makes them
    template.check(task)
    return template, task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", required=True, help="op:shape[:dtype[:attrs-json]] items")
    parser.add_argument("--log", default=None, help="tuning log with the records to bench")
    parser.add_argument("--json-out", default=None, help="append one JSON line per case here")
    args = parser.parse_args()

    from autotune.bench.cuda import CudaBench
    from records import RecordLog, best_records
    from search_space import Target

    target = Target.cuda(0)
    session = CudaBench(target)
    ceilings = session.ceilings
    print(f"ceilings: {json.dumps(ceilings)}", file=sys.stderr, flush=True)
    records = RecordLog(args.log).records() if args.log and Path(args.log).exists() else []
    rows = []
    for case in args.cases:
        try:
            template, task = parse_case(case)
            space = template.space(task, target)
            mine = [r for r in records if r.task.key == task.key and r.target.key == target.key]
            winner = best_records(mine).get((task.key, target.key))
            config = winner.to_config(space) if winner is not None else template.default(task, target)
            result = session.bench(task, config)
            row = result.to_dict()
            row["tuned_trials"] = len(mine)
            print(result.summary(), file=sys.stderr, flush=True)
        except Exception as exc:  # one broken case must not cost the table
            op, shape = (case.split(":") + [""])[:2]
            row = {"op": op, "shape": {"case": shape}, "dtype": "", "tuned_trials": 0,
                   "error": f"{type(exc).__name__}: {exc}"}
            print(f"{case}: {row['error']}", file=sys.stderr, flush=True)
        rows.append(row)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(row) + "\n")

    session.close()
    clock = next((r["sm_clock_mhz"] for r in rows if r.get("sm_clock_mhz")), None)
    print(f"\nGPU: {target.device_name}, {datetime.date.today().isoformat()}, SM clock {clock} MHz; "
          f"streaming {ceilings['stream_gbs']:.0f} GB/s, fp16 {ceilings['fp16_gflops'] / 1e3:.0f} / "
          f"bf16 {ceilings['bf16_gflops'] / 1e3:.0f} / fp32 {ceilings['fp32_gflops'] / 1e3:.1f} TFLOP/s "
          f"({ceilings['source']})\n")
    print("| op | shape | dtype | trials | tuned ms | vendor ms | vendor | tuned/vendor | tuned rate | roofline |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        if r["error"]:
            print(f"| {r['op']} | {shape} | {r['dtype']} | {r['tuned_trials']} | failed: {r['error'][:60]} "
                  f"| | | | | |")
            continue
        vendor_ms = f"{r['baseline_s'] * 1e3:.4f}" if r["baseline_s"] else "-"
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] and math.isfinite(r["speedup"]) else "-"
        rate = (f"{r['tuned_gflops'] / 1e3:.1f} TFLOP/s" if r["bound"] == "compute"
                else f"{r['tuned_gbs']:.0f} GB/s")
        vendor = r["baseline"] + (f" (check: {r['baseline_check'][:40]})" if r["baseline_check"] else "")
        print(f"| {r['op']} | {shape} | {r['dtype']} | {r['tuned_trials']} | {r['tuned_s'] * 1e3:.4f} | {vendor_ms} "
              f"| {vendor} | {speedup} | {rate} | {r['roofline_fraction'] * 100:.0f}% {r['bound']} |")


if __name__ == "__main__":
    main()
