"""``softmax`` on CUDA: Y = exp(X - max) / sum, one warp or block per row (see rowplan).

With the row cached (registers or shared memory) the kernel makes three passes over the
cache: max, sum of exponentials, write. Re-reading rows from global memory instead, the
first pass keeps an online (max, rescaled sum) per thread, so the row is read twice, not
three times. Exponentials are exp2 of x * log2(e) - max * log2(e) (one FMA each).
"""
from __future__ import annotations

from ...ops.elementwise import SoftmaxOp
from ...task import Task
from ...template import register_template
from .rowplan import RowKernelCuda, RowPlan


@register_template
class SoftmaxCuda(SoftmaxOp, RowKernelCuda):
    dtypes = ("float32", "float16", "bfloat16")
    log2e = True

    def body(self, task: Task, plan: RowPlan) -> str:
        return _body(plan)


def _body(p: RowPlan) -> str:
    head = "  const T* x = X + row * N;\n  T* y = Y + row * N;\n" + p.declare_cache("x")
    if p.cache == "reread":
        stats = (
            "  float mx = -INFINITY, sum = 0.0f;\n"
            + p.first_pass(
                "    float vm = to_f32(a.e[0]);\n"
                "#pragma unroll\n    for (int e = 1; e < VEC; ++e) vm = fmaxf(vm, to_f32(a.e[e]));\n"
                "    const float nm = fmaxf(mx, vm);\n"
                "    const float nml = nm * LOG2E;\n"
                "    sum *= exp2f(fmaf(mx, LOG2E, -nml));\n"
                "#pragma unroll\n    for (int e = 0; e < VEC; ++e) sum += exp2f(fmaf(to_f32(a.e[e]), LOG2E, -nml));\n"
                "    mx = nm;\n")
            + "  const float rmx = row_max(mx, scratch);\n"
            # a thread that saw nothing keeps (-inf, 0) and adds nothing
            "  sum = row_sum(mx == -INFINITY ? 0.0f : sum * exp2f((mx - rmx) * LOG2E), scratch);\n"
            "  const float ml = rmx * LOG2E;\n")
    else:
        stats = (
            "  float mx = -INFINITY;\n"
            + p.first_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) mx = fmaxf(mx, to_f32(a.e[e]));\n")
            + "  const float ml = row_max(mx, scratch) * LOG2E;\n  float sum = 0.0f;\n"
            + p.next_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) "
                          "sum += exp2f(fmaf(to_f32(a.e[e]), LOG2E, -ml));\n")
            + "  sum = row_sum(sum, scratch);\n")
    write = "  const float inv = 1.0f / sum;\n" + p.write_pass("x", "exp2f(fmaf(to_f32(a.e[e]), LOG2E, -ml)) * inv")
    return head + stats + write
