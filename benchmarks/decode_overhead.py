"""How much of a decode step is spent outside the kernels: Python, numpy copies, ctypes glue.

    .venv/bin/python benchmarks/decode_overhead.py [--lib DIR [--quantize q4]] [--model tiny] [--prompt-tokens 64]
        [--steps 16] [--repeats 9] [--trials-total 40] [--results benchmarks/RESULTS.md --label before]

Without ``--lib`` it tunes the model into a temporary directory (``autotune tune-model
--trials-total N --no-mlflow``) and exports the library there (``autotune export``). It then
loads the library with ``runtime.load`` and generates greedily with ``LlamaModel`` as
``autotune run`` does (random weights and prompt from ``--seed``, the prefill length fixed
once, every kernel loaded and one warm-up generation first), ``--steps`` decode steps per
generation (``generate(prompts, steps + 1)``: the first token comes from the prefill).

Three figures per repeat, each repeat running them back to back:

- wall: ``Generation.decode_s`` of a plain generation, per decode step (token);
- in kernels, timed: the same generation with every kernel's ctypes function replaced by a
  wrapper that adds ``perf_counter()`` around the foreign call, less the wrapper's own cost
  measured on an empty Python function taking the same arguments. The foreign call counts as
  inside (ctypes converting its arguments included), everything else the step does is outside;
- in kernels, replayed: the foreign calls of ``--steps`` decode steps (recorded once, with their
  arguments and KV lengths) replayed back to back with no step logic in between.

The share outside kernels is ``1 - in kernels / wall``. The machine may be shared, which only
ever adds time: the table gives the best (minimum) of the repeats and the spread (min-max).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def build_library(model: str, trials: int, folder: Path) -> Path:
    """Tune ``model`` and export its library into ``folder``; the library's path."""
    autotune = Path(sys.executable).with_name("autotune")
    log, lib = folder / "tune.jsonl", folder / "lib"
    subprocess.run([str(autotune), "tune-model", "--model", model, "--trials-total", str(trials), "--no-mlflow",
                    "--log", str(log)], check=True, stdout=subprocess.DEVNULL)
    subprocess.run([str(autotune), "export", "--log", str(log), "--out", str(lib)], check=True,
                   stdout=subprocess.DEVNULL)
    return lib


def timer_cost(samples: int = 20000, nargs: int = 6) -> float:
    """Seconds one timed interval adds around nothing: perf_counter, the call of an empty
    function with ``nargs`` arguments (the median of many)."""
    perf_counter = time.perf_counter

    def empty(*args):
        return None

    args = tuple(range(nargs))
    spans = []
    for _ in range(samples):
        start = perf_counter()
        empty(*args)
        spans.append(perf_counter() - start)
    return statistics.median(spans)


class Instrument:
    """Swaps every kernel's ctypes function for a timing (and optionally recording) wrapper;
    bound calls pick the function up when bound, so only steps built while on are timed."""

    def __init__(self, kernels):
        self.kernels = list(kernels)
        self.original = {id(k): k.function for k in self.kernels}
        self.spans: list[float] = []  # seconds of each foreign call, in call order
        self.record: list | None = None

    def on(self, record: bool = False) -> None:
        self.spans = []
        self.record = [] if record else None
        for kernel in self.kernels:
            kernel.function = self._wrap(self.original[id(kernel)])

    def off(self) -> None:
        for kernel in self.kernels:
            kernel.function = self.original[id(kernel)]

    def _wrap(self, function):
        perf_counter = time.perf_counter

        def timed(*args):
            start = perf_counter()
            function(*args)
            self.spans.append(perf_counter() - start)
            if self.record is not None:
                self.record.append((function, args))

        return timed


def measure(lib: Path, model_name: str, prompt_tokens: int, steps: int, repeats: int, seed: int,
            quantize: str = "none") -> dict:
    import runtime
    from runtime.llama import LlamaModel, _DecodeStep
    from runtime.model_config import load_model_config
    from runtime.weights import ModelWeights

    config = load_model_config(model_name)
    weights = ModelWeights.random(config, seed)
    if quantize == "q4":  # the library's int4 linear layers (group 128, as tune-model's default)
        weights = weights.quantize_q4(128)
    prompts = np.random.default_rng(seed).integers(0, config.vocab_size, (1, prompt_tokens))
    library = runtime.load(lib)
    try:
        model = LlamaModel(config, weights, library)
        batch, tokens = prompts.shape
        model.prefill_sizes = [model.padded_tokens(batch, tokens)]  # as autotune run: searched once
        model.prepare(batch, tokens, steps + 1)
        reference = model.generate(prompts, steps + 1)  # warm-up, and the tokens every run must give
        instrument = Instrument(model.used.values())
        cost = timer_cost()

        # the calls of ``steps`` decode steps, recorded from a step object kept alive for the replay
        padded = model.prefill_sizes[0]
        capacity = padded + steps + 1
        caches = model.new_caches(batch, capacity)
        instrument.on()
        first, _ = model.prefill(prompts, caches)
        prefill_calls = len(instrument.spans)  # a generation's first calls: its prefill's
        instrument.off()
        instrument.on(record=True)
        step = _DecodeStep(model, batch, capacity, caches)
        token = np.argmax(first, axis=-1)
        for position in range(tokens, tokens + steps):
            token = np.argmax(step(token, position), axis=-1)
        recorded = instrument.record
        instrument.off()
        calls_per_step = len(recorded) / steps

        walls, timed, replayed = [], [], []
        for _ in range(repeats):
            generation = model.generate(prompts, steps + 1)
            assert np.array_equal(generation.tokens, reference.tokens)
            walls.append(generation.decode_s / steps)

            instrument.on()
            generation = model.generate(prompts, steps + 1)
            instrument.off()
            assert np.array_equal(generation.tokens, reference.tokens)
            # the prefill's calls were timed too: count only the decode steps' ones
            decode = instrument.spans[prefill_calls:]
            assert len(decode) == len(recorded), (len(decode), len(recorded))
            timed.append((sum(decode) - cost * len(decode)) / steps)

            start = time.perf_counter()
            for function, args in recorded:
                function(*args)
            replayed.append((time.perf_counter() - start) / steps)
        del step
    finally:
        library.close()
    return {"model": model_name, "prompt_tokens": prompt_tokens, "padded": padded, "steps": steps,
            "repeats": repeats, "calls_per_step": calls_per_step, "timer_cost_s": cost,
            "wall_s": walls, "kernels_timed_s": timed, "kernels_replayed_s": replayed}


