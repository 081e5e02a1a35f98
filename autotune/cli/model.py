"""Whole-model commands: ``autotune tune-model`` and ``autotune run``."""
from __future__ import annotations

import warnings
from pathlib import Path

import click
from click.core import ParameterSource

from runtime.model_config import PRESETS
from runtime.plan import PREFILL_DYNAMIC_ROWS
from runtime.precision import DTYPES

from ..units import format_time
from .common import (UserError, available_memory, check_fits_in_memory, check_tracking, echo_json, load_logs, make_job, open_log,
                     positive, refuse_other_targets, resolve_target, restriction, run_tuning, seed_option, stale_warnings_reported,
                     job_options, timing_options, timing_policy)
from .group import cli


def parse_sizes(text: str, option: str) -> tuple[int, ...]:
    """``128,512`` -> (128, 512): positive integers, no repeats."""
    items = [item.strip() for item in text.split(",")] if text else []
    if not items or any(not i.isdigit() or int(i) < 1 for i in items):
        raise UserError(f"malformed {option} {text!r}: expected positive integers like 128,512")
    sizes = tuple(int(i) for i in items)
    if len(set(sizes)) != len(sizes):
        raise UserError(f"{option} {text!r} names a size twice")
    return sizes


def load_config(model: str):
    from runtime.model_config import load_model_config

    try:
        return load_model_config(model)
    except ValueError as exc:
        raise UserError(str(exc)) from None


@cli.command("tune-model")
@click.option("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a config.json (or its folder)")
@click.option("--target", default="cpu", show_default=True, help="cpu or cuda")
@click.option("--prefill-tokens", default="128", show_default=True, help="prompt lengths to tune prefill at")
@click.option("--decode-batch", default="1", show_default=True, help="batch sizes to tune decode at")
@click.option("--kv-len", default="512", show_default=True, help="KV cache lengths to tune decode attention at")
@click.option("--quantize", default="none", show_default=True, type=click.Choice(["none", "q4"]),
              help="q4: int4 weight-only linear layers (symmetric, group-wise scales); an int4 checkpoint's "
                   "config (GPTQ, AWQ) makes it q4 with its group size and zero points")
@click.option("--group-size", default=128, show_default=True, type=click.Choice(["32", "64", "128"]),
              callback=lambda ctx, param, value: int(value), help="q4: weights per int4 scale along K")
@click.option("--trials-total", default=200, show_default=True, type=int, callback=positive,
              help="trials over all tasks, records already in the log included")
@click.option("--tuner", default="xgb", show_default=True,
              type=click.Choice(["xgb", "random", "grid", "optuna-tpe", "optuna-cmaes"]), help="xgb: a learned cost model (XGBoost) ranks the candidates; random, grid; Optuna's TPE and CMA-ES")
@click.option("--batch", default=8, show_default=True, type=int, callback=positive, help="trials per round")
@click.option("--seed", default=0, show_default=True, type=int, callback=seed_option, help="seed of the tuners and the inputs")
@click.option("--threads", default=None, type=int, callback=positive, help="cpu: only configs with this many threads")
@click.option("--log", "log_path", default="tune.jsonl", show_default=True, help="JSONL tuning log (resumed)")
@job_options(experiment="llm-autotune")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--list-tasks", is_flag=True, help="print the model's tasks and how often each runs, tune nothing")
@click.option("--cache", default="auto", show_default=True, type=click.Choice(["auto", "cold", "warm"]),
              help="cpu: time candidates with their inputs out of cache (cold) or in it (warm); auto: cold when "
                   "one forward pass touches more bytes than the last-level cache holds")
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(list(DTYPES)),
              help="the model's precision: weights, activations and KV cache (float32 accumulation); on the cpu "
                   "bfloat16 and float16 are weight-only (16-bit linear weights, float32 arithmetic); an int4 "
                   "checkpoint's (GPTQ, AWQ) default is float16")
