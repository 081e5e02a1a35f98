"""Every CUDA template renders valid CUDA C that nvcc compiles for sm_90a (no GPU needed)."""
from __future__ import annotations

import math

import numpy as np
import pytest

from cost_model import ANALYTIC_FEATURES
from measure import LocalBuilder, MeasureError, MeasureInput
from search_space import Target, Task, get_template, list_templates

CUDA_TEMPLATES = sorted((t for t in list_templates("cuda") if type(t).__module__.startswith("search_space.templates")),
                        key=lambda t: t.op)
SM90 = Target.from_name("sm_90a")


def example_tasks(template) -> list[Task]:
    tasks = []
    for dtype in template.dtypes:
        shape = dict(template.example_shape)
        task = Task.make(template.op, shape, dtype, dynamic=template.dynamic_dims)
        template.check(task)
        tasks.append(task)
    return tasks


@pytest.mark.parametrize("template", CUDA_TEMPLATES, ids=lambda t: t.op)
def test_cuda_template_contract(template):
    for task in example_tasks(template):
        space = template.space(task, SM90)
        default = template.default(task, SM90)
        assert space.is_valid(default)
        features = template.features(task, default, SM90)
        assert set(features) <= set(ANALYTIC_FEATURES), set(features) - set(ANALYTIC_FEATURES)
        assert all(math.isfinite(float(v)) for v in features.values())
        source = template.render(task, default, SM90)
        assert source.lang == "cuda" and f'extern "C" __global__' in source.code
        names = [a.name for a in source.args if a.role in ("in", "out")]
        assert names == [a.name for a in template.signature(task)]
        launch = source.launch_dims
        assert {"grid", "block"} <= set(launch) and math.prod(launch["block"]) <= SM90.max_threads_per_block


@pytest.mark.tools("nvcc")
@pytest.mark.parametrize("template", CUDA_TEMPLATES, ids=lambda t: t.op)
def test_cuda_template_compiles_for_sm90a(template):
    """The default config of every dtype and a sampled config of one dtype go through nvcc, the
    defaults without spilling registers to local memory (a sample of the whole space over the
    suite: the seed, and so the dtype and the config, differ per template; each nvcc call costs
    about a second). A bfloat16 default that is the
    float16 one with the element type renamed, and without inline PTX (whose helpers are
    specialised per type), is the same code for nvcc (checked here): only the float16 one is compiled."""
    rng = np.random.default_rng(sum(map(ord, template.op)))
    tasks = example_tasks(template)
    inputs = [MeasureInput(task, template.default(task, SM90), SM90) for task in tasks]
    sources = {i.task.dtype: template.render(i.task, i.config, SM90) for i in inputs}
    if {"float16", "bfloat16"} <= set(sources) and "// BEGIN PTX" not in sources["float16"].code:
        def named(code: str) -> str:
            return code.replace("__nv_bfloat162", "__half2").replace("__nv_bfloat16", "__half")
        if (named(sources["bfloat16"].code) == named(sources["float16"].code)
                and sources["bfloat16"].launch == sources["float16"].launch):
            inputs = [i for i in inputs if i.task.dtype != "bfloat16"]
    defaults = len(inputs)
    sampled = tasks[int(rng.integers(len(tasks)))]
    inputs += [MeasureInput(sampled, c, SM90) for c in template.space(sampled, SM90).sample(rng, 1)]
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    failures = [(i.task.key, str(i.config), b.error.name, b.message) for i, b in zip(inputs, builds)
                if b.error != MeasureError.NO_ERROR]
    assert not failures, failures
    assert all(b.stats.get("registers", 0) > 0 for b in builds)
    spilled = [(i.task.key, str(i.config), b.stats["spill_stores"])
               for i, b in zip(inputs[:defaults], builds) if b.stats["spill_stores"]]
    assert not spilled, spilled


# sliding-window attention (Mistral's, Gemma 3's) and soft-capped attention (Gemma 2's) at each
# operator's example shape: the attributes, and what the source then holds
ATTENTION_VARIANTS = {
    "window": ({"attention_prefill": {"window": 128}, "attention_decode": {"window": 1000},
                "rope_append_attention": {"window": 1000}}, ("constexpr long long WINDOW = {window};",)),
    "softcap": ({op: {"softcap": 50.0} for op in ("attention_prefill", "attention_decode", "rope_append_attention")},
                ("constexpr float SOFTCAP = 50.0f;", "tanhf(")),
}


