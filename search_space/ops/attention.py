"""Attention with grouped-query heads: prefill over a prompt, decode against a KV cache.

Head h of the queries reads key/value head ``h // (H // HKV)``. ``scale`` defaults to
1/sqrt(D). Layouts (the contract every template reads):

- ``attention_prefill``: Q[B,T,H,D], K[B,T,HKV,D], V[B,T,HKV,D] -> O[B,T,H,D], token-major
  as a QKV projection produces them; causal means query t sees keys 0..t. T may be a
  runtime argument (``dynamic``): the kernel then reads it from its int64 argument T.
- ``attention_decode``: one new query per sequence, Q[B,H,D] -> O[B,H,D], against the
  cache K[B,HKV,S,D], V[B,HKV,S,D] of capacity S of which the first L positions are valid.
  S and L are runtime arguments (int64, in that order after the arrays) when dynamic, so one
  kernel serves every cache length; a task's L is the length it is tuned at.

``window`` (sliding-window attention, Mistral's and Gemma 3's): a query at position t sees only
the keys at t - window + 1 .. t, at most ``window`` of them (transformers' sliding-window mask);
0, the default, means no window. In prefill it narrows the causal mask; in decode the query sits
at position L - 1, so the cache rows read are max(0, L - window) .. L - 1.

``softcap`` (Gemma 2's attention logit soft-capping): each scaled score s becomes
softcap * tanh(s / softcap) before the mask and the softmax; 0, the default, leaves it.
"""
from __future__ import annotations

import math

import numpy as np

from runtime.abi import ATTR_DEFAULTS

from ..task import Task
from ..template import ArgSpec, Operator, register_operator
from .common import FLOAT_DTYPES, ITEMSIZE, random_normal, to_float32, to_float64


def _scale(op: Operator, task: Task) -> float:
    scale = op.attrs(task)["scale"]
    return float(scale) if scale else 1.0 / math.sqrt(task.dims["D"])


def _check_heads(op: Operator, task: Task) -> None:
    d = task.dims
    if d["H"] % d["HKV"]:
        raise ValueError(f"{op.op}: H = {d['H']} must be a multiple of HKV = {d['HKV']}")


WINDOW_DOC = "sliding window: a query at position t sees the keys at t - window + 1 .. t; 0: no window"


def check_window(op: Operator, task: Task) -> int:
    """The task's ``window`` attribute, refused unless a count (0: none)."""
    window = op.attrs(task)["window"]
    if not isinstance(window, int) or isinstance(window, bool) or window < 0:
        raise ValueError(f"{op.op}: window = {window!r} must be a number of positions (0: no window)")
    return window


SOFTCAP_DOC = "soft-capping: each scaled score s becomes softcap * tanh(s / softcap) before the softmax; 0: none"


def check_softcap(op: Operator, task: Task) -> float:
    """The task's ``softcap`` attribute, refused unless a positive number or 0 (none)."""
    cap = op.attrs(task)["softcap"]
    if not (isinstance(cap, (int, float)) and not isinstance(cap, bool) and math.isfinite(cap) and cap >= 0):
        raise ValueError(f"{op.op}: softcap = {cap!r} must be a positive number (0: none)")
    return float(cap)


def capped(op: Operator, task: Task, scores: np.ndarray) -> np.ndarray:
    """Scaled scores soft-capped as the task's ``softcap`` says (themselves without one)."""
    cap = op.attrs(task)["softcap"]
    return cap * np.tanh(scores / cap) if cap else scores


def window_start(length: int, window: int) -> int:
    """The first of ``length`` positions a query at the last of them sees through ``window``."""
    return max(0, length - window) if window else 0


def softmax_last(scores: np.ndarray) -> np.ndarray:
    scores = scores - scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)
    return scores


