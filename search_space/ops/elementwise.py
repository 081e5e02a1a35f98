"""Row-wise and element-wise operators of a Llama-style block.

Every one works on rows: M rows (tokens) of N elements (hidden or intermediate size),
except ``rope`` which works on T tokens x H heads x D head dims. Outputs have the task's
dtype; arithmetic is float32 or better. Argument names and layouts (the contract every
template reads):

- ``softmax``:   X[M,N] -> Y[M,N], each row normalised (max-subtracted, exp, divided by sum).
- ``rmsnorm``:   X[M,N], G[N] -> Y[M,N] = X / sqrt(mean(X^2) + eps) * G. With
  ``residual``: X[M,N], R[M,N], G[N] -> S[M,N] = X + R and Y[M,N] = rmsnorm(S) * G
  (the fused residual add of a decoder block: S is the new residual stream).
- ``layernorm``: X[M,N], G[N], BETA[N] -> Y = (X - mean) / sqrt(var + eps) * G + BETA.
- ``rope``:      X[T,H,D], P[T] (int32 positions) -> Y[T,H,D], rotate-half (Llama / HF):
  for i < D/2, f_i = theta^(-2i/D) (rescaled for ``rope_type`` linear, llama3, yarn or longrope,
  see ``runtime.rope_frequencies``), a = P[t] * f_i, c = s cos a, n = s sin a with s the
  ``attention_factor`` of yarn and longrope (1 for the other types, ``rotation_scale``):
  Y[i] = X[i] c - X[i + D/2] n,  Y[i + D/2] = X[i + D/2] c + X[i] n. With ``rotary_dim`` R
  (partial rotary, 0 for D) the first R dims of each head are rotated so (D read as R) and
  dims R .. D - 1 are copied.
- ``swiglu``:    G[M,N], U[M,N] -> Y = silu(G) * U, silu(g) = g / (1 + exp(-g)).
- ``gelu``:      X[M,N] -> Y = 0.5 X (1 + tanh(sqrt(2/pi) (X + 0.044715 X^3))).
- ``geglu``:     G[M,N], U[M,N] -> Y = gelu(G) * U, gelu as above (Gemma's gated MLP).
- ``add``:       A[M,N], B[M,N] -> Y = A + B.
- ``bias_add``:  X[M,N], B[N] -> Y = X + B (B added to every row: a linear layer's bias).
- ``gather_columns``: X[M,N], P[N] (int32, each in 0 .. N - 1) -> Y[m, j] = X[m, P[j]]: the input
  of a linear layer quantised with act-order (GPTQ ``desc_act``), whose weight rows are stored
  sorted by group, put in that order.
- ``qk_norm``:   X[T, H + 2 HKV, D] (a token's Q/K/V projection: H query heads, then HKV key
  heads, then HKV value heads), GQ, GK -> Y of the same shape, the value heads copied. With
  ``span`` head (Qwen3's per-head q_norm and k_norm, before the rotary embedding), GQ[D] and
  GK[D]: each query head is RMS-normalised over its D dims and scaled by GQ, each key head
  likewise by GK. With ``span`` projection (OLMo 2's), GQ[H D] and GK[HKV D]: a token's whole
  query projection (H D values) is one RMS row scaled by GQ, its whole key projection one by GK.

M (and T) may be runtime arguments: the number of tokens changes from step to step.
"""
from __future__ import annotations

import math

import numpy as np

from runtime.abi import ATTR_DEFAULTS
from runtime.rope_frequencies import (ROPE_TYPES, SCALING_KEYS, frequencies_of_attrs, rope_problem, rotary_dim_of,
                                     rotary_dim_problem, rotation_scale)

from ..task import Task
from ..template import ArgSpec, Operator, register_operator
from .common import FLOAT_DTYPES, ITEMSIZE, random_normal, random_uniform, to_float32, to_float64


