"""Linear layers: Y[M,N] = X[M,K] @ W[N,K]^T, full precision (``gemm``, ``gemv``) and with
int4 weights (``gemm_q4``, ``gemv_q4``).

W is stored out-features by in-features, as in Hugging Face checkpoints, so both operands
are contiguous along K. Y has the task's dtype (accumulation is float32 or better).

Weight-only bfloat16 or float16 (``weight=bfloat16`` or ``weight=float16`` on a float32
task): X and Y are float32, W holds raw bfloat16 words (numpy uint16) or IEEE halves (numpy
float16) in the same [N, K] layout, widened to float32 as they are read. A decode step reads
its weights once, so half the bytes is close to half the time. The reference computes with
the widened weights in float64. Templates opt in (``weight_dtypes``).

int4 weight layout (the contract every q4 template reads):
- ``WQ[N, K/2]`` uint8: two 4-bit codes per byte along K, element ``k = 2j`` in the low
  nibble of byte ``j``, ``k = 2j + 1`` in the high nibble;
- ``SCALES[N, K/G]`` and, with ``zero_point``, ``ZEROS[N, K/G]`` in the task's dtype, one
  per group of G = ``group_size`` consecutive k;
- dequantised ``w[n, k] = (code - z) * scale`` with ``z = ZEROS[n, k // G]`` or 8 without
  zero points (symmetric codes).

Decode fusions (``gemv`` and ``gemv_q4``; templates opt in with ``fusable``): a decode step is
a few hundred small kernels, each costing a launch and a drain, so a decode linear layer can
take over its neighbours' work in a decoder layer:
- ``norm=rmsnorm``: X is RMS-normalised first with the norm weight ``G[K]`` and ``eps``,
  Y = (X / rms(X) * G) @ W^T. Every block reads all of X anyway, so each finds the rows'
  mean of squares itself, and the RMSNorm before a projection costs no kernel of its own.
- ``residual=true``: Y = R + X @ W^T with the residual stream ``R[M, N]`` (a buffer other than
  Y), so the residual add after the output and down projections costs none either.
- ``act=swiglu``: W's rows are the gate projection's then the up projection's (N/2 each, as a
  fused gate/up weight stacks them), and Y[M, N/2] = silu(X @ W_gate^T) * (X @ W_up^T): the
  gated MLP's activation costs no kernel, and the N-wide gate/up output is never written.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from runtime.abi import ATTR_DEFAULTS
from runtime.q4 import dequantize_q4, quantize_q4  # the format is the runtime's contract too

from ..task import Task
from ..template import ArgSpec, Operator, Template, register_operator
from .common import FLOAT_DTYPES, ITEMSIZE, from_float, random_uniform, to_float32, to_float64


WEIGHT_ONLY = ("bfloat16", "float16")  # narrower storages W may have on a float32 task
NORMS = ("none", "rmsnorm")
ACTS = ("none", "swiglu")
FUSION_ATTRS = {name: ATTR_DEFAULTS["gemv"][name] for name in ("norm", "eps", "residual", "act")}
FUSION_DOCS = {"norm": "rmsnorm: X is RMS-normalised first, with the norm weight G[K] (decode fusion; CUDA)",
               "eps": "added to the mean of squares of X with norm=rmsnorm",
               "residual": "true: Y = R + X @ W^T, with the residual stream R[M,N] (decode fusion; CUDA)",
               "act": "swiglu: W is gate rows then up rows, Y[M,N/2] = silu(X W_gate^T) * X W_up^T "
                      "(decode fusion; CUDA)"}


def fusions(task: Task) -> tuple[bool, bool]:
    """(X normalised first, residual added to Y) of a linear layer task."""
    return task.attr.get("norm", "none") == "rmsnorm", bool(task.attr.get("residual", False))


def gated(task: Task) -> bool:
    """Whether Y is the SwiGLU of W's two halves (``act=swiglu``)."""
    return task.attr.get("act", "none") == "swiglu"