def summary(result: dict) -> dict:
    """Best and spread of each figure; the share outside kernels per repeat (same repeat's figures)."""
    walls = result["wall_s"]
    out = {}
    for name in ("wall_s", "kernels_timed_s", "kernels_replayed_s"):
        values = result[name]
        out[name] = (min(values), statistics.median(values), max(values))
    for name in ("kernels_timed_s", "kernels_replayed_s"):
        shares = [1 - k / w for k, w in zip(result[name], walls)]
        best = 1 - min(result[name]) / min(walls)  # best kernels against the best wall
        out["outside_" + name.split("_")[1]] = (best, min(shares), statistics.median(shares), max(shares))
    return out


def table(result: dict) -> str:
    s = summary(result)
    us = 1e6
    lines = ["| per decode step (token) | best | median | spread (min-max) |", "| --- | --- | --- | --- |"]
    for label, key in (("decode wall", "wall_s"), ("in kernels, timed", "kernels_timed_s"),
                       ("in kernels, replayed", "kernels_replayed_s")):
        lo, med, hi = s[key]
        lines.append(f"| {label} | {lo * us:.1f} us | {med * us:.1f} us | {lo * us:.1f}-{hi * us:.1f} us |")
    for label, key in (("share outside kernels (timed)", "outside_timed"),
                       ("share outside kernels (replayed)", "outside_replayed")):
        best, lo, med, hi = s[key]
        lines.append(f"| {label} | {best:.1%} | {med:.1%} | {lo:.1%}-{hi:.1%} |")
    lines.append("")
    lines.append(f"{result['model']}, batch 1, prompt {result['prompt_tokens']} tokens (prefill padded to "
                 f"{result['padded']}), {result['steps']} decode steps per generation, {result['repeats']} "
                 f"repeats; {result['calls_per_step']:.0f} kernel calls per step; timer cost "
                 f"{result['timer_cost_s'] * 1e9:.0f} ns per call subtracted. Share = 1 - in kernels / wall, "
                 "best = best kernels against best wall, spread over repeats (each repeat's own figures).")
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lib", help="an exported library (default: tune and export one into a temp dir)")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--trials-total", type=int, default=40)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=16, help="decode steps per generation")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantize", default="none", choices=["none", "q4"],
                        help="q4: the model's linear layers in int4 (a --lib tuned with tune-model --quantize q4)")
    parser.add_argument("--json", action="store_true", help="print every figure as JSON")
    parser.add_argument("--results", help="append a dated section to this markdown file (RESULTS.md)")
    parser.add_argument("--label", default="", help="a word for the section title (before, after)")
    args = parser.parse_args(argv)

    if args.quantize != "none" and not args.lib:
        parser.error("--quantize needs --lib: a library tuned with tune-model --quantize")
    with tempfile.TemporaryDirectory(prefix="decode-overhead-") as tmp:
        lib = Path(args.lib) if args.lib else build_library(args.model, args.trials_total, Path(tmp))
        result = measure(lib, args.model, args.prompt_tokens, args.steps, args.repeats, args.seed, args.quantize)
    result["cpu"] = cpu_model()
    text = table(result)
    print(json.dumps(result) if args.json else text)
    if args.results:
        command = "benchmarks/decode_overhead.py " + " ".join(argv if argv is not None else sys.argv[1:])
        title = f"## CPU: time outside kernels in a {args.model} decode step{' (' + args.label + ')' if args.label else ''}"
        section = (f"\n{title} ({datetime.date.today().isoformat()})\n\n"
                   f"`.venv/bin/python {command.strip()}` on {result['cpu']}, {os.cpu_count()} cores "
                   f"(shared).\n\n{text}\n")
        with open(args.results, "a") as f:
            f.write(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