@pytest.mark.tools("nvcc")
@pytest.mark.parametrize("variant", sorted(ATTENTION_VARIANTS))
def test_windowed_and_soft_capped_attention_compile_for_sm90a(variant):
    """The windowed (soft-capped) default config of every dtype of the three attention templates
    (and the Hopper prefill's first seed), through the contract and nvcc, the defaults without spills."""
    attrs_of, marks = ATTENTION_VARIANTS[variant]
    inputs = []
    for op, attrs in attrs_of.items():
        template = get_template(op, "cuda")
        for dtype in template.dtypes:
            task = Task.make(op, template.example_shape, dtype, attrs=attrs, dynamic=template.dynamic_dims)
            default = template.default(task, SM90)
            assert template.space(task, SM90).is_valid(default)
            features = template.features(task, default, SM90)
            assert set(features) <= set(ANALYTIC_FEATURES) and all(math.isfinite(float(v)) for v in features.values())
            code = template.render(task, default, SM90).code
            assert all(mark.format(**attrs) in code for mark in marks)
            inputs.append(MeasureInput(task, default, SM90))
    defaults = len(inputs)
    prefill = get_template("attention_prefill", "cuda")
    task = Task.make("attention_prefill", prefill.example_shape, "bfloat16", attrs=attrs_of["attention_prefill"],
                     dynamic=prefill.dynamic_dims)
    seed = prefill.seed_configs(task, SM90)[0]
    assert seed["impl"] == "wgmma"
    inputs.append(MeasureInput(task, prefill.space(task, SM90).from_values(seed), SM90))
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    failures = [(i.task.key, str(i.config), b.error.name, b.message) for i, b in zip(inputs, builds)
                if b.error != MeasureError.NO_ERROR]
    assert not failures, failures
    spilled = [(i.task.key, str(i.config)) for i, b in zip(inputs[:defaults], builds) if b.stats["spill_stores"]]
    assert not spilled, spilled


@pytest.mark.tools("nvcc")
def test_the_decode_step_kernels_take_a_programmatic_launch_on_hopper(tmp_path):
    """The fused decode GEMVs (both int4 schedules, each way of starting the weights), rope_append,
    attention with ``programmatic`` and rope_append_attention say they take a programmatic launch on sm_90a, and nvcc keeps exactly one wait
    and one trigger in them there: a graph joins them to the kernel before them on that word
    alone, so a wait compiled away would be a race. Not below sm_90, nor in unfused kernels."""
    import subprocess

    from measure.compile_cuda import nvcc_path
    norm = {"norm": "rmsnorm", "eps": 1e-5}
    cases = [("gemv", {"M": 1, "N": 64, "K": 256}, norm, {"warps": 4, "rows": 1, "ksplit": 2, "vec": 16,
                                                          "unroll": 2, "x_smem": 1}),
             ("rope_append", {"B": 1, "H": 4, "HKV": 2, "D": 64, "S": 32}, {}, None),
             ("attention_decode", {"B": 1, "H": 8, "HKV": 2, "D": 64, "S": 64, "L": 64},
              {"lengths": "per_sequence", "programmatic": True}, None),
             ("rope_append_attention", {"B": 1, "H": 8, "HKV": 2, "D": 64, "S": 64, "L": 64}, {}, None)]
    cases += [("gemv_q4", {"M": 1, "N": 64, "K": 512}, {"group_size": 128, **norm, "act": "swiglu"},
               {"core": "mma", "warps": 4, "rows": 1, "ksplit": 2, "unroll": 2, "mtile": 1, "kc": 512,
                "prefetch": prefetch}) for prefetch in (0, 1, 2)]
    cases += [("gemv_q4", {"M": 1, "N": 64, "K": 2048}, {"group_size": 128, "residual": True},
               {"core": "simt", "warps": 4, "rows": 1, "ksplit": 2, "unroll": 2, "mtile": 1, "kc": 2048,
                "prefetch": 0})]
    for i, (op, shape, attrs, values) in enumerate(cases):
        template = get_template(op, "cuda")
        task = Task.make(op, shape, "float16", attrs, template.dynamic_dims)
        space = template.space(task, SM90)
        config = space.from_values(values) if values else template.default(task, SM90)
        source = template.render(task, config, SM90)
        assert source.launch_dims.get("programmatic") is True, (op, attrs)
        assert "programmatic" not in template.render(task, config, Target.from_name("sm_80")).launch_dims
        (tmp_path / f"k{i}.cu").write_text(source.code)
        subprocess.run([nvcc_path(), "-arch=sm_90a", "-ptx", "-o", str(tmp_path / f"k{i}.ptx"),
                        str(tmp_path / f"k{i}.cu")], check=True, capture_output=True)
        ptx = (tmp_path / f"k{i}.ptx").read_text()
        assert ptx.count("griddepcontrol.wait") == 1 and ptx.count("griddepcontrol.launch_dependents") == 1, (op, attrs)
        if attrs:  # the same kernel unfused: a plain launch, no such instructions
            plain = Task.make(op, shape, "float16", {k: v for k, v in attrs.items() if k in ("group_size", "lengths")},
                              template.dynamic_dims)
            unfused = template.render(plain, config, SM90)
            assert "programmatic" not in unfused.launch_dims and "griddepcontrol" not in unfused.code