@timing_options()
def tune_model(model, target, prefill_tokens, decode_batch, kv_len, quantize, group_size, trials_total, tuner, batch,
               seed, threads, log_path, tracking_uri, no_mlflow, experiment, build_timeout, run_timeout, quiet,
               as_json, list_tasks, cache, dtype, repeats, min_sample_ms) -> None:
    """Tune every kernel a model's prefill and decode passes need, over one trial budget."""
    from autotune.tune_model import ModelWorkload

    check_tracking(tracking_uri, no_mlflow)
    config = load_config(model)
    from measure.backends import get_backend

    if config.int4_format is not None and _left_out("quantize") and _left_out("group_size"):
        quantize, group_size = "q4", config.int4_group_size  # an int4 checkpoint's layers are int4

    kind = resolve_target(target, compile_only=True).kind
    if config.int4_format is not None and _left_out("dtype"):
        dtype = "float16"  # as GPTQ and AWQ write their scales and float tensors
    activations, weights = _precisions(config, dtype, kind, quantize)
    prefill_sizes, kv_sizes = parse_sizes(prefill_tokens, "--prefill-tokens"), parse_sizes(kv_len, "--kv-len")
    # a CUDA model's decode step runs as one captured graph: its kernels are the resident ones
    workload = ModelWorkload(config, prefill_sizes, parse_sizes(decode_batch, "--decode-batch"), kv_sizes,
                             quantize, group_size, activations, resident=get_backend(kind).resident_decode,
                             weights=weights if weights != activations else None,
                             dynamic_rows=PREFILL_DYNAMIC_ROWS[kind])
    try:
        tasks = workload.tasks()
    except ValueError as exc:
        raise UserError(str(exc)) from None
    _check_precision(tasks, kind, activations)
    if list_tasks:
        rows = [{"task": t.key, "op": t.task.op, "weight": t.weight, "calls_per_pass": t.uses} for t in tasks]
        if as_json:
            echo_json(rows)
            return
        for row in rows:
            uses = ", ".join(f"{n} x{c}" for n, c in row["calls_per_pass"].items())
            click.echo(f"x{row['weight']:<8g} {row['task']}  ({uses})")
        click.echo(f"{len(rows)} tasks of {config.name} ({config.parameters / 1e6:.1f}M parameters); weight = runs "
                   "per workload (each prefill once, 128 decode steps per batch size)")
        return
    tgt = resolve_target(target)
    if threads is not None and not tgt.uses_cpu_threads:
        raise UserError("--threads is for the cpu target")
    from autotune.job import model_timing

    timing = timing_policy(repeats, min_sample_ms, run_timeout, model_timing(tgt))
    from search_space import get_template

    for task in tasks:  # a task that cannot be allocated would be given up trial after trial
        check_fits_in_memory(task.task)
        if threads is not None:  # said now, naming --threads, not from inside the job
            restriction(get_template(task.task.op, tgt.kind), task.task, tgt, threads)
    job = make_job(target=tgt, model=workload, tuner=tuner, trials=trials_total, batch=batch, seed=seed,
                   log=open_log(log_path).path, restrict={"threads": [threads]} if threads is not None else None,
                   mlflow=not no_mlflow, tracking_uri=tracking_uri, experiment=experiment,
                   build_timeout=build_timeout, run_timeout=run_timeout, cache=cache, timing=timing)
    click.echo(f"{config.name}: {config.parameters / 1e6:.1f}M parameters, {len(tasks)} tasks "
               f"({', '.join(sorted({t.task.op for t in tasks}))}), {trials_total} trials in all", err=True)
    condition = job.cache_condition()
    if condition is not None:
        click.echo(cache_note(job), err=True)
    try:
        summary = run_tuning(job, progress=not quiet)
    except ValueError as exc:  # e.g. --threads not offered by a task's space
        raise UserError(str(exc)) from None
    rows = [{"task": t.key, "weight": t.weight, "trials": s.trials,
             "best_ms": s.best.seconds * 1e3 if s.best else None,
             "share": (t.weight * s.best.seconds / summary.estimated_latency_s) if s.best and
             summary.estimated_latency_s < float("inf") else None}
            for t, s in zip(summary.tasks, summary.summaries)]
    if as_json:
        echo_json({"model": config.name, "cache": condition, "working_set_bytes": workload.working_set_bytes(),
                   "tasks": rows, "trials": summary.trials, "measured": summary.measured,
                   "resumed": summary.resumed, "wall_s": summary.wall_s, "compile_share": summary.compile_share,
                   "estimated_latency_ms": summary.estimated_latency_s * 1e3, "given_up": summary.given_up,
                   "log": job.log})
        return
    # share: of the estimated workload time (each kernel's best time x its calls per workload)
    click.echo(f"{'share':>6}  {'trials':>11}  {'best':>14}  {'calls':<6} task")
    for row in sorted(rows, key=lambda r: -(r["share"] or 0)):
        best = format_time(row["best_ms"] / 1e3) if row["best_ms"] is not None else "no verified kernel"
        share = f"{row['share'] * 100:5.1f}%" if row["share"] is not None else "    -"
        click.echo(f"{share}  {row['trials']:4d} trials  {best:>14}  x{row['weight']:g}  {row['task']}")
    click.echo(f"{summary.trials} trials ({summary.resumed} resumed, {summary.measured} measured now) in "
               f"{summary.wall_s:.1f} s, compile share {summary.compile_share * 100:.0f}%; estimated "
               f"{format_time(summary.estimated_latency_s)} per workload")
    if summary.given_up:
        click.echo(f"given up (nothing verified): {', '.join(summary.given_up)}")
    if condition is not None:
        click.echo(f"timed {condition}: {CACHE_WORDS[condition]}")
    click.echo(f"log: {job.log}")


