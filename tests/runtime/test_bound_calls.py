"""The decode step's fast paths keep every check: a bound call's cheap dim check refuses what
the full one refuses, ``run`` follows the dims set, and the step's precomputed copies write
what the plain ones write.

Calls that would crash a regressed runtime run in a child process (``run_numpy_only``), as in
``test_safety``."""
from __future__ import annotations


import numpy as np
import pytest
from fakes import run_library_attempts

from runtime.arrays import HostArrays
from runtime.llama import LlamaModel, _DecodeStep
from runtime.model_config import PRESETS
from runtime.precision import Bfloat16Words
from runtime.weights import ModelWeights


def test_the_cheap_dim_check_refuses_what_the_full_one_does(tmp_path, exported_library):
    out = run_library_attempts(tmp_path, exported_library, """
        kernel = library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True}, dynamic=["M"])
        x, r, g, y, s = f32(8, 64), f32(8, 64), f32(64), np.zeros((8, 64), np.float32), np.zeros((8, 64), np.float32)
        call = kernel.bind({"X": x, "R": r, "G": g, "Y": y, "S": s})
        out["M=5"] = attempt(lambda: call(M=5))  # the cheap path: a plain int in range
        out["after M=5"] = dict(call.scalars)
        for m in (9, 100000, 0, -1, True, 2.0):
            out[f"then {m!r}"] = attempt(lambda: call(M=m))
        out["refused ones changed nothing"] = call.scalars == {"M": 5}
        out["np.int64(3)"] = attempt(lambda: call(M=np.int64(3)))  # the full check accepts numpy ints
        out["after np.int64(3)"] = dict(call.scalars)
        out["unknown dim"] = attempt(lambda: call(Q=3))
        out["M=8"] = attempt(lambda: call(M=8))
        # run() is the call with the dims last set: rows past M untouched
        call(M=3)
        y[:] = 0
        call.run()
        out["run wrote rows"] = [bool(np.any(y[i])) for i in range(8)]
    """)
    assert out["M=5"] == "ok" and out["after M=5"] == {"M": 5}
    for m in ("9", "100000"):
        assert out[f"then {m}"].startswith("ValueError") and "exceeds 8, what the bound arrays hold" in out[f"then {m}"]
    for m in ("0", "-1"):
        assert out[f"then {m}"].startswith("ValueError") and "must be at least 1" in out[f"then {m}"]
    for m in ("True", "2.0"):
        assert out[f"then {m}"].startswith("ValueError") and "must be an int" in out[f"then {m}"]
    assert out["refused ones changed nothing"] is True
    assert out["np.int64(3)"] == "ok" and out["after np.int64(3)"] == {"M": 3}
    assert out["unknown dim"].startswith("TypeError") and "Q is not a dynamic dim" in out["unknown dim"]
    assert out["M=8"] == "ok"
    assert out["run wrote rows"] == [True] * 3 + [False] * 5


