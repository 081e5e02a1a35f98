"""Tune operators at LLM shapes on this CPU and bench each against its baseline in one run.

    python benchmarks/cpu_ops.py --preset llm --threads 1 2 --trials 64 \
        --log benchmarks/cpu.jsonl --results benchmarks/cpu_results.jsonl --markdown
    python benchmarks/cpu_ops.py --cases gemm:M=1024,N=1024,K=1024 gemv:M=1,N=11008,K=4096 --trials 96
    python benchmarks/cpu_ops.py --table benchmarks/cpu_results.jsonl     # the table again, nothing run

A case is ``op:shape``, optionally followed by ``:dtype`` and/or ``:attrs``, e.g.
``gemm:M=1024,N=1024,K=1024:bfloat16`` or ``gemv_q4:M=1,N=11008,K=4096:group_size=32``.
``--preset llm`` is every operator at Llama-2-7B shapes (``LLM_CASES``).

For each thread count, then each case: ``autotune tune`` (xgb, the stated trial budget,
resumed from the log) with candidates restricted to that thread count, then ``autotune
bench`` on the best record, which times the tuned kernel, the numpy baseline (OpenBLAS
with its fast kernel: OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE unset for the baseline's
process only; BLAS limited to the same thread count, element-wise numpy is one thread
anyway) and the machine's roofline. Each result is appended to ``--results`` with the
load average and date as soon as it is measured; the table shows, per case and thread
count, the latest result, with the target of ``../shared/TARGETS.md`` it is held to and
whether it is met.
"""
from __future__ import annotations

import argparse
import gzip
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_CASES = ["gemm:M=1024,N=1024,K=1024", "gemv:M=1,N=11008,K=4096"]
DTYPES = ("float32", "bfloat16", "float16")

# Llama-2-7B: hidden 4096, intermediate 11008, vocabulary 32000, 32 heads of 128 (8 KV
# heads for GQA); prefill 128..512 tokens, decode batch 1..16, KV length 512..4096.
# Bandwidth is only judged where the working set is unambiguous: within half the L3
# (decode rows) or well past all of it (the row-wise ops on 4 prompts of 512 tokens, M =
# 2048; one prompt's 17-34 MB straddles the 32 MB L3, and repeated calls partly hit it).
# Cheap cases first, the largest GEMM last.
LLM_CASES = [
    "rmsnorm:M=2048,N=4096", "rmsnorm:M=2048,N=4096:residual=true", "layernorm:M=2048,N=4096",
    "softmax:M=16384,N=512", "rope:T=2048,H=32,D=128", "swiglu:M=2048,N=11008", "gelu:M=2048,N=11008",
    "add:M=2048,N=4096", "rmsnorm:M=16,N=4096:residual=true", "swiglu:M=16,N=11008",
    "gemv:M=1,N=11008,K=4096", "gemv:M=16,N=11008,K=4096", "gemv:M=1,N=4096,K=11008", "gemv:M=16,N=4096,K=11008",
    "gemm:M=16,N=11008,K=4096",
    "gemv:M=1,N=11008,K=4096:bfloat16", "gemv:M=16,N=11008,K=4096:bfloat16",
    "gemv_q4:M=1,N=11008,K=4096:group_size=32", "gemv_q4:M=1,N=11008,K=4096:group_size=64",
    "gemv_q4:M=1,N=11008,K=4096:group_size=128", "gemv_q4:M=1,N=11008,K=4096:group_size=128,zero_point=true",
    "gemv_q4:M=16,N=11008,K=4096:group_size=128", "gemv_q4:M=1,N=4096,K=11008:group_size=128",
    "gemv_q4:M=1,N=32000,K=4096:group_size=128",
    "attention_decode:B=1,H=32,HKV=8,D=128,S=4096,L=4096", "attention_decode:B=4,H=32,HKV=8,D=128,S=4096,L=4096",
    "attention_decode:B=16,H=32,HKV=8,D=128,S=512,L=512", "attention_decode:B=4,H=32,HKV=32,D=128,S=2048,L=2048",
    "attention_prefill:B=1,T=128,H=32,HKV=8,D=128", "attention_prefill:B=1,T=512,H=32,HKV=8,D=128",
    "attention_prefill:B=1,T=512,H=32,HKV=32,D=128",
    "gemm:M=1024,N=1024,K=1024", "gemm:M=128,N=4096,K=4096", "gemm:M=128,N=4096,K=4096:bfloat16",
    "gemm_q4:M=128,N=4096,K=4096:group_size=128",
    "gemm:M=2048,N=4096,K=4096",
]
PRESETS = {"llm": LLM_CASES, "default": DEFAULT_CASES}
ROW_OPS = ("rmsnorm", "layernorm", "softmax", "rope", "swiglu", "geglu", "gelu", "add")