CACHE_WORDS = {"cold": "weights cycled through copies filling one pass of the model, at least the last-level "
                       "cache",
               "warm": "weights cycled through copies filling what one pass touches, found in the cache that "
                       "holds the model"}


def cache_note(job) -> str:
    """One line: the cache condition ``job`` times candidates in, and why."""
    from measure.timing import last_level_cache_bytes

    condition, target = job.cache_condition(), job.target
    if job.cache != "auto":
        return f"timing candidates {condition} ({CACHE_WORDS[condition]}): as --cache says"
    mib = 1 << 20
    llc, reported = last_level_cache_bytes(target), target.l3_bytes
    size = f"{llc / mib:.0f} MiB" + (f" (L3 reported as {reported / mib:.0f} MiB, counted at most that)"
                                     if reported and reported > llc else "")
    working = job.model.working_set_bytes()
    fits = "more than" if condition == "cold" else "within"
    return (f"timing candidates {condition} ({CACHE_WORDS[condition]}): one forward pass touches "
            f"{working / mib:.1f} MiB, {fits} the last-level cache of {size}")


def _prompt_ids(prompt_ids: str | None, vocab: int) -> list[int] | None:
    """``--prompt-ids`` as token ids, checked against the vocabulary (None when not given)."""
    if prompt_ids is None:
        return None
    try:
        ids = [int(i) for i in prompt_ids.split(",")]
    except ValueError:
        raise UserError(f"malformed --prompt-ids {prompt_ids!r}: expected integers like 1,2,3") from None
    if min(ids) < 0 or max(ids) >= vocab:
        raise UserError(f"--prompt-ids must lie in 0..{vocab - 1}")
    return ids


def _text_prompt(text: str, prompt_ids: str | None, tokenizer_path: str | None, weights_dir: str | None, model: str,
                 vocab: int, chat: bool = False, system: str | None = None):
    """(the tokenizer, ``--prompt``'s token ids, the text encoded) from the checkpoint's
    tokenizer.json; ``chat``: the prompt laid out by its chat template first (after ``system``)."""
    from autotune.prompt_text import chat_prompt, encode, find_tokenizer, load_tokenizer

    if prompt_ids is not None:
        raise UserError("give --prompt or --prompt-ids, not both")
    try:
        path = find_tokenizer(tokenizer_path, weights_dir, model)
        tokenizer = load_tokenizer(path)
        if chat:
            text = chat_prompt(path, text, system)
        return tokenizer, encode(tokenizer, text, vocab, path, special=not chat), text
    except ValueError as exc:
        raise UserError(str(exc)) from None


