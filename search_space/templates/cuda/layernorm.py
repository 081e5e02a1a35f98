"""``layernorm`` on CUDA: Y = (X - mean) / sqrt(var + eps) * G + BETA, a warp or block per row.

Cached rows take the two-pass statistics (mean, then the sum of squared deviations) from
the cache. Re-read rows get both statistics in one pass of sums shifted by the row's first
element (var = E[(x-k)^2] - E[x-k]^2 is exact in exact arithmetic for any k, and a k near
the mean avoids the cancellation of the unshifted formula), then one pass writes.
"""
from __future__ import annotations

from ...codegen.cuda import dim_scalars
from ...ops.elementwise import LayerNormOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .rowplan import RowPlan, c_float, row_default, row_features, row_kernel_source, row_space


@register_template
class LayerNormCuda(LayerNormOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return row_space(task, target)

    def default(self, task: Task, target: Target) -> Config:
        return row_default(self.space(task, target), task)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return row_features(task, config, target, self.min_bytes(task), self.flops(task), passes=2)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        plan = RowPlan.of(task, config)
        args = self.signature(task) + dim_scalars(task)
        return row_kernel_source(task, plan, "layernorm_rows", args, _body(plan, float(self.attrs(task)["eps"])))


def _body(p: RowPlan, eps: float) -> str:
    load = f"load_pack<VEC, {p.load_hint}>(x + (long long)v * VEC)"
    head = "  const T* x = X + row * N;\n  T* y = Y + row * N;\n" + p.declare_cache("x")
    if p.cache == "reread":
        stats = (
            "  const float shift = to_f32(x[0]);\n  float s1 = 0.0f, s2 = 0.0f;\n" + p.loop(True)
            + f"    const Pack<T, VEC> a = {load};\n"
            "#pragma unroll\n    for (int e = 0; e < VEC; ++e) { const float d = to_f32(a.e[e]) - shift; s1 += d; s2 = fmaf(d, d, s2); }\n  }\n"
            "  const float m1 = row_sum(s1, scratch) * (1.0f / N);\n"
            "  const float var = fmaxf(row_sum(s2, scratch) * (1.0f / N) - m1 * m1, 0.0f);\n"
            "  const float mean = shift + m1;\n")
    else:
        stats = (
            "  float s1 = 0.0f;\n" + p.loop(True)
            + f"    const Pack<T, VEC> a = {load};\n" + p.keep("x", "a")
            + "#pragma unroll\n    for (int e = 0; e < VEC; ++e) s1 += to_f32(a.e[e]);\n  }\n"
            "  const float mean = row_sum(s1, scratch) * (1.0f / N);\n"
            "  float s2 = 0.0f;\n" + p.loop(False)
            + f"    const Pack<T, VEC> a = {p.get('x', 'x')};\n"
            "#pragma unroll\n    for (int e = 0; e < VEC; ++e) { const float d = to_f32(a.e[e]) - mean; s2 = fmaf(d, d, s2); }\n  }\n"
            "  const float var = row_sum(s2, scratch) * (1.0f / N);\n")
    write = (
        f"  const float rstd = rsqrtf(var + {c_float(eps)});\n" + p.loop(False)
        + f"    const Pack<T, VEC> a = {p.get('x', 'x')};\n"
        "    const Pack<T, VEC> g = load_pack<VEC, 2>(G + (long long)v * VEC);\n"
        "    const Pack<T, VEC> b = load_pack<VEC, 2>(BETA + (long long)v * VEC);\n"
        "    Pack<T, VEC> o;\n"
        "#pragma unroll\n    for (int e = 0; e < VEC; ++e) o.e[e] = from_f32<T>(fmaf((to_f32(a.e[e]) - mean) * rstd, to_f32(g.e[e]), to_f32(b.e[e])));\n"
        f"    store_pack<VEC, {p.store_hint}>(y + (long long)v * VEC, o);\n  }}\n")
    return head + stats + write
