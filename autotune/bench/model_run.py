"""``autotune run``: generate with a model on tuned kernels, optionally beside the numpy
reference and the untuned template defaults, all in one run.

The numpy reference runs in its own worker process with OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE removed, so OpenBLAS uses its fastest kernel (which one ran is reported
through threadpoolctl), as ``autotune bench`` does for single operators. Weights are made
in each process from the same recipe (a seed or a folder), so nothing large crosses over.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np

from runtime.generation import Generation
from runtime.kernel import KernelProvider
from runtime.llama import LlamaModel
from runtime.model_config import ModelConfig
from runtime.sampling import Sampling
from runtime.weights import ModelWeights

from .cpu import FAST_BLAS_ENV


REPEATS = 3  # timed generations per side: other work on the machine only ever adds time


def fastest(generations: Iterable[Generation]) -> Generation:
    """The first generation's tokens and logits with the fastest prefill and decode times seen."""
    runs = list(generations)
    best = runs[0]
    best.prefill_s = min(g.prefill_s for g in runs)
    best.decode_s = min(g.decode_s for g in runs)
    return best


def make_weights(config: ModelConfig, weights_dir: str | None, seed: int, quantize: str,
                 group_size: int, check_finite: bool = False, mapped: bool = False) -> ModelWeights:
    """The checkpoint in ``weights_dir`` (``mapped``: its files mapped, ``ModelWeights.load``) or
    weights generated from ``seed``; int4 where ``quantize`` says so."""
    weights = (ModelWeights.load(config, weights_dir, check_finite, mapped) if weights_dir
               else ModelWeights.random(config, seed))
    return weights.quantize_q4(group_size) if quantize == "q4" else weights


def run_generation(kernels: KernelProvider, config: ModelConfig, weights: ModelWeights, prompts: np.ndarray,
                   new_tokens: int, prefill_sizes: list[int] | None = None,
                   repeats: int = REPEATS, dtype: str = "float32",
                   keep_logits: bool = True, sampling: Sampling | None = None,
                   stop_ids=()) -> tuple[Generation, dict[str, Any]]:
    """Load every kernel, warm up once, then the timed generations (the fastest prefill and
    decode of ``repeats``); also how many of the kernels it ran were tuned, the prompt length
    the prefill ran at, and how the decode steps ran (``decode_path``). ``keep_logits=False``:
    the tokens only (every step's logits of a long generation take memory). ``sampling`` and
    ``stop_ids``: as ``LlamaModel.generate`` takes them (every repeat draws the same tokens)."""
    model = LlamaModel(config, weights, kernels, prefill_sizes, dtype=dtype)
    batch, tokens = prompts.shape
    if prefill_sizes is None:
        # the padded length, found once as the defaults' side is given it: LlamaModel.prefill
        # looks it up on every pass, and searching the provider's tuned sizes there (~0.4 ms on
        # the tiny model, a fifth of its prefill) would be timed on the tuned side only
        model.prefill_sizes = [model.padded_tokens(batch, tokens)]
    model.prepare(batch, tokens, new_tokens)
    model.generate(prompts, min(new_tokens, 2))
    generation = fastest(model.generate(prompts, new_tokens, keep_logits=keep_logits, sampling=sampling,
                                        stop_ids=stop_ids) for _ in range(repeats))
    tuned = sum(1 for k in model.used.values() if k.tuned)
    return generation, {"tuned": tuned, "untuned": len(model.used) - tuned,
                        "prefill_padded_to": model.padded_tokens(batch, tokens), **decode_path(model)}


def decode_path(model: LlamaModel) -> dict[str, Any]:
    """How the last generation's decode steps ran: ``decode_mode`` (host: a call per kernel;
    graph: one captured CUDA graph per step; resident: its kernels issued one by one), with the
    step's kernels and the graph's programmatic edges, and the driver's words where it refused a
    capture or the edges."""
    path: dict[str, Any] = {"decode_mode": model.decode_mode}
    if model.decode_mode != "host":
        path["step_kernels"] = model.step_kernels
        path["programmatic_edges"] = model.programmatic_edges
        for name in ("capture_error", "programmatic_error"):
            if getattr(model, name):
                path[name] = getattr(model, name)
    return path


