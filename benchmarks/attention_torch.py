"""Tuned attention kernels beside torch's scaled_dot_product_attention on this CPU.

    python benchmarks/attention_torch.py --log benchmarks/cpu.jsonl --threads 1 \
        --cases attention_prefill:B=1,T=512,H=32,HKV=8,D=128 attention_decode:B=1,H=32,HKV=8,D=128,S=4096,L=4096

Optional: it needs torch (CPU build), which is no dependency of the project. Each case
runs the best kernel recorded in the log(s) for that shape with the given thread count
(the template default, with a warning, when none is recorded), checks that its output
matches SDPA's, times both in this process (torch with the same number of threads) and
prints tuned/SDPA speed ratios. SDPA gets views in its (B, H, T, D) layout, with GQA
through ``enable_gqa``; nothing is copied for it inside the timed region. Append
``:causal=0`` to a prefill case for non-causal attention.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import numpy as np

DEFAULT_CASES = [  # the attention cases of benchmarks/cpu_ops.py --preset llm
    "attention_prefill:B=1,T=128,H=32,HKV=8,D=128",
    "attention_prefill:B=1,T=512,H=32,HKV=8,D=128",
    "attention_prefill:B=1,T=512,H=32,HKV=32,D=128",
    "attention_decode:B=1,H=32,HKV=8,D=128,S=4096,L=4096",
    "attention_decode:B=4,H=32,HKV=8,D=128,S=4096,L=4096",
    "attention_decode:B=16,H=32,HKV=8,D=128,S=512,L=512",
    "attention_decode:B=4,H=32,HKV=32,D=128,S=2048,L=2048",
]


def time_call(fn, min_s: float = 0.2, repeats: int = 7) -> tuple[float, float]:
    """(median, fastest) seconds per call over ``repeats`` samples of at least
    ``min_s / repeats`` each: on a busy machine other work only ever adds time, so the
    fastest sample is the steadier comparison."""
    fn()
    n = 1
    while True:
        start = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - start >= min_s / repeats or n >= 1 << 20:
            break
        n *= 2
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        samples.append((time.perf_counter() - start) / n)
    return statistics.median(samples), min(samples)


def parse_case(text: str):
    from search_space import parse_shape

    parts = text.split(":")
    if len(parts) not in (2, 3) or parts[0] not in ("attention_prefill", "attention_decode"):
        raise ValueError(f"bad case {text!r}: expected attention_prefill|attention_decode:DIMS[:causal=0]")
    attrs = {}
    if len(parts) == 3:
        key, _, value = parts[2].partition("=")
        if key != "causal" or parts[0] != "attention_prefill":
            raise ValueError(f"bad case {text!r}: only prefill takes causal=0|1")
        attrs["causal"] = value not in ("0", "false", "False")
    return parts[0], parse_shape(parts[1]), attrs


def sdpa_call(torch, op: str, dims: dict, attrs: dict, inputs: dict):
    """A zero-argument SDPA call on views of the same inputs in torch's layout."""
    f = torch.nn.functional.scaled_dot_product_attention
    q, k, v = (torch.from_numpy(inputs[n]) for n in ("Q", "K", "V"))
    gqa = dims["H"] != dims["HKV"]
    if op == "attention_prefill":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B,T,H,D] -> [B,H,T,D] views
        causal = attrs.get("causal", True)
        return lambda: f(q, k, v, is_causal=causal, enable_gqa=gqa).transpose(1, 2)
    length = dims["L"]
    q = q.unsqueeze(2)                                   # [B,H,1,D]
    k, v = k[:, :, :length], v[:, :, :length]            # the valid rows of the cache
    return lambda: f(q, k, v, enable_gqa=gqa).squeeze(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", nargs="+", default=["benchmarks/cpu.jsonl"], help="tuning log(s)")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES)
    parser.add_argument("--threads", type=int, default=1, help="threads of the tuned kernel and of torch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        print("attention_torch.py needs torch (a CPU build): pip install torch", file=sys.stderr)
        sys.exit(2)
    try:
        cases = [parse_case(c) for c in args.cases]
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        sys.exit(2)

    from records import load_records
    from export import TunedKernels
    from search_space import Task, get_template

    warnings.formatwarning = lambda message, *rest, **kw: f"warning: {message}\n"
    torch.set_num_threads(args.threads)
    records = [r for r in load_records(args.log, warn=False) if r.config.get("threads", 1) == args.threads]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); tuned kernels with "
          f"threads={args.threads} from {', '.join(args.log)} ({len(records)} records)")
    print("| op | shape | tuned | tuned ms | SDPA ms | tuned/SDPA speed | (medians) | max abs diff | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    with TunedKernels(records) as kernels:
        for op, dims, attrs in cases:
            template = get_template(op, "cpu")
            task = Task.make(op, dims, attrs=attrs)
            template.check(task)
            inputs = template.make_inputs(task, np.random.default_rng(args.seed))
            kernel = kernels.get(op, dims, attrs=attrs)
            out = np.empty(tuple(dims[d] for d in template.signature(task)[-1].shape), np.float32)
            tuned = lambda: kernel(*(inputs[n] for n in ("Q", "K", "V")), out={"O": out})  # noqa: E731
            sdpa = sdpa_call(torch, op, dims, attrs, inputs)
            tuned()
            diff = float(np.max(np.abs(out - sdpa().numpy())))
            load = os.getloadavg()[0]
            (tuned_s, tuned_min), (sdpa_s, sdpa_min) = time_call(tuned), time_call(sdpa)
            shape = ",".join(f"{k}={v}" for k, v in dims.items()) + ("" if attrs.get("causal", True) else " non-causal")
            print(f"| {op} | {shape} | {'yes' if kernel.tuned else 'default'} | {tuned_min * 1e3:.3f} | "
                  f"{sdpa_min * 1e3:.3f} | {sdpa_min / tuned_min:.2f}x | {sdpa_s / tuned_s:.2f}x | {diff:.1e} "
                  f"| {load:.1f} |", flush=True)


if __name__ == "__main__":
    main()