def is_fused(task: Task) -> bool:
    """Whether a linear layer task takes over any neighbour's work (norm, residual or act)."""
    return any(fusions(task)) or gated(task)


def out_width(task: Task) -> int:
    """Columns of Y: N, or N/2 with ``act=swiglu``."""
    return task.dims["N"] // 2 if gated(task) else task.dims["N"]


def _y_shape(task: Task) -> tuple:
    return ("M", out_width(task)) if gated(task) else ("M", "N")


def norm_eps(task: Task) -> float:
    """The eps of a task's fused RMSNorm (``norm=rmsnorm``)."""
    return float(task.attr.get("eps", FUSION_ATTRS["eps"]))


def check_fusions(op: Operator, task: Task) -> None:
    a = op.attrs(task)
    if a.get("norm", "none") not in NORMS:
        raise ValueError(f"{op.op}: norm must be one of {', '.join(NORMS)}, got {a['norm']!r}")
    if a.get("act", "none") not in ACTS:
        raise ValueError(f"{op.op}: act must be one of {', '.join(ACTS)}, got {a['act']!r}")
    if gated(task) and task.dims["N"] % 2:
        raise ValueError(f"{op.op}: act=swiglu needs an even N (gate rows, then as many up rows), got {task.dims['N']}")
    if isinstance(op, Template) and is_fused(task) and not getattr(op, "fusable", False):
        raise ValueError(f"{op.op}: the {op.target_kind} template takes no decode fusions (norm, residual, act: CUDA "
                         "templates only)")


def fused_args(task: Task) -> tuple[tuple[ArgSpec, ...], tuple[ArgSpec, ...]]:
    """The arguments the fusions add: (G after X, R before Y)."""
    norm, residual = fusions(task)
    return ((ArgSpec("G", "in", task.dtype, ("K",)),) if norm else (),
            (ArgSpec("R", "in", task.dtype, _y_shape(task)),) if residual else ())


def fused_bytes(task: Task) -> float:
    norm, residual = fusions(task)
    d = task.dims
    return ITEMSIZE[task.dtype] * (d["K"] * norm + d["M"] * out_width(task) * residual)