def parse_case(case: str) -> tuple[str, str, str, list[str]]:
    """``op:shape[:dtype][:attrs]`` as (op, shape, dtype, ["KEY=VALUE", ...])."""
    op, shape, *extra = case.split(":")
    dtype, attrs = "float32", []
    for item in extra:
        if item in DTYPES:
            dtype = item
        else:
            attrs += item.split(",")
    return op, shape, dtype, attrs


def task_args(case: str) -> list[str]:
    op, shape, dtype, attrs = parse_case(case)
    return ["--op", op, "--shape", shape, "--dtype", dtype] + [a for kv in attrs for a in ("--attr", kv)]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True)


def fastest_record(log: str, case: str, threads: int):
    """The verified record of the case with the fastest timed sample at this thread count.

    ``autotune best`` ranks by the median of a candidate's samples; on a busy machine the
    fastest sample is the steadier statistic (other work only adds time), and it is what
    the table compares, so the kernel benched is picked by it too."""
    from autotune.cli import resolve_task
    from records import load_records
    from search_space import Target

    op, shape, dtype, attrs = parse_case(case)
    _, task = resolve_task(op, shape, dtype, "cpu", "", attrs)
    target = Target.host()
    mine = [r for r in load_records([log], warn=False)
            if r.ok and r.task.key == task.key and r.target.key == target.key
            and r.config.get("threads", threads) == threads]
    return min(mine, key=lambda r: min(r.result.costs), default=None)


