"""``layernorm`` on CUDA: Y = (X - mean) / sqrt(var + eps) * G + BETA, a warp or block per row.

Cached rows take the two-pass statistics (mean, then the sum of squared deviations) from
the cache. Re-read rows get both statistics in one pass of sums shifted by the row's first
element (var = E[(x-k)^2] - E[x-k]^2 is exact in exact arithmetic for any k, and a k near
the mean avoids the cancellation of the unshifted formula), then one pass writes.
"""
from __future__ import annotations

from ...ops.elementwise import LayerNormOp
from ...task import Task
from ...template import register_template
from .rowplan import RowKernelCuda, RowPlan, c_float


@register_template
class LayerNormCuda(LayerNormOp, RowKernelCuda):
    dtypes = ("float32", "float16", "bfloat16")

    def body(self, task: Task, plan: RowPlan) -> str:
        return _body(plan, float(self.attrs(task)["eps"]))


def _body(p: RowPlan, eps: float) -> str:
    head = "  const T* x = X + row * N;\n  T* y = Y + row * N;\n" + p.declare_cache("x")
    if p.cache == "reread":
        stats = (
            "  const float shift = to_f32(x[0]);\n  float s1 = 0.0f, s2 = 0.0f;\n"
            + p.first_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) "
                           "{ const float d = to_f32(a.e[e]) - shift; s1 += d; s2 = fmaf(d, d, s2); }\n")
            + "  const float m1 = row_sum(s1, scratch) * (1.0f / N);\n"
            "  const float var = fmaxf(row_sum(s2, scratch) * (1.0f / N) - m1 * m1, 0.0f);\n"
            "  const float mean = shift + m1;\n")
    else:
        stats = (
            "  float s1 = 0.0f;\n"
            + p.first_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) s1 += to_f32(a.e[e]);\n")
            + "  const float mean = row_sum(s1, scratch) * (1.0f / N);\n  float s2 = 0.0f;\n"
            + p.next_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) "
                          "{ const float d = to_f32(a.e[e]) - mean; s2 = fmaf(d, d, s2); }\n")
            + "  const float var = row_sum(s2, scratch) * (1.0f / N);\n")
    write = (f"  const float rstd = rsqrtf(var + {c_float(eps)});\n"
             + p.write_pass("x", "fmaf((to_f32(a.e[e]) - mean) * rstd, to_f32(g.e[e]), to_f32(b.e[e]))",
                            columns=p.column("g", "G") + p.column("b", "BETA")))
    return head + stats + write