WEIGHTS = {"W", "WQ", "SCALES", "ZEROS", "G"}  # inputs no kernel of the step writes


def test_nothing_the_kernel_before_writes_is_touched_before_the_wait():
    """In sampled configs of every kernel that takes a programmatic launch, the kernel body before
    grid_dependency_wait() names no input but the weights and no output: such a kernel may run
    while the one before it still writes X, R, the Q/K/V rows or the positions (and still reads
    what this one writes). Nor does it return: the waits chain only through kernels that finish
    after their own wait."""
    import re

    norm = {"norm": "rmsnorm", "eps": 1e-5}
    variants = [("gemv", {"M": m, "N": 96, "K": 1024}, attrs) for m in (1, 5)
                for attrs in (norm, {"residual": True}, {**norm, "act": "swiglu"})]
    variants += [("gemv_q4", {"M": m, "N": 96, "K": 1024}, {"group_size": 64, **attrs}) for m in (1, 9)
                 for attrs in ({**norm, "act": "swiglu", "zero_point": True}, {"residual": True}, norm)]
    variants += [("rope_append", {"B": 2, "H": 4, "HKV": 2, "D": 64, "S": 32}, {}),
                 ("attention_decode", {"B": 2, "H": 8, "HKV": 2, "D": 64, "S": 64, "L": 64},
                  {"lengths": "per_sequence", "programmatic": True}),
                 ("rope_append_attention", {"B": 2, "H": 8, "HKV": 2, "D": 64, "S": 64, "L": 64}, {})]
    rng = np.random.default_rng(7)
    checked = 0
    for op, shape, attrs in variants:
        template = get_template(op, "cuda")
        task = Task.make(op, shape, "float16", attrs, template.dynamic_dims)
        for config in template.space(task, SM90).sample(rng, 30):
            source = template.render(task, config, SM90)
            kernel = source.code[source.code.index('extern "C" __global__'):]
            before = re.sub(r"//.*", "", kernel[kernel.index(") {") + 3:kernel.index("grid_dependency_wait();")])
            others = [a.name for a in source.args if a.role in ("in", "out", "workspace") and a.name not in WEIGHTS]
            touched = [name for name in others if re.search(rf"\b{name}\b", before)]
            assert not touched, (op, attrs, config.as_dict(), touched)
            # a small kernel lets the next one launch first thing, a GEMV once its main loop is done
            trigger = kernel.index("launch_dependents();")
            last_load = kernel.rindex("ld_stream<") if op.startswith("gemv") else kernel.index("grid_dependency_wait();")
            assert (trigger > last_load) == op.startswith("gemv"), (op, config.as_dict())
            # every block reaches the wait: a kernel ending before it could end before the kernel
            # before it, and the one after (which waits for this one only) would read stale data
            assert not re.search(r"\breturn\b", before), (op, attrs, config.as_dict())
            checked += 1
    assert checked >= 300