def test_a_kv_length_stays_within_the_cache_and_the_cache_keeps_its_rows(tmp_path, exported_library):
    """L may take any value up to the S rows bound; S itself is the cache's row stride
    ([B, HKV, S, D]): another value would read the bound cache with the wrong layout."""
    out = run_library_attempts(tmp_path, exported_library, """
        shape = {"B": 1, "H": 4, "HKV": 2, "D": 32, "S": 64, "L": 64}
        kernel = library.get("attention_decode", shape, dynamic=["S", "L"])
        q, k, v, o = f32(1, 4, 32), f32(1, 2, 64, 32), f32(1, 2, 64, 32), np.zeros((1, 4, 32), np.float32)
        call = kernel.bind({"Q": q, "K": k, "V": v, "O": o}, dims={"S": 64, "L": 1})
        out["L=64"] = attempt(lambda: call(L=64))
        out["L=65"] = attempt(lambda: call(L=65))
        out["S=32"] = attempt(lambda: call(S=32))  # L = 64 stays: refused
        out["S=32,L=8"] = attempt(lambda: call(S=32, L=8))  # the cache's layout: refused
        out["then L=40"] = attempt(lambda: call(L=40))
        out["S=65"] = attempt(lambda: call(S=65))
        out["S=64 again"] = attempt(lambda: call(S=64))
        out["then L=64"] = attempt(lambda: call(L=64))
        out["scalars"] = dict(call.scalars)
        out["S=32,L=40"] = attempt(lambda: call(S=32, L=40))
        out["bind L=100"] = attempt(lambda: kernel.bind({"Q": q, "K": k, "V": v, "O": o}, dims={"S": 64, "L": 100}))
    """)
    assert out["S=32"].startswith("ValueError") and "dim L = 64 exceeds S = 32" in out["S=32"]
    assert out["S=32,L=8"].startswith("ValueError") and "dim S = 32 is not the 64 the arrays were bound at" in out["S=32,L=8"]
    assert out["L=64"] == out["then L=40"] == out["S=64 again"] == out["then L=64"] == "ok"
    assert out["L=65"].startswith("ValueError") and "dim L = 65 exceeds S = 64" in out["L=65"]
    assert out["S=65"].startswith("ValueError") and "dim S = 65 exceeds 64" in out["S=65"]
    assert out["scalars"] == {"S": 64, "L": 64}
    assert "dim L = 40 exceeds S = 32" in out["S=32,L=40"]
    assert "dim L = 100 exceeds S = 64" in out["bind L=100"]


def test_the_dims_that_set_an_array_s_layout():
    from runtime.abi import ArgSpec
    from runtime.kernel import layout_dims

    cache = [ArgSpec("K", "in", "float32", ("B", "HKV", "S", "D")), ArgSpec("O", "out", "float32", ("B", "H", "D"))]
    assert layout_dims(cache, {"B": 2, "HKV": 2, "S": 64, "D": 32, "H": 4}) == {"HKV", "S", "D", "H"}
    # axes of one outside it: the same layout at fewer rows (one sequence's prefill, [1, T, H, D])
    assert layout_dims(cache, {"B": 1, "HKV": 1, "S": 64, "D": 32, "H": 4}) == {"D"}
    rows = [ArgSpec("X", "in", "float32", ("M", "N")), ArgSpec("G", "in", "float32", ("N",))]
    assert layout_dims(rows, {"M": 8, "N": 64}) == {"N"}


def test_host_copies_of_a_decode_step_match_the_plain_ones():
    arrays = HostArrays()
    rng = np.random.default_rng(0)
    cache, plain = np.zeros((2, 3, 8, 4), np.float32), np.zeros((2, 3, 8, 4), np.float32)
    rows = np.zeros((6, 4), np.float32)
    write = arrays.position_writer(cache, rows)
    for position in (0, 5, 7):
        rows[:] = rng.standard_normal((6, 4))  # the writer sees what the kernels write into rows later
        write(position)
        arrays.write_position(plain, rows, position)
    np.testing.assert_array_equal(cache, plain)
    with pytest.raises(IndexError):
        write(8)
    with pytest.raises(ValueError, match="must be contiguous"):
        arrays.position_writer(cache, np.zeros((6, 4), np.float32).T)  # [4, 6]: no view as [2, 3, 4]

    table, buffer = rng.standard_normal((10, 4)).astype(np.float32), np.zeros((3, 4), np.float32)
    arrays.gather_rows(buffer, table, np.array([4, 0, 9]))
    np.testing.assert_array_equal(buffer, table[[4, 0, 9]])
    with pytest.raises(IndexError):
        arrays.gather_rows(buffer, table, np.array([1, 10, 2]))
    positions = np.zeros(3, np.int32)
    arrays.fill(positions, 17)
    assert positions.tolist() == [17, 17, 17]