@register_operator
class AttentionPrefillOp(Operator):
    op = "attention_prefill"
    dims = ("B", "T", "H", "HKV", "D")
    dynamic_dims = ("T",)
    dtypes = FLOAT_DTYPES
    default_attrs = ATTR_DEFAULTS["attention_prefill"]
    attr_docs = {"causal": "true: each query sees only the keys at or before its position",
                 "scale": "softmax scale of Q.K; 0.0 means 1/sqrt(D)", "window": WINDOW_DOC + " (causal only)",
                 "softcap": SOFTCAP_DOC}
    example_shape = {"B": 1, "T": 512, "H": 32, "HKV": 8, "D": 128}
    description = "causal grouped-query attention over a prompt, flash-style (O = softmax(QK^T) V)"

    def check(self, task: Task) -> None:
        super().check(task)
        _check_heads(self, task)
        check_softcap(self, task)
        if check_window(self, task) and not self.attrs(task)["causal"]:
            raise ValueError(f"{self.op}: a window needs causal attention (it narrows the causal mask)")

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        return (ArgSpec("Q", "in", dt, ("B", "T", "H", "D")), ArgSpec("K", "in", dt, ("B", "T", "HKV", "D")),
                ArgSpec("V", "in", dt, ("B", "T", "HKV", "D")), ArgSpec("O", "out", dt, ("B", "T", "H", "D")))

    def pairs(self, task: Task) -> float:
        t, w = task.dims["T"], self.attrs(task)["window"]
        if w and w < t:  # the first w queries as causal, each later one sees w keys
            return w * (w + 1) / 2 + (t - w) * w
        return t * (t + 1) / 2 if self.attrs(task)["causal"] else float(t * t)

    def flops(self, task: Task) -> float:
        d = task.dims
        return 4.0 * d["B"] * d["H"] * d["D"] * self.pairs(task)

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return ITEMSIZE[task.dtype] * d["B"] * d["T"] * d["D"] * (2 * d["H"] + 2 * d["HKV"])

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        return {"Q": random_normal(rng, (d["B"], d["T"], d["H"], d["D"]), task.dtype),
                "K": random_normal(rng, (d["B"], d["T"], d["HKV"], d["D"]), task.dtype),
                "V": random_normal(rng, (d["B"], d["T"], d["HKV"], d["D"]), task.dtype)}

    def _attend(self, task: Task, q, k, v) -> np.ndarray:
        d = task.dims
        b, t, h, hkv, dim = d["B"], d["T"], d["H"], d["HKV"], d["D"]
        group = h // hkv
        qg = q.reshape(b, t, hkv, group, dim).transpose(0, 2, 3, 1, 4)  # B,HKV,G,T,D
        kt = k.transpose(0, 2, 3, 1)                                      # B,HKV,D,T
        vt = v.transpose(0, 2, 1, 3)                                      # B,HKV,T,D
        scores = capped(self, task, np.matmul(qg, kt[:, :, None]) * _scale(self, task))  # B,HKV,G,T,T
        if self.attrs(task)["causal"]:
            scores[..., np.triu_indices(t, 1)[0], np.triu_indices(t, 1)[1]] = -np.inf
        window = self.attrs(task)["window"]
        if window:  # keys window or more positions behind the query
            scores[..., np.tril_indices(t, -window)[0], np.tril_indices(t, -window)[1]] = -np.inf
        out = np.matmul(softmax_last(scores), vt[:, :, None])             # B,HKV,G,T,D
        return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dim)

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q, k, v = (to_float64(inputs[n], task.dtype) for n in ("Q", "K", "V"))
        return {"O": self._attend(task, q, k, v)}

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        q, k, v = (to_float32(inputs[n], task.dtype) for n in ("Q", "K", "V"))
        return "numpy float32 attention (batched matmul, mask, softmax)", lambda: self._attend(task, q, k, v)