def _prompts(ids: list[int] | None, prompt_tokens: int, batch: int, vocab: int, seed: int):
    """The batch of prompts: ``ids`` in every row, or ``prompt_tokens`` random ids a row."""
    import numpy as np

    if ids is not None:
        return np.tile(np.asarray(ids, dtype=np.int64), (batch, 1))
    return np.random.default_rng(seed).integers(0, vocab, (batch, prompt_tokens))


def _kernels(lib: str | None, logs: tuple[str, ...], target: str, allow_stale: bool = False):
    """The kernel provider: an exported library, or tuning logs (compiled on first use)."""
    if bool(lib) == bool(logs):
        raise UserError("give either --lib DIR (an exported library) or --log LOG (tuning logs)")
    from export import TunedKernels

    if lib:
        import runtime

        if not Path(lib, "manifest.json").is_file():
            raise UserError(f"--lib {lib}: no manifest.json there (make one with `autotune export`)")
        from runtime.library import read_manifest

        try:
            # shapes a CPU library lacks run template defaults, compiled here
            cpu = read_manifest(lib).get("target", {}).get("kind") == "cpu"
            return runtime.load(lib, fallback=TunedKernels.defaults() if cpu else None)
        except (OSError, ValueError, AttributeError) as exc:
            raise UserError(f"--lib {lib}: {exc}") from None
    records, tgt = load_logs(logs), resolve_target(target)
    refuse_other_targets(records, tgt, target, "--log")
    with stale_warnings_reported(logs, allow_stale):  # records of code the templates no longer render
        return TunedKernels(records, tgt, allow_stale=allow_stale)


def _precisions(config, dtype: str, kind: str, quantize: str, chosen_by: str = "") -> tuple[str, str]:
    """(the kernels' precision, the linear layers' weights) of ``config`` in ``dtype`` on ``kind``
    (``runtime.plan.precisions``: bfloat16 and float16 on the CPU are weight-only), or a one-line
    refusal; ``chosen_by`` says where a dtype the user did not give came from."""
    from runtime.plan import precisions

    if config.moe and kind != "cpu":  # runtime.llama: the router picks each token's experts on the host
        raise UserError(f"{config.name} is a mixture of experts, which runs on CPU kernels only: use --target cpu")
    try:
        return precisions(dtype, kind, quantize, float_head=config.int4_format is not None)
    except ValueError as exc:
        raise UserError(f"--dtype {dtype}{chosen_by}: {exc}") from None


def _check_precision(tasks, kind: str, dtype: str) -> None:
    """Refuse a precision the target's templates do not offer for every task, in one line."""
    from search_space.registry import get_template

    missing = sorted({t.task.op for t in tasks if dtype not in get_template(t.task.op, kind).dtypes})
    if missing:
        raise UserError(f"--dtype {dtype}: the {kind} templates of {', '.join(missing)} offer no {dtype}; "
                        "use --dtype float32 or another target")


