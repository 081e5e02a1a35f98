"""The decode GEMVs' weight-read rates inside a model, per task: how fast each streams W
when the model calls it (every call of one generation timed through its ctypes function,
with ``decode_overhead.Instrument``), to set beside what the tuner measured alone.

    .venv/bin/python benchmarks/decode_gemv_rates.py LIB DTYPE [CONFIG]

LIB: an exported library of the model (``autotune export``); DTYPE: the model's precision
(float32 or bfloat16 on the CPU); CONFIG: its config.json (default: llama-100m). Prints, per GEMV
task called more than 30 times, the median call and the rate it read W at, and the share of
the generation spent in kernels.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

from decode_overhead import Instrument  # same directory

PROMPT_TOKENS, NEW_TOKENS = 16, 33


def main(lib: str, dtype: str, model: str = "benchmarks/models/llama-100m/config.json") -> None:
    import runtime
    from autotune.bench.model_run import make_weights
    from runtime.llama import LlamaModel
    from runtime.model_config import load_model_config
    from runtime.precision import ITEMSIZE

    config = load_model_config(model)
    library = runtime.load(lib)
    try:
        llama = LlamaModel(config, make_weights(config, None, 0, "none", 128), library, dtype=dtype)
        prompts = np.random.default_rng(0).integers(0, config.vocab_size, (1, PROMPT_TOKENS))
        llama.generate(prompts, NEW_TOKENS)  # warm-up: every kernel loaded and bound
        instruments = {key: Instrument([kernel]) for key, kernel in llama.used.items()}
        for instrument in instruments.values():
            instrument.on()
        start = time.perf_counter()
        llama.generate(prompts, NEW_TOKENS)  # bound in generate, so its calls are the timed ones
        wall = time.perf_counter() - start
        for instrument in instruments.values():
            instrument.off()
    finally:
        library.close()
    for key, instrument in sorted(instruments.items(), key=lambda kv: -sum(kv[1].spans)):
        spec = llama.used[key].spec
        if spec.op == "gemv" and len(instrument.spans) > 30:
            w_bytes = spec.dims["N"] * spec.dims["K"] * ITEMSIZE[spec.attr.get("weight", spec.dtype)]
            median = statistics.median(instrument.spans)
            print(f"{key:58s} calls {len(instrument.spans):4d} median {median * 1e6:8.1f} us  "
                  f"{w_bytes / median / 1e9:5.1f} GB/s")
    in_kernels = sum(sum(i.spans) for i in instruments.values())
    print(f"in kernels: {in_kernels / wall:.1%} of the generation")


if __name__ == "__main__":
    main(*sys.argv[1:])
