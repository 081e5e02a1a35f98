"""Vendor baselines on the GPU, through torch, keyed by operator: what a tuned CUDA kernel is
compared with by ``autotune bench --target cuda``.

| op | baseline |
| --- | --- |
| gemm, gemv | cuBLAS via ``torch.matmul(X, W.T)`` (TF32 off for float32) |
| gemm_q4, gemv_q4 | tinygemm via ``torch._weight_int4pack_mm`` (bfloat16 activations, its own packing) |
| softmax | ``torch.softmax`` |
| rmsnorm | ``torch.nn.functional.rms_norm`` (with ``residual``: the add, then the norm) |
| layernorm | ``torch.nn.functional.layer_norm`` |
| qk_norm | ``F.rms_norm`` of the q and k heads (HF Qwen3's q_norm, k_norm), or of the whole q and k (``span`` projection: OLMo 2's), ``torch.cat`` with v |
| rope | rotate-half in eager torch with precomputed cos/sin (the Hugging Face Llama way) |
| swiglu | ``F.silu(G) * U`` |
| gelu | ``F.gelu(X, approximate="tanh")`` |
| geglu | ``F.gelu(G, approximate="tanh") * U`` |
| add | ``torch.add`` |
| bias_add | ``X + B`` (broadcast over rows) |
| gather_columns | ``X.index_select(1, P)`` (P as int64, converted once, outside the timing) |
| attention_prefill, attention_decode | ``F.scaled_dot_product_attention`` (GQA) |

Each runs in a worker process that imports torch (never the parent). Inputs come from the
operator's ``make_inputs`` with the same seed as the tuned kernel's; the baseline's output
is compared with the float64 reference and the verdict reported (tinygemm computes in
bfloat16, so its tolerance is bfloat16's whatever the task's dtype). Timing is the CUDA
runner's: CUDA events around each call, an L2-sized buffer written before each one.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from runtime.rope_frequencies import frequencies_of_attrs, rotation_scale

BaselineFactory = Callable[[Any, Any, dict, Any], tuple[str, Callable[[], Any]]]
BASELINES: dict[str, BaselineFactory] = {}


def baseline(*ops: str):
    def register(factory: BaselineFactory) -> BaselineFactory:
        for op in ops:
            BASELINES[op] = factory
        return factory
    return register


def _tensor(torch, array: np.ndarray, dtype: str):
    """A device tensor from an input array (bfloat16 travels as raw uint16)."""
    if dtype == "bfloat16" and array.dtype == np.uint16:
        return torch.from_numpy(array.view(np.int16).copy()).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


def _with_fusions(torch, task, t, name: str, matmul):
    """(name, call) of ``matmul(X)`` with what a decode GEMV fuses done by torch around it: the
    RMSNorm of X before (``norm=rmsnorm``), SwiGLU of the two halves (``act=swiglu``) and the
    residual add (``residual``) after."""
    import torch.nn.functional as F

    from search_space.ops.matmul import fusions, gated, is_fused, norm_eps, out_width

    norm, residual = fusions(task)
    glu, half = gated(task), out_width(task)
    x = t["X"]
    eps = norm_eps(task)
    if not is_fused(task):
        return name, lambda: matmul(x)

    def fused():
        y = matmul(F.rms_norm(x, (x.shape[-1],), t["G"], eps) if norm else x)
        if glu:
            y = F.silu(y[:, :half]) * y[:, half:]
        return y + t["R"] if residual else y

    done = ["RMSNorm before"] * norm + ["SwiGLU after"] * glu + ["add after"] * residual
    return f"{name} with torch's {' and '.join(done)}", fused


@baseline("gemm", "gemv")
def _matmul(torch, task, t, template):
    w = t["W"]
    torch.backends.cuda.matmul.allow_tf32 = False
    return _with_fusions(torch, task, t, "cuBLAS torch.matmul(X, W.T)", lambda x: torch.matmul(x, w.t()))


def tinygemm_pack(torch, wq: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int):
    """Our int4 layout -> tinygemm's: packed weights and [K/G, N, 2] bfloat16 (scale, zero).

    tinygemm dequantises as (q - 8) * scale + zero, so zero = (8 - z) * scale; it packs the
    even k in the high nibble (we put it in the low one).
    """
    codes = torch.from_numpy(wq).cuda()
    scale = torch.from_numpy(np.asarray(scales, dtype=np.float32)).cuda()
    z = torch.from_numpy(np.asarray(zeros, dtype=np.float32)).cuda() if zeros is not None else torch.full_like(scale, 8.0)
    swapped = ((codes & 0x0F) << 4) | (codes >> 4)
    try:  # torch >= 2.5 takes uint8 [N, K/2]
        packed = torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), 8)
    except RuntimeError:  # older torch: int32 codes [N, K]
        unpacked = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack(unpacked, 8)
    scales_zeros = torch.stack([scale, (8.0 - z) * scale], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return packed, scales_zeros


@baseline("gemm_q4", "gemv_q4")
def _int4(torch, task, t, template):
    from search_space.ops.common import to_float32
    from search_space.ops.matmul import is_fused

    a = template.attrs(task)
    raw = t["_raw"]
    zeros = to_float32(raw["ZEROS"], task.dtype) if a["zero_point"] else None
    packed, sz = tinygemm_pack(torch, raw["WQ"], to_float32(raw["SCALES"], task.dtype), zeros, a["group_size"])
    group = a["group_size"]
    if not is_fused(task):  # X converted once, outside the timed call
        x = t["X"].to(torch.bfloat16)
        return ("tinygemm torch._weight_int4pack_mm (bfloat16)",
                lambda: torch._weight_int4pack_mm(x, packed, group, sz))
    return _with_fusions(torch, task, t, "tinygemm torch._weight_int4pack_mm (bfloat16)",
                         lambda x: torch._weight_int4pack_mm(x.to(torch.bfloat16), packed, group, sz))


@baseline("softmax")
def _softmax(torch, task, t, template):
    x = t["X"]
    return "torch.softmax", lambda: torch.softmax(x, dim=-1)


@baseline("rmsnorm")
def _rmsnorm(torch, task, t, template):
    import torch.nn.functional as F

    eps = float(template.attrs(task)["eps"])
    x, g = t["X"], t["G"]
    n = x.shape[-1]
    if template.attrs(task).get("residual"):
        r = t["R"]

        def fused():
            s = x + r
            return F.rms_norm(s, (n,), g, eps), s
        return "torch add + F.rms_norm", fused
    return "F.rms_norm", lambda: F.rms_norm(x, (n,), g, eps)


@baseline("layernorm")
def _layernorm(torch, task, t, template):
    import torch.nn.functional as F

    eps = float(template.attrs(task)["eps"])
    x, g, b = t["X"], t["G"], t["BETA"]
    return "F.layer_norm", lambda: F.layer_norm(x, (x.shape[-1],), g, b, eps)


@baseline("qk_norm")
def _qk_norm(torch, task, t, template):
    import torch.nn.functional as F

    d = task.dims
    eps = float(template.attrs(task)["eps"])
    x, gq, gk = t["X"], t["GQ"], t["GK"]
    if template.by_projection(task):  # OLMo 2: each token's whole q (H D) and k (HKV D) one RMS row
        rows = x.view(x.shape[0], -1)
        q_run, k_run = template.run_lengths(task)

        def qk_norm_projection():
            q, k, v = rows.split([q_run, k_run, k_run], dim=1)
            return torch.cat([F.rms_norm(q, (q_run,), gq, eps), F.rms_norm(k, (k_run,), gk, eps), v],
                             dim=1).view(x.shape)
        return "F.rms_norm of the whole q and k projections, torch.cat with v", qk_norm_projection

    def qk_norm():  # a new Y of X's shape, as the kernel writes: the v heads copied into it
        q, k, v = x.split([d["H"], d["HKV"], d["HKV"]], dim=1)
        return torch.cat([F.rms_norm(q, (d["D"],), gq, eps), F.rms_norm(k, (d["D"],), gk, eps), v], dim=1)
    return "F.rms_norm of the q and k heads, torch.cat with v", qk_norm


@baseline("swiglu")
def _swiglu(torch, task, t, template):
    import torch.nn.functional as F

    g, u = t["G"], t["U"]
    return "F.silu(G) * U", lambda: F.silu(g) * u


@baseline("gelu")
def _gelu(torch, task, t, template):
    import torch.nn.functional as F

    x = t["X"]
    return "F.gelu(tanh)", lambda: F.gelu(x, approximate="tanh")


@baseline("geglu")
def _geglu(torch, task, t, template):
    import torch.nn.functional as F

    g, u = t["G"], t["U"]
    return "F.gelu(G, tanh) * U", lambda: F.gelu(g, approximate="tanh") * u


@baseline("add")
def _add(torch, task, t, template):
    a, b = t["A"], t["B"]
    return "torch.add", lambda: torch.add(a, b)


@baseline("bias_add")
def _bias_add(torch, task, t, template):
    x, b = t["X"], t["B"]
    return "torch X + B", lambda: torch.add(x, b)


@baseline("gather_columns")
def _gather_columns(torch, task, t, template):
    x, p = t["X"], t["P"].long()
    return "torch index_select", lambda: torch.index_select(x, 1, p)


@baseline("rope")
def _rope(torch, task, t, template):
    x, p = t["X"], t["P"]
    d = task.dims["D"]
    cos, sin = _cos_sin(torch, template.attrs(task), d, p, x.dtype, "cuda")  # T, 1, D

    return "eager torch rotate-half (HF Llama)", lambda: _rotate_half(torch, x, cos, sin)


@baseline("attention_prefill")
def _prefill(torch, task, t, template):
    import torch.nn.functional as F

    a = template.attrs(task)
    scale = float(a["scale"]) or 1.0 / math.sqrt(task.dims["D"])
    q, k, v = (t[n].transpose(1, 2) for n in ("Q", "K", "V"))  # B, heads, T, D views
    return ("F.scaled_dot_product_attention (GQA)",
            lambda: F.scaled_dot_product_attention(q, k, v, is_causal=bool(a["causal"]), scale=scale,
                                                   enable_gqa=True))


@baseline("attention_decode")
def _decode(torch, task, t, template):
    import torch.nn.functional as F

    d = task.dims
    scale = float(template.attrs(task)["scale"]) or 1.0 / math.sqrt(d["D"])
    q = t["Q"][:, :, None, :]  # B, H, 1, D
    k, v = t["K"][:, :, : d["L"], :], t["V"][:, :, : d["L"], :]
    if "LENS" in t:  # each sequence its own length: a mask over the first L positions
        mask = (torch.arange(d["L"], device="cuda")[None, :] < t["LENS"][:, None].long())[:, None, None, :]
        return ("F.scaled_dot_product_attention decode (GQA, masked lengths)",
                lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True))
    return ("F.scaled_dot_product_attention decode (GQA)",
            lambda: F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True))


def _written_caches(torch, task, dtype, positions):
    """(caches, rows, at) for the cache outputs of a row append: two caches of NaN (the rows
    nothing writes stay so, as the operator's reference marks them), and the sequences whose
    position lies inside the cache with those positions, as index tensors."""
    d, device = task.dims, positions.device
    caches = [torch.full((d["B"], d["HKV"], d["S"], d["D"]), float("nan"), dtype=dtype, device=device)
              for _ in range(2)]
    inside = [(b, int(p)) for b, p in enumerate(positions.tolist()) if 0 <= int(p) < d["S"]]
    rows = torch.tensor([b for b, _ in inside], device=device, dtype=torch.long)
    at = torch.tensor([p for _, p in inside], device=device, dtype=torch.long)
    return caches, rows, at


def _cos_sin(torch, attrs, dim: int, positions, dtype, device):
    """HF Llama's rotate-half tables [rows, 1, D] at ``positions``: the inverse frequencies as a
    float32 buffer (scaled by the rope type), cos and sin times yarn's attention factor (else 1)."""
    freqs = torch.tensor(frequencies_of_attrs(dim, attrs), dtype=torch.float32, device=device)
    angle = positions.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([angle, angle], dim=-1)[:, None, :]
    scale = rotation_scale(attrs)
    return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def _rotate_half(torch, x, cos, sin):
    """HF's rotate-half of x by the tables: its first cos.shape[-1] dims, the rest as they are (a
    partial rotary, as transformers' Phi-3 applies it)."""
    rotary = cos.shape[-1]
    turned = x[..., :rotary]
    lo, hi = turned[..., : rotary // 2], turned[..., rotary // 2:]
    rotated = turned * cos + torch.cat([-hi, lo], dim=-1) * sin
    return rotated if rotary == x.shape[-1] else torch.cat([rotated, x[..., rotary:]], dim=-1)


def _rotation(torch, task, template, qkv, positions):
    """The rotate-half (HF Llama) of the projection's q and k rows at ``positions``, as a call:
    the cos and sin tables are made once, here."""
    d = task.dims
    heads, dim = d["H"] + d["HKV"], d["D"]
    cos, sin = _cos_sin(torch, template.attrs(task), dim, positions, qkv.dtype, qkv.device)  # B, 1, D
    return lambda: _rotate_half(torch, qkv[:, :heads], cos, sin)


@baseline("kv_append")
def _kv_append(torch, task, t, template):
    caches, rows, at = _written_caches(torch, task, t["K"].dtype, t["P"])

    def append():
        for cache, new in zip(caches, (t["K"], t["V"])):
            cache[rows, :, at] = new[rows]
        return tuple(caches)
    return "torch index_put of the rows", append


@baseline("rope_append")
def _rope_append(torch, task, t, template):
    h, hkv = task.dims["H"], task.dims["HKV"]
    qkv = t["QKV"]
    rotate = _rotation(torch, task, template, qkv, t["P"])
    caches, rows, at = _written_caches(torch, task, qkv.dtype, t["P"])

    def rope_append():
        rotated = rotate()
        caches[0][rows, :, at] = rotated[rows, h:]
        caches[1][rows, :, at] = qkv[rows, h + hkv:]
        return rotated[:, :h], caches[0], caches[1]
    return "eager torch rotate-half (HF Llama) and index_put of the rows", rope_append


@baseline("rope_append_attention")
def _rope_append_attention(torch, task, t, template):
    """rope_append's torch, then SDPA over the cache rows before each position and the new one."""
    import torch.nn.functional as F

    d = task.dims
    h, hkv = d["H"], d["HKV"]
    qkv, p, device = t["QKV"], t["P"], t["QKV"].device
    scale = float(template.attrs(task)["scale"]) or 1.0 / math.sqrt(d["D"])
    rotate = _rotation(torch, task, template, qkv, p)
    # the rows past each position are NaN in the inputs (never read): zeros here, so that masked
    # rows add 0, not NaN; one row more for a position past the cache
    caches = [torch.cat([torch.nan_to_num(t[n]), torch.zeros_like(t[n][:, :, :1])], dim=2) for n in ("K", "V")]
    cached = [min(max(int(position), 0), d["S"]) for position in p.tolist()]
    batch = torch.arange(d["B"], device=device)
    rows = torch.tensor(cached, device=device, dtype=torch.long)
    n = max(cached) + 1
    mask = (torch.arange(n, device=device)[None, :] <= rows[:, None])[:, None, None, :]
    outs, written, at = _written_caches(torch, task, qkv.dtype, p)  # the outputs: only the rows written

    def rope_append_attention():
        rotated = rotate()
        for cache, out, new in zip(caches, outs, (rotated[:, h:], qkv[:, h + hkv:])):
            cache[batch, :, rows] = new
            out[written, :, at] = new[written]
        o = F.scaled_dot_product_attention(rotated[:, :h, None, :], caches[0][:, :, :n], caches[1][:, :, :n],
                                           attn_mask=mask, scale=scale, enable_gqa=True)
        return o, outs[0], outs[1]
    return "eager torch rotate-half, index_put of the rows and SDPA decode (GQA, masked lengths)", rope_append_attention


@baseline("argmax")
def _argmax(torch, task, t, template):
    x = t["X"]
    return "torch.argmax", lambda: torch.argmax(x, dim=-1).to(torch.int32)


def _as_outputs(task, value) -> dict[str, Any]:
    """The baseline's result named like the operator's outputs."""
    if task.op == "attention_prefill":
        return {"O": value.transpose(1, 2)}
    if task.op == "attention_decode":
        return {"O": value[:, :, 0, :]}
    if task.op == "kv_append":
        return {"KC": value[0], "VC": value[1]}
    if task.op == "rope_append":
        return {"Q": value[0], "KC": value[1], "VC": value[2]}
    if task.op == "rope_append_attention":
        return {"O": value[0][:, :, 0, :], "KC": value[1], "VC": value[2]}
    if isinstance(value, tuple):
        return {"Y": value[0], "S": value[1]}
    return {"Y": value}


def run_vendor_baseline(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: build the op's torch baseline on the task's inputs, check it, time it."""
    import importlib

    import torch

    from measure.verify import check_output
    from search_space import Task, get_template
    from search_space.template import TOLERANCE

    importlib.import_module(payload["module"])
    task = Task.from_dict(payload["task"])
    if task.op not in BASELINES:
        return {"error": f"no vendor baseline for {task.op}"}
    template = get_template(task.op, "cuda")
    raw = template.make_inputs(task, np.random.default_rng(payload["seed"]))
    signature = {a.name: a for a in template.signature(task)}
    tensors = {name: _tensor(torch, array, signature[name].dtype if name in signature else task.dtype)
               for name, array in raw.items()}
    tensors["_raw"] = raw
    description, call = BASELINES[task.op](torch, task, tensors, template)
    result = call()
    torch.cuda.synchronize()
    reference = template.reference(task, raw)
    tolerance = TOLERANCE["bfloat16"] if task.op.endswith("_q4") else template.tolerance(task)
    problems = []
    for name, value in _as_outputs(task, result).items():
        got = value.float().cpu().numpy()
        problem = check_output(name, got, reference[name], tolerance, "float32")
        if problem:
            problems.append(problem)
    costs = time_torch(torch, call, payload.get("repeats", 50), payload.get("max_total_s", 2.0))
    return {"description": description, "costs": costs, "median": float(np.median(costs)),
            "check": "; ".join(problems), "torch": torch.__version__, "device": torch.cuda.get_device_name()}


def time_torch(torch, call: Callable[[], Any], repeats: int, max_total_s: float) -> list[float]:
    """Seconds per call: events around each call, a buffer twice the L2 written before each."""
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 64 << 20)
    flush = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device="cuda")
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    first = max(start.elapsed_time(end) * 1e-3, 1e-7)
    n = max(10, min(repeats, int(max_total_s / first)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush.fill_(i)
        starts[i].record()
        call()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends)]


def tensor_core_peak(payload: dict[str, Any]) -> dict[str, Any]:
    """Worker side: cuBLAS rates (GFLOP/s) on random 8192^3 bfloat16 and float16 products and a
    4096^3 float32 one (TF32 off): the practical matrix ceilings of this GPU, measured now."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    out = {}
    for name, dtype, n in (("bf16_gflops", torch.bfloat16, 8192), ("fp16_gflops", torch.float16, 8192),
                           ("fp32_matmul_gflops", torch.float32, 4096)):
        a = torch.randn(n, n, device="cuda", dtype=dtype)
        b = torch.randn(n, n, device="cuda", dtype=dtype)
        costs = time_torch(torch, lambda: torch.matmul(a, b), 10, 2.0)
        out[name] = 2.0 * n ** 3 / float(np.median(costs)) / 1e9
        del a, b
    out["torch"] = torch.__version__
    return out
