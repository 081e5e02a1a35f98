"""Built-in schedule templates. Each module registers its template when it is imported: a
lookup imports only the module of the template it names (a worker building one gemv candidate
needs no other), a listing imports them all (``search_space.registry``)."""
from __future__ import annotations

_CPU_OPS = ("add", "attention_decode", "attention_prefill", "bias_add", "gather_columns", "geglu", "gelu", "gemm",
            "gemm_q4", "gemv", "gemv_q4", "layernorm", "qk_norm", "rmsnorm", "rope", "softmax", "swiglu")
# CUDA has every CPU operator and these; one that is on both lists is named once
_CUDA_OPS = _CPU_OPS + tuple(op for op in ("kv_append", "rope_append", "rope_append_attention", "argmax", "qk_norm")
                             if op not in _CPU_OPS)
# a CUDA module that registers more than its own name's template
_CUDA_SHARED = {"kv_append": "device_step", "rope_append": "device_step", "argmax": "device_step",
                "rope_append_attention": "attention_decode"}

# (op, target kind) -> the module that registers that built-in template
MODULES: dict[tuple[str, str], str] = {
    **{(op, "cpu"): f"{__name__}.{op}" for op in _CPU_OPS},
    **{(op, "cuda"): f"{__name__}.cuda.{_CUDA_SHARED.get(op, op)}" for op in _CUDA_OPS},
}
