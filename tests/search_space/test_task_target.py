from __future__ import annotations

import json

import pytest

from search_space import Target, Task, format_shape, get_template, parse_shape


def test_parse_shape_accepts_and_rejects():
    assert parse_shape("M=256,N=128,K=64") == {"M": 256, "N": 128, "K": 64}
    assert parse_shape(" M = 1 , N=2") == {"M": 1, "N": 2}
    for bad in ("", "M", "M=", "M=0", "M=-1", "M=1,M=2", "M=1.5", "1=2", "M=1;N=2"):
        with pytest.raises(ValueError):
            parse_shape(bad)
    assert format_shape({"M": 1, "N": 2}) == "M=1,N=2"


def test_task_key_roundtrip_and_metrics():
    task = Task.make("gemm", {"M": 2, "N": 3, "K": 4})
    assert task.key == "gemm/float32/M=2,N=3,K=4"
    assert Task.from_dict(json.loads(json.dumps(task.to_dict()))) == task
    assert task.flops == 2 * 2 * 3 * 4
    assert task.min_bytes == 4 * (2 * 4 + 3 * 4 + 2 * 3)
    dyn = Task.make("gemm", {"M": 16, "N": 3, "K": 4}, dynamic=["M"], attrs={"eps": 1e-5})
    assert "M~=16" in dyn.key and "eps=" in dyn.key
    assert Task.from_dict(dyn.to_dict()) == dyn
    with pytest.raises(ValueError):
        Task.make("gemm", {"M": 0, "N": 1, "K": 1})
    with pytest.raises(ValueError):
        Task.make("gemm", {"M": 1, "N": 1, "K": 1}, dtype="int3")
    with pytest.raises(ValueError):
        Task.make("gemm", {"M": 1}, dynamic=["Q"])