def _check_model_fits(config, weights_dtype: str, quantize: str, cache_dtype: str, batch: int, positions: int,
                      logit_steps: int, weights_dir: str | None = None, compare: bool = False) -> None:
    """Refuse a run whose weights, KV cache (``positions`` per sequence) and kept logits exceed
    the memory this machine has available (a config.json with a million layers, or a billion
    new tokens, would otherwise end in MemoryError, the OOM killer or hours of decoding), or
    whose sequence is longer than any kernel dim may be or than the model is computed for (past
    longrope's original context). A q4 run holds the weights it quantises
    (as the checkpoint stores them; generated ones in float32) beside the int4 codes, and with
    ``compare`` the float32 weights the codes stand for, which the reference computes with."""
    from runtime.abi import numpy_dtype
    from runtime.library import MAX_DIM

    if positions > MAX_DIM:
        raise UserError(f"{config.name}: {positions} positions (prompt + new tokens) is more than the kernels take "
                        f"({MAX_DIM})")
    if quantize == "q4":  # an int4 checkpoint stores the codes themselves
        source = 0 if config.int4_format is not None else _stored_itemsize(weights_dir)
        per_weight = 0.5 + source + (4 if compare else 0)
    else:
        per_weight = numpy_dtype(weights_dtype).itemsize
    weights = config.parameters * per_weight
    cache = 2 * config.num_hidden_layers * batch * positions * config.kv_size * numpy_dtype(cache_dtype).itemsize
    logits = batch * logit_steps * config.vocab_size * 4
    have = available_memory()
    if have and weights + cache + logits > have:
        held = weights_dtype
        if quantize == "q4":
            held = "int4 codes beside the weights they are quantised from"
            held += " and those the codes stand for" if compare else ""
        parts = [f"its {config.parameters / 1e9:.1f}B weights take about {weights / 2**30:.1f} GiB as {held}"]
        if cache > weights / 100:
            parts.append(f"the KV cache of {batch} x {positions} positions {cache / 2**30:.1f} GiB")
        if logits > weights / 100:
            parts.append(f"the logits of {logit_steps} steps {logits / 2**30:.1f} GiB")
        raise UserError(f"{config.name}: {', '.join(parts)}; this machine has {have / 2**30:.1f} GiB available")


def _checkpoint_beside(model: str) -> str | None:
    """The folder of ``--model`` (a config.json or its folder) where it holds safetensors files: a
    downloaded checkpoint, whose weights a run takes unless told otherwise; None for a preset or a
    config alone."""
    from runtime.model_config import PRESETS

    path = Path(model)
    if model in PRESETS or not path.exists():
        return None
    folder = path if path.is_dir() else path.parent
    return str(folder) if any(folder.glob("*.safetensors")) else None


def _stored_itemsize(weights_dir: str | None) -> int:
    """Bytes per weight as the checkpoint in ``weights_dir`` stores them (its widest float type;
    4 for generated weights, which are float32, and where the headers cannot be read: the load
    says why)."""
    from runtime.weights import checkpoint_files, read_header

    if weights_dir is None:
        return 4
    try:
        dtypes = {info["dtype"] for path in checkpoint_files(weights_dir)
                  for name, info in read_header(path)[0].items() if name != "__metadata__"}
    except (ValueError, OSError, KeyError, TypeError):
        return 4
    return 2 if dtypes and dtypes <= {"BF16", "F16"} else 4


def _dtype_of(kernels, dtype: str) -> str:
    """``auto``: the precision of the provider's float linear-layer kernels, that of their weights
    when weight-only, else of its int4 ones (float32 when it has several). The float ones speak
    first: on the CPU an int4 checkpoint's LM head is float16 weight-only beside float32 int4 layers."""
    if dtype != "auto":
        return dtype
    specs = kernels.specs()
    for ops in (("gemv", "gemm"), ("gemv_q4", "gemm_q4")):
        found = {spec.dtype if spec.attr.get("weight", "same") == "same" else spec.attr["weight"]
                 for spec in specs if spec.op in ops}
        if found:
            return found.pop() if len(found) == 1 else "float32"
    return "float32"


def _sampling(temperature: float, top_k: int, top_p: float, seed: int):
    """``--temperature`` and its cuts as a ``Sampling``, None for greedy decoding."""
    from runtime.sampling import Sampling

    if temperature == 0:
        cuts = [name for name in ("top_k", "top_p") if not _left_out(name)]
        if cuts:
            raise UserError(f"--{cuts[0].replace('_', '-')} is for sampling: give --temperature above 0 too")
        return None
    try:
        return Sampling(temperature, top_k, top_p, seed)
    except ValueError as exc:
        raise UserError("--" + str(exc).replace("_", "-", 1)) from None


