"""Where a model's prefill time goes, kernel by kernel, inside the model and alone.

    .venv/bin/python benchmarks/tiny_prefill_profile.py --lib demo-lib --log demo-model.jsonl \
        [--model tiny] [--prompt-tokens 64] [--passes 20] [--json]

Runs the prefill pass of ``autotune run`` (same random prompt, at the same length: its own on
the CPU, padded to a tuned one where the GEMMs compile M in) on the exported library
(``--lib``) and on untuned template defaults, alternating pass by pass, and times every bound kernel call with ``perf_counter`` through a wrapper
defined here (the runtime is untouched: the wrapper sits between ``LlamaModel`` and its
kernel provider). Per task it prints the median time per call over the timed passes on
both sides, and beside them, from ``--log``: the tuned record's time as the tuner measured
it (with the cache condition the record says it was timed in, where it says one), and the
tuned config and the template default re-timed alone by the measuring runner: cold (the
weights cycled through copies filling twice the last-level cache), in place (the same buffers
every call) and pass (copies filling what one forward pass of the model touches: how ``tune-model``
times a model that fits in cache). ``--json`` prints every figure instead.

The tuned side's prefill length is fixed once, as ``autotune run`` fixes it
(``LlamaModel.padded_tokens`` searches the library's tuned sizes on every pass otherwise). A
row is a call of the model, named by the task the library tuned for it (a dynamic dim's
nearest tuned bucket).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np


class _TimedCall:
    """A bound call that adds its duration to ``sink[key]``."""

    __slots__ = ("call", "key", "sink")

    def __init__(self, call, key: str, sink: dict):
        self.call, self.key, self.sink = call, key, sink

    def __call__(self, **dims: int) -> None:
        start = time.perf_counter()
        self.call(**dims)
        self.sink[self.key].append(time.perf_counter() - start)


class _TimedKernel:
    """A kernel whose bound calls are timed; everything else is the kernel's."""

    def __init__(self, kernel, key: str, sink: dict):
        self._kernel, self._key, self._sink = kernel, key, sink

    def __getattr__(self, name: str):
        return getattr(self._kernel, name)

    def bind(self, arrays, dims=None) -> _TimedCall:
        return _TimedCall(self._kernel.bind(arrays, dims), self._key, self._sink)


class _TimedProvider:
    """A kernel provider handing out timed kernels, keyed by the task the first provider to be
    asked for the same call (the library) tuned for it: ``names``, shared by both sides, so a
    call with a dynamic dim is one row although the library serves it from a tuned bucket."""

    def __init__(self, provider, sink: dict, names: dict):
        self._provider, self._sink, self._names = provider, sink, names

    def __getattr__(self, name: str):
        return getattr(self._provider, name)

    def get(self, op, shape, dtype="float32", attrs=None, dynamic=()):
        from runtime.abi import KernelSpec

        kernel = self._provider.get(op, shape, dtype, attrs, dynamic)
        call = KernelSpec.make(op, dict(shape), dtype, dict(attrs or {}), dynamic).key  # what the model asked for
        return _TimedKernel(kernel, self._names.setdefault(call, _task_key(kernel.spec)), self._sink)


def _task_key(spec) -> str:
    from search_space import Task

    return Task.make(spec.op, spec.dims, spec.dtype, spec.attr, spec.dynamic).key


def profile_prefill(lib: str, model: str, prompt_tokens: int, passes: int, seed: int = 0) -> dict:
    """In-model per-call times of the library's and the defaults' prefill (seconds), by task."""
    import runtime
    from export import TunedKernels
    from runtime.llama import LlamaModel
    from runtime.model_config import load_model_config

    from autotune.bench.model_run import make_weights

    config = load_model_config(model)
    weights = make_weights(config, None, seed, "none", 128)
    prompts = np.random.default_rng(seed).integers(0, config.vocab_size, (1, prompt_tokens))
    sinks = {"tuned": defaultdict(list), "defaults": defaultdict(list)}
    walls: dict[str, list[float]] = {"tuned": [], "defaults": []}
    in_kernels: dict[str, list[float]] = {"tuned": [], "defaults": []}
    library = runtime.load(lib, fallback=TunedKernels.defaults())
    defaults = TunedKernels.defaults()
    names: dict = {}
    try:
        tuned = LlamaModel(config, weights, _TimedProvider(library, sinks["tuned"], names))
        padded = tuned.padded_tokens(1, prompt_tokens)
        tuned.prefill_sizes = [padded]  # as autotune run does: the padded length is not searched per pass
        models = {"tuned": tuned,  # prepared first: its kernels name the rows
                  "defaults": LlamaModel(config, weights, _TimedProvider(defaults, sinks["defaults"], names),
                                         [padded])}
        caches = {}
        for name, m in models.items():
            m.prepare(1, prompt_tokens, 2)
            caches[name] = m.new_caches(1, padded + 2)
            for _ in range(3):  # warm-up: every kernel loaded and bound once, caches as in a run
                m.prefill(prompts, caches[name])
            sinks[name].clear()
        for _ in range(passes):
            for name, m in models.items():  # alternate, so load on the machine hits both sides alike
                before = sum(sum(t) for t in sinks[name].values())
                start = time.perf_counter()
                m.prefill(prompts, caches[name])
                walls[name].append(time.perf_counter() - start)
                in_kernels[name].append(sum(sum(t) for t in sinks[name].values()) - before)
    finally:
        library.close()
        defaults.close()
    out: dict = {"model": config.name, "prompt_tokens": prompt_tokens, "padded": padded, "passes": passes,
                 "pass_s": {n: statistics.median(w) for n, w in walls.items()}, "tasks": {}}
    for name, sink in sinks.items():
        for key, times in sink.items():
            row = out["tasks"].setdefault(key, {})
            row["calls_per_pass"] = len(times) // passes
            row[f"{name}_call_s"] = statistics.median(times)
            row[f"{name}_pass_s"] = sum(times) / passes
    out["kernel_s"] = {name: statistics.median(times) for name, times in in_kernels.items()}
    return out


