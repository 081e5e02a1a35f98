"""Operators that keep a decode step on the device, so that it can be captured once as a CUDA
graph and replayed for every token (``runtime.llama``): what changes from step to step (each
sequence's position) is read from device memory, and only token ids go back to the host.

- ``kv_append``: K[B,HKV,D], V[B,HKV,D], P[B] (int32 positions) -> the caches KC[B,HKV,S,D]
  and VC[B,HKV,S,D] with row P[b] of sequence b set to K[b] and V[b]; every other row is left
  as it was (the reference marks those NaN: verification requires the poison there to
  survive). A position outside 0..S-1 writes nothing.
- ``rope_append``: the fused Q/K/V projection's rows QKV[B, H + 2 HKV, D] and P[B] -> Q[B,H,D]
  (q rotated at P[b]) and the caches KC, VC[B,HKV,S,D] with row P[b] set to k rotated at P[b] and
  to v: ``rope`` of q and k and ``kv_append`` in one kernel, straight from the projection's output
  (attributes as ``rope``'s). Rows other than P[b] are left as they were; a position outside the
  cache writes no cache row (q is still rotated).
- ``rope_append_attention``: ``rope_append`` and then ``attention_decode`` in one kernel, the
  captured step's attention: QKV[B, H + 2 HKV, D], P[B] and the caches K, V[B,HKV,S,D] (rows
  before P[b] read) -> O[B,H,D], the rotated q of sequence b attending to the rotated k and v
  rows 0..P[b] (its own new row last), and the caches KC, VC with row P[b] set to them (the
  rest left as it was). The runtime passes the same cache as K and KC: no kernel reads the row
  it writes. A position past the cache attends to all S cached rows and its own, writing none;
  a negative one to its own row only. L (at least 1) is the length tuned at: P[b] + 1.
- ``argmax``: X[M,N] -> Y[M] (int32), the index of each row's largest value, the first one on
  ties (as numpy's argmax): greedy decoding's next token ids.

S and M may be runtime arguments (the cache capacity, the batch).
"""
from __future__ import annotations

import numpy as np

from runtime.rope_frequencies import frequencies_of_attrs, rotation_scale

from ..task import Task
from ..template import ArgSpec, Operator, register_operator
from .attention import (SOFTCAP_DOC, WINDOW_DOC, AttentionDecodeOp, _check_heads, _scale, capped, check_softcap,
                        check_window, softmax_last, window_start)
from .common import FLOAT_DTYPES, ITEMSIZE, from_float, random_normal, to_float32, to_float64
from .elementwise import RopeOp, check_rope, rotate_half