def test_an_attribute_at_its_default_names_the_same_task():
    plain = Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16")
    spelled = Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float16",
                        {"norm": "none", "eps": 1e-5, "residual": False, "act": "none", "weight": "same"})
    assert spelled == plain and spelled.key == plain.key == "gemv/float16/M=1,N=64,K=64"
    assert Task.make("rope", {"T": 1, "H": 2, "D": 8}, attrs={"theta": 10000}).attrs == ()
    # a number where the default is a float is a float: 500000 and 500000.0 name one kernel
    assert Task.make("rope", {"T": 1, "H": 2, "D": 8}, attrs={"theta": 500000}).key.endswith("/theta=500000.0")
    # other values stay, and so do values of another type, for the operator's check to refuse
    assert Task.make("rmsnorm", {"M": 1, "N": 8}, attrs={"eps": 1e-6, "residual": False}).attr == {"eps": 1e-6}
    odd = Task.make("rmsnorm", {"M": 1, "N": 8}, attrs={"residual": 0})
    assert odd.attr == {"residual": 0}
    # a scaled rope's parameters are all required, whatever their value
    llama3 = {"rope_type": "llama3", "factor": 1.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    assert Task.make("rope", {"T": 1, "H": 2, "D": 8}, attrs=llama3).attr == llama3


def test_an_attribute_of_another_kind_than_its_default_is_refused_and_numpy_scalars_are_plain_values():
    import numpy as np

    rmsnorm = get_template("rmsnorm", "cpu")
    for attrs, words in [({"residual": 1}, "residual = 1 is not a bool like false"),
                         ({"eps": float("nan")}, "eps = nan is not a float like 1e-05"),
                         ({"eps": "1e-6"}, "eps = '1e-6' is not a float"),
                         ({"eps": 10 ** 400}, "eps = 1000.* is not a float")]:  # past any float
        with pytest.raises(ValueError, match=words):
            rmsnorm.check(Task.make("rmsnorm", {"M": 1, "N": 8}, attrs=attrs))
    task = Task.make("gemv_q4", {"M": 1, "N": 8, "K": 128},
                     attrs={"group_size": np.int64(32), "zero_point": np.bool_(True)})
    get_template("gemv_q4", "cpu").check(task)
    assert task.key.endswith("/group_size=32,zero_point=true")
    assert Task.make("gemv_q4", {"M": 1, "N": 8, "K": 128}, attrs={"group_size": np.int64(128)}).attrs == ()


def test_the_operators_defaults_are_the_abis():
    """What a template computes with where a task leaves an attribute out is what the runtime
    leaves out of a kernel's key (``runtime.abi.ATTR_DEFAULTS``): one table, read by both."""
    from runtime.abi import ATTR_DEFAULTS
    from runtime.rope_frequencies import SCALING_KEYS
    from search_space import list_templates

    for template in list_templates("cpu") + list_templates("cuda"):
        if not type(template).__module__.startswith("search_space.templates"):
            continue
        table = ATTR_DEFAULTS.get(template.op, {})
        assert dict(table) == {k: v for k, v in template.default_attrs.items() if k not in SCALING_KEYS}, template.op


def test_host_target(host):
    assert host.kind == "cpu"
    assert host.cores >= 1
    assert host.vector_bits in (128, 256, 512)
    assert Target.from_dict(json.loads(json.dumps(host.to_dict()))) == host
    assert host.key.startswith("cpu-")


def test_compile_only_cuda_target():
    sm90 = Target.from_name("sm_90a")
    assert sm90.kind == "cuda" and sm90.sm_count == 132 and sm90.max_threads_per_block == 1024
    with pytest.raises(ValueError):
        Target.from_name("tpu")
    with pytest.raises(ValueError):
        Target(kind="fpga", arch="x")


def test_the_registry_knows_where_each_built_in_template_lives():
    """``search_space.templates.MODULES`` names the module of every built-in template, so that a
    lookup imports that module alone; a template added without its entry would load them all."""
    from search_space import list_templates
    from search_space.templates import MODULES

    built_in = {(t.op, t.target_kind): type(t).__module__ for t in list_templates()
                if type(t).__module__.startswith("search_space.templates")}
    assert built_in == MODULES


def test_a_lookup_imports_only_the_template_it_names():
    """A worker building one kernel imports its template's module and no other (a fresh
    interpreter: this one has imported them all)."""
    import subprocess
    import sys

    code = ("import sys; from search_space import get_template, Task; "
            "t = get_template('gemv', 'cpu'); Task.make('gemv', {'M': 1, 'N': 8, 'K': 8}).flops; "
            "get_template('argmax', 'cuda'); "
            "import json; print(json.dumps(sorted(m for m in sys.modules if m.startswith('search_space.templates.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    imported = set(json.loads(out))
    assert {"search_space.templates.gemv", "search_space.templates.cuda.device_step"} <= imported
    others = {"gemm", "gemm_q4", "gemv_q4", "attention_prefill", "attention_decode", "softmax", "layernorm"}
    assert not imported & ({f"search_space.templates.{op}" for op in others}
                           | {f"search_space.templates.cuda.{op}" for op in others | {"gemv"}}), out
    with pytest.raises(ValueError, match="unknown op 'nosuchop' for target cpu: known ops are add, "):
        get_template("nosuchop", "cpu")


def test_task_make_takes_numpy_dims_and_a_dynamic_dim_by_name():
    import numpy as np

    task = Task.make("rmsnorm", {"M": np.int64(8), "N": np.int32(64)}, dynamic="M")
    assert task.dims == {"M": 8, "N": 64} and type(task.dims["M"]) is int and task.dynamic == ("M",)
    assert Task.make("gemm", {"M": 8, "N": 8, "K": 8}, dynamic="M,N").dynamic == ("M", "N")
    with pytest.raises(ValueError, match=r"dynamic dims \['Q'\]"):
        Task.make("rmsnorm", {"M": 8, "N": 64}, dynamic="Q")
    for bad in (True, 2.0, np.float64(2), "8", 0):
        with pytest.raises(ValueError, match="dim M must be a positive integer"):
            Task.make("rmsnorm", {"M": bad, "N": 64})
    with pytest.raises(TypeError, match="shape must map dim names to sizes"):
        Task.make("rmsnorm", "M=8,N=64")
    with pytest.raises(TypeError, match="op must be an operator name"):
        Task.make(None, {"M": 8})


def test_only_known_cuda_archs_are_compile_only_targets():
    """An arch's SM count and shared memory are what the constraints check: an unknown one was
    given sm_90's, and a malformed one ("sm_9") failed at every nvcc call."""
    import pytest

    from search_space import Target

    assert Target.from_name("sm_80").max_shared_memory_per_block == 163 << 10
    assert Target.from_name("sm_90a").sm_count == 132
    for name in ("sm_9", "sm_100a", "sm_86a"):
        with pytest.raises(ValueError, match=f"unknown CUDA arch '{name}'.*sm_90a"):
            Target.from_name(name)
