"""``softmax`` on CUDA: Y = exp(X - max) / sum, one warp or block per row (see rowplan).

With the row cached (registers or shared memory) the kernel makes three passes over the
cache: max, sum of exponentials, write. Re-reading rows from global memory instead, the
first pass keeps an online (max, rescaled sum) per thread, so the row is read twice, not
three times. Exponentials are exp2 of x * log2(e) - max * log2(e) (one FMA each).
"""
from __future__ import annotations

from ...codegen.cuda import dim_scalars
from ...ops.elementwise import SoftmaxOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .rowplan import RowPlan, row_default, row_features, row_kernel_source, row_space


@register_template
class SoftmaxCuda(SoftmaxOp, Template):
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
        return row_kernel_source(task, plan, "softmax_rows", args, _body(plan), log2e=True)


def _body(p: RowPlan) -> str:
    load = f"load_pack<VEC, {p.load_hint}>(x + (long long)v * VEC)"
    head = "  const T* x = X + row * N;\n  T* y = Y + row * N;\n" + p.declare_cache("x")
    if p.cache == "reread":
        stats = (
            "  float mx = -INFINITY, sum = 0.0f;\n" + p.loop(True)
            + f"    const Pack<T, VEC> a = {load};\n"
            "    float vm = to_f32(a.e[0]);\n"
            "#pragma unroll\n    for (int e = 1; e < VEC; ++e) vm = fmaxf(vm, to_f32(a.e[e]));\n"
            "    const float nm = fmaxf(mx, vm);\n"
            "    const float nml = nm * LOG2E;\n"
            "    sum *= exp2f(fmaf(mx, LOG2E, -nml));\n"
            "#pragma unroll\n    for (int e = 0; e < VEC; ++e) sum += exp2f(fmaf(to_f32(a.e[e]), LOG2E, -nml));\n"
            "    mx = nm;\n  }\n"
            "  const float rmx = row_max(mx, scratch);\n"
            # a thread that saw nothing keeps (-inf, 0) and adds nothing
            "  sum = row_sum(mx == -INFINITY ? 0.0f : sum * exp2f((mx - rmx) * LOG2E), scratch);\n"
            "  const float ml = rmx * LOG2E;\n")
    else:
        stats = (
            "  float mx = -INFINITY;\n" + p.loop(True)
            + f"    const Pack<T, VEC> a = {load};\n" + p.keep("x", "a")
            + "#pragma unroll\n    for (int e = 0; e < VEC; ++e) mx = fmaxf(mx, to_f32(a.e[e]));\n  }\n"
            "  const float ml = row_max(mx, scratch) * LOG2E;\n"
            "  float sum = 0.0f;\n" + p.loop(False)
            + f"    const Pack<T, VEC> a = {p.get('x', 'x')};\n"
            "#pragma unroll\n    for (int e = 0; e < VEC; ++e) sum += exp2f(fmaf(to_f32(a.e[e]), LOG2E, -ml));\n  }\n"
            "  sum = row_sum(sum, scratch);\n")
    write = (
        "  const float inv = 1.0f / sum;\n" + p.loop(False)
        + f"    const Pack<T, VEC> a = {p.get('x', 'x')};\n"
        "    Pack<T, VEC> o;\n"
        "#pragma unroll\n    for (int e = 0; e < VEC; ++e) o.e[e] = from_f32<T>(exp2f(fmaf(to_f32(a.e[e]), LOG2E, -ml)) * inv);\n"
        f"    store_pack<VEC, {p.store_hint}>(y + (long long)v * VEC, o);\n  }}\n")
    return head + stats + write