def reference_job(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: the numpy reference generation, with the BLAS it ran on."""
    from threadpoolctl import threadpool_info

    from runtime.reference import ReferenceModel

    config = ModelConfig.from_hf_dict(payload["config"], payload["name"])
    weights = make_weights(config, payload["weights_dir"], payload["seed"], payload["quantize"],
                           payload["group_size"]).rounded(payload.get("dtype", "float32"))
    model = ReferenceModel(config, weights)
    prompts = np.asarray(payload["prompts"])
    model.generate(prompts, min(payload["new_tokens"], 2))  # warm-up, as the tuned side gets
    sampling = Sampling(**payload["sampling"]) if payload.get("sampling") else None
    result = fastest(model.generate(prompts, payload["new_tokens"], sampling, payload.get("stop_ids", ()))
                     for _ in range(payload["repeats"]))
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    blas = {k: pools[0].get(k) for k in ("internal_api", "version", "architecture", "num_threads")} if pools else {}
    return {"tokens": result.tokens, "logits": result.logits, "prefill_s": result.prefill_s,
            "decode_s": result.decode_s, "prefill_tokens": result.prefill_tokens,
            "decode_tokens": result.decode_tokens, "blas": blas}


def run_reference(config: ModelConfig, weights_dir: str | None, seed: int, quantize: str, group_size: int,
                  prompts: np.ndarray, new_tokens: int, dtype: str = "float32", sampling: Sampling | None = None,
                  stop_ids=()) -> tuple[Generation, dict]:
    """The numpy reference in float32, from the weights a model in ``dtype`` holds (rounded to
    it), in a worker process with the fastest BLAS; tokens chosen and ended as the tuned side's."""
    from measure.worker import WorkerProcess

    payload = {"config": config.to_hf_dict(), "name": config.name, "weights_dir": weights_dir, "seed": seed,
               "quantize": quantize, "group_size": group_size, "prompts": prompts, "new_tokens": new_tokens,
               "dtype": dtype, "repeats": REPEATS, "stop_ids": list(stop_ids),
               "sampling": dataclasses.asdict(sampling) if sampling is not None else None}
    worker = WorkerProcess(env=FAST_BLAS_ENV, name="autotune-reference")
    try:
        out = worker.call("autotune.bench.model_run:reference_job", payload, 3600)
    finally:
        worker.close()
    generation = Generation(out["tokens"], out["logits"], out["prefill_s"], out["decode_s"], out["prefill_tokens"],
                            out["decode_tokens"])
    return generation, out["blas"]


def tuned_condition(lib: str | None = None, logs: Iterable[str] = ()) -> str | None:
    """The cache condition the kernels were timed in when tuned: "cold", "warm", "cold+warm"
    when they differ, None when nothing says. From a library, its manifest entries' ``measured``
    stats; from tuning logs, the best records' stats (``"cache"``, set by the CPU runner)."""
    conditions: set[str] = set()
    if lib:
        from runtime.library import read_manifest

        conditions = {(e.get("measured") or {}).get("cache") for e in read_manifest(lib).get("kernels", [])}
    elif logs:
        from records import best_records, load_records

        conditions = {r.result.stats.get("cache") for r in best_records(load_records(list(logs), warn=False)).values()}
    conditions.discard(None)
    return "+".join(sorted(conditions)) or None


def run_condition(config: ModelConfig, batch: int, tokens: int, capacity: int, quantize: str,
                  group_size: int, dtype: str = "float32", weights: str | None = None) -> tuple[str, int, int]:
    """(condition, bytes, cache bytes): the cache condition this CPU runs the model in, from the
    bytes its largest pass touches (prefill of ``tokens`` per sequence, decode against a cache
    of ``capacity`` positions) against the last-level cache, as ``tune-model --cache auto`` decides."""
    from measure.timing import cache_condition, last_level_cache_bytes
    from search_space import Target

    from ..model_tasks import pass_bytes

    target = Target.host()
    touched = max(pass_bytes(config, batch * tokens, batch, capacity, quantize, group_size, dtype, weights),
                  pass_bytes(config, batch, batch, capacity, quantize, group_size, dtype, weights))
    return cache_condition(touched, target), touched, last_level_cache_bytes(target)


def logit_difference(a: Generation, b: Generation) -> dict[str, float]:
    """Largest |a - b| over every step's logits (the steps both ran: one side may have ended
    sooner), absolute and relative to the largest |b|."""
    steps = min(a.logits.shape[1], b.logits.shape[1])
    a_logits, b_logits = a.logits[:, :steps], b.logits[:, :steps]
    diff = np.abs(a_logits.astype(np.float64) - b_logits.astype(np.float64))
    scale = float(np.abs(b_logits).max()) or 1.0
    # NaN logits (weights that hold NaN) give token 0 on both sides: equal tokens, no agreement
    finite = bool(np.isfinite(a_logits).all() and np.isfinite(b_logits).all())
    return {"max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale,
            "prefill_max_abs": float(diff[:, 0].max()),
            "decode_max_abs": float(diff[:, 1:].max()) if diff.shape[1] > 1 else 0.0,
            "finite": finite, "same_tokens": finite and bool(np.array_equal(a.tokens, b.tokens))}


@dataclass
class RunReport:
    model: str
    source: str
    quantize: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    tuned: Generation
    kernels: dict[str, Any] = field(default_factory=dict)   # tuned / untuned kernels used, decode_path()
    reference: Generation | None = None
    reference_blas: dict = field(default_factory=dict)
    defaults: Generation | None = None
    tuned_for: str | None = None   # the cache condition the kernels were timed in ("cold", "warm")
    dtype: str = "float32"         # the model's precision
    runs_in: tuple[str, int, int] | None = None  # run_condition(): condition, bytes per pass, cache bytes
    prompt_text: str | None = None  # run --prompt: the prompt as given
    texts: list[str] | None = None  # and each sequence's generated tokens as text, to its end of sequence
    ended_at: list[int | None] | None = None  # the index of that end-of-sequence token (None: none)
    sampling: Sampling | None = None  # None: greedy decoding
    stop_ids: tuple[int, ...] = ()    # the ids a sequence ended at (none: every new token generated)
    weights: str = ""                 # where the weights came from: a checkpoint folder, or "random (seed N)"

    def cache(self) -> dict[str, Any]:
        out: dict[str, Any] = {"tuned_for": self.tuned_for}
        if self.runs_in is not None:
            out.update(runs_in=self.runs_in[0], pass_bytes=self.runs_in[1], cache_bytes=self.runs_in[2])
        return out

    def cache_line(self) -> str:
        """Which cache condition the kernels were tuned for, and which this run is in."""
        tuned = (f"kernels tuned {self.tuned_for}" if self.tuned_for else
                 "the kernels do not say which cache condition they were tuned in")
        if self.runs_in is None:
            return f"  timing: {tuned}"
        condition, touched, cache = self.runs_in
        mib = 1 << 20
        fits = "more than" if condition == "cold" else "within"
        line = (f"  timing: {tuned}; this run is {condition} (a pass touches {touched / mib:.1f} MiB, {fits} the "
                f"{cache / mib:.0f} MiB last-level cache)")
        if self.tuned_for in ("cold", "warm") and self.tuned_for != condition:
            line += f": tune again (tune-model --cache {condition}) for this situation"
        return line

    def decode_lines(self) -> list[str]:
        """How a GPU decode step ran (nothing for the CPU's call per kernel)."""
        mode = self.kernels.get("decode_mode")
        if mode in (None, "host"):
            return []
        if mode == "graph":
            edges = self.kernels.get("programmatic_edges", 0)
            line = (f"  decode: one CUDA graph per token, {self.kernels.get('step_kernels', 0)} kernels, "
                    f"{edges} programmatic edges")
            refused = self.kernels.get("programmatic_error")
            return [line + (f" (the driver refused them: {refused})" if refused else "")]
        return [f"  decode: the step's kernels issued one by one (no CUDA graph: "
                f"{self.kernels.get('capture_error', 'not captured')})"]

    def choice_lines(self) -> list[str]:
        """How the tokens were chosen (nothing for greedy decoding) and where the generation ended."""
        lines = []
        if self.sampling is not None:
            s = self.sampling
            lines.append(f"  sampling: temperature {s.temperature:g}, top-k {s.top_k or 'off'}, "
                         f"top-p {s.top_p:g}, seed {s.seed}")
        generated = self.tuned.tokens.shape[1]
        if self.stop_ids and all(set(row.tolist()) & set(self.stop_ids) for row in self.tuned.tokens):
            lines.append(f"  ended: every sequence at an end-of-sequence id, after {generated} of {self.new_tokens} "
                         "new tokens")
        return lines

    def to_dict(self) -> dict[str, Any]:
        def speed(g: Generation) -> dict[str, float]:
            return {"prefill_tokens_per_s": g.prefill_tokens_per_s, "decode_tokens_per_s": g.decode_tokens_per_s,
                    "prefill_s": g.prefill_s, "decode_s": g.decode_s}

        out: dict[str, Any] = {"model": self.model, "source": self.source, "weights": self.weights,
                               "quantize": self.quantize, "dtype": self.dtype,
                               "batch": self.batch, "prompt_tokens": self.prompt_tokens,
                               "new_tokens": self.new_tokens, "generated_tokens": int(self.tuned.tokens.shape[1]),
                               "sampling": dataclasses.asdict(self.sampling) if self.sampling else None,
                               "stop_ids": list(self.stop_ids), "token_ids": self.tuned.tokens.tolist(),
                               "kernels": self.kernels, "cache": self.cache(), **speed(self.tuned)}
        for name, other in (("reference", self.reference), ("defaults", self.defaults)):
            if other is None:
                continue
            out[name] = {**speed(other), "logits": logit_difference(self.tuned, other)}
            out[f"decode_speedup_vs_{name}"] = _ratio(self.tuned.decode_tokens_per_s, other.decode_tokens_per_s)
            out[f"prefill_speedup_vs_{name}"] = _ratio(self.tuned.prefill_tokens_per_s, other.prefill_tokens_per_s)
        if self.reference is not None:
            out["reference"]["blas"] = self.reference_blas
        if self.texts is not None:
            out.update(prompt_text=self.prompt_text, texts=self.texts, ended_at=self.ended_at)
        return out

    def summary(self) -> str:
        padded = self.kernels.get("prefill_padded_to", self.prompt_tokens)
        lines = [f"{self.model} ({self.dtype}, quantize {self.quantize}) on {self.source}: batch {self.batch}, {self.prompt_tokens} prompt "
                 f"tokens" + (f" (prefill padded to {padded})" if padded != self.prompt_tokens else "")
                 + f", {self.new_tokens} new; kernels {self.kernels.get('tuned', 0)} tuned, "
                 f"{self.kernels.get('untuned', 0)} template defaults",
                 *([f"  weights: {self.weights}"] if self.weights else []),
                 self.cache_line(),
                 *self.decode_lines(),
                 *self.choice_lines(),
                 f"  tuned:     prefill {self.tuned.prefill_tokens_per_s:10.1f} tok/s   {_decode(self.tuned)}"]
        for name, other in (("numpy", self.reference), ("defaults", self.defaults)):
            if other is None:
                continue
            d = logit_difference(self.tuned, other)
            agreement = (f"largest logit difference {d['max_abs']:.2e} ({d['max_rel']:.1e} relative), "
                         f"{'same' if d['same_tokens'] else 'different'} tokens" if d["finite"] else
                         "logits not finite (NaN or infinite): no agreement to report (--check-weights finds NaN weights)")
            lines.append(f"  {name + ':':<10} prefill {other.prefill_tokens_per_s:10.1f} tok/s   {_decode(other)}   "
                         f"tuned is {_times(_ratio(self.tuned.prefill_tokens_per_s, other.prefill_tokens_per_s))} / "
                         f"{_times(_ratio(self.tuned.decode_tokens_per_s, other.decode_tokens_per_s))}; {agreement}")
        if self.reference_blas:
            lines.append(f"  numpy BLAS: {self.reference_blas.get('internal_api')} "
                         f"{self.reference_blas.get('architecture')}, {self.reference_blas.get('num_threads')} threads")
        lines.append(f"  tokens: {self.tuned.tokens.tolist()}")
        if self.texts is not None:  # quoted as JSON strings: a newline in the text stays on its line
            lines.append(f"  prompt: {json.dumps(self.prompt_text, ensure_ascii=False)}")
            ended = self.ended_at or [None] * len(self.texts)
            lines += [f"  text{f'[{i}]' if len(self.texts) > 1 else ''}: {json.dumps(text, ensure_ascii=False)}"
                      + ("" if at is None else f" (end of sequence at new token {at + 1} of {self.new_tokens})")
                      for i, (text, at) in enumerate(zip(self.texts, ended))]
        return "\n".join(lines)


def _decode(run: Generation) -> str:
    return f"decode {run.decode_tokens_per_s:8.1f} tok/s" if run.decode_tokens else "no decode step (1 new token)"


def _times(ratio: float) -> str:
    return f"{ratio:.2f}x" if math.isfinite(ratio) else "-"


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else float("nan")