def retime_alone(log: str, task_keys: list[str], model: str = "tiny") -> dict[str, dict]:
    """The best record's time, and its config and the template default re-timed alone: cold
    (copies of the weights filling twice the last-level cache), in place (the same buffers every call) and
    warm as ``tune-model`` times a model that fits in cache (copies filling one pass)."""
    from measure import LocalBuilder, LocalRunner, MeasureInput, TimingPolicy
    from measure.timing import policy_for
    from records import best_records, load_records
    from runtime.model_config import load_model_config
    from search_space import Target, get_template

    from autotune.tune_model import ModelWorkload

    target = Target.host()
    best = {task_key: rec for (task_key, target_key), rec in best_records(load_records([log])).items()
            if target_key == target.key}
    inputs, where = [], []
    for key in task_keys:
        record = best.get(key)
        if record is None:
            continue
        template = get_template(record.task.op, target.kind)
        tuned = template.space(record.task, target).from_values(record.config)
        for which, config in (("tuned", tuned), ("defaults", template.default(record.task, target))):
            inputs.append(MeasureInput(record.task, config, target))
            where.append((key, which))
    out: dict[str, dict] = {key: {"record_s": rec.seconds, "record_cache": rec.result.stats.get("cache", "cold*")}
                            for key, rec in best.items() if key in task_keys}
    pass_bytes = ModelWorkload(load_model_config(model)).working_set_bytes()
    policies = {"cold": policy_for("cold", target), "inplace": TimingPolicy(),
                "pass": policy_for("warm", target, pass_bytes=pass_bytes)}
    with LocalBuilder(n_parallel=1) as builder:
        builds = builder.build(inputs)
        for condition, policy in policies.items():
            with LocalRunner(policy=policy) as runner:
                for (key, which), result in zip(where, runner.run(inputs, builds)):
                    out[key][f"{which}_{condition}_s"] = result.median
    return out


def _us(seconds) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def markdown(profile: dict, alone: dict) -> str:
    lines = [f"{profile['model']}, prompt {profile['prompt_tokens']} tokens run at {profile['padded']}, "
             f"median over {profile['passes']} prefill passes; times in us per call. "
             f"Prefill pass (wall, median): tuned "
             f"{profile['pass_s']['tuned'] * 1e3:.3f} ms, defaults {profile['pass_s']['defaults'] * 1e3:.3f} ms; "
             f"in kernels (median pass): tuned {profile['kernel_s']['tuned'] * 1e3:.3f} ms, defaults "
             f"{profile['kernel_s']['defaults'] * 1e3:.3f} ms.",
             "",
             "| task | calls/pass | in model: tuned | defaults | defaults/tuned | record (as tuned) | "
             "alone tuned: cold | in place | pass | alone default: cold | in place | pass |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = sorted(profile["tasks"].items(), key=lambda kv: -kv[1].get("defaults_pass_s", 0.0))
    for key, row in rows:
        a = alone.get(key, {})
        tuned, default = row.get("tuned_call_s"), row.get("defaults_call_s")
        ratio = f"{default / tuned:.2f}x" if tuned and default else "-"
        record = f"{_us(a.get('record_s'))} ({a['record_cache']})" if "record_s" in a else "-"
        cells = " | ".join(_us(a.get(f"{which}_{condition}_s")) for which in ("tuned", "defaults")
                           for condition in ("cold", "inplace", "pass"))
        lines.append(f"| {key} | {row['calls_per_pass']} | {_us(tuned)} | {_us(default)} | {ratio} | {record} | "
                     f"{cells} |")
    lines.append("")
    lines.append("defaults/tuned > 1: the tuned kernel is faster in the model. Alone: cold = copies of the weights "
                 "filling twice the L3; in place = the same buffers every call; pass = copies filling what one "
                 "pass of the model touches (tune-model's warm). cold* = a record from before records said their "
                 "condition (tune-model then always timed cold).")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lib", required=True, help="an exported library (autotune export)")
    parser.add_argument("--log", default=None, help="the tuning log it was exported from (re-times each task alone)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prompt-tokens", type=int, default=64, help="as `autotune run` (its own length, or padded to a tuned size)")
    parser.add_argument("--passes", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not Path(args.lib, "manifest.json").is_file():
        sys.exit(f"--lib {args.lib}: no manifest.json there")
    profile = profile_prefill(args.lib, args.model, args.prompt_tokens, args.passes)
    alone = retime_alone(args.log, list(profile["tasks"]), args.model) if args.log else {}
    if args.json:
        print(json.dumps({"profile": profile, "alone": alone}, indent=1))
    else:
        print(markdown(profile, alone))


if __name__ == "__main__":
    main()