@register_operator
class KvAppendOp(Operator):
    op = "kv_append"
    dims = ("B", "HKV", "D", "S")
    dynamic_dims = ("S",)
    dtypes = FLOAT_DTYPES
    example_shape = {"B": 1, "HKV": 8, "D": 128, "S": 4096}
    description = "write each sequence's new K/V rows into its cache at its position (read from memory)"

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        return (ArgSpec("K", "in", dt, ("B", "HKV", "D")), ArgSpec("V", "in", dt, ("B", "HKV", "D")),
                ArgSpec("P", "in", "int32", ("B",)),
                ArgSpec("KC", "out", dt, ("B", "HKV", "S", "D")), ArgSpec("VC", "out", dt, ("B", "HKV", "S", "D")))

    def flops(self, task: Task) -> float:
        return 0.0

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return 4 * ITEMSIZE[task.dtype] * d["B"] * d["HKV"] * d["D"] + 4 * d["B"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        rows = (d["B"], d["HKV"], d["D"])
        positions = _positions(rng, d["B"], d["S"])
        return {"K": random_normal(rng, rows, task.dtype), "V": random_normal(rng, rows, task.dtype), "P": positions}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _caches(task, to_float64(inputs["K"], task.dtype), to_float64(inputs["V"], task.dtype), inputs["P"])

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        k, v = to_float32(inputs["K"], task.dtype), to_float32(inputs["V"], task.dtype)
        return "numpy row copies", lambda: _caches(task, k, v, inputs["P"])


def _positions(rng: np.random.Generator, batch: int, capacity: int) -> np.ndarray:
    """Positions spread over the cache, the last one out of range when there is room for it."""
    positions = rng.integers(0, capacity, batch)
    if batch > 1:
        positions[-1] = capacity
    return positions.astype(np.int32)


def _caches(task: Task, k: np.ndarray, v: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    """KC, VC with row P[b] of sequence b set to k[b], v[b] and NaN everywhere else."""
    d = task.dims
    kc = np.full((d["B"], d["HKV"], d["S"], d["D"]), np.nan, dtype=k.dtype)
    vc = kc.copy()
    for b, position in enumerate(int(p) for p in positions):
        if 0 <= position < d["S"]:
            kc[b, :, position] = k[b]
            vc[b, :, position] = v[b]
    return {"KC": kc, "VC": vc}


@register_operator
class RopeAppendOp(Operator):
    op = "rope_append"
    dims = ("B", "H", "HKV", "D", "S")
    dynamic_dims = ("S",)
    dtypes = FLOAT_DTYPES
    default_attrs = RopeOp.default_attrs
    attr_docs = RopeOp.attr_docs
    example_shape = {"B": 1, "H": 32, "HKV": 8, "D": 128, "S": 4096}
    description = ("rope of q and k and their cache append in one kernel, from the fused Q/K/V projection's rows "
                   "(positions read from memory)")

    def check(self, task: Task) -> None:
        super().check(task)
        check_rope(self.op, task)

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt, d = task.dtype, task.dims
        return (ArgSpec("QKV", "in", dt, ("B", d["H"] + 2 * d["HKV"], "D")), ArgSpec("P", "in", "int32", ("B",)),
                ArgSpec("Q", "out", dt, ("B", "H", "D")),
                ArgSpec("KC", "out", dt, ("B", "HKV", "S", "D")), ArgSpec("VC", "out", dt, ("B", "HKV", "S", "D")))

    def flops(self, task: Task) -> float:
        d = task.dims
        return 3.0 * d["B"] * (d["H"] + d["HKV"]) * d["D"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return ITEMSIZE[task.dtype] * d["B"] * d["D"] * (2 * d["H"] + 4 * d["HKV"]) + 4 * d["B"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        return {"QKV": random_normal(rng, (d["B"], d["H"] + 2 * d["HKV"], d["D"]), task.dtype),
                "P": _positions(rng, d["B"], d["S"])}

    def _compute(self, task: Task, qkv: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
        d = task.dims
        attrs = self.attrs(task)
        freqs = frequencies_of_attrs(d["D"], attrs)
        rotated = rotate_half(qkv[:, :d["H"] + d["HKV"]], positions, freqs, rotation_scale(attrs))
        return {"Q": rotated[:, :d["H"]], **_caches(task, rotated[:, d["H"]:], qkv[:, d["H"] + d["HKV"]:], positions)}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._compute(task, to_float64(inputs["QKV"], task.dtype), inputs["P"])

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        qkv = to_float32(inputs["QKV"], task.dtype)
        return "numpy rope and row copies", lambda: self._compute(task, qkv, inputs["P"])


@register_operator
class RopeAppendAttentionOp(Operator):
    op = "rope_append_attention"
    dims = ("B", "H", "HKV", "D", "S", "L")
    dynamic_dims = ("S", "L")
    dtypes = FLOAT_DTYPES
    default_attrs = {"scale": 0.0, "window": 0, "softcap": 0.0, **RopeOp.default_attrs}
    attr_docs = {"scale": AttentionDecodeOp.attr_docs["scale"],
                 "window": WINDOW_DOC + " (the query is at its position P: it sees P - window + 1 .. P)",
                 "softcap": SOFTCAP_DOC,
                 **RopeOp.attr_docs}
    example_shape = {"B": 1, "H": 32, "HKV": 8, "D": 128, "S": 4096, "L": 4096}
    description = ("rope of q and k, their cache append and decode attention in one kernel, from the fused Q/K/V "
                   "projection's rows (positions read from memory)")

    def check(self, task: Task) -> None:
        super().check(task)
        check_rope(self.op, task)
        _check_heads(self, task)
        check_window(self, task)
        check_softcap(self, task)
        d = task.dims
        if not 1 <= d["L"] <= d["S"]:
            raise ValueError(f"{self.op}: L = {d['L']} must be from 1 to the cache capacity S = {d['S']}")

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt, d = task.dtype, task.dims
        cache = ("B", "HKV", "S", "D")
        return (ArgSpec("QKV", "in", dt, ("B", d["H"] + 2 * d["HKV"], "D")), ArgSpec("P", "in", "int32", ("B",)),
                ArgSpec("K", "in", dt, cache), ArgSpec("V", "in", dt, cache), ArgSpec("O", "out", dt, ("B", "H", "D")),
                ArgSpec("KC", "out", dt, cache), ArgSpec("VC", "out", dt, cache))

    def read_rows(self, task: Task) -> int:
        """The positions the new token at L - 1 attends to: L, or the window's."""
        return task.dims["L"] - window_start(task.dims["L"], self.attrs(task)["window"])

    def flops(self, task: Task) -> float:
        d = task.dims
        return 4.0 * d["B"] * d["H"] * self.read_rows(task) * d["D"] + 3.0 * d["B"] * (d["H"] + d["HKV"]) * d["D"]

    def min_bytes(self, task: Task) -> float:
        """The cached rows read, the projection's rows, O and the two new cache rows."""
        d = task.dims
        rows = 2 * d["HKV"] * (self.read_rows(task) - 1) + (d["H"] + 2 * d["HKV"]) + d["H"] + 2 * d["HKV"]
        return ITEMSIZE[task.dtype] * d["B"] * d["D"] * rows + 4 * d["B"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Ragged positions (sequence b at L - 1 - b, the last past the cache when there are
        several), and caches that are NaN from each sequence's position on: a kernel that reads
        a row it should not (the one it writes, or a later one) gives NaN."""
        d = task.dims
        positions = np.maximum(d["L"] - 1 - np.arange(d["B"]), 0).astype(np.int32)
        if d["B"] > 1:
            positions[-1] = d["S"]
        cache = (d["B"], d["HKV"], d["S"], d["D"])
        k, v = random_normal(rng, cache, task.dtype), random_normal(rng, cache, task.dtype)
        nan = from_float(np.array([np.nan], dtype=np.float32), task.dtype)[0]
        for b, position in enumerate(positions):
            k[b, :, position:] = v[b, :, position:] = nan
        return {"QKV": random_normal(rng, (d["B"], d["H"] + 2 * d["HKV"], d["D"]), task.dtype), "P": positions,
                "K": k, "V": v}

    def _compute(self, task: Task, qkv: np.ndarray, positions: np.ndarray, k: np.ndarray,
                 v: np.ndarray) -> dict[str, np.ndarray]:
        d = task.dims
        h, hkv, dim = d["H"], d["HKV"], d["D"]
        attrs = self.attrs(task)
        rotated = rotate_half(qkv[:, :h + hkv], positions, frequencies_of_attrs(dim, attrs), rotation_scale(attrs))
        new_k, new_v = rotated[:, h:], qkv[:, h + hkv:]
        out = np.empty((d["B"], h, dim), dtype=rotated.dtype)
        for b, position in enumerate(int(p) for p in positions):
            cached = min(max(position, 0), d["S"])
            first = window_start(cached + 1, self.attrs(task)["window"])
            keys = np.concatenate([k[b, :, :cached], new_k[b][:, None]], axis=1)[:, first:]      # HKV, n, D
            values = np.concatenate([v[b, :, :cached], new_v[b][:, None]], axis=1)[:, first:]
            q = rotated[b, :h].reshape(hkv, h // hkv, dim)                           # HKV, G, D
            scores = capped(self, task, np.matmul(q, keys.transpose(0, 2, 1)) * _scale(self, task))  # HKV, G, n
            out[b] = np.matmul(softmax_last(scores), values).reshape(h, dim)
        return {"O": out, **_caches(task, new_k, new_v, positions)}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        qkv, k, v = (to_float64(inputs[n], task.dtype) for n in ("QKV", "K", "V"))
        return self._compute(task, qkv, inputs["P"], k, v)

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        qkv, k, v = (to_float32(inputs[n], task.dtype) for n in ("QKV", "K", "V"))
        return ("numpy rope, row copies and attention over the cache",
                lambda: self._compute(task, qkv, inputs["P"], k, v))


@register_operator
class ArgmaxOp(Operator):
    op = "argmax"
    dims = ("M", "N")
    dynamic_dims = ("M",)
    dtypes = FLOAT_DTYPES
    example_shape = {"M": 1, "N": 32000}
    description = "index of each row's largest value (greedy decoding's next token)"

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        return (ArgSpec("X", "in", task.dtype, ("M", "N")), ArgSpec("Y", "out", "int32", ("M",)))

    def flops(self, task: Task) -> float:
        return float(task.dims["M"] * task.dims["N"])

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return ITEMSIZE[task.dtype] * d["M"] * d["N"] + 4 * d["M"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        x = random_normal(rng, (d["M"], d["N"]), task.dtype)
        # a tie for the largest value in every row: the first index must win
        for row in range(d["M"]):
            i, j = sorted(rng.choice(d["N"], 2, replace=False)) if d["N"] > 1 else (0, 0)
            top = np.max(to_float32(x[row], task.dtype)) + 1.0
            x[row, i] = x[row, j] = from_float(np.array([top], dtype=np.float32), task.dtype)[0]
        return {"X": x}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": np.argmax(to_float64(inputs["X"], task.dtype), axis=-1).astype(np.int32)}

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        x = to_float32(inputs["X"], task.dtype)
        return "numpy argmax", lambda: x.argmax(axis=-1)

