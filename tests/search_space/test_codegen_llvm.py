"""The LLVM codegen helpers, compiled and run on the host."""
from __future__ import annotations

import numpy as np
import pytest

from measure.cpu_kernel import allocate_args, compile_and_load
from search_space import ArgSpec, KernelSource
from search_space.codegen import llvm as cg

N = 4096


def unary_kernel(host, name: str, lanes: int = 16):
    module = cg.new_module(name)
    fn = cg.kernel_function(module, "k", 2)
    kb = cg.KernelBuilder(fn)
    x, y = fn.args
    with kb.loop(0, N, lanes) as i:
        kb.store_vec(getattr(kb, name)(kb.load_vec(x, i, lanes)), y, i)
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", "float32", (N,)),
                                                      ArgSpec("Y", "out", "float32", (N,))))
    return source, compile_and_load(source, host)


@pytest.mark.parametrize("name, reference, low, high", [
    ("exp", np.exp, -87.0, 88.0),
    ("tanh", np.tanh, -12.0, 12.0),
    ("exp_fast", np.exp, -87.0, 88.0),
])
def test_vector_math_is_accurate(host, name, reference, low, high):
    source, kernel = unary_kernel(host, name)
    x = np.random.default_rng(0).uniform(low, high, N).astype(np.float32)
    x[:8] = [0.0, 1e-7, -1e-7, 0.5, -0.5, 0.7, low, high]
    buffers = allocate_args(source, {}, {"X": x})
    kernel(buffers, {})
    want = reference(x.astype(np.float64))
    rel = np.abs(buffers["Y"] - want) / np.maximum(np.abs(want), 1e-30)
    assert rel.max() < 1e-6, (x[np.argmax(rel)], rel.max())


@pytest.mark.parametrize("name", ["exp", "exp_fast"])
def test_exp_of_minus_infinity_is_zero(host, name):
    source, kernel = unary_kernel(host, name)
    x = np.full(N, -np.inf, dtype=np.float32)
    buffers = allocate_args(source, {}, {"X": x})
    kernel(buffers, {})
    assert (buffers["Y"] == 0).all()


@pytest.mark.parametrize("count", [1, 3, 5, 8])
def test_reduce_add_many_sums_each_vector(host, count):
    module = cg.new_module("r")
    fn = cg.kernel_function(module, "k", 2)
    kb = cg.KernelBuilder(fn)
    x, y = fn.args
    vectors = [kb.load_vec(x, 16 * i, 16) for i in range(count)]
    sums, width = kb.reduce_add_many(vectors)
    if width > 1:
        kb.store_vec(sums, y, 0)
    else:  # a one-lane vector
        kb.store(kb.b.extract_element(sums, cg.ir.Constant(cg.I32, 0)), y, 0)
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", "float32", (16 * count,)),
                                                      ArgSpec("Y", "out", "float32", (8,))))
    values = np.random.default_rng(count).standard_normal(16 * count).astype(np.float32)
    buffers = allocate_args(source, {}, {"X": values})
    compile_and_load(source, host)(buffers, {})
    np.testing.assert_allclose(buffers["Y"][:count], values.reshape(count, 16).sum(1), rtol=1e-5)
    assert np.isnan(buffers["Y"][width:]).all()  # nothing written past the sums


@pytest.mark.parametrize("threads, chunks", [(1, 7), (2, 7), (4, 3), (3, 1)])
def test_parallel_entry_covers_every_chunk_once(host, threads, chunks):
    module = cg.new_module("p")
    body, kb = cg.chunk_body(module, "body", n_pointers=1, n_scalars=0)
    out, begin, end, thread = body.args
    with kb.loop(begin, end, 1) as c:
        old = kb.load(out, c)
        kb.store(kb.fadd(old, cg.f32(1.0)), out, c)
    kb.ret()
    cg.parallel_entry(module, "k", body, n_pointers=1, n_scalars=0, threads=threads, n_chunks=chunks)
    source = KernelSource("llvm", str(module), "k", (ArgSpec("Y", "in", "float32", (chunks,)),))
    y = np.zeros(chunks, dtype=np.float32)
    compile_and_load(source, host)({"Y": y}, {})
    assert y.tolist() == [1.0] * chunks