def _stop_ids(weights_dir: str | None, model: str, vocab: int) -> tuple[int, ...]:
    """The checkpoint's end-of-sequence ids that the model can generate (an id past its vocabulary
    ends nothing)."""
    from autotune.prompt_text import checkpoint_folders, end_of_sequence_ids

    return tuple(i for i in end_of_sequence_ids(checkpoint_folders(weights_dir, model)) if 0 <= i < vocab)


def _left_out(option: str) -> bool:
    """Whether the command's ``option`` took its default (not given on the command line)."""
    return click.get_current_context().get_parameter_source(option) is ParameterSource.DEFAULT


def _group_size_of(kernels, group_size: str) -> int:
    """``auto``: the int4 group of the provider's q4 linear layers (128, the default, when they
    have several or none); a q4 model at another group than its kernels' runs on none of them."""
    if group_size != "auto":
        return int(group_size)
    found = {int(spec.attr.get("group_size", 128)) for spec in kernels.specs() if spec.op in ("gemv_q4", "gemm_q4")}
    return found.pop() if len(found) == 1 else 128


def _quantize_of(kernels, quantize: str) -> str:
    if quantize != "auto":
        return quantize
    ops = {spec.op for spec in kernels.specs()}
    return "q4" if ops & {"gemv_q4", "gemm_q4"} and not ops & {"gemv", "gemm"} else "none"


@cli.command("run")
@click.option("--lib", default=None, help="an exported library directory (autotune export)")
@click.option("--log", "logs", multiple=True, help="or tuning logs: kernels compiled on first use (repeatable)")
@click.option("--model", required=True, help=f"a preset ({', '.join(PRESETS)}) or a config.json (or its folder)")
@click.option("--weights", "weights_dir", default=None, help="folder of safetensors files (HF Llama names)")
@click.option("--seed", default=0, show_default=True, type=int, callback=seed_option,
              help="seed of generated weights, prompt and sampling")
@click.option("--prompt-tokens", default=64, show_default=True, type=int, callback=positive,
              help="length of a random prompt (which generates every --new-tokens: a benchmark)")
@click.option("--prompt-ids", default=None, help="the prompt's token ids, e.g. 1,2,3")
@click.option("--prompt", "prompt_text", default=None,
              help="or the prompt as text, encoded by the checkpoint's tokenizer.json; the generated text is printed")
@click.option("--tokenizer", "tokenizer_path", default=None,
              help="with --prompt: the tokenizer.json (or its folder); default: the one in --weights or beside --model")
@click.option("--chat", is_flag=True,
              help="with --prompt: send it as a user message through the checkpoint's chat template (an instruct "
                   "model's: chat_template.jinja or tokenizer_config.json beside its tokenizer.json)")
@click.option("--system", "system_text", default=None, help="with --chat: a system message before the prompt")
@click.option("--batch", default=1, show_default=True, type=int, callback=positive, help="sequences at once")
@click.option("--new-tokens", default=32, show_default=True, type=int, callback=positive,
              help="tokens generated per sequence, at most: a sequence of --prompt or --prompt-ids ends at the "
                   "checkpoint's end-of-sequence ids (generation_config.json, config.json)")
@click.option("--ignore-eos", is_flag=True, help="generate every --new-tokens, past an end-of-sequence id")
@click.option("--temperature", default=0.0, show_default=True, type=float,
              help="0: greedy decoding (the most likely token); above 0: sample from the logits / temperature")
@click.option("--top-k", default=0, show_default=True, type=int, help="with --temperature: sample among the k most "
                                                                        "likely tokens (0: all)")
@click.option("--top-p", default=1.0, show_default=True, type=float,
              help="with --temperature: sample among the most likely tokens that hold this share of the "
                   "probability (1: all)")
@click.option("--quantize", default="auto", show_default=True, type=click.Choice(["auto", "none", "q4"]),
              help="auto: q4 when the kernels are the int4 ones, or the model is an int4 checkpoint (GPTQ, AWQ)")
@click.option("--group-size", default="auto", show_default=True, type=click.Choice(["auto", "32", "64", "128"]),
              help="q4: weights per scale; auto: an int4 checkpoint's, else that of the kernels' int4 layers (128 "
                   "where they say none)")
