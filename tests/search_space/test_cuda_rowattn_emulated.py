"""The generated CUDA C of the row-wise and attention templates, run on the CPU through the
emulator in tests/cudaemu.py and compared with the float64 references.

This is where indexing, tails, barriers, warp collectives and the mma/ldmatrix fragment
layouts of the attention kernels are checked on a machine without a GPU: every dtype,
awkward shapes, runtime sizes other than the tuned ones, poisoned outputs. Speed and the
real hardware's behaviour are the GPU tests' business (test_cuda_rowattn_gpu.py).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import cudaemu
from measure.verify import check_output
from search_space import KernelSource, Target, Task, get_template
from search_space.ops.common import from_float, to_float64

SM90 = Target.from_name("sm_90a")
pytestmark = pytest.mark.tools("emulator")
DTYPES = ("float32", "float16", "bfloat16")

# (op, tuned shape, attrs, dynamic dims (None: the operator's), runtime overrides, config overrides)
CASES = [
    ("softmax", {"M": 8, "N": 1000}, {}, None, [{"M": 3}], [{}, dict(mapping="block", threads=64, cache="reread", unroll=4)]),
    ("softmax", {"M": 4, "N": 1}, {}, (), [{}], [{}]),
    ("rmsnorm", {"M": 8, "N": 24}, {"residual": True}, None, [{"M": 9}],
     [{}, dict(mapping="warp", threads=64, cache="reread", vec=1, unroll=1)]),
    ("rmsnorm", {"M": 8, "N": 1000}, {}, None, [{"M": 2}], [dict(mapping="block", threads=128, cache="smem", unroll=2)]),
    ("layernorm", {"M": 8, "N": 1000}, {}, None, [{"M": 3}],
     [{}, dict(mapping="block", threads=64, cache="reread", unroll=2, stream=1)]),
    ("add", {"M": 8, "N": 1001}, {}, None, [{"M": 3}], [{}, dict(grid="persistent", vec=2)]),
    ("swiglu", {"M": 8, "N": 7}, {}, None, [{"M": 5}], [{}]),
    ("geglu", {"M": 8, "N": 7}, {}, None, [{"M": 5}], [{}]),
    # the bias is read at each element's column: rows other than the tuned count, a long odd row
    ("bias_add", {"M": 8, "N": 1000}, {}, None, [{"M": 3}], [{}, dict(grid="persistent", vec=2, unroll=4)]),
    ("bias_add", {"M": 4, "N": 7}, {}, None, [{"M": 5}], [{}]),
    ("gelu", {"M": 8, "N": 1001}, {}, None, [{"M": 1}], [dict(unroll=4, vec=1)]),
    # columns in a random order: fewer rows than tuned (the last block of rows part full), a row
    # in chunks, unrolled vectors past a chunk's end; a row of 7 (vectors of one), M compiled in
    ("gather_columns", {"M": 4, "N": 1000}, {}, None, [{"M": 3}],
     [{}, dict(threads=64, vec=2, rows=2, split=4, unroll=2), dict(threads=64, vec=4, rows=4, split=1, unroll=4)]),
    ("gather_columns", {"M": 2, "N": 7}, {}, (), [{}], [{}]),
    # Qwen3's q/k norm: query heads by GQ, key heads by GK, value heads copied; fewer tokens than
    # tuned (10 heads a token: blocks of rows straddle tokens); a warp per head (the default), a
    # block per head from shared memory, re-read rows
    ("qk_norm", {"T": 4, "H": 6, "HKV": 2, "D": 128}, {}, None, [{"T": 3}, {"T": 1}],
     [{}, dict(mapping="block", threads=64, vec=1, cache="smem", unroll=2, stream=1),
      dict(mapping="warp", threads=64, vec=1, cache="reread", unroll=4)]),
    ("qk_norm", {"T": 3, "H": 2, "HKV": 1, "D": 64}, {"eps": 1e-5}, (), [{}], [{}]),   # T compiled in
    # OLMo 2's: each token's whole q (H D) and k (HKV D) one RMS row, GQA, D of no wider vector
    # than 2, runtime T; then 512 query elements over 128, 256 and 512 threads, T compiled in
    ("qk_norm", {"T": 4, "H": 6, "HKV": 2, "D": 38}, {"span": "projection"}, None, [{"T": 3}, {"T": 1}],
     [{}, dict(vec=1)]),
    ("qk_norm", {"T": 3, "H": 8, "HKV": 2, "D": 64}, {"span": "projection", "eps": 1e-5}, (), [{}],
     [{}, dict(threads=256, vec=2), dict(threads=512, vec=1)]),
    ("rope", {"T": 8, "H": 3, "D": 80}, {"theta": 500000.0}, None, [{"T": 19}], [{}, dict(trig="registers", tokens=4)]),
    ("rope", {"T": 2, "H": 1, "D": 2}, {}, (), [{}], [{}]),
    ("rope", {"T": 8, "H": 2, "D": 24}, {"theta": 10000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
     None, [{"T": 5}], [{}, dict(trig="registers")]),
    ("rope", {"T": 4, "H": 2, "D": 16}, {"theta": 500000.0, "rope_type": "linear", "factor": 4.0}, None, [{}], [{}]),
    ("rope", {"T": 8, "H": 2, "D": 24}, {"theta": 10000.0, "rope_type": "yarn", "factor": 8.0,
                                        "original_max_position_embeddings": 2048, "beta_fast": 32.0, "beta_slow": 1.0,
                                        "truncate": False, "attention_factor": 1.2079441541679836},
     None, [{"T": 5}], [{}, dict(trig="registers", tokens=4)]),
    # partial rotary (Phi-4-mini's 0.75): pairs (i, i + 12) of the first 24 dims turn, 24 .. 31
    # pass through; a longrope one with rotary_dim / 2 factors, 2 of 40 dims (vectors of 1)
    ("rope", {"T": 8, "H": 3, "D": 32}, {"theta": 10000.0, "rotary_dim": 24}, None, [{"T": 5}],
     [{}, dict(trig="registers", tokens=4, vec=2)]),
    ("rope", {"T": 4, "H": 2, "D": 40}, {"theta": 10000.0, "rotary_dim": 2, "rope_type": "longrope",
                                        "short_factor": (1.5,), "attention_factor": 1.19}, None, [{}], [{}]),
    ("attention_decode", {"B": 1, "H": 4, "HKV": 4, "D": 64, "S": 96, "L": 96}, {}, None,
     [{"L": 1}, {"S": 130, "L": 129}], [{}, dict(splits=1, warps=2), dict(lanes=32, vec=1, unroll=4, splits=4)]),
    ("attention_decode", {"B": 2, "H": 6, "HKV": 1, "D": 80, "S": 40, "L": 33}, {"scale": 0.3}, (), [{}], [{}]),
    # ragged lengths from device memory (a CUDA graph's attention): sequence b attends to L - b positions
    ("attention_decode", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, {"lengths": "per_sequence"}, None,
     [{}, {"L": 2}], [{}, dict(splits=2, warps=2, unroll=1)]),
    # sliding windows: the splits cut the window's rows (L - 70 .. L - 1), a window past L (L = 1,
    # 50), ragged lengths whose windows start at different rows, a window of one row
    ("attention_decode", {"B": 1, "H": 4, "HKV": 4, "D": 64, "S": 96, "L": 96}, {"window": 70}, None,
     [{}, {"L": 1}, {"L": 50}, {"S": 130, "L": 129}],
     [{}, dict(splits=1, warps=2), dict(lanes=32, vec=1, unroll=4, splits=4)]),
    ("attention_decode", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40},
     {"lengths": "per_sequence", "window": 37}, None, [{}, {"L": 2}], [{}, dict(splits=2, warps=2, unroll=1)]),
    ("attention_decode", {"B": 2, "H": 4, "HKV": 1, "D": 32, "S": 24, "L": 20}, {"window": 1}, (), [{}], [{}]),
    # soft-capping (Gemma 2's): small caps, so that most scores are capped; L from 1 to past the
    # tuned S, ragged lengths with a window, a cap with a scale, one split and many
    ("attention_decode", {"B": 1, "H": 4, "HKV": 4, "D": 64, "S": 96, "L": 96}, {"softcap": 2.0}, None,
     [{}, {"L": 1}, {"S": 130, "L": 129}], [{}, dict(splits=1, warps=2), dict(lanes=32, vec=1, unroll=4, splits=4)]),
    ("attention_decode", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40},
     {"lengths": "per_sequence", "window": 37, "softcap": 1.5}, None, [{}, {"L": 2}],
     [{}, dict(splits=2, warps=2, unroll=1)]),
    ("attention_decode", {"B": 2, "H": 6, "HKV": 1, "D": 80, "S": 40, "L": 33}, {"scale": 0.5, "softcap": 3.0}, (),
     [{}], [{}]),
    # the captured step's: the same, launched programmatically (its wait and trigger are no-ops here)
    ("attention_decode", {"B": 2, "H": 4, "HKV": 2, "D": 32, "S": 24, "L": 20},
     {"lengths": "per_sequence", "programmatic": True}, None, [{}], [dict(splits=2, warps=2, unroll=1)]),
    # the resident decode step's own kernels: rows at positions read from memory, greedy ids
    ("kv_append", {"B": 3, "HKV": 2, "D": 40, "S": 24}, {}, None, [{}, {"S": 7}], [{}, dict(vec=1, threads=32)]),
    # rope of q and k with the cache append, from the fused projection's rows
    ("rope_append", {"B": 3, "H": 4, "HKV": 2, "D": 40, "S": 24}, {"theta": 500000.0}, None, [{}, {"S": 7}],
     [{}, dict(vec=1, threads=32)]),
    ("rope_append", {"B": 1, "H": 6, "HKV": 2, "D": 24, "S": 9}, {"theta": 10000.0, "rope_type": "llama3", "factor": 8.0,
                                                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                  "original_max_position_embeddings": 64},
     None, [{}], [{}]),
    ("rope_append", {"B": 1, "H": 6, "HKV": 2, "D": 24, "S": 9}, {"theta": 10000.0, "rope_type": "yarn", "factor": 8.0,
                                                                  "original_max_position_embeddings": 2048,
                                                                  "beta_fast": 32.0, "beta_slow": 1.0,
                                                                  "truncate": True,
                                                                  "attention_factor": 1.2079441541679836},
     None, [{}], [{}]),
    ("rope_append", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 24}, {"theta": 10000.0, "rotary_dim": 24}, None,
     [{}, {"S": 7}], [{}, dict(vec=1, threads=32)]),
    # and both with attention: the new row from registers, the cached rows before it (NaN from there on)
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, {"theta": 500000.0}, None,
     [{}, {"L": 1}, {"S": 9, "L": 5}], [{}, dict(splits=4, warps=2, unroll=2, lanes=2, vec=2), dict(splits=1, lanes=1)]),
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40},
     {"theta": 10000.0, "rotary_dim": 24}, None, [{}, {"L": 1}], [{}, dict(splits=4, warps=2, lanes=2, vec=4)]),
    ("rope_append_attention", {"B": 1, "H": 6, "HKV": 2, "D": 24, "S": 30, "L": 30},
     {"theta": 10000.0, "scale": 0.3, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, None, [{}, {"L": 2}], [{}, dict(splits=8)]),
    # yarn: q and k rotated with cos and sin scaled by the attention factor (q.k by its square)
    ("rope_append_attention", {"B": 2, "H": 6, "HKV": 2, "D": 24, "S": 30, "L": 30},
     {"theta": 10000.0, "rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": 1.2079441541679836}, None,
     [{}, {"L": 2}], [{}, dict(splits=8)]),
    # windowed: the new row and the cached rows from P - 32 on (P - 0 with a window of one); at L
    # = 5 the window holds every row
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, {"theta": 500000.0, "window": 33},
     None, [{}, {"S": 9, "L": 5}], [{}, dict(splits=2, warps=2, unroll=2, lanes=2, vec=2), dict(splits=1, lanes=1)]),
    ("rope_append_attention", {"B": 2, "H": 4, "HKV": 2, "D": 32, "S": 24, "L": 20}, {"window": 1}, None, [{}], [{}]),
    # soft-capped: the new row's score capped too (it opens row group 0's state); with a window
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40},
     {"theta": 500000.0, "softcap": 2.0}, None, [{}, {"L": 1}],
     [{}, dict(splits=4, warps=2, unroll=2, lanes=2, vec=2), dict(splits=1, lanes=1)]),
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, {"window": 9, "softcap": 1.0},
     None, [{}], [{}, dict(splits=1, lanes=1)]),
    ("argmax", {"M": 3, "N": 1001}, {}, None, [{}], [{}, dict(threads=128)]),
    ("argmax", {"M": 2, "N": 4096}, {}, None, [{}], [{}, dict(vec=1, threads=256)]),
    ("attention_prefill", {"B": 1, "T": 64, "H": 2, "HKV": 1, "D": 64}, {}, None, [{"T": 1}, {"T": 100}],
     [{}, dict(impl="mma", warps=2, block_k=32, stages=3, q_regs=0),
      dict(impl="mma", warps=2, warp_rows=32, block_k=32, stages=2, q_regs=1),
      dict(impl="simt", warp_rows=2, block_k=64, stages=1, q_regs=0)]),
    ("attention_prefill", {"B": 2, "T": 40, "H": 4, "HKV": 2, "D": 32}, {"causal": False}, None, [{"T": 33}], [{}]),
    ("attention_prefill", {"B": 1, "T": 20, "H": 2, "HKV": 2, "D": 24}, {"scale": 0.2}, (), [{}], [{}]),
    # sliding windows: key tiles skipped before a query tile's window (32-row tiles and 32-key
    # tiles), masks at its lower edge; at T = 9 (below the window) the no-window result
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 1, "D": 64}, {"window": 16}, None,
     [{}, {"T": 9}, {"T": 100}],
     [{}, dict(impl="mma", warps=2, block_k=32, stages=3, q_regs=0),
      dict(impl="mma", warps=2, warp_rows=32, block_k=32, stages=2, q_regs=1),
      dict(impl="simt", warp_rows=2, block_k=32, stages=1, q_regs=0)]),
    # a window that is no multiple of the tiles, GQA, two batches
    ("attention_prefill", {"B": 2, "T": 70, "H": 4, "HKV": 2, "D": 32}, {"window": 33}, None, [{}],
     [{}, dict(impl="mma", warps=2, block_k=32, stages=2, q_regs=0),
      dict(impl="simt", warp_rows=1, block_k=32, stages=1, q_regs=0)]),
    # a window of one key: each query sees itself only (most tiles wholly masked for most rows)
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 2, "D": 32}, {"window": 1}, (), [{}],
     [dict(impl="mma", warps=2, block_k=32, stages=2, q_regs=1), dict(impl="simt", warp_rows=4, block_k=32, stages=1)]),
    # a window as long as T, and longer: no key is masked by it
    ("attention_prefill", {"B": 1, "T": 40, "H": 2, "HKV": 1, "D": 32}, {"window": 40}, (), [{}], [{}]),
    ("attention_prefill", {"B": 1, "T": 40, "H": 2, "HKV": 1, "D": 32}, {"window": 64}, None, [{"T": 64}], [{}]),
    # soft-capping before the mask: causal (runtime T past the tuned one), with a window (rows that
    # meet wholly masked tiles first stay 0, not NaN), a window of one key, not causal with a scale
    ("attention_prefill", {"B": 1, "T": 64, "H": 2, "HKV": 1, "D": 64}, {"softcap": 2.0}, None, [{"T": 1}, {"T": 100}],
     [{}, dict(impl="mma", warps=2, block_k=32, stages=3, q_regs=0),
      dict(impl="mma", warps=2, warp_rows=32, block_k=32, stages=2, q_regs=1),
      dict(impl="simt", warp_rows=2, block_k=64, stages=1, q_regs=0)]),
    ("attention_prefill", {"B": 2, "T": 70, "H": 4, "HKV": 2, "D": 32}, {"window": 16, "softcap": 1.5}, None, [{}],
     [{}, dict(impl="mma", warps=2, warp_rows=32, block_k=32, stages=2, q_regs=0),
      dict(impl="simt", warp_rows=4, block_k=32, stages=1, q_regs=0)]),
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 2, "D": 32}, {"window": 1, "softcap": 2.0}, (), [{}],
     [dict(impl="mma", warps=2, block_k=32, stages=2, q_regs=1), dict(impl="simt", warp_rows=1, block_k=32, stages=1)]),
    ("attention_prefill", {"B": 2, "T": 40, "H": 4, "HKV": 2, "D": 32}, {"causal": False, "scale": 0.5, "softcap": 3.0},
     None, [{"T": 33}], [{}]),
]


def jobs():
    """Every config of every case in float32 and in a 16-bit type (float16 and bfloat16 take
    turns, so each type meets the mma attention's instructions in several cases), and every
    dtype for the first config of each operator."""
    out = []
    ops = set()
    for n, (op, shape, attrs, dynamic, runs, overrides) in enumerate(CASES):
        template = get_template(op, "cuda")
        tasks = [Task.make(op, shape, dtype, attrs=attrs, dynamic=template.dynamic_dims if dynamic is None else dynamic)
                 for dtype in DTYPES]
        spaces = [template.space(task, SM90) for task in tasks]
        defaults = [template.default(task, SM90).as_dict() for task in tasks]
        seen = [set() for _ in DTYPES]
        for j, extra in enumerate(overrides):
            configs = {}
            for d, (task, space) in enumerate(zip(tasks, spaces)):
                values = dict(defaults[d], **extra)
                if not space.accepts(values):
                    continue   # e.g. an mma config for float32
                config = space.from_values(values)
                if config.index not in seen[d]:
                    seen[d].add(config.index)
                    configs[d] = config
            halves = [d for d in (1 + (n + j) % 2, 2 - (n + j) % 2) if d in configs]  # this turn's first
            if len(halves) == 2 and (op in ops or j > 0):
                del configs[halves[1]]  # the 16-bit types take turns
            ops.add(op)
            out += [(template, tasks[d], configs[d], runs) for d in sorted(configs)]
    return out


@pytest.fixture(scope="module")
def emulator():
    emu = cudaemu.Emulator()
    yield emu
    emu.close()


def test_emulated_kernels_match_the_reference(emulator):
    work = jobs()
    assert len(work) >= 40
    sources = [template.render(task, config, SM90) for template, task, config, _ in work]
    with ThreadPoolExecutor(2) as pool:   # g++ builds in parallel; runs go one at a time to the worker
        list(pool.map(cudaemu.build, sources))
    problems = []
    for (template, task, config, runs), source in zip(work, sources):
        workspaces = {a.name: np.zeros(max(a.nbytes, 1), np.uint8) for a in source.args if a.role == "workspace"}
        for i, overrides in enumerate(runs):
            run_task = task.with_dims(**overrides)
            inputs = template.make_inputs(run_task, np.random.default_rng(i))
            reference = template.reference(run_task, inputs)
            # twice on the same workspace: split-KV counters must come back to zero
            for call in range(2 if workspaces else 1):
                # copies land as late as their wait allows: a read before its wait sees NaN
                out = emulator.run(source, run_task.dims, inputs, deferred=True, seed=i, workspaces=workspaces)
                if "error" in out:
                    problems.append(f"{run_task.key} {config} call {call}: {out['error']}")
                    break
                workspaces = out["workspaces"]
                for arg in source.args:
                    if arg.role == "out":
                        problem = check_output(arg.name, out["outputs"][arg.name], reference[arg.name],
                                               template.tolerance(run_task), arg.dtype)
                        if problem:
                            problems.append(f"{run_task.key} {config} call {call}: {problem}")
    assert not problems, "\n".join(problems)



def test_rope_append_attention_at_positions_outside_the_cache(emulator):
    """A negative position attends to its own row only, one past the cache to all S cached rows
    and its own; neither writes a cache row (the reference keeps their rows NaN)."""
    template = get_template("rope_append_attention", "cuda")
    task = Task.make("rope_append_attention", {"B": 4, "H": 4, "HKV": 2, "D": 32, "S": 72, "L": 64}, "float16",
                     {"theta": 10000.0}, template.dynamic_dims)
    inputs = template.make_inputs(task, np.random.default_rng(3))
    inputs["P"] = np.array([-2, 77, 0, 71], dtype=np.int32)
    for name in ("K", "V"):  # rows before each position hold values, the rest NaN
        cache = inputs[name].astype(np.float32)
        cache[np.isnan(cache)] = 0.5
        for b, position in enumerate(inputs["P"]):
            cache[b, :, max(position, 0):] = np.nan
        inputs[name] = cache.astype(np.float16)
    reference = template.reference(task, inputs)
    assert np.isnan(reference["KC"][:2]).all() and not np.isnan(reference["KC"][3, :, 71]).any()
    space = template.space(task, SM90)
    for values in ({}, dict(splits=4, warps=2, unroll=1, lanes=4, vec=4)):
        source = template.render(task, space.from_values(dict(template.default(task, SM90).as_dict(), **values)), SM90)
        out = emulator.run(source, task.dims, inputs, deferred=True)
        assert "error" not in out, out.get("error")
        for name in ("O", "KC", "VC"):
            assert not check_output(name, out["outputs"][name], reference[name], template.tolerance(task), "float16")


def _run(emulator, task: Task, config: dict, inputs: dict) -> dict:
    template = get_template(task.op, "cuda")
    space = template.space(task, SM90)
    source = template.render(task, space.from_values(dict(template.default(task, SM90).as_dict(), **config)), SM90)
    workspaces = {a.name: np.zeros(max(a.nbytes, 1), np.uint8) for a in source.args if a.role == "workspace"}
    out = emulator.run(source, task.dims, inputs, deferred=True, workspaces=workspaces)
    assert "error" not in out, out.get("error")
    return out["outputs"]


@pytest.mark.parametrize("op, shape, dtype, window, config", [
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 1, "D": 64}, "float16", 70,
     dict(impl="mma", warps=2, block_k=32, stages=2, q_regs=0)),
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 1, "D": 32}, "float32", 1000, {}),
    ("attention_prefill", {"B": 1, "T": 150, "H": 2, "HKV": 1, "D": 64}, "bfloat16", 150,
     dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0, block_k=64, stages=2, consumers=2, overlap=1)),
    ("attention_decode", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, "float16", 40,
     dict(splits=2, warps=2, unroll=1)),
    # the last sequence sits one past the cache: it sees 48 + 1 positions
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, "float32", 49, dict(splits=2)),
], ids=["prefill-mma", "prefill-simt", "prefill-wgmma", "decode", "rope-append-attention"])
def test_a_window_over_every_position_gives_exactly_the_unwindowed_result(emulator, op, shape, dtype, window, config):
    """window >= T (or the positions a decode query sees): the same bits as no window."""
    attrs = {"lengths": "per_sequence"} if op == "attention_decode" else {}
    plain, windowed = (Task.make(op, shape, dtype, attrs=dict(attrs, window=w), dynamic=()) for w in (0, window))
    inputs = get_template(op, "cuda").make_inputs(plain, np.random.default_rng(5))
    a, b = _run(emulator, plain, config, inputs), _run(emulator, windowed, config, inputs)
    for name in a:
        assert np.array_equal(a[name], b[name], equal_nan=True), name


@pytest.mark.parametrize("op", ["attention_decode", "rope_append_attention"])
def test_decode_reads_no_cache_row_before_the_window(emulator, op):
    """Cache rows before each sequence's window are NaN: a kernel that reads one (a split range
    from 0, a row group starting early) gives NaN; ragged lengths, splits of the window's rows."""
    template = get_template(op, "cuda")
    attrs = {"lengths": "per_sequence", "window": 20} if op == "attention_decode" else {"window": 20}
    task = Task.make(op, {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, "float16", attrs=attrs,
                     dynamic=template.dynamic_dims)
    inputs = template.make_inputs(task, np.random.default_rng(4))
    # the first row a sequence sees: LENS[b] - 20, or P[b] - 19 (its own row at P[b] is the last)
    firsts = inputs["LENS"] - 20 if op == "attention_decode" else np.minimum(inputs["P"], 48) - 19
    for name in ("K", "V"):
        cache = inputs[name].copy()
        for b, first in enumerate(firsts):
            cache[b, :, :max(int(first), 0)] = np.nan
        inputs[name] = cache
    reference = template.reference(task, inputs)
    assert not np.isnan(reference["O"]).any()
    for config in ({}, dict(splits=2, warps=1, unroll=1, lanes=4, vec=2)):
        out = _run(emulator, task, config, inputs)
        for name in reference:
            assert not check_output(name, out[name], reference[name], template.tolerance(task), "float16"), name


WGMMA = dict(impl="wgmma", warps=4, warp_rows=16, q_regs=0)


@pytest.mark.parametrize("dtype, shape, dynamic, attrs, config", [
    # one consumer, T a runtime argument (one batch), causal, 64 dims
    ("float16", {"B": 1, "T": 100, "H": 4, "HKV": 2, "D": 64}, ("T",), {}, dict(WGMMA, block_k=64, stages=2, consumers=1)),
    # two consumers, two batches (the 4-D boxes stop at each batch's T), 128 dims in two boxes
    ("bfloat16", {"B": 2, "T": 150, "H": 4, "HKV": 1, "D": 128}, (), {}, dict(WGMMA, block_k=128, stages=3, consumers=2)),
    ("float16", {"B": 1, "T": 70, "H": 2, "HKV": 2, "D": 128}, (), {"causal": False},
     dict(WGMMA, block_k=64, stages=3, consumers=2)),
    # the softmax of tile j while S of tile j and P V of tile j - 1 are in flight
    ("bfloat16", {"B": 2, "T": 150, "H": 4, "HKV": 1, "D": 128}, (), {},
     dict(WGMMA, block_k=64, stages=2, consumers=2, overlap=1)),
    ("float16", {"B": 1, "T": 40, "H": 2, "HKV": 1, "D": 64}, ("T",), {},
     dict(WGMMA, block_k=128, stages=3, consumers=1, overlap=1)),  # a single key tile
    # sliding windows: the producer starts at the first tile of the window of the block's first
    # row (the last block skips one of 64 keys), masks at the window's lower edge
    ("float16", {"B": 1, "T": 150, "H": 2, "HKV": 1, "D": 64}, ("T",), {"window": 33},
     dict(WGMMA, block_k=64, stages=2, consumers=1)),
    # 128 rows a block against a window of 16: rows meet wholly masked tiles before their keys
    ("bfloat16", {"B": 2, "T": 200, "H": 4, "HKV": 1, "D": 128}, (), {"window": 16},
     dict(WGMMA, block_k=64, stages=2, consumers=2, overlap=1)),
    ("float16", {"B": 1, "T": 70, "H": 2, "HKV": 2, "D": 64}, (), {"window": 1},
     dict(WGMMA, block_k=64, stages=3, consumers=1, overlap=1)),
    ("bfloat16", {"B": 1, "T": 100, "H": 2, "HKV": 1, "D": 128}, (), {"window": 100},   # as long as T: no mask
     dict(WGMMA, block_k=128, stages=2, consumers=2)),
    # soft-capped S in the softmax the warpgroup runs (while S and P V are in flight with overlap)
    ("float16", {"B": 1, "T": 150, "H": 2, "HKV": 1, "D": 64}, ("T",), {"softcap": 2.0},
     dict(WGMMA, block_k=64, stages=2, consumers=1)),
    ("bfloat16", {"B": 2, "T": 200, "H": 4, "HKV": 1, "D": 128}, (), {"window": 16, "softcap": 1.5},
     dict(WGMMA, block_k=64, stages=2, consumers=2, overlap=1)),
    ("float16", {"B": 1, "T": 70, "H": 2, "HKV": 2, "D": 128}, (), {"causal": False, "softcap": 2.0},
     dict(WGMMA, block_k=64, stages=3, consumers=2)),
], ids=["one-consumer", "two-batches", "not-causal", "overlap", "overlap-one-tile", "window", "window-overlap",
        "window-of-one", "window-of-t", "softcap", "softcap-window-overlap", "softcap-not-causal"])
def test_attention_prefill_wgmma_matches_the_reference(emulator, dtype, shape, dynamic, attrs, config):
    """The Hopper schedule: TMA boxes, the K/V ring, S on wgmma, P from registers into wgmma
    with V N-major; copies landing at once and only when a consumer waits."""
    template = get_template("attention_prefill", "cuda")
    task = Task.make("attention_prefill", shape, dtype, attrs=attrs, dynamic=dynamic)
    space = template.space(task, SM90)
    assert space.accepts(config), space.violations(space.from_values(config))
    for deferred in (False, True):
        assert emulator.check(task, space.from_values(config), SM90, deferred=deferred) is None


# Gemma 2's cap of 50 on queries 16 times make_inputs': scores reach about +-50, deep in tanh's bend
@pytest.mark.parametrize("op, shape, dtype, attrs, config", [
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 1, "D": 64}, "float16", {},
     dict(impl="mma", warps=2, block_k=32, stages=2, q_regs=0)),
    ("attention_prefill", {"B": 1, "T": 70, "H": 2, "HKV": 1, "D": 64}, "float32", {"window": 33}, {}),
    ("attention_prefill", {"B": 1, "T": 150, "H": 2, "HKV": 1, "D": 128}, "float16", {"window": 100},
     dict(WGMMA, block_k=64, stages=2, consumers=2, overlap=1)),
    ("attention_decode", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, "float16", {"lengths": "per_sequence"},
     dict(splits=2, warps=2, unroll=1)),
    ("rope_append_attention", {"B": 3, "H": 4, "HKV": 2, "D": 32, "S": 48, "L": 40}, "float32", {"window": 20},
     dict(splits=2)),
], ids=["prefill-mma", "prefill-simt-window", "prefill-wgmma-window", "decode", "rope-append-attention-window"])
def test_a_gemma2_soft_cap_bends_large_scores(emulator, op, shape, dtype, attrs, config):
    """The capped reference is many tolerances away from the uncapped one (a kernel that skipped
    the cap, or capped unscaled or log2-domain scores, fails), and the kernel matches it."""
    template = get_template(op, "cuda")
    plain, capped = (Task.make(op, shape, dtype, attrs=dict(attrs, softcap=cap), dynamic=template.dynamic_dims)
                     for cap in (0.0, 50.0))
    inputs = template.make_inputs(capped, np.random.default_rng(6))
    name, rows = ("QKV", shape["H"]) if op == "rope_append_attention" else ("Q", None)   # the query rows only
    q = to_float64(inputs[name], dtype)
    q[:, :rows] *= 16.0
    inputs[name] = from_float(q.astype(np.float32), dtype)
    reference, uncapped = template.reference(capped, inputs), template.reference(plain, inputs)["O"]
    tolerance = template.tolerance(capped)
    assert np.linalg.norm(uncapped - reference["O"]) > 5 * tolerance * np.linalg.norm(reference["O"])
    out = _run(emulator, capped, config, inputs)
    for name in reference:
        assert not check_output(name, out[name], reference[name], tolerance, dtype), name