def test_masked_loads_and_stores_stay_inside_the_array(host):
    module = cg.new_module("m")
    fn = cg.kernel_function(module, "k", 2)
    kb = cg.KernelBuilder(fn)
    x, y = fn.args
    v = kb.masked_load_vec(x, 0, 16, cg.i64(5))
    kb.masked_store_vec(kb.fadd(v, kb.splat(cg.f32(1.0), 16)), y, 0, cg.i64(5))
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", "float32", (5,)),
                                                      ArgSpec("Y", "out", "float32", (16,))))
    buffers = allocate_args(source, {}, {"X": np.arange(5, dtype=np.float32)})
    compile_and_load(source, host)(buffers, {})
    assert buffers["Y"][:5].tolist() == [1, 2, 3, 4, 5] and np.isnan(buffers["Y"][5:]).all()


def sincos_kernel(host, dtype: str, lanes: int):
    """Kernel (X[N] of ``dtype``) -> (S[N], C[N]) float32 through ``KernelBuilder.sincos``."""
    element = cg.element_type(dtype)
    module = cg.new_module("sincos")
    fn = cg.kernel_function(module, "k", 3)
    kb = cg.KernelBuilder(fn)
    x, s, c = fn.args
    with kb.loop(0, N, lanes) as i:
        sin, cos = kb.sincos(kb.load_vec(x, i, lanes, element))
        kb.store_vec(sin, s, i)
        kb.store_vec(cos, c, i)
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", dtype, (N,)),
                                                      ArgSpec("S", "out", "float32", (N,)),
                                                      ArgSpec("C", "out", "float32", (N,))))
    return source, compile_and_load(source, host)


@pytest.mark.parametrize("dtype, lanes, bound", [
    ("float64", 8, 2e5),    # RoPE angles: positions up to 1e5 and more times frequencies <= 1
    ("float64", 16, 1e9),   # the stated range of float64 arguments
    ("float32", 16, 1e4),
    ("float32", 8, 4.0),
])
def test_sincos_is_accurate_for_large_arguments(host, dtype, lanes, bound):
    source, kernel = sincos_kernel(host, dtype, lanes)
    rng = np.random.default_rng(int(bound) % 1000)
    x = rng.uniform(-bound, bound, N).astype(dtype)
    # exact multiples of pi/2 and their neighbours, where one result is tiny or the quadrant flips
    k = np.arange(-16, 16)
    x[:32] = (k * (np.pi / 2)).astype(dtype)
    x[32:64] = np.nextafter(x[:32], np.inf, dtype=x.dtype)
    x[64:72] = np.array([0.0, 1e-30, -1e-7, 0.5, np.pi / 4, -np.pi / 4, bound, -bound]).astype(dtype)
    buffers = allocate_args(source, {}, {"X": x})
    kernel(buffers, {})
    exact = x.astype(np.float64)
    for name, reference in (("S", np.sin), ("C", np.cos)):
        got = buffers[name].astype(np.float64)
        want = reference(exact)
        error = np.abs(got - want)
        # within float32 rounding: absolute near zeros of the function, relative elsewhere
        limit = 1.5e-7 * np.maximum(np.abs(want), 2 ** -10) + 1e-12
        assert (error <= limit).all(), (name, x[np.argmax(error / limit)], error.max())