def test_the_prefetch_ahead_of_a_wait_keeps_to_a_quarter_of_l2():
    """Whole rows while the matrix fits a quarter of L2; else the lines per row that do, at least
    one; a partial last line counts as a line. llama-2-7b's fp16 gate/up (172 MiB) gets whole lines
    within 12.5 MiB on a 50 MB L2, its int4 o_proj (8 MiB) all of it."""
    import dataclasses

    from search_space.codegen.cuda_ptx import prefetch_lines

    assert prefetch_lines(SM90, 4096, 4096 // 2) == 16  # int4 o_proj: 2 KiB rows, 16 lines each
    lines, budget = prefetch_lines(SM90, 22016, 4096 * 2), (50 << 20) / 4
    assert lines < 64 and budget - 22016 * 128 < 22016 * 128 * lines <= budget  # within a line per row
    assert prefetch_lines(SM90, 64, 200) == 2  # 200-byte rows: two lines
    assert prefetch_lines(dataclasses.replace(SM90, l2_bytes=1 << 10), 4096, 8192) == 1


def test_a_programmatic_launch_is_a_cuda_graphs_and_a_yes_or_no():
    shape = {"B": 1, "H": 4, "HKV": 2, "D": 64, "S": 16, "L": 16}
    with pytest.raises(ValueError, match="the cpu template takes no programmatic launch"):
        get_template("attention_decode", "cpu").check(Task.make("attention_decode", shape, "float32",
                                                                 {"programmatic": True}, ("S", "L")))
    with pytest.raises(ValueError, match="programmatic = 'yes' is not a bool like false"):
        get_template("attention_decode", "cuda").check(Task.make("attention_decode", shape, "float16",
                                                                  {"programmatic": "yes"}, ("S", "L")))


def test_hopper_instructions_are_searched_on_sm90a_only():
    """wgmma, TMA and clusters are sm_90a's: on an A100 (sm_80) such candidates failed in ptxas,
    a trial each."""
    rng = np.random.default_rng(0)
    cases = [("gemm", {"M": 512, "N": 512, "K": 512}, lambda c: c["instr"] == "wgmma" or c["pipeline"] == "tma"
              or c["cluster"] > 1),
             ("attention_prefill", {"B": 1, "T": 128, "H": 4, "HKV": 4, "D": 64}, lambda c: c["impl"] == "wgmma")]
    for op, dims, hopper_only in cases:
        task, template = Task.make(op, dims, "float16"), get_template(op, "cuda")
        on_a100 = template.space(task, Target.from_name("sm_80")).sample(rng, 200)
        assert on_a100 and not any(hopper_only(c.as_dict()) for c in on_a100), op
        on_h100 = template.space(task, SM90).sample(rng, 200)
        assert any(hopper_only(c.as_dict()) for c in on_h100), op


@pytest.mark.tools("nvcc")
@pytest.mark.parametrize("rotary_dim", [0, 96], ids=["whole-head", "partial"])
def test_longrope_rope_kernels_compile_for_sm90a(rotary_dim):
    """The three CUDA rope kernels of a longrope rope (its short factors a list attribute) bake in
    the frequencies ``frequencies_of_attrs`` gives (the reference's, divided by the factors) and
    scale cos and sin by its attention factor; with a partial rotary (Phi-4-mini's: 96 of 128
    dims, 48 factors) they turn HALF = ROTARY / 2 pairs and copy the other dims. The default
    config of every dtype through nvcc."""
    from runtime.rope_frequencies import rope_attrs

    from search_space.templates.cuda.rope import frequency_table

    pairs = (rotary_dim or 128) // 2
    attrs = rope_attrs(10000.0, "longrope", short_factor=[1.0 + i / 8 for i in range(pairs)], attention_factor=1.19)
    if rotary_dim:
        attrs["rotary_dim"] = rotary_dim
    inputs = []
    for op in ("rope", "rope_append", "rope_append_attention"):
        template = get_template(op, "cuda")
        for dtype in template.dtypes:
            task = Task.make(op, template.example_shape, dtype, attrs=attrs, dynamic=template.dynamic_dims)
            default = template.default(task, SM90)
            code = template.render(task, default, SM90).code
            table = frequency_table(task, template.attrs(task))
            assert table in code and table.count(",") == pairs - 1
            assert "// longrope's attention factor" in code and "constexpr float ROPE_SCALE = 1.19f;" in code
            assert ("constexpr int ROTARY = 96;\nconstexpr int HALF = ROTARY / 2;\n" in code) == bool(rotary_dim)
            inputs.append(MeasureInput(task, default, SM90))
    with LocalBuilder(n_parallel=2, timeout_s=300) as builder:
        builds = builder.build(inputs)
    failures = [(i.task.key, str(i.config), b.error.name, b.message) for i, b in zip(inputs, builds)
                if b.error != MeasureError.NO_ERROR]
    assert not failures, failures