@pytest.mark.parametrize("old, new", [
    ("BK * 128));", "BK * 64));"),                                  # V's second 64-dim box misplaced
    ("p + 4 * kk,", "p + 4 * (kk ^ 1),"),                             # P's key blocks swapped
    ("Qs + cw * 64 * 64;", "Qs;"),                                    # both consumers on the first 64 rows
    ("if (signals) mbar_arrive(&empty[s]);", ""),                     # stages never given back
    ("issue_pv(o, p, Vs + s * DB * BK * 64);\n    wgmma_wait<0>();", "wgmma_wait<0>();"),  # P V never issued
], ids=["v-box-offset", "p-fragment-order", "q-rows", "no-release", "no-pv"])
def test_emulator_catches_attention_wgmma_bugs(emulator, old, new):
    _assert_attention_bug_caught(emulator, old, new, overlap=0)


@pytest.mark.parametrize("old, new", [
    ("issue_pv(o, p, Vs + prev * DB", "issue_pv(o, p, Vs + s * DB"),        # P V of tile j - 1 on tile j's V
    ("    scale_o(o, corr);\n    pack_p(sc, p);\n  }", "    pack_p(sc, p);\n  }"),  # O never rescaled
], ids=["wrong-v-stage", "no-rescale"])
def test_emulator_catches_attention_overlap_bugs(emulator, old, new):
    _assert_attention_bug_caught(emulator, old, new, overlap=1)