def test_exp_fast_on_nonpositive_inputs_and_its_clamps(host):
    module = cg.new_module("e")
    fn = cg.kernel_function(module, "k", 3)
    kb = cg.KernelBuilder(fn)
    x, y, z = fn.args
    with kb.loop(0, N, 16) as i:
        v = kb.load_vec(x, i, 16)
        kb.store_vec(kb.exp_fast(v, nonpositive=True), y, i)
        kb.store_vec(kb.exp_fast(kb.b.fneg(v)), z, i)
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", "float32", (N,)),
                                                      ArgSpec("Y", "out", "float32", (N,)),
                                                      ArgSpec("Z", "out", "float32", (N,))))
    x = -np.random.default_rng(1).uniform(0, 100, N).astype(np.float32)
    x[:6] = [0.0, -0.0, -np.inf, -87.29, -87.31, -88.5]
    buffers = allocate_args(source, {}, {"X": x})
    compile_and_load(source, host)(buffers, {})
    want = np.exp(x.astype(np.float64))
    live = x >= -87.29
    assert (np.abs(buffers["Y"][live] / want[live] - 1) < 5e-7).all()
    assert (buffers["Y"][~live] == 0).all()
    up = buffers["Z"]  # exp(-x): above 88 it saturates at exp(88), never inf
    assert np.isfinite(up).all()
    assert np.allclose(up[-x > 88], np.exp(np.float32(88.0)), rtol=1e-6)
    inside = -x <= 88
    assert (np.abs(up[inside] / np.exp(-x[inside].astype(np.float64)) - 1) < 5e-7).all()


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_avx512_reciprocal_is_accurate(host, lanes):
    if not (host.has_feature("avx512f") and host.has_feature("avx512vl")):
        pytest.skip("the host has no AVX-512")  # the template never offers it there either
    module = cg.new_module("r")
    fn = cg.kernel_function(module, "k", 2)
    kb = cg.KernelBuilder(fn)
    x, y = fn.args
    with kb.loop(0, N, lanes) as i:
        kb.store_vec(kb.reciprocal_avx512(kb.load_vec(x, i, lanes)), y, i)
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", "float32", (N,)),
                                                      ArgSpec("Y", "out", "float32", (N,))))
    rng = np.random.default_rng(lanes)
    x = (rng.choice([-1, 1], N) * 10.0 ** rng.uniform(-30, 30, N)).astype(np.float32)
    x[:4] = [1.0, -1.0, 3.0, 1.7e38]
    buffers = allocate_args(source, {}, {"X": x})
    compile_and_load(source, host)(buffers, {})
    want = 1.0 / x.astype(np.float64)
    assert (np.abs(buffers["Y"] / want - 1) < 2.5e-7).all()


@pytest.mark.parametrize("count", [1, 2, 3, 7])
@pytest.mark.parametrize("lanes", [8, 16])
def test_a_masked_store_of_16_bit_words_writes_exactly_count_elements(count, lanes):
    """LLVM 22 (x86) stored two 16-bit lanes for a one-lane mask known at compile time: a
    bfloat16 GEMM wrote one element past Y. Stores must stay inside the mask."""
    from search_space import Target

    module = cg.new_module("masked")
    fn = cg.kernel_function(module, "masked", n_pointers=2)
    kb = cg.KernelBuilder(fn)
    src, dst = fn.args
    value = kb.masked_load_vec(src, cg.i64(0), lanes, cg.i64(count))
    kb.masked_store_vec(kb.f32_to_bf16(value), dst, cg.i64(0), cg.i64(count), cg.I16)
    kb.ret()
    source = KernelSource("llvm", str(module), "masked", (ArgSpec("S", "in", "float32", ("N",)),
                                                          ArgSpec("D", "out", "uint16", ("N",))))
    kernel = compile_and_load(source, Target.host())
    raw = np.full(2 * lanes + 64, 0xA5, dtype=np.uint8)
    kernel({"S": np.arange(1, lanes + 1, dtype=np.float32), "D": raw}, {})
    assert (raw[:2 * count] != 0xA5).any() and (raw[2 * count:] == 0xA5).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("lanes", [0, 8, 16])
def test_16_bit_words_widen_to_float32_exactly(host, dtype, lanes):
    """Every 16-bit pattern (zeros, subnormals, infinities, NaNs) widened as numpy widens it,
    scalar (``lanes`` 0) and vector."""
    from search_space.ops.common import to_float32

    module = cg.new_module("widen")
    fn = cg.kernel_function(module, "k", 2)
    kb = cg.KernelBuilder(fn)
    x, y = fn.args
    words = 1 << 16
    with kb.loop(0, words, lanes or 1) as i:
        if lanes:
            kb.store_vec(kb.words_to_f32(kb.load_vec(x, i, lanes, cg.I16), dtype), y, i)
        else:
            kb.store(kb.words_to_f32(kb.load(x, i, cg.I16), dtype), y, i)
    kb.ret()
    source = KernelSource("llvm", str(module), "k", (ArgSpec("X", "in", dtype, (words,)),
                                                      ArgSpec("Y", "out", "float32", (words,))))
    raw = np.arange(words, dtype=np.uint32).astype(np.uint16)
    stored = raw.view(np.float16) if dtype == "float16" else raw
    buffers = allocate_args(source, {}, {"X": stored})
    compile_and_load(source, host)(buffers, {})
    np.testing.assert_array_equal(buffers["Y"], to_float32(stored, dtype))  # NaN equals NaN