def run_case(case: str, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    """Tune (resumed from the log) and bench one case; a failure is a result with ``error``."""
    meta: dict[str, Any] = {"case": case, "trials": args.trials, "tuner": args.tuner,
                            "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if not args.bench_only:
        tuned = cli("tune", *task_args(case), "--tuner", args.tuner, "--trials", str(args.trials), "--log", args.log,
                    "--no-mlflow", "--quiet", "--threads", str(threads))
        if tuned.returncode != 0:
            return {**meta, "threads": threads, "error": f"tune failed: {tuned.stderr.strip()[-500:]}"}
    record = fastest_record(args.log, case, threads)
    if record is None:
        return {**meta, "threads": threads, "error": f"no verified record with threads={threads} in {args.log}"}
    with tempfile.TemporaryDirectory() as folder:
        picked = Path(folder) / "picked.jsonl"
        picked.write_text(record.to_json() + "\n")
        meta["load"] = os.getloadavg()  # just before the timed part
        benched = cli("bench", *task_args(case), "--log", str(picked), "--threads", str(threads), "--json")
    try:
        result = json.loads(benched.stdout)
    except json.JSONDecodeError:
        return {**meta, "threads": threads, "error": f"bench failed: {benched.stderr.strip()[-500:]}"}
    meta["load_after"] = os.getloadavg()
    return {**result, **meta}


@dataclass
class Row:
    """One (case, thread count) of the table: the best of its bench runs.

    Times are the fastest timed sample over every run, for the tuned kernel and for the
    baseline separately: other work on the machine only ever adds time (the roofline probes
    are best-of too). ``median_ratio`` is the latest run's ratio of the medians."""

    case: str
    threads: int
    op: str
    dtype: str
    tuned_s: float
    baseline_s: float
    median_ratio: float
    flops: float
    nbytes: float
    level: str  # the memory level the working set fits in
    blas: str
    runs: int
    loads: tuple[float, float]  # lowest and highest 1-minute load before a bench of this row

    @property
    def speedup(self) -> float:
        return self.baseline_s / self.tuned_s


def best_rows(results: list[dict[str, Any]], cases: list[str] | None = None) -> list[Row]:
    """Rows in the order of ``cases`` (else of their first result), one thread count after the other."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results:
        if r.get("tuned_s"):
            groups.setdefault((r["case"], r["threads"]), []).append(r)
    rows = []
    for (case, threads), runs in groups.items():
        last = runs[-1]
        fastest = lambda key, fallback: min(r.get(key) or r[fallback] for r in runs)  # noqa: E731
        loads = [r["load"][0] for r in runs if r.get("load")]
        rows.append(Row(case, threads, last["op"], last["dtype"], fastest("tuned_min_s", "tuned_s"),
                        fastest("baseline_min_s", "baseline_s"), last["speedup"],
                        last["tuned_gflops"] * last["tuned_s"] * 1e9, last["tuned_gbs"] * last["tuned_s"] * 1e9,
                        last["memory_level"], last["blas"].get("architecture") or "-", len(runs),
                        (min(loads), max(loads)) if loads else (math.nan, math.nan)))
    order = {case: i for i, case in reversed(list(enumerate(cases or [r["case"] for r in results])))}
    return sorted(rows, key=lambda row: (row.threads, order[row.case]))


def ceilings(results: list[dict[str, Any]]) -> dict[tuple[int, str], float]:
    """The highest FMA peak (key "peak") and read bandwidth per memory level that the probes
    measured in these results, per thread count: other work only ever lowers a probe's
    result, so the highest is the machine's ceiling, and judging every case against it
    keeps a probe that ran at a busy moment from flattering its case."""
    best: dict[tuple[int, str], float] = {}
    for r in results:
        if r.get("tuned_s"):
            for key, value in (((r["threads"], "peak"), r["peak_gflops"]),
                               ((r["threads"], r["memory_level"]), r["memory_gbs"])):
                best[key] = max(best.get(key, 0.0), value)
    return best


def roofline(row: Row, ceiling: dict[tuple[int, str], float]) -> tuple[str, float, float]:
    """(bound, fraction of the roof, the roof's rate): compute or memory, whichever binds."""
    peak, bandwidth = ceiling[(row.threads, "peak")], ceiling[(row.threads, row.level)]
    compute_s, memory_s = row.flops / (peak * 1e9), row.nbytes / (bandwidth * 1e9)
    if compute_s >= memory_s:
        return "compute", compute_s / row.tuned_s, peak
    return "memory", memory_s / row.tuned_s, bandwidth


def target_of(row: Row, bound: str, fraction: float) -> tuple[str, bool | None]:
    """The line of TARGETS.md a row is held to, and whether it is met (None: no line).

    bfloat16 has no line of its own: the float32 line of the same operator is applied
    (against float32 OpenBLAS for gemm, to the bfloat16 bytes for gemv) and marked so."""
    memory = bound == "memory"
    bf16 = " (fp32 line)" if row.dtype == "bfloat16" else ""
    if row.op == "gemm":
        return f">= 0.9x OpenBLAS{bf16}", row.speedup >= 0.9
    if row.op == "gemv":
        return f">= 80% of bandwidth{bf16}", memory and fraction >= 0.8
    if row.op == "gemv_q4":
        return ">= 3x numpy fp32 GEMV", row.speedup >= 3.0
    if row.op in ROW_OPS:
        return ">= 70% of bandwidth, >= 2x numpy", memory and fraction >= 0.7 and row.speedup >= 2.0
    if row.op == "attention_prefill":
        return ">= 3x numpy reference", row.speedup >= 3.0
    if row.op == "attention_decode":
        return ">= 70% of bandwidth (KV reads)", memory and fraction >= 0.7
    return "none in TARGETS.md", None


def markdown(results: list[dict[str, Any]], cases: list[str] | None = None) -> str:
    ceiling = ceilings(results)
    lines = ["| op | shape | threads | tuned ms | baseline ms | baseline kernel | tuned/baseline | (medians) "
             "| tuned rate | roofline fraction | target | met | runs | load |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in best_rows(results, cases):
        op, _, rest = row.case.partition(":")
        bound, fraction, roof = roofline(row, ceiling)
        rate = (f"{row.flops / row.tuned_s / 1e9:.1f} GFLOP/s" if bound == "compute"
                else f"{row.nbytes / row.tuned_s / 1e9:.1f} GB/s")
        where = f"of {row.level} {roof:.0f} GB/s" if bound == "memory" else f"of FMA peak {roof:.0f} GFLOP/s"
        target, met = target_of(row, bound, fraction)
        low, high = row.loads
        load = f"{low:.1f}" if low == high else f"{low:.1f}-{high:.1f}"
        lines.append(f"| {op} | {rest.replace(':', ' ')} | {row.threads} | {row.tuned_s * 1e3:.4g} "
                     f"| {row.baseline_s * 1e3:.4g} | {row.blas} | {row.speedup:.2f}x | {row.median_ratio:.2f}x "
                     f"| {rate} | {fraction * 100:.0f}% {where} | {target} "
                     f"| {'-' if met is None else 'yes' if met else '**no**'} | {row.runs} | {load} |")
    failed = [r for r in results if not r.get("tuned_s")]
    lines += [f"\nfailed: {r['case']} threads={r['threads']}: {r.get('error', '')[:300]}" for r in failed]
    return "\n".join(lines)


def read_results(path: str) -> list[dict[str, Any]]:
    """A results file, plain or gzipped (as kept in benchmarks/data/)."""
    raw = Path(path).read_bytes()
    text = gzip.decompress(raw).decode() if path.endswith(".gz") else raw.decode()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=None,
                        help="op:shape items, optionally op:shape:KEY=VALUE,... with operator attributes")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="a named list of cases")
    parser.add_argument("--trials", type=int, default=96, help="tuning trials per case and thread count")
    parser.add_argument("--threads", type=int, nargs="+", default=[1], help="thread counts, one pass each")
    parser.add_argument("--tuner", default="xgb")
    parser.add_argument("--log", default="benchmarks/cpu.jsonl", help="tuning log (resumed)")
    parser.add_argument("--results", default=None, help="append each bench result here (JSONL)")
    parser.add_argument("--bench-only", action="store_true", help="bench the logged best again, tune nothing")
    parser.add_argument("--table", metavar="RESULTS", default=None,
                        help="print the table of a results file (of --cases/--preset only, when given) and stop")
    parser.add_argument("--markdown", action="store_true", help="print the table header and run notes too")
    args = parser.parse_args()
    if args.table:
        if not Path(args.table).is_file():
            print(f"cpu_ops.py: no results file {args.table}", file=sys.stderr)
            sys.exit(2)
        results = read_results(args.table)
        wanted = (args.cases or []) + (PRESETS[args.preset] if args.preset else [])
        if wanted:  # only these cases' rows, in this order
            results = [r for r in results if r["case"] in wanted]
        print(markdown(results, wanted or None))
        return
    if args.trials < 1 or min(args.threads) < 1:
        print("cpu_ops.py: --trials and --threads must be positive", file=sys.stderr)
        sys.exit(2)
    cases = (args.cases or []) + (PRESETS[args.preset] if args.preset else [])
    cases = cases or DEFAULT_CASES
    from autotune.cli import UserError, resolve_task

    for case in cases:
        try:
            op, shape, dtype, attrs = parse_case(case)
            resolve_task(op, shape, dtype, "cpu", "", attrs)
        except (UserError, ValueError) as exc:
            print(f"cpu_ops.py: bad case {case!r}: {exc}", file=sys.stderr)
            sys.exit(2)

    rows = []
    for threads in args.threads:
        for case in cases:
            result = run_case(case, threads, args)
            rows.append(result)
            if args.results:
                with open(args.results, "a") as out:
                    out.write(json.dumps(result) + "\n")
                    out.flush()
                    os.fsync(out.fileno())
            print(json.dumps(result), file=sys.stderr, flush=True)

    if args.markdown:
        device = next((r["device"] for r in rows if r.get("device")), "")
        print(f"Machine: {platform.node()} ({device}), {datetime.date.today().isoformat()}, threads "
              f"{', '.join(map(str, args.threads))}, {args.tuner} with {args.trials} trials per case and thread "
              f"count; times are the fastest sample of all bench runs of a row, load the 1-minute load average "
              f"before each.\n")
    print(markdown(rows, cases))


if __name__ == "__main__":
    main()