def _assert_attention_bug_caught(emulator, old, new, overlap):
    template = get_template("attention_prefill", "cuda")
    task = Task.make("attention_prefill", {"B": 2, "T": 150, "H": 4, "HKV": 1, "D": 128}, "bfloat16")
    source = template.render(task, template.space(task, SM90).from_values(dict(WGMMA, block_k=64, stages=2,
                                                                                consumers=2, overlap=overlap)), SM90)
    assert old in source.code
    source = KernelSource(source.lang, source.code.replace(old, new), source.entry, source.args, source.launch_dims)
    inputs = template.make_inputs(task, np.random.default_rng(0))
    out = emulator.run(source, task.dims, inputs)
    assert "error" in out or check_output("O", out["outputs"]["O"], template.reference(task, inputs)["O"],
                                          template.tolerance(task), "bfloat16")


def test_emulator_catches_a_wrong_fragment_layout(emulator, monkeypatch):
    """The check above can fail: swapping two B registers of the mma gives a wrong answer."""
    import search_space.templates.cuda.attention_prefill as prefill

    right = "mma16816(s[mt][2 * np], a[mt][0], a[mt][1], a[mt][2], a[mt][3], b0, b1);"
    assert right in prefill._MMA_KERNEL
    monkeypatch.setattr(prefill, "_MMA_KERNEL", prefill._MMA_KERNEL.replace(right, right.replace("b0, b1", "b1, b0")))
    template = get_template("attention_prefill", "cuda")
    task = Task.make("attention_prefill", {"B": 1, "T": 40, "H": 1, "HKV": 1, "D": 32}, "float16")
    source = template.render(task, template.default(task, SM90), SM90)
    inputs = template.make_inputs(task, np.random.default_rng(0))
    out = emulator.run(source, task.dims, inputs)
    assert check_output("O", out["outputs"]["O"], template.reference(task, inputs)["O"], template.tolerance(task),
                        "float16")


