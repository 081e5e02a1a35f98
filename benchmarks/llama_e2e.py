"""A whole model end to end on this CPU: tune-model, export, run against numpy and defaults.

    python benchmarks/llama_e2e.py --model benchmarks/models/llama-100m/config.json \
        --quantize none --trials-total 300 --work /tmp/e2e --markdown
    python benchmarks/llama_e2e.py --model benchmarks/models/llama-100m/config.json \
        --dtype bfloat16 --trials-total 300 --work /tmp/e2e --markdown

``--dtype bfloat16`` (or ``float16``) runs the model weight-only on the CPU (16-bit linear
weights, float32 arithmetic; ``runtime.plan.precisions``); its numpy reference computes in float32
on the same rounded weights, so it reads twice the bytes per weight.

Runs, as a user would, ``autotune tune-model`` (resumed from ``WORK/NAME.jsonl``),
``autotune export`` into ``WORK/NAME-lib`` and ``autotune run --lib ... --compare --json``
(the tuned library, the numpy reference in its own process with OpenBLAS's fastest kernel,
and the same model on untuned template defaults, all in one run), then prints one markdown
row per model with the speeds, the speedups, the decode bandwidth floor (the weights and the
mean KV cache a decode step reads, over the DRAM read bandwidth the roofline probe measures
here with as many threads as the machine runs, before and after the runs, the better of the
two), the largest logit difference and the cache
condition the library was tuned in (``tune-model`` decides it from the model: cold when one
forward pass touches more than the last-level cache, else warm; ``run`` reads it back from the
library's manifest, or says it cannot).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def autotune(*args: str) -> str:
    """Run `autotune ARGS...` in a subprocess; its stdout, or stop with its stderr on failure."""
    proc = subprocess.run([sys.executable, "-m", "autotune.cli", *args], capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"autotune {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


def read_bandwidth(threads: int) -> float:
    """DRAM read bytes/s of the generated read probe with ``threads`` threads (the one a cold
    ``tune-model`` job runs: ``autotune.tune_model.memory_read_rate``)."""
    from autotune.tune_model import memory_read_rate
    from search_space import Target

    rate = memory_read_rate(Target.host(), {"threads": [threads]}, lambda line: print(line, file=sys.stderr))
    if not rate:
        sys.exit("the memory read probe failed: no bandwidth floor to compare with")
    return rate


def decode_bytes(model: str, quantize: str, prompt: int, new: int, dtype: str = "float32") -> float:
    """Bytes a decode step of a CPU model in ``dtype`` reads: every weight once (float32, or
    bfloat16 linear weights; int4 codes and scales with q4) and the float32 KV cache at the
    mean length of the generation."""
    from autotune.model_tasks import weight_bytes
    from runtime.model_config import load_model_config
    from runtime.plan import precisions

    config = load_model_config(model)
    activations, weights = precisions(dtype, "cpu", quantize)
    kv = 2 * config.num_hidden_layers * config.kv_size * 4 * (prompt + new / 2)
    return weight_bytes(config, quantize, dtype=activations, weights=weights) + kv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["tiny"], help="presets or config.json files")
    parser.add_argument("--quantize", default="none", choices=["none", "q4"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="bfloat16, float16: weight-only 16-bit linear layers, float32 arithmetic")
    parser.add_argument("--cache", default="auto", choices=["auto", "cold", "warm"],
                        help="tune-model's --cache: the condition candidates are timed in")
    parser.add_argument("--trials-total", type=int, default=300)
    parser.add_argument("--prefill-tokens", default="128")
    parser.add_argument("--decode-batch", default="1")
    parser.add_argument("--kv-len", default="512")
    parser.add_argument("--prompt-tokens", type=int, default=100)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--work", default="benchmarks/e2e")
    parser.add_argument("--markdown", action="store_true", help="print the table header too")
    args = parser.parse_args()

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    threads = len(os.sched_getaffinity(0))
    bandwidth = read_bandwidth(threads)
    rows = []
    for model in args.model:
        name = Path(model).parent.name if model.endswith(".json") else model
        name += "-q4" if args.quantize == "q4" else ""
        name += {"bfloat16": "-bf16", "float16": "-f16"}.get(args.dtype, "")
        log, lib = work / f"{name}.jsonl", work / f"{name}-lib"
        begin = time.perf_counter()
        tune = json.loads(autotune("tune-model", "--model", model, "--quantize", args.quantize, "--dtype", args.dtype,
                                   "--cache", args.cache, "--prefill-tokens", args.prefill_tokens,
                                   "--decode-batch", args.decode_batch,
                                   "--kv-len", args.kv_len, "--trials-total", str(args.trials_total),
                                   "--log", str(log), "--no-mlflow", "--quiet", "--json"))
        tune_s = time.perf_counter() - begin
        autotune("export", "--log", str(log), "--out", str(lib))
        out = json.loads(autotune("run", "--lib", str(lib), "--model", model, "--dtype", args.dtype,
                                  "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens),
                                  "--compare", "--json"))
        out.update(name=name, trials=tune["trials"], tasks=len(tune["tasks"]), tune_s=tune_s,
                   tuned_cache=tune.get("cache"), working_set_bytes=tune.get("working_set_bytes"),
                   probe_threads=threads,
                   decode_bytes=decode_bytes(model, args.quantize, args.prompt_tokens, args.new_tokens, args.dtype))
        rows.append(out)
    # probed again after the runs, the best of the two taken: on a shared host one probe can
    # land in a neighbour's burst and read at half the rate (18 GB/s where the model drew 29)
    probes = [bandwidth, read_bandwidth(threads)]
    bandwidth = max(probes)
    for out in rows:
        floor = bandwidth / out["decode_bytes"]
        out.update(read_bytes_per_s=bandwidth, read_probes_bytes_per_s=probes, floor_tokens_per_s=floor,
                   share_of_floor=out["decode_tokens_per_s"] / floor)
        print(json.dumps(out), file=sys.stderr, flush=True)

    if args.markdown:
        load = os.getloadavg()
        print(f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
              f"{datetime.date.today().isoformat()}, load average {load[0]:.1f}/{load[1]:.1f}; "
              f"{args.prompt_tokens} prompt tokens, {args.new_tokens} new, batch 1; best of 3 timed runs per side; "
              f"read probe {bandwidth / 1e9:.1f} GB/s with {threads} threads (best of "
              f"{' and '.join(f'{p / 1e9:.1f}' for p in probes)}, before and after the runs).\n")
        print("| model | weights | tuned (cache) | tasks / trials | tune min | decode tok/s tuned | floor | of floor | "
              "numpy | defaults | tuned/numpy | tuned/defaults | prefill tok/s tuned / numpy / defaults | max logit diff "
              "(rel) vs numpy |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        ref, dft = r["reference"], r["defaults"]
        # what tune-model chose, and what the library itself says (None: its manifest does not record it)
        said = (r.get("cache") or {}).get("tuned_for")
        timed = f"{r.get('tuned_cache') or '?'} ({(r.get('working_set_bytes') or 0) / 2**20:.0f} MiB/pass)"
        timed += "" if said == r.get("tuned_cache") else f", library: {said or 'not recorded'}"
        weights = "q4" if r["quantize"] == "q4" else r.get("dtype", "float32")
        print(f"| {r['name']} | {weights} | {timed} | {r['tasks']} / {r['trials']} | {r['tune_s'] / 60:.1f} | "
              f"{r['decode_tokens_per_s']:.1f} | {r['floor_tokens_per_s']:.1f} | {r['share_of_floor'] * 100:.0f}% | "
              f"{ref['decode_tokens_per_s']:.1f} | {dft['decode_tokens_per_s']:.1f} | "
              f"{r['decode_speedup_vs_reference']:.2f}x | {r['decode_speedup_vs_defaults']:.2f}x | "
              f"{r['prefill_tokens_per_s']:.0f} / {ref['prefill_tokens_per_s']:.0f} / {dft['prefill_tokens_per_s']:.0f} | "
              f"{ref['logits']['max_abs']:.1e} ({ref['logits']['max_rel']:.1e}) |")


if __name__ == "__main__":
    main()