@register_operator
class AttentionDecodeOp(Operator):
    op = "attention_decode"
    dims = ("B", "H", "HKV", "D", "S", "L")
    dynamic_dims = ("S", "L")
    dtypes = FLOAT_DTYPES
    default_attrs = ATTR_DEFAULTS["attention_decode"]
    attr_docs = {"scale": "softmax scale of Q.K; 0.0 means 1/sqrt(D)",
                 "lengths": "uniform: every sequence attends to L positions (a scalar argument); per_sequence: "
                            "sequence b to LENS[b] <= L, read from device memory (what a captured CUDA graph "
                            "needs: one launch serves every step)",
                 "programmatic": "true: the kernel may start before the kernel ahead of it in a captured CUDA "
                                 "graph has ended, and lets the next one start early (programmatic dependent "
                                 "launch; CUDA, sm_90+)",
                 "window": WINDOW_DOC + " (the query is at position L - 1: it reads cache rows L - window .. L - 1)",
                 "softcap": SOFTCAP_DOC}
    example_shape = {"B": 1, "H": 32, "HKV": 8, "D": 128, "S": 4096, "L": 4096}
    description = "one query per sequence against a KV cache of runtime length L (split-KV)"
    LENGTHS = ("uniform", "per_sequence")

    def check(self, task: Task) -> None:
        super().check(task)
        _check_heads(self, task)
        if task.dims["L"] > task.dims["S"]:
            raise ValueError(f"attention_decode: L = {task.dims['L']} exceeds the cache capacity S = {task.dims['S']}")
        check_window(self, task)
        check_softcap(self, task)
        if self.attrs(task)["lengths"] not in self.LENGTHS:
            raise ValueError(f"attention_decode: lengths = {self.attrs(task)['lengths']!r}; use one of "
                             f"{', '.join(self.LENGTHS)}")
        # a bool: Operator.check refuses an attribute of another kind than its default
        if self.attrs(task)["programmatic"] and getattr(self, "target_kind", "cuda") != "cuda":
            raise ValueError(f"attention_decode: the {self.target_kind} template takes no programmatic launch "
                             "(a CUDA graph's)")

    def per_sequence(self, task: Task) -> bool:
        return self.attrs(task)["lengths"] == "per_sequence"

    def resident_inputs(self, task: Task) -> tuple[str, ...]:
        return ("K", "V")  # the KV cache

    def resident_read_share(self, task: Task) -> float:
        return min(task.dims["L"], task.dims["S"]) / max(task.dims["S"], 1)  # the L rows of S a call reads

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        lens = (ArgSpec("LENS", "in", "int32", ("B",)),) if self.per_sequence(task) else ()
        return (ArgSpec("Q", "in", dt, ("B", "H", "D")), ArgSpec("K", "in", dt, ("B", "HKV", "S", "D")),
                ArgSpec("V", "in", dt, ("B", "HKV", "S", "D")), *lens, ArgSpec("O", "out", dt, ("B", "H", "D")))

    def read_rows(self, task: Task) -> int:
        """The cache rows a sequence at the task's L reads: L, or the window's."""
        return task.dims["L"] - window_start(task.dims["L"], self.attrs(task)["window"])

    def flops(self, task: Task) -> float:
        d = task.dims
        return 4.0 * d["B"] * d["H"] * self.read_rows(task) * d["D"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return ITEMSIZE[task.dtype] * d["B"] * d["D"] * (2 * d["HKV"] * self.read_rows(task) + 2 * d["H"])

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        cache = (d["B"], d["HKV"], d["S"], d["D"])
        inputs = {"Q": random_normal(rng, (d["B"], d["H"], d["D"]), task.dtype),
                  "K": random_normal(rng, cache, task.dtype), "V": random_normal(rng, cache, task.dtype)}
        if self.per_sequence(task):  # ragged: sequence b is b positions shorter (at least 1), the first is L
            inputs["LENS"] = np.maximum(d["L"] - np.arange(d["B"]), min(d["L"], 1)).astype(np.int32)
        return inputs

    def _lengths(self, task: Task, inputs: dict[str, np.ndarray]) -> list[int]:
        d = task.dims
        return [int(n) for n in inputs["LENS"]] if self.per_sequence(task) else [d["L"]] * d["B"]

    def _attend(self, task: Task, q, k, v, lengths: list[int]) -> np.ndarray:
        d = task.dims
        b, h, hkv, dim = d["B"], d["H"], d["HKV"], d["D"]
        out = np.zeros((b, h, dim), dtype=q.dtype)
        for seq in {*lengths} - {0}:  # one batched product per distinct length; no positions: zeros
            rows = [i for i, n in enumerate(lengths) if n == seq]
            qg = q[rows].reshape(len(rows), hkv, h // hkv, dim)                      # b,HKV,G,D
            first = window_start(seq, self.attrs(task)["window"])
            keys, values = k[rows, :, first:seq], v[rows, :, first:seq]              # b,HKV,L,D
            scores = capped(self, task, np.matmul(qg, keys.transpose(0, 1, 3, 2)) * _scale(self, task))  # b,HKV,G,L
            out[rows] = np.matmul(softmax_last(scores), values).reshape(len(rows), h, dim)
        return out

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q, k, v = (to_float64(inputs[n], task.dtype) for n in ("Q", "K", "V"))
        return {"O": self._attend(task, q, k, v, self._lengths(task, inputs))}

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        q, k, v = (to_float32(inputs[n], task.dtype) for n in ("Q", "K", "V"))
        lengths = self._lengths(task, inputs)
        return "numpy float32 attention over the cache", lambda: self._attend(task, q, k, v, lengths)