def test_emulator_reports_a_deadlock(emulator):
    from search_space import ArgSpec, KernelSource
    from search_space.codegen.cuda import PREAMBLE, kernel_params

    args = (ArgSpec("Y", "out", "float32", (64,)),)
    code = (PREAMBLE + f'extern "C" __global__ void stuck({kernel_params(args)}) {{\n'
            "  if (threadIdx.x < 16) __syncthreads();   // half a block at a barrier: never completes\n"
            "  else for (int i = 0; i < 3; ++i) __syncwarp();\n"
            "  Y[threadIdx.x] = 1.0f;\n}\n")
    source = KernelSource("cuda", code, "stuck", args, (("block", (64, 1, 1)), ("grid", (1, 1, 1)), ("smem", 0)))
    assert "deadlock" in emulator.run(source, {}, {})["error"]


def test_shared_memory_past_the_launch_size_is_caught(emulator):
    """Shared memory addressed by offset (the emu:: calls under AUTOTUNE_EMULATE) is checked
    against the dynamic size the launch asked for."""
    from search_space import ArgSpec, KernelSource
    from search_space.codegen.cuda import PREAMBLE, kernel_params

    args = (ArgSpec("Y", "out", "float32", (32,)),)
    code = (PREAMBLE + f'extern "C" __global__ void overrun({kernel_params(args)}) {{\n'
            "  extern __shared__ __align__(16) float s[];\n"
            "  unsigned r0, r1, r2, r3;\n"
            "  emu::ldmatrix_x4(emu::smem_offset(s) + 16 * threadIdx.x, false, r0, r1, r2, r3);\n"
            "  Y[threadIdx.x] = (float)(r0 & 1u);\n}\n")

    def launch(smem: int) -> KernelSource:
        return KernelSource("cuda", code, "overrun", args, (("block", (32, 1, 1)), ("grid", (1, 1, 1)), ("smem", smem)))

    fits = emulator.run(launch(512), {}, {})
    assert "error" not in fits, fits["error"]
    assert "past the end of dynamic shared memory" in emulator.run(launch(256), {}, {})["error"]
