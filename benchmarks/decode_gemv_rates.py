"""The decode GEMVs' weight-read rates inside a model, per task: how fast each streams W
when the model calls it (every decode step of one generation, each call timed through its
ctypes function), against what the tuner measured alone.

    .venv/bin/python benchmarks/decode_gemv_rates.py LIB DTYPE [CONFIG]

LIB: an exported library of the model (``autotune export``); DTYPE: the model's precision
(float32 or bfloat16 on the CPU); CONFIG: its config.json (default: llama-100m). Prints, per GEMV
task called more than 30 times, the median call and the rate it read W at, and the share of
the generation spent in kernels.
"""
import sys, time, statistics
from collections import defaultdict
import numpy as np
import runtime
from runtime.llama import LlamaModel
from runtime.model_config import load_model_config
from autotune.bench.model_run import make_weights
lib, dtype = sys.argv[1], sys.argv[2]
config = load_model_config(sys.argv[3] if len(sys.argv) > 3 else "benchmarks/models/llama-100m/config.json")
weights = make_weights(config, None, 0, "none", 128)
library = runtime.load(lib)
model = LlamaModel(config, weights, library, dtype=dtype)
prompts = np.random.default_rng(0).integers(0, config.vocab_size, (1, 16))
model.generate(prompts, 33)  # warm-up: every kernel loaded and bound
sink = defaultdict(list)
for key, kernel in model.used.items():
    f = kernel.function
    def timed(*args, f=f, key=key):
        s = time.perf_counter(); f(*args); sink[key].append(time.perf_counter() - s)
    kernel.function = timed
t = time.perf_counter(); g = model.generate(prompts, 33); wall = time.perf_counter() - t
tot = 0
for key, ts in sorted(sink.items(), key=lambda kv: -sum(kv[1])):
    if key.startswith("gemv") and len(ts) > 30:
        d = dict(p.split("=") for p in key.split("/")[2].split(","))
        wb = int(d["N"]) * int(d["K"]) * (2 if "bfloat16" in key else 4)
        med = statistics.median(ts)
        print(f"{key:58s} calls {len(ts):4d} median {med*1e6:8.1f} us  {wb/med/1e9:5.1f} GB/s")
    tot += sum(ts)
print("in kernels share of the generation", round(tot / wall, 3))
library.close()
