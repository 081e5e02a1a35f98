"""Tune operators at LLM shapes on this CPU and bench each against its baseline in one run.

    python benchmarks/cpu_ops.py --cases gemm:M=1024,N=1024,K=1024 gemv:M=1,N=11008,K=4096 \
        --trials 96 --threads 1 --log benchmarks/cpu.jsonl --markdown

For each case: ``autotune tune`` (xgb, the stated trial budget, resumed from the log) with
candidates restricted to the requested thread count, then ``autotune bench`` on the best
record, which times the tuned kernel, the numpy baseline (OpenBLAS with its fast kernel:
OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset for the baseline's process only) and the
machine's roofline. Prints one markdown row per case.
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys

DEFAULT_CASES = ["gemm:M=1024,N=1024,K=1024", "gemv:M=1,N=11008,K=4096"]


def cli(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"autotune {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES,
                        help="op:shape items, optionally op:shape:KEY=VALUE,... with operator attributes")
    parser.add_argument("--trials", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tuner", default="xgb")
    parser.add_argument("--log", default="benchmarks/cpu.jsonl")
    parser.add_argument("--markdown", action="store_true", help="print the table header too")
    args = parser.parse_args()

    rows = []
    for case in args.cases:
        op, shape, *attrs = case.split(":", 2)
        options = ["--op", op, "--shape", shape]
        for item in attrs[0].split(",") if attrs else ():
            options += ["--attr", item]
        cli("tune", *options, "--tuner", args.tuner, "--trials", str(args.trials),
            "--log", args.log, "--no-mlflow", "--quiet", "--threads", str(args.threads))
        result = json.loads(cli("bench", *options, "--log", args.log, "--threads", str(args.threads), "--json"))
        rows.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)

    if args.markdown:
        print(f"Machine: {platform.node()} ({rows[0]['device'] if rows else ''}), "
              f"{datetime.date.today().isoformat()}, {args.threads} thread(s), {args.tuner} with "
              f"{args.trials} trials per case.\n")
        print("| op | shape | threads | tuned ms | baseline ms | baseline kernel | tuned/baseline speedup "
              "| tuned rate | roofline fraction |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        rate = (f"{r['tuned_gflops']:.1f} GFLOP/s" if r["bound"] == "compute"
                else f"{r['tuned_gbs']:.1f} GB/s")
        blas = r["blas"].get("architecture") or r["baseline"]
        shape = ",".join(f"{k}={v}" for k, v in r["shape"].items())
        key_parts = r["task"].split("/", 3)  # op/dtype/dims[/attributes]
        if len(key_parts) == 4:
            shape += f" ({key_parts[3]})"
        print(f"| {r['op']} | {shape} | {r['threads']} | {r['tuned_s'] * 1e3:.4g} | {r['baseline_s'] * 1e3:.4g} "
              f"| {blas} | {r['speedup']:.2f}x | {rate} | {r['roofline_fraction'] * 100:.0f}% "
              f"{r['bound']} ({r['memory_level'] if r['bound'] == 'memory' else 'FMA peak'}) |")


if __name__ == "__main__":
    main()
