"""A CPU template default runs on every core where one core would take long, else on one."""
from __future__ import annotations

import dataclasses

import pytest

from search_space import Target, Task, get_template

BIG = [  # tens of microseconds to milliseconds on one core
    ("gemm", {"M": 128, "N": 2048, "K": 2048}, ("M",)),
    ("gemm_q4", {"M": 128, "N": 2048, "K": 2048}, ()),
    ("gemv", {"M": 1, "N": 4096, "K": 4096}, ()),
    ("gemv_q4", {"M": 1, "N": 4096, "K": 4096}, ()),
    ("rmsnorm", {"M": 128, "N": 2048}, ("M",)),
    ("swiglu", {"M": 128, "N": 5632}, ("M",)),
    ("geglu", {"M": 128, "N": 5632}, ("M",)),
    ("attention_decode", {"B": 1, "H": 32, "HKV": 8, "D": 128, "S": 2048, "L": 2048}, ("S", "L")),
    ("attention_prefill", {"B": 1, "T": 128, "H": 32, "HKV": 4, "D": 64}, ("T",)),
]
SMALL = [  # a token's row: over before a worker wakes
    ("rmsnorm", {"M": 1, "N": 2048}, ()),
    ("rope", {"T": 1, "H": 36, "D": 64}, ("T",)),
    ("swiglu", {"M": 1, "N": 512}, ("M",)),
    ("geglu", {"M": 1, "N": 512}, ("M",)),
]


def _host(cores: int) -> Target:
    return dataclasses.replace(Target.host(), cores=cores)


@pytest.mark.parametrize("op,shape,dynamic", BIG, ids=[c[0] for c in BIG])
def test_a_long_task_defaults_to_every_core(op, shape, dynamic):
    task = Task.make(op, shape, "float32", {}, dynamic)
    template = get_template(op, "cpu")
    for cores in (4, 1):
        target = _host(cores)
        default = template.default(task, target)
        assert default.as_dict()["threads"] == cores
        assert template.space(task, target).is_valid(default.as_dict())


@pytest.mark.parametrize("op,shape,dynamic", SMALL, ids=[c[0] for c in SMALL])
def test_a_short_task_defaults_to_one_thread(op, shape, dynamic):
    task = Task.make(op, shape, "float32", {}, dynamic)
    default = get_template(op, "cpu").default(task, _host(4))
    assert default.as_dict()["threads"] == 1


def test_a_default_falls_back_to_one_thread_where_a_thread_would_have_no_work():
    # 4 rows of W make one block: the threads split W blocks, so a second one would have none
    task = Task.make("gemm", {"M": 256, "N": 4, "K": 8192}, "float32")
    target = _host(4)
    template = get_template("gemm", "cpu")
    space = template.space(task, target)
    assert not space.accepts(dict(template.default(task, target).as_dict(), threads=4))
    assert template.default(task, target).as_dict()["threads"] == 1
