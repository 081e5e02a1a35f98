"""``qk_norm`` on CUDA: Qwen3's per-head RMSNorm of q and k, value heads copied.

X[T, H + 2 HKV, D] is read as T * (H + 2 HKV) head rows of D elements, and each row is one
row of the row kernels (``rowplan``: a warp or a block per row, the same knobs as rmsnorm).
Row r is head j = r % (H + 2 HKV): j < H is a query head, normalised and scaled by GQ;
j < H + HKV a key head, by GK; the rest are value heads, copied. The choice is the same for
every thread of a row, so the reductions (warp shuffles, block barriers) never diverge.

In a captured decode step it sits between the Q/K/V GEMV and attention, both launched
programmatically, so it takes a programmatic launch too (sm_90 on): it lets attention launch
first thing and waits for the GEMV's rows before it reads them.

T (tokens) may be a runtime argument. In the kernel it is named TOKENS: the row kernels'
code calls the element type T.
"""
from __future__ import annotations

from ...codegen.cuda import PREAMBLE, VECTOR_HELPERS, dim_scalars, kernel_params
from ...codegen.cuda_ptx import grid_dependency_code, programmatic_launch
from ...ops.elementwise import QKNormOp
from ...space import Config, ConfigSpace
from ...target import Target
from ...task import Task
from ...template import KernelSource, Template, register_template
from .rowplan import RowPlan, c_float, row_default, row_features, row_space


def head_rows(task: Task) -> Task:
    """The task as the row kernels see it: M = T (H + 2 HKV) rows of N = D, M dynamic where T
    is. It only sizes the schedule (space, default, features); it is no task of any operator."""
    d = task.dims
    return Task.make(task.op, {"M": d["T"] * QKNormOp.heads(task), "N": d["D"]}, task.dtype,
                     dynamic=("M",) if "T" in task.dynamic else ())


@register_template
class QKNormCuda(QKNormOp, Template):
    target_kind = "cuda"
    dtypes = ("float32", "float16", "bfloat16")

    def space(self, task: Task, target: Target) -> ConfigSpace:
        self.check(task)
        return row_space(head_rows(task), target)

    def default(self, task: Task, target: Target) -> Config:
        return row_default(self.space(task, target), head_rows(task))

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        # re-reads are counted for the copied value rows too: a slight over-estimate
        return row_features(head_rows(task), config, target, self.min_bytes(task), self.flops(task), passes=2)

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        self.check(task)
        d = task.dims
        heads = self.heads(task)
        p = RowPlan.of(head_rows(task), config)
        args = self.signature(task) + dim_scalars(task)
        # the C parameters in the order of ``args``; the dynamic T is renamed TOKENS (see above)
        params = kernel_params(self.signature(task)) + (", long long TOKENS" if "T" in task.dynamic else "")
        tokens = "" if "T" in task.dynamic else f"constexpr long long TOKENS = {d['T']};\n"
        programmatic = programmatic_launch(target)
        helpers, trigger, wait = grid_dependency_code(bool(programmatic))
        code = (PREAMBLE + VECTOR_HELPERS + helpers + p.constants() + tokens
                + f"constexpr int H = {d['H']};\nconstexpr int HKV = {d['HKV']};\nconstexpr int HEADS = {heads};\n"
                + p.reducers()
                + f'\nextern "C" __global__ void __launch_bounds__({p.threads}) qk_norm_rows({params}) {{'
                + (trigger + wait or "\n") + p.smem_decl() + "  const long long M = TOKENS * HEADS;  // head rows\n" + p.row_start()
                + _body(p, float(self.attrs(task)["eps"])) + "}\n")
        if "T" in task.dynamic:
            grid = f"(T * {heads} + {p.rows - 1}) // {p.rows}" if p.rows > 1 else f"T * {heads}"
        else:
            grid = -(-d["T"] * heads // p.rows)
        launch = (("block", (p.threads, 1, 1)), ("grid", (grid, 1, 1)), ("smem", p.smem_bytes())) + programmatic
        return KernelSource("cuda", code, "qk_norm_rows", tuple(args), launch)


def _body(p: RowPlan, eps: float) -> str:
    """rmsnorm's two passes (sum of squares while caching the row, then the scaled write) with
    the gain of the row's head; a value row is copied in one pass instead."""
    copy = (p.loop(True)
            + f"    store_pack<VEC, {p.store_hint}>(y + (long long)v * VEC, "
            f"load_pack<VEC, {1 if p.stream else 0}>(x + (long long)v * VEC));\n  }}\n")
    return ("  const T* x = X + row * N;\n  T* y = Y + row * N;\n"
            "  const int head = (int)(row % HEADS);\n"
            "  if (head >= H + HKV) {  // a value head: the whole row (warp or block) leaves together\n"
            + copy + "    return;\n  }\n"
            "  const T* gain = head < H ? GQ : GK;\n"
            + p.declare_cache("x") + "  float ss = 0.0f;\n"
            + p.first_pass("#pragma unroll\n    for (int e = 0; e < VEC; ++e) "
                           "{ const float f = to_f32(a.e[e]); ss = fmaf(f, f, ss); }\n")
            + f"  const float inv = rsqrtf(row_sum(ss, scratch) * (1.0f / N) + {c_float(eps)});\n"
            + p.write_pass("x", "to_f32(a.e[e]) * inv * to_f32(g.e[e])", columns=p.column("g", "gain")))