def test_a_decode_step_binds_new_lengths_and_refuses_positions_past_its_cache(default_kernels):
    tiny = PRESETS["tiny"]
    weights = ModelWeights.random(tiny, seed=3)
    model = LlamaModel(tiny, weights, default_kernels)
    prompts = np.random.default_rng(1).integers(0, tiny.vocab_size, (1, 5))
    generated = model.generate(prompts, 4)
    caches = model.new_caches(1, 8)
    first, _ = model.prefill(prompts, caches)
    step = _DecodeStep(model, 1, 8, caches, lengths=[6])  # 7 and 8 are bound on first use
    tokens = first.argmax(axis=-1)
    for i, position in enumerate(range(5, 8)):  # generate's three decode steps, on a cache of another size
        logits = step(tokens, position)
        np.testing.assert_allclose(logits, generated.logits[:, i + 1], rtol=1e-5, atol=1e-5)
        tokens = logits.argmax(axis=-1)
    assert sorted(step._by_length) == [6, 7, 8]
    with pytest.raises((IndexError, ValueError)):
        step(tokens, 8)  # the cache holds 8 positions


def test_calls_of_one_kernel_on_several_threads_do_not_share_scratch(default_kernels):
    """ctypes lets go of the GIL in the foreign call: threads calling one kernel run at once.
    Each call has its own workspace (the gemm packs its panels there), so every thread gets
    the answer it gets alone."""
    import threading

    kernel = default_kernels.get("gemm", {"M": 128, "N": 128, "K": 128})
    assert any(a.role == "workspace" for a in kernel.args)
    rng = np.random.default_rng(0)
    inputs = [(rng.standard_normal((128, 128)).astype(np.float32), rng.standard_normal((128, 128)).astype(np.float32))
              for _ in range(4)]
    alone = [kernel(x, w).copy() for x, w in inputs]
    wrong = [0] * len(inputs)

    def work(i: int) -> None:
        y = np.empty_like(alone[i])
        for _ in range(150):
            kernel(*inputs[i], out={"Y": y})
            wrong[i] += not np.array_equal(y, alone[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0] * len(inputs)


def test_a_call_names_only_arrays_the_kernel_takes_and_no_output_overlaps_an_input(exported_library):
    import runtime

    library = runtime.load(exported_library)
    gemv = library.get("gemv", {"M": 1, "N": 64, "K": 128})
    x, w = np.ones((1, 128), np.float32), np.ones((64, 128), np.float32)
    with pytest.raises(TypeError, match=r"has no argument 'y'"):  # its buffer would never be written
        gemv(x, w, out={"y": np.empty((1, 64), np.float32)})
    with pytest.raises(TypeError, match="has no argument 'B'"):
        gemv(x, w, B=x)
    with pytest.raises(TypeError, match="takes 2 inputs"):
        gemv(x, w, x)
    with pytest.raises(TypeError, match="got input 'X' both by position and by name"):  # ran on W's array
        gemv(x, w, X=w[:1])
    shared = np.zeros(256, np.float32)  # X and Y in one buffer: the kernel would read what it writes
    with pytest.raises(ValueError, match="output Y overlaps input X"):
        gemv(shared[:128].reshape(1, 128), w, out={"Y": shared[64:128].reshape(1, 64)})
    # binding checks the same: names, overlaps, and what an array is
    with pytest.raises(ValueError, match="output Y overlaps input X"):
        gemv.bind({"X": shared[:128].reshape(1, 128), "W": w, "Y": shared[64:128].reshape(1, 64)})
    with pytest.raises(TypeError, match="has no argument 'Z'"):
        gemv.bind({"X": x, "W": w, "Y": np.empty((1, 64), np.float32), "Z": x})
    with pytest.raises(ValueError, match="input X: expected a numpy array, got list"):
        gemv.bind({"X": [[1.0] * 128], "W": w, "Y": np.empty((1, 64), np.float32)})
    # two outputs in one buffer: one of the results would be lost
    norm = library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True}, dynamic=["M"])
    rows, both = np.ones((8, 64), np.float32), np.empty((8, 64), np.float32)
    with pytest.raises(ValueError, match="output S overlaps output Y"):
        norm(rows, rows, np.ones(64, np.float32), out={"Y": both, "S": both})
    # a cache of other than the tuned rows: how many are valid is the caller's to say
    attention = library.get("attention_decode", {"B": 1, "H": 4, "HKV": 2, "D": 32, "S": 64, "L": 64},
                            dynamic=["S", "L"])
    q, cache = np.ones((1, 4, 32), np.float32), np.ones((1, 2, 128, 32), np.float32)
    with pytest.raises(TypeError, match=r"pass the dynamic dim L"):
        attention(q, cache, cache)
    assert np.allclose(attention(q, cache, cache, dims={"L": 100}), 1.0)
    for value in (2.7, 0, -3, True, "8", 10**400):
        with pytest.raises(ValueError, match="dim N must be an int from 1 to"):
            library.get("gemv", {"M": 1, "N": value, "K": 128})
    assert library.get("gemv", {"M": 1, "N": np.int64(64), "K": 128}) is gemv
    # an attribute spelled out at its default names the same kernel as one left out
    norm = library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True}, dynamic=["M"])
    assert norm.tuned and library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True, "eps": 1e-5},
                                      dynamic=["M"]).entry == norm.entry
    # another value is another kernel: the error says which there are
    with pytest.raises(LookupError, match=r"its rmsnorm kernels have the attributes \{residual=true\}"):
        library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True, "eps": 1e-6}, dynamic=["M"])


