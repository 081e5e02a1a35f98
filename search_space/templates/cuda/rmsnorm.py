"""``rmsnorm`` on CUDA: Y = X / sqrt(mean(X^2) + eps) * G, one warp or block per row.

With ``residual`` the kernel first forms S = X + R, writes it (the new residual stream)
and normalises S as stored (rounded to the dtype, like a fused add-norm that hands S to the
next layer). Pass one loads the row (and R), accumulates the sum of squares and keeps the
row (registers / shared memory) or not (then pass two re-reads X, or S, which this very
thread wrote, with ordinary loads). G is read through the read-only cache.
"""
from __future__ import annotations

from ...ops.elementwise import RMSNormOp
from ...task import Task
from ...template import register_template
from .rowplan import RowKernelCuda, RowPlan, c_float


@register_template
class RMSNormCuda(RMSNormOp, RowKernelCuda):
    dtypes = ("float32", "float16", "bfloat16")

    def streams(self, task: Task) -> int:
        return 2 if self._residual(task) else 1  # R is loaded with X

    def body(self, task: Task, plan: RowPlan) -> str:
        return _body(plan, self._residual(task), float(self.attrs(task)["eps"]))


def _body(p: RowPlan, residual: bool, eps: float) -> str:
    head = "  const T* x = X + row * N;\n  T* y = Y + row * N;\n"
    first = p.loop(True) + f"    Pack<T, VEC> a = {p.first_load('x')};\n"
    source = "x"
    if residual:
        # S is read back in re-read mode: keep it cached (no evict-first) there.
        s_hint = p.store_hint if p.cache != "reread" else 0
        head += "  const T* r = R + row * N;\n  T* s = S + row * N;\n"
        first += (f"    const Pack<T, VEC> b = {p.first_load('r')};\n"
                  "#pragma unroll\n    for (int e = 0; e < VEC; ++e) a.e[e] = from_f32<T>(to_f32(a.e[e]) + to_f32(b.e[e]));\n"
                  f"    store_pack<VEC, {s_hint}>(s + (long long)v * VEC, a);\n")
        source = "s"
    first += (p.keep("x", "a")
              + "#pragma unroll\n    for (int e = 0; e < VEC; ++e) { const float f = to_f32(a.e[e]); ss = fmaf(f, f, ss); }\n  }\n")
    return (head + p.declare_cache("x") + "  float ss = 0.0f;\n" + first
            + f"  const float inv = rsqrtf(row_sum(ss, scratch) * (1.0f / N) + {c_float(eps)});\n"
            + p.write_pass(source, "to_f32(a.e[e]) * inv * to_f32(g.e[e])", columns=p.column("g", "G")))