@click.option("--compare", is_flag=True, help="also run the numpy reference and the untuned template defaults")
@click.option("--target", default="cpu", show_default=True, help="with --log: the target the records are for")
@click.option("--json", "as_json", is_flag=True, help="one JSON object with the token ids and every figure")
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", *DTYPES]),
              help="the model's precision; auto: that of the kernels' linear layers")
@click.option("--allow-stale", is_flag=True,
              help="with --log: use records of code the templates no longer render, with a warning")
@click.option("--check-weights", is_flag=True,
              help="with --weights: refuse a checkpoint whose tensors hold NaN or infinite values (one pass over them)")
@click.option("--random-weights", is_flag=True,
              help="generate the weights from --seed even where --model's folder holds a checkpoint (by default "
                   "its safetensors files are the weights, as if given to --weights)")
@click.option("--mmap", "mapped", is_flag=True,
              help="with --weights: map the checkpoint's files into memory rather than read them (no copy; the "
                   "pages the kernels read come in as they are used: a mixture of experts' unpicked experts stay on "
                   "disk); the files must not change during the run")
def run(lib, logs, model, weights_dir, seed, prompt_tokens, prompt_ids, prompt_text, tokenizer_path, chat, system_text,
        batch, new_tokens, ignore_eos, temperature, top_k, top_p, quantize, group_size, compare, target, as_json, dtype,
        allow_stale, check_weights, random_weights, mapped) -> None:
    """Generate with a model on tuned kernels; print prefill and decode tokens/s."""
    from runtime.generation import check_positions
    from runtime.kernel import UntunedShapeWarning
    from runtime.plan import check_quantize

    from autotune.bench.model_run import (RunReport, make_weights, run_condition, run_generation, run_reference,
                                          tuned_condition)

    config = load_config(model)
    if weights_dir and not Path(weights_dir).is_dir():
        raise UserError(f"--weights {weights_dir} is not a directory")
    if random_weights and weights_dir:
        raise UserError("--random-weights and --weights: give one (generated weights, or a checkpoint's)")
    if weights_dir is None and not random_weights:  # a checkpoint's folder given as --model is its weights too
        weights_dir = _checkpoint_beside(model)
    if check_weights and not weights_dir:
        raise UserError("--check-weights is for a checkpoint's weights (--weights, or a --model folder holding one): "
                        "generated weights are finite")
    if mapped and not weights_dir:
        raise UserError("--mmap is for a checkpoint's weights (--weights, or a --model folder holding one): generated "
                        "weights are in memory already")
    tokenizer = encoded = None
    if system_text is not None and not chat:
        raise UserError("--system is for --chat")
    if prompt_text is not None:
        tokenizer, ids, encoded = _text_prompt(prompt_text, prompt_ids, tokenizer_path, weights_dir, model,
                                               config.vocab_size, chat, system_text)
    elif tokenizer_path is not None or chat:
        raise UserError(f"{'--tokenizer' if tokenizer_path is not None else '--chat'} is for --prompt")
    else:
        ids = _prompt_ids(prompt_ids, config.vocab_size)
    length = len(ids) if ids is not None else prompt_tokens
    try:  # before any kernel is built where the target is sure not to scale queries (CUDA)
        check_positions(config, length + new_tokens - 1, scales_queries=target != "cuda")
    except ValueError as exc:
        raise UserError(str(exc)) from None
    sampling = _sampling(temperature, top_k, top_p, seed)
    # a given prompt's text and generation end at the checkpoint's end-of-sequence ids (--ignore-eos: the text only)
    end_ids = () if ids is None else _stop_ids(weights_dir, model, config.vocab_size)
    stop_ids = () if ignore_eos else end_ids
    # a library runs on the target it was exported for: a --target that names another is a mistake
    named = click.get_current_context().get_parameter_source("target") is not ParameterSource.DEFAULT
    named_kind = resolve_target(target, compile_only=True).kind if lib and named else None
    kernels = _kernels(lib, logs, target, allow_stale)
    if named_kind not in (None, getattr(kernels, "kind", "cpu")):
        kernels.close()
        raise UserError(f"--target {target}: the library {lib} is for the {kernels.kind} target it was exported for "
                        "(--target is for --log)")
    try:
        if getattr(kernels, "kind", "cpu") == "cuda":
            resolve_target("cuda")  # a GPU to run them on, said in one line before any weights are made
        check_positions(config, length + new_tokens - 1, scales_queries=getattr(kernels, "kind", "cpu") == "cpu")
        if config.int4_format is not None:  # an int4 checkpoint's layers are int4, its LM head not
            quantize = "q4" if quantize == "auto" else quantize
            group_size = str(config.int4_group_size) if group_size == "auto" else group_size
        quantize = _quantize_of(kernels, quantize)
        group_size = _group_size_of(kernels, group_size)
        chosen_by = " (--dtype auto: the kernels' linear layers)" if dtype == "auto" else ""
        dtype = _dtype_of(kernels, dtype)
        activations, weights_dtype = _precisions(config, dtype, getattr(kernels, "kind", "cpu"), quantize, chosen_by)
        # the cache in the activations' precision; the logits kept only where --compare compares them
        _check_model_fits(config, weights_dtype, quantize, activations, batch, length + new_tokens,
                          new_tokens if compare else 0, weights_dir, compare)
        prompts = _prompts(ids, prompt_tokens, batch, config.vocab_size, seed)  # made once they fit
        try:
            check_quantize(config, quantize, group_size)
            weights = make_weights(config, weights_dir, seed, quantize, group_size, check_weights, mapped)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        untuned: list[str] = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UntunedShapeWarning)
            tuned, counts = run_generation(kernels, config, weights, prompts, new_tokens, dtype=dtype,
                                           keep_logits=compare, sampling=sampling, stop_ids=stop_ids)
        for w in caught:
            if issubclass(w.category, UntunedShapeWarning):
                untuned.append(str(w.message))
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        for message in untuned:
            click.echo(f"autotune: warning: {message}", err=True)
    finally:
        kernels.close()
    report = RunReport(config.name, lib or ",".join(logs), quantize, batch, prompts.shape[1], new_tokens, tuned,
                       counts, dtype=dtype, sampling=sampling, stop_ids=stop_ids,
                       weights=weights_dir if weights_dir else f"random (seed {seed})")
    if tokenizer is not None:
        from autotune.prompt_text import decode, until_end

        ended = [until_end(row, end_ids) for row in tuned.tokens]
        report.prompt_text = encoded  # with --chat, as the template laid it out
        report.texts = [decode(tokenizer, ids) for ids, _ in ended]
        report.ended_at = [at for _, at in ended]
    try:
        report.tuned_for = tuned_condition(lib, logs)
    except (OSError, ValueError):
        report.tuned_for = None
    if getattr(kernels, "kind", "cpu") == "cpu":
        padded = counts["prefill_padded_to"]
        report.runs_in = run_condition(config, batch, padded, padded + new_tokens, quantize, group_size,
                                       activations, weights_dtype)
    if compare:
        from export import TunedKernels

        report.reference, report.reference_blas = run_reference(config, weights_dir, seed, quantize, group_size,
                                                                prompts, new_tokens, dtype, sampling, stop_ids)
        # the defaults run where the tuned kernels do: compiled for this CPU, or for the GPU
        defaults_target = resolve_target("cuda") if getattr(kernels, "kind", "cpu") == "cuda" else None
        with TunedKernels.defaults(defaults_target) as defaults:
            # at the prompt length the tuned prefill ran at, so both sides compute the same shapes
            report.defaults, _ = run_generation(defaults, config, weights, prompts, new_tokens,
                                                prefill_sizes=[counts["prefill_padded_to"]], dtype=dtype,
                                                sampling=sampling, stop_ids=stop_ids)
    if as_json:
        echo_json(report.to_dict())
    else:
        click.echo(report.summary())