def test_generate_takes_integer_token_ids_and_real_weights(default_kernels):
    tiny = PRESETS["tiny"]
    weights = ModelWeights.random(tiny, seed=0)
    model = LlamaModel(tiny, weights, default_kernels)
    for prompts, words in [([[1.7, 2.2]], "integer token ids"), ([["1", "2"]], "integer token ids"),
                           ([[True, False]], "integer token ids"), (np.zeros((0, 3), np.int64), "batch and tokens")]:
        with pytest.raises(ValueError, match=words):
            model.generate(prompts, new_tokens=2)
    for new_tokens in (2.5, "3", None):
        with pytest.raises(ValueError, match="new_tokens must be an int"):
            model.generate([[1, 2]], new_tokens=new_tokens)
    assert model.generate([[1, 2]], new_tokens=np.int64(2)).tokens.shape == (1, 2)
    for odd in (np.full((tiny.hidden_size,), 1 + 1j), np.full((tiny.hidden_size,), "1.0")):
        with pytest.raises(ValueError, match="model.norm.weight: a weight tensor must hold real numbers"):
            ModelWeights(tiny, {**weights.tensors, "model.norm.weight": odd})
    # bfloat16 words as numpy holds them would be taken for integers (16256 for 1.0): said, not done
    words = np.full((tiny.hidden_size,), 0x3F80, np.uint16)
    with pytest.raises(ValueError, match=r"model.norm.weight: uint16 values are ambiguous: .*Bfloat16Words"):
        ModelWeights(tiny, {**weights.tensors, "model.norm.weight": words})
    marked = ModelWeights(tiny, {**weights.tensors, "model.norm.weight": words.view(Bfloat16Words)})
    assert np.array_equal(marked["model.norm.weight"], np.ones(tiny.hidden_size, np.float32))
    with pytest.raises(ValueError, match="must be a mapping"):
        ModelWeights(tiny, None)


def test_a_kv_length_compiled_in_is_not_kept_for_a_cache_of_other_rows(default_kernels):
    """attention_decode tuned at S = L = 16 with neither dynamic: both still reach the kernel at
    run time, S read off the cache; L is the caller's to give when the cache is not the tuned one."""
    attention = default_kernels.get("attention_decode", {"B": 1, "H": 2, "HKV": 1, "D": 32, "S": 16, "L": 16})
    q = np.ones((1, 2, 32), np.float32)
    small, large = np.ones((1, 1, 16, 32), np.float32), np.ones((1, 1, 24, 32), np.float32)
    assert np.allclose(attention(q, small, small), 1.0)
    with pytest.raises(TypeError, match=r"the arrays hold S = 24, not the tuned 16: pass how many rows are valid"):
        attention(q, large, large)
    assert np.allclose(attention(q, large, large, dims={"L": 20}), 1.0)