class NumpyComputedOp(Operator):
    """An operator whose subclass computes it in numpy (``compute``, over a dict of arrays in
    whatever float type they hold): its reference is that in float64, its baseline in float32."""

    def compute(self, task: Task, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The operator in numpy, in whatever float type ``arrays`` hold."""
        raise NotImplementedError

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.compute(task, {k: to_float64(v, task.dtype) for k, v in inputs.items()})

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        arrays = {k: to_float32(v, task.dtype) for k, v in inputs.items()}
        return f"numpy float32 {self.op}", lambda: self.compute(task, arrays)


class RowOp(NumpyComputedOp):
    """Operators over M rows of N elements; inputs and outputs named by the subclass."""

    dims = ("M", "N")
    dynamic_dims = ("M",)
    dtypes = FLOAT_DTYPES
    example_shape = {"M": 512, "N": 4096}
    row_inputs: tuple[str, ...] = ("X",)
    vector_inputs: tuple[str, ...] = ()  # per-column parameters of shape [N]
    outputs: tuple[str, ...] = ("Y",)
    flops_per_element = 1.0

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        return (tuple(ArgSpec(n, "in", dt, ("M", "N")) for n in self.row_inputs)
                + tuple(ArgSpec(n, "in", dt, ("N",)) for n in self.vector_inputs)
                + tuple(ArgSpec(n, "out", dt, ("M", "N")) for n in self.outputs))

    def flops(self, task: Task) -> float:
        return self.flops_per_element * task.dims["M"] * task.dims["N"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        rows = len(self.row_inputs) + len(self.outputs)
        return ITEMSIZE[task.dtype] * (rows * d["M"] * d["N"] + len(self.vector_inputs) * d["N"])

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        out = {n: random_normal(rng, (d["M"], d["N"]), task.dtype) for n in self.row_inputs}
        out.update({n: random_uniform(rng, (d["N"],), task.dtype, 0.5, 1.5) for n in self.vector_inputs})
        return out


@register_operator
class SoftmaxOp(RowOp):
    op = "softmax"
    flops_per_element = 4.0
    description = "row softmax Y = exp(X - max) / sum"

    def compute(self, task, a):
        x = a["X"]
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return {"Y": e / e.sum(axis=1, keepdims=True)}


@register_operator
class RMSNormOp(RowOp):
    op = "rmsnorm"
    default_attrs = ATTR_DEFAULTS["rmsnorm"]
    attr_docs = {"eps": "added to the mean of squares before the square root",
                 "residual": "true: normalise X + R and also write that sum as S (the fused residual add)"}
    flops_per_element = 4.0
    description = "RMSNorm Y = X / rms(X) * G, optionally fused with the residual add S = X + R"

    def _residual(self, task: Task) -> bool:
        return bool(self.attrs(task)["residual"])

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        rows = ("X", "R") if self._residual(task) else ("X",)
        outs = ("Y", "S") if self._residual(task) else ("Y",)
        return (tuple(ArgSpec(n, "in", dt, ("M", "N")) for n in rows) + (ArgSpec("G", "in", dt, ("N",)),)
                + tuple(ArgSpec(n, "out", dt, ("M", "N")) for n in outs))

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        rows = 4 if self._residual(task) else 2
        return ITEMSIZE[task.dtype] * (rows * d["M"] * d["N"] + d["N"])

    def make_inputs(self, task, rng):
        d = task.dims
        out = {"X": random_normal(rng, (d["M"], d["N"]), task.dtype),
               "G": random_uniform(rng, (d["N"],), task.dtype, 0.5, 1.5)}
        if self._residual(task):
            out["R"] = random_normal(rng, (d["M"], d["N"]), task.dtype)
        return out

    def compute(self, task, a):
        x = a["X"] + a["R"] if self._residual(task) else a["X"]
        eps = float(self.attrs(task)["eps"])
        y = x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + eps) * a["G"]
        return {"Y": y, "S": x} if self._residual(task) else {"Y": y}


@register_operator
class LayerNormOp(RowOp):
    op = "layernorm"
    vector_inputs = ("G", "BETA")
    default_attrs = ATTR_DEFAULTS["layernorm"]
    attr_docs = {"eps": "added to the variance before the square root"}
    flops_per_element = 6.0
    description = "LayerNorm Y = (X - mean) / std * G + BETA"

    def compute(self, task, a):
        x = a["X"]
        mean = x.mean(axis=1, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=1, keepdims=True)
        return {"Y": (x - mean) / np.sqrt(var + float(self.attrs(task)["eps"])) * a["G"] + a["BETA"]}


@register_operator
class SwiGLUOp(RowOp):
    op = "swiglu"
    row_inputs = ("G", "U")
    example_shape = {"M": 512, "N": 11008}
    flops_per_element = 6.0
    description = "SwiGLU Y = silu(G) * U (the gated MLP activation)"

    def compute(self, task, a):
        g = a["G"]
        return {"Y": g / (1.0 + np.exp(-g)) * a["U"]}


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (PyTorch's ``approximate="tanh"``) in the type of ``x``."""
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


@register_operator
class GeluOp(RowOp):
    op = "gelu"
    flops_per_element = 10.0
    description = "GELU, tanh approximation"

    def compute(self, task, a):
        return {"Y": gelu_tanh(a["X"])}


@register_operator
class GegluOp(RowOp):
    op = "geglu"
    row_inputs = ("G", "U")
    example_shape = {"M": 512, "N": 11008}
    flops_per_element = 12.0
    description = "GeGLU Y = gelu_tanh(G) * U (Gemma's gated MLP activation)"

    def compute(self, task, a):
        return {"Y": gelu_tanh(a["G"]) * a["U"]}


@register_operator
class AddOp(RowOp):
    op = "add"
    row_inputs = ("A", "B")
    description = "residual add Y = A + B"

    def compute(self, task, a):
        return {"Y": a["A"] + a["B"]}


@register_operator
class BiasAddOp(RowOp):
    op = "bias_add"
    vector_inputs = ("B",)
    description = "bias add Y = X + B, B[N] added to every row (a linear layer's bias)"

    def compute(self, task, a):
        return {"Y": a["X"] + a["B"]}


@register_operator
class GatherColumnsOp(RowOp):
    op = "gather_columns"
    description = ("Y[m, j] = X[m, P[j]]: each row's columns in the order P gives (the input of an "
                   "act-order int4 linear layer, its weights stored sorted by group)")
    flops_per_element = 0.0

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        return (ArgSpec("X", "in", dt, ("M", "N")), ArgSpec("P", "in", "int32", ("N",)),
                ArgSpec("Y", "out", dt, ("M", "N")))

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return ITEMSIZE[task.dtype] * 2 * d["M"] * d["N"] + 4 * d["N"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        return {"X": random_normal(rng, (d["M"], d["N"]), task.dtype),
                "P": rng.permutation(d["N"]).astype(np.int32)}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": to_float64(inputs["X"], task.dtype)[:, inputs["P"]]}

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        x, order = to_float32(inputs["X"], task.dtype), inputs["P"]
        return "numpy take", lambda: np.take(x, order, axis=1)


@register_operator
class QKNormOp(NumpyComputedOp):
    op = "qk_norm"
    dims = ("T", "H", "HKV", "D")
    dynamic_dims = ("T",)
    dtypes = FLOAT_DTYPES
    default_attrs = ATTR_DEFAULTS["qk_norm"]
    attr_docs = {"eps": "added to the mean of squares of each normalised run before the square root",
                 "span": "what one RMS row is: head: each query and key head of D (Qwen3; GQ, GK of D); "
                         "projection: a token's whole query projection of H D and key projection of "
                         "HKV D (OLMo 2; GQ of H D, GK of HKV D)"}
    example_shape = {"T": 512, "H": 32, "HKV": 8, "D": 128}
    description = ("RMSNorm of each query and key head (Qwen3's q_norm, k_norm) or of the whole q and k "
                   "projections (OLMo 2's); value heads copied")
    SPANS = ("head", "projection")

    def check(self, task: Task) -> None:
        super().check(task)
        span = self.attrs(task)["span"]
        if span not in self.SPANS:
            raise ValueError(f"qk_norm: span = {span!r}; use one of {', '.join(self.SPANS)}")

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt, rows = task.dtype, ("T", self.heads(task), "D")
        q_run, k_run = self.run_lengths(task)
        gq, gk = ((q_run,), (k_run,)) if self.by_projection(task) else (("D",), ("D",))
        return (ArgSpec("X", "in", dt, rows), ArgSpec("GQ", "in", dt, gq), ArgSpec("GK", "in", dt, gk),
                ArgSpec("Y", "out", dt, rows))

    @staticmethod
    def heads(task: Task) -> int:
        """Heads per token row: query, key and value."""
        return task.dims["H"] + 2 * task.dims["HKV"]

    def by_projection(self, task: Task) -> bool:
        return self.attrs(task)["span"] == "projection"

    def run_lengths(self, task: Task) -> tuple[int, int]:
        """The elements of one RMS row of a token's query part and of its key part, which are
        the lengths of GQ and GK: D each (span head), or H D and HKV D (span projection)."""
        d = task.dims
        return (d["H"] * d["D"], d["HKV"] * d["D"]) if self.by_projection(task) else (d["D"], d["D"])

    def flops(self, task: Task) -> float:
        d = task.dims
        return 4.0 * d["T"] * (d["H"] + d["HKV"]) * d["D"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return ITEMSIZE[task.dtype] * (2 * d["T"] * self.heads(task) * d["D"] + sum(self.run_lengths(task)))

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        q_run, k_run = self.run_lengths(task)
        return {"X": random_normal(rng, (d["T"], self.heads(task), d["D"]), task.dtype),
                "GQ": random_uniform(rng, (q_run,), task.dtype, 0.5, 1.5),
                "GK": random_uniform(rng, (k_run,), task.dtype, 0.5, 1.5)}

    def compute(self, task: Task, a: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t, h, hkv, d = (task.dims[n] for n in ("T", "H", "HKV", "D"))
        x = a["X"]
        y = x.copy()
        eps = float(self.attrs(task)["eps"])
        for first, count, gain in ((0, h, a["GQ"]), (h, hkv, a["GK"])):
            heads = slice(first, first + count)
            run = gain.shape[0]  # D (each head a row) or count * D (the whole projection one row)
            part = x[:, heads].reshape(t, count * d // run, run)
            normed = part / np.sqrt(np.mean(part * part, axis=-1, keepdims=True) + eps) * gain
            y[:, heads] = normed.reshape(t, count, d)
        return {"Y": y}


def check_rope(op: str, task: Task) -> None:
    """ValueError for an odd head dim or rope attributes that do not describe a rotation."""
    if task.dims["D"] % 2:
        raise ValueError(f"{op}: head dim D = {task.dims['D']} must be even")
    attrs = task.attr
    theta = attrs.get("theta", RopeOp.default_attrs["theta"])
    if theta <= 0:  # a finite number: Operator.check, which every caller runs first, refuses anything else
        raise ValueError(f"{op}: theta = {theta!r} is not a positive number")
    rotary_dim = attrs.get("rotary_dim", 0)
    problem = (rotary_dim and rotary_dim_problem(rotary_dim, task.dims["D"])) or rope_problem(
        attrs.get("rope_type", "default"), {k: v for k, v in attrs.items() if k in SCALING_KEYS},
        rotary_dim_of(task.dims["D"], attrs))
    if problem:
        raise ValueError(f"{op}: {problem}")


def rotate_half(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Rotate-half RoPE of x[T, heads, D] at positions[T], pair i turning by position * freqs[i],
    cos and sin multiplied by ``scale`` (yarn's or longrope's attention factor, ``rotation_scale``).
    The first 2 len(freqs) dims are rotated (pairs (i, i + len(freqs))), the rest pass through
    (partial rotary)."""
    half = len(freqs)
    if 2 * half < x.shape[-1]:
        return np.concatenate([rotate_half(x[..., :2 * half], positions, freqs, scale), x[..., 2 * half:]], axis=-1)
    dtype = np.float64 if x.dtype == np.float64 else np.float32
    angle = (positions.astype(np.float64)[:, None] * freqs[None, :]).astype(dtype)[:, None, :]  # T,1,D/2
    cos, sin = np.cos(angle), np.sin(angle)
    if scale != 1.0:
        cos, sin = cos * dtype(scale), sin * dtype(scale)
    lo, hi = x[..., :half], x[..., half:]
    return np.concatenate([lo * cos - hi * sin, hi * cos + lo * sin], axis=-1)


@register_operator
class RopeOp(Operator):
    op = "rope"
    dims = ("T", "H", "D")
    dynamic_dims = ("T",)
    dtypes = FLOAT_DTYPES
    # the scaling parameters' defaults are only their types (for --attr) and neutral values: a
    # rope of a scaled type (linear, llama3, yarn, longrope) must name every parameter its type takes (``check``)
    default_attrs = {**ATTR_DEFAULTS["rope"], "factor": 1.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": True, "attention_factor": 1.0,
                     "short_factor": ()}
    attr_docs = {
        "theta": "RoPE base: position p turns pair i by p * theta^(-2i/D) (before scaling)",
        "rope_type": f"frequency scaling, as transformers' rope_type: {', '.join(ROPE_TYPES)}",
        "factor": "linear, llama3, yarn (required there): how much slower the (long-wavelength) frequencies turn",
        "low_freq_factor": "llama3 (required): wavelengths above original_max_position_embeddings / this are scaled",
        "high_freq_factor": "llama3 (required): wavelengths below original_max_position_embeddings / this are kept",
        "original_max_position_embeddings": "llama3, yarn (required): the context length the model was pretrained at",
        "beta_fast": "yarn (required; transformers' default 32): pairs turning more often than this over "
                     "original_max_position_embeddings are kept",
        "beta_slow": "yarn (required; transformers' default 1): pairs turning less often than this over "
                     "original_max_position_embeddings are divided by factor (those between are blended)",
        "truncate": "yarn (required; transformers' default true): round the blended band's ends out to whole pairs",
        "attention_factor": "yarn, longrope (required; from factor or mscale as transformers computes it): cos and "
                            "sin are multiplied by it, so the rotated vectors come out scaled by it",
        "rotary_dim": "partial rotary (Phi-4-mini): only the first rotary_dim dims of a head are rotated (an even "
                      "number, pairs (i, i + rotary_dim/2)), the rest pass through; 0: all D",
        "short_factor": "longrope (required): rotary_dim/2 (D/2) positive numbers, pair i's frequency divided by the i-th (the "
                        "factors transformers applies within the original context)",
    }
    example_shape = {"T": 512, "H": 32, "D": 128}
    description = "rotary position embedding, rotate-half (Llama), positions as an input"

    def check(self, task: Task) -> None:
        super().check(task)
        check_rope(self.op, task)

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        dt = task.dtype
        return (ArgSpec("X", "in", dt, ("T", "H", "D")), ArgSpec("P", "in", "int32", ("T",)),
                ArgSpec("Y", "out", dt, ("T", "H", "D")))

    def flops(self, task: Task) -> float:
        d = task.dims
        return 3.0 * d["T"] * d["H"] * d["D"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        return 2 * ITEMSIZE[task.dtype] * d["T"] * d["H"] * d["D"] + 4 * d["T"]

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        start = int(rng.integers(0, 2048))
        return {"X": random_normal(rng, (d["T"], d["H"], d["D"]), task.dtype),
                "P": np.arange(start, start + d["T"], dtype=np.int32)}

    def compute(self, task: Task, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        attrs = self.attrs(task)
        return rotate_half(x, positions, frequencies_of_attrs(task.dims["D"], attrs), rotation_scale(attrs))

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"Y": self.compute(task, to_float64(inputs["X"], task.dtype), inputs["P"])}

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        x = to_float32(inputs["X"], task.dtype)
        return "numpy float32 rope", lambda: self.compute(task, x, inputs["P"])