def fused_inputs(task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
    norm, residual = fusions(task)
    d = task.dims
    out = {}
    if norm:  # rows far from unit RMS, so that a missing normalisation shows
        out["G"] = random_uniform(rng, (d["K"],), task.dtype, 0.5, 1.5)
    if residual:
        out["R"] = random_uniform(rng, (d["M"], out_width(task)), task.dtype)
    return out


def fused_x(task: Task, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """X in float64 as the matmul reads it: RMS-normalised with ``norm=rmsnorm``."""
    x = to_float64(inputs["X"], task.dtype)
    if not fusions(task)[0]:
        return x
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + norm_eps(task)) * to_float64(inputs["G"], task.dtype)


def fused_y(task: Task, inputs: dict[str, np.ndarray], y: np.ndarray) -> dict[str, np.ndarray]:
    """Y from the float64 product X @ W^T: gated (``act=swiglu``), then the residual added."""
    if gated(task):
        gate, up = y[:, :out_width(task)], y[:, out_width(task):]
        y = gate / (1.0 + np.exp(-gate)) * up
    return {"Y": y + to_float64(inputs["R"], task.dtype) if fusions(task)[1] else y}


class Matmul(Operator):
    dims = ("M", "N", "K")
    dtypes = FLOAT_DTYPES
    default_attrs = ATTR_DEFAULTS["gemm"]
    attr_docs = {"weight": "storage of W: same (the task's dtype), or bfloat16 or float16 on a float32 task "
                           "(weight-only: 16-bit words widened to float32 as they are read; CPU templates)"}
    weight_dtypes: ClassVar[tuple[str, ...]] = ()  # a template's weight-only storages (the operator: any)

    def weight_dtype(self, task: Task) -> str:
        """The dtype W is stored in: the task's, or a weight-only one."""
        weight = self.attrs(task)["weight"]
        return task.dtype if weight == "same" else weight

    def check(self, task: Task) -> None:
        super().check(task)
        check_fusions(self, task)
        weight = self.attrs(task)["weight"]
        if weight == "same":
            return
        if weight not in WEIGHT_ONLY or task.dtype != "float32":
            raise ValueError(f"{self.op}: weight={weight!r} on a {task.dtype} task; use weight=same, or "
                             f"weight={' or '.join(WEIGHT_ONLY)} on a float32 task")
        if isinstance(self, Template) and weight not in self.weight_dtypes:
            raise ValueError(f"{self.op}: the {self.target_kind} template takes no weight={weight} "
                             "(W in the task's dtype only)")

    def resident_inputs(self, task: Task) -> tuple[str, ...]:
        return ("W", *(a.name for a in fused_args(task)[0]))

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        g, r = fused_args(task)
        return (ArgSpec("X", "in", task.dtype, ("M", "K")), *g, ArgSpec("W", "in", self.weight_dtype(task), ("N", "K")),
                *r, ArgSpec("Y", "out", task.dtype, _y_shape(task)))

    def flops(self, task: Task) -> float:
        d = task.dims
        return 2.0 * d["M"] * d["N"] * d["K"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        size = ITEMSIZE[task.dtype]
        return (size * (d["M"] * d["K"] + d["M"] * out_width(task)) + ITEMSIZE[self.weight_dtype(task)] * d["N"] * d["K"]
                + fused_bytes(task))

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        return {"X": random_uniform(rng, (d["M"], d["K"]), task.dtype),
                "W": random_uniform(rng, (d["N"], d["K"]), self.weight_dtype(task)), **fused_inputs(task, rng)}

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        w = to_float64(inputs["W"], self.weight_dtype(task))
        return fused_y(task, inputs, fused_x(task, inputs) @ w.T)

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        """float32 BLAS (weight-only: on the widened weights, four bytes each)."""
        x = to_float32(inputs["X"], task.dtype)
        w = to_float32(inputs["W"], self.weight_dtype(task))
        y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        return "numpy matmul X @ W.T (float32 BLAS)", lambda: np.matmul(x, w.T, out=y)


@register_operator
class GemmOp(Matmul):
    op = "gemm"
    example_shape = {"M": 1024, "N": 1024, "K": 1024}
    dynamic_dims = ("M",)  # a prefill's token rows, where a template supports it (the CPU's)
    description = "matmul Y[M,N] = X[M,K] @ W[N,K]^T (linear layer, HF weight layout)"


GEMV_MAX_M = 16


@register_operator
class GemvOp(Matmul):
    op = "gemv"
    example_shape = {"M": 1, "N": 11008, "K": 4096}
    description = "decode matmul Y[M,N] = X[M,K] @ W[N,K]^T, M = 1..16"
    default_attrs = ATTR_DEFAULTS["gemv"]
    attr_docs = {**Matmul.attr_docs, **FUSION_DOCS}

    def check(self, task: Task) -> None:
        super().check(task)
        if task.dims["M"] > GEMV_MAX_M:
            raise ValueError(f"gemv is the decode case M = 1..{GEMV_MAX_M}; use gemm for M = {task.dims['M']}")


# ----------------------------------------------------------------------------- int4


class MatmulQ4(Operator):
    dims = ("M", "N", "K")
    dtypes = FLOAT_DTYPES
    default_attrs = ATTR_DEFAULTS["gemm_q4"]
    attr_docs = {"group_size": "weights per scale (32, 64 or 128) along K",
                 "zero_point": "true: each group also has a zero point (asymmetric int4); false: symmetric"}

    def check(self, task: Task) -> None:
        super().check(task)
        check_fusions(self, task)
        a = self.attrs(task)
        if a["group_size"] not in (32, 64, 128):
            raise ValueError(f"{self.op}: group_size must be 32, 64 or 128, got {a['group_size']}")
        if task.dims["K"] % a["group_size"]:
            raise ValueError(f"{self.op}: K = {task.dims['K']} must be a multiple of group_size {a['group_size']}")

    def resident_inputs(self, task: Task) -> tuple[str, ...]:
        zeros = ("ZEROS",) if self.attrs(task)["zero_point"] else ()
        return ("WQ", "SCALES", *zeros, *(a.name for a in fused_args(task)[0]))

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        k, groups = task.dims["K"], task.dims["K"] // self.attrs(task)["group_size"]
        g, r = fused_args(task)
        args = [ArgSpec("X", "in", task.dtype, ("M", "K")), *g,
                ArgSpec("WQ", "in", "uint8", ("N", k // 2)),
                ArgSpec("SCALES", "in", task.dtype, ("N", groups))]
        if self.attrs(task)["zero_point"]:
            args.append(ArgSpec("ZEROS", "in", task.dtype, ("N", groups)))
        args += [*r, ArgSpec("Y", "out", task.dtype, _y_shape(task))]
        return tuple(args)

    def flops(self, task: Task) -> float:
        d = task.dims
        return 2.0 * d["M"] * d["N"] * d["K"]

    def min_bytes(self, task: Task) -> float:
        d = task.dims
        a = self.attrs(task)
        size = ITEMSIZE[task.dtype]
        per_group = size * (2 if a["zero_point"] else 1)
        weights = d["N"] * d["K"] / 2 + d["N"] * d["K"] / a["group_size"] * per_group
        return weights + size * (d["M"] * d["K"] + d["M"] * out_width(task)) + fused_bytes(task)

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        d = task.dims
        a = self.attrs(task)
        w = rng.standard_normal((d["N"], d["K"])).astype(np.float32) * 0.05
        q = quantize_q4(w, a["group_size"], a["zero_point"])
        out = {"X": random_uniform(rng, (d["M"], d["K"]), task.dtype), "WQ": q["WQ"],
               "SCALES": from_float(q["SCALES"], task.dtype)}
        if a["zero_point"]:
            out["ZEROS"] = from_float(q["ZEROS"], task.dtype)
        return {**out, **fused_inputs(task, rng)}

    def dequantized(self, task: Task, inputs: dict[str, np.ndarray]) -> np.ndarray:
        a = self.attrs(task)
        zeros = to_float64(inputs["ZEROS"], task.dtype) if a["zero_point"] else None
        return dequantize_q4(inputs["WQ"], to_float64(inputs["SCALES"], task.dtype), zeros, a["group_size"])

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return fused_y(task, inputs, fused_x(task, inputs) @ self.dequantized(task, inputs).T)

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]):
        """fp32 GEMV/GEMM on the same (dequantised) weights: what int4 must beat."""
        x = to_float32(inputs["X"], task.dtype)
        w = self.dequantized(task, inputs).astype(np.float32)
        y = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)
        return "numpy float32 matmul on the dequantised weights", lambda: np.matmul(x, w.T, out=y)


@register_operator
class GemvQ4Op(MatmulQ4):
    op = "gemv_q4"
    example_shape = {"M": 1, "N": 11008, "K": 4096}
    description = "decode matmul with int4 weights and group-wise scales, M = 1..16"
    default_attrs = ATTR_DEFAULTS["gemv_q4"]
    attr_docs = {**MatmulQ4.attr_docs, **FUSION_DOCS}

    def check(self, task: Task) -> None:
        super().check(task)
        if task.dims["M"] > GEMV_MAX_M:
            raise ValueError(f"gemv_q4 is the decode case M = 1..{GEMV_MAX_M}; use gemm_q4")


@register_operator
class GemmQ4Op(MatmulQ4):
    op = "gemm_q4"
    example_shape = {"M": 128, "N": 4096, "K": 4096}
    dynamic_dims = ("M",)  # as gemm's
    description = "matmul with int4 weights and group-wise scales (prefill)"
