"""``rmsnorm`` on CUDA: Y = X / sqrt(mean(X^2) + eps) * G, one warp or block per row.

With ``residual`` the kernel first forms S = X + R, writes it (the new residual stream)
and normalises S as stored (rounded to the dtype, like a fused add-norm that hands S to the
next layer). Pass one loads the row (and R), accumulates the sum of squares and keeps the
row (registers / shared memory) or not (then pass two re-reads X, or S, which this very
thread wrote, with ordinary loads). G is read through the read-only cache.
"""
from __future__ import annotations

from ...codegen.cuda import dim_scalars
from ...ops.elementwise import RMSNormOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .rowplan import RowPlan, c_float, row_default, row_features, row_kernel_source, row_space


@register_template
class RMSNormCuda(RMSNormOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return row_space(task, target, streams=2 if self._residual(task) else 1)

    def default(self, task: Task, target: Target) -> Config:
        return row_default(self.space(task, target), task)

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        return row_features(task, config, target, self.min_bytes(task), self.flops(task), passes=2)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        plan = RowPlan.of(task, config)
        args = self.signature(task) + dim_scalars(task)
        body = _body(plan, self._residual(task), float(self.attrs(task)["eps"]))
        return row_kernel_source(task, plan, "rmsnorm_rows", args, body)


def _body(p: RowPlan, residual: bool, eps: float) -> str:
    head = "  const T* x = X + row * N;\n  T* y = Y + row * N;\n"
    first = p.loop(True) + f"    Pack<T, VEC> a = load_pack<VEC, {p.load_hint}>(x + (long long)v * VEC);\n"
    source = "x"
    if residual:
        # S is read back in re-read mode: keep it cached (no evict-first) there.
        s_hint = p.store_hint if p.cache != "reread" else 0
        head += "  const T* r = R + row * N;\n  T* s = S + row * N;\n"
        first += (f"    const Pack<T, VEC> b = load_pack<VEC, {p.load_hint}>(r + (long long)v * VEC);\n"
                  "#pragma unroll\n    for (int e = 0; e < VEC; ++e) a.e[e] = from_f32<T>(to_f32(a.e[e]) + to_f32(b.e[e]));\n"
                  f"    store_pack<VEC, {s_hint}>(s + (long long)v * VEC, a);\n")
        source = "s"
    first += (p.keep("x", "a")
              + "#pragma unroll\n    for (int e = 0; e < VEC; ++e) { const float f = to_f32(a.e[e]); ss = fmaf(f, f, ss); }\n  }\n")
    return (head + p.declare_cache("x") + "  float ss = 0.0f;\n" + first
            + f"  const float inv = rsqrtf(row_sum(ss, scratch) * (1.0f / N) + {c_float(eps)});\n"
            + p.loop(False)
            + f"    const Pack<T, VEC> a = {p.get('x', source)};\n"
            "    const Pack<T, VEC> g = load_pack<VEC, 2>(G + (long long)v * VEC);\n"
            "    Pack<T, VEC> o;\n"
            "#pragma unroll\n    for (int e = 0; e < VEC; ++e) o.e[e] = from_f32<T>(to_f32(a.e[e]) * inv * to_f32(g.e[e]));\n"
            f"    store_pack<VEC, {p.store_hint}>(y + (long long)v * VEC, o);\n  }}\n")
