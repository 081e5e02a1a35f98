from __future__ import annotations

import numpy as np
import pytest

from search_space import Config, ConfigSpace, Knob


def make_space():
    return ConfigSpace(
        [Knob("a", (1, 2, 4)), Knob("b", ("x", "y")), Knob("c", (8, 16, 32, 64))],
        [("a*c <= 128", lambda v: v["a"] * v["c"] <= 128)],
    )


def test_len_get_index_roundtrip():
    space = make_space()
    assert len(space) == 3 * 2 * 4
    for i in range(len(space)):
        config = space.get(i)
        assert config.index == i
        assert space.index_of(config) == i
        assert space.index_of(config.as_dict()) == i


def test_last_knob_varies_fastest():
    space = make_space()
    assert space.get(0).as_dict() == {"a": 1, "b": "x", "c": 8}
    assert space.get(1).as_dict() == {"a": 1, "b": "x", "c": 16}
    assert space.get(4).as_dict() == {"a": 1, "b": "y", "c": 8}


def test_constraints_filter_iteration_sampling_and_neighbors():
    space = make_space()
    valid = list(space)
    assert all(space.is_valid(c) for c in valid)
    assert len(valid) == len(space) - 2  # a=4 with c=64, for b in x,y
    assert space.violations({"a": 4, "b": "x", "c": 64}) == ["a*c <= 128"]
    rng = np.random.default_rng(0)
    sample = space.sample(rng, 10)
    assert len(sample) == 10 and len({c.index for c in sample}) == 10
    assert all(space.is_valid(c) for c in sample)
    exclude = {c.index for c in valid[:-3]}
    rest = space.sample(rng, 10, exclude=exclude)
    assert {c.index for c in rest} == {c.index for c in valid[-3:]}
    origin = space.from_values({"a": 2, "b": "x", "c": 64})
    for n in space.neighbors(origin):
        diff = [k for k in origin.as_dict() if origin[k] != n[k]]
        assert len(diff) == 1 and space.is_valid(n)
    assert all(n["a"] != 4 or n["c"] != 64 for n in space.neighbors(origin))


def test_bad_values_raise():
    space = make_space()
    with pytest.raises(ValueError):
        space.index_of({"a": 3, "b": "x", "c": 8})
    with pytest.raises(KeyError):
        space.index_of({"a": 1})
    with pytest.raises(IndexError):
        space.get(len(space))
    with pytest.raises(ValueError):
        Knob("k", (1, 1))
    with pytest.raises(ValueError):
        ConfigSpace([Knob("a", (1,)), Knob("a", (2,))])


def test_sampling_large_space_is_uniform_enough():
    space = ConfigSpace([Knob(f"k{i}", tuple(range(10))) for i in range(7)])  # 10^7 points
    sample = space.sample(np.random.default_rng(1), 2000)
    assert len({c.index for c in sample}) == 2000
    first = np.array([c["k0"] for c in sample])
    counts = np.bincount(first, minlength=10)
    assert counts.min() > 120  # ~200 expected per value


def test_sparse_valid_configs_of_a_space_too_large_to_enumerate_are_still_found():
    """10^7 points of which one in 10^4 is valid (k0..k3 all 7): 50 draws per wanted config
    rarely hit one; walks that repair draws find them, each valid and distinct, and a space
    holding none ends within its bound."""
    knobs = [Knob(f"k{i}", tuple(range(10))) for i in range(7)]
    sparse = ConfigSpace(knobs, [(f"k{i} is 7", lambda v, i=i: v[f"k{i}"] == 7) for i in range(4)])
    assert len(sparse) > sparse.ENUMERATE_LIMIT
    sample = sparse.sample(np.random.default_rng(3), 40, exclude={sparse.index_of({f"k{i}": 7 for i in range(7)})})
    assert len(sample) == 40 and len({c.index for c in sample}) == 40
    assert all(sparse.is_valid(c) for c in sample) and {c["k6"] for c in sample} != {7}
    empty = ConfigSpace(knobs, [("never", lambda v: False)])
    assert empty.sample(np.random.default_rng(0), 3) == []


def test_random_neighbor_moves_one_knob():
    space = make_space()
    rng = np.random.default_rng(3)
    config = space.from_values({"a": 1, "b": "x", "c": 8})
    for _ in range(20):
        nxt = space.random_neighbor(config, rng)
        assert nxt is not None and space.is_valid(nxt)
        assert sum(config[k] != nxt[k] for k in space.names) == 1


def test_config_is_not_a_space():
    config = make_space().get(5)
    assert isinstance(config, Config)
    assert not hasattr(config, "knobs")
    assert Config(config.values, config.index) == config


def test_a_knob_added_later_reads_old_configs_as_its_legacy_value():
    space = ConfigSpace([Knob("tile", (4, 8)), Knob("packed", (0, 1), legacy=0), Knob("order", ("a", "b"))])
    old = {"tile": 8, "order": "b"}  # logged before "packed" existed
    assert space.from_values(old).as_dict() == {"tile": 8, "packed": 0, "order": "b"}
    with pytest.raises(KeyError, match="lacks knobs"):  # a knob without a legacy value must be named
        space.from_values({"tile": 8})
    assert space.restrict(packed=[0]).from_values(old)["packed"] == 0
    with pytest.raises(KeyError):  # the legacy value is outside this restricted space
        space.restrict(packed=[1]).index_of(old)
    with pytest.raises(ValueError, match="legacy value"):
        Knob("packed", (0, 1), legacy=2)


def test_gemm_logs_from_before_the_outer_kernel_and_x_packing_still_map(host):
    from search_space import Task, get_template

    task = Task.make("gemm", {"M": 512, "N": 512, "K": 512})
    space = get_template("gemm", "cpu").space(task, host)
    old = {"mr": 3, "nr": 3, "vec": 8, "unroll": 2, "kc": 0, "mc": 32, "nc": 192, "order": "nkm",
           "inner": "nm", "pack": 1, "threads": 1}  # a record of 2026-11-28
    config = space.from_values(old)
    assert config["kernel"] == "dot" and config["xpack"] == 0


def test_accepted_completes_partial_values_and_skips_what_the_space_rejects():
    space = make_space()
    defaults = {"a": 1, "b": "x", "c": 8}
    got = space.accepted([{"c": 64}, {"a": 4, "c": 64}, {"b": "y"}, {"c": 64}, {"d": 1} | {"a": 3}], defaults)
    assert [c.as_dict() for c in got] == [{"a": 1, "b": "x", "c": 64}, {"a": 1, "b": "y", "c": 8}]


def test_restrict_takes_one_value_alone():
    space = make_space()
    assert [k.values for k in space.restrict(a=2, b="y").knobs][:2] == [(2,), ("y",)]  # "y" is a value, not letters
    with pytest.raises(ValueError, match=r"knob b has none of the values \['xy'\]"):
        space.restrict(b="xy")


def test_a_space_knows_whether_any_config_is_valid():
    space = make_space()
    assert space.has_valid_config()
    assert not space.restrict(a=4, c=64).has_valid_config()  # 4 * 64 > 128
