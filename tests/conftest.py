from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


# ----------------------------------------------------------------------------- tools
# The programs some tests need besides Python, in one place. A test marked
# ``@pytest.mark.tools("nvcc", ...)``, or using a fixture that calls ``require_tools``, is
# skipped with the reason on a machine that lacks one.


def _c_compiler() -> bool:
    from export.library_writer import ExportError, find_c_compiler

    try:
        find_c_compiler()
    except ExportError:
        return False
    return True


def _emulator() -> bool:
    from cudaemu import CUDA_INCLUDE

    return shutil.which("g++") is not None and (Path(CUDA_INCLUDE) / "cuda_fp16.h").is_file()


TOOLS = {
    "nvcc": (lambda: shutil.which("nvcc") is not None, "needs nvcc (the CUDA toolkit) on PATH to build cubins"),
    "cc": (_c_compiler, "needs a C compiler ($CC, cc, gcc or clang) to link exported libraries"),
    "emulator": (_emulator, "needs g++ and the CUDA toolkit's headers for the CPU emulator of CUDA (tests/cudaemu.py)"),
    "make": (lambda: shutil.which("make") is not None, "needs make"),
    # not a program, but skipped the same way: the cluster tests need the optional extra
    "ray": (lambda: importlib.util.find_spec("ray") is not None,
            "needs Ray, the optional extra (pip install -e '.[ray]'; make install brings it)"),
}


@functools.lru_cache(maxsize=None)
def _have(tool: str) -> bool:
    return TOOLS[tool][0]()


def missing_tools(*tools: str) -> list[str]:
    """The skip reason of every tool in ``tools`` this machine lacks."""
    unknown = [t for t in tools if t not in TOOLS]
    if unknown:
        raise ValueError(f"unknown tool {unknown}: known are {', '.join(TOOLS)}")
    return [TOOLS[t][1] for t in tools if not _have(t)]


def require_tools(*tools: str) -> None:
    """Skip the calling test (or fixture) unless this machine has every tool in ``tools``."""
    missing = missing_tools(*tools)
    if missing:
        pytest.skip("; ".join(missing))


def pytest_configure(config):
    config.addinivalue_line("markers", f"tools(*names): needs these programs ({', '.join(TOOLS)}); "
                                       "skipped with the reason where one is missing")


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import pycuda.driver as drv

        drv.init()
        return drv.Device.count() > 0
    except Exception:
        return False


# The test files that take longest, longest first (seconds on the 2-core VM, 2026-12-07, beside
# each: setup, call and teardown under three workers). pytest-xdist hands each worker whole files
# in collection order (the Makefile turns off its reordering by test count, which put the
# few-but-long files last): started early, the long files run beside others and the short ones
# fill in at the end, where one long file would otherwise run alone while the other worker
# waits. A file missing here only runs later.
LONGEST_FIRST = (
    "tests/cluster/test_ray_cluster.py",  # 100, mostly waiting on the cluster
    "tests/autotune/test_model_on_fake_gpu.py",  # 79
    "tests/autotune/test_cli_model.py",  # 60
    "tests/runtime/test_transformers_parity.py",  # 55 (37 alone: Qwen3 and Phi-3 added)
    "tests/search_space/test_cuda_matmul_emulated.py",  # 54
    "tests/autotune/test_cli_hardening.py",  # 43
    "tests/autotune/test_cli_research.py",  # 43
    "tests/search_space/test_cuda_rowattn_emulated.py",  # 42
    "tests/search_space/test_cuda_templates.py",  # 42
    "tests/search_space/test_cpu_templates.py",  # 40
    "tests/search_space/test_quant_templates.py",  # 35
    "tests/autotune/test_cli.py",  # 34
    "tests/cluster/test_mlflow_server.py",  # 24
    "tests/search_space/test_attention_templates.py",  # 23
    "tests/measure/test_cuda_on_fake_gpu.py",  # 22
    "tests/autotune/test_cuda_cli.py",  # 22
    "tests/measure/test_faults.py",  # 21
)


def pytest_collection_modifyitems(config, items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: the rest keep their order
    gpu = None
    for item in items:
        missing = [reason for marker in item.iter_markers("tools") for reason in missing_tools(*marker.args)]
        if "gpu" in item.keywords:  # the GPU tests build their kernels
            gpu = _has_gpu() if gpu is None else gpu
            if not gpu:
                item.add_marker(pytest.mark.skip(reason="needs an NVIDIA GPU and pycuda"))
            missing += missing_tools("nvcc")
        if missing:
            item.add_marker(pytest.mark.skip(reason="; ".join(dict.fromkeys(missing))))


def session_folder(tmp_path_factory) -> Path:
    """The test session's own temporary folder, the same in every pytest-xdist worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # each worker's basetemp lies in the session's
        root = root.parent
    return root


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """A fresh artifact cache per test session, shared by every worker it starts (writes to it
    are atomic renames, so two workers building the same kernel each finish with one file)."""
    path = session_folder(tmp_path_factory) / "kernel-cache"
    path.mkdir(exist_ok=True)
    old = os.environ.get("AUTOTUNE_CACHE_DIR")
    os.environ["AUTOTUNE_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("AUTOTUNE_CACHE_DIR", None)
    else:
        os.environ["AUTOTUNE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def host():
    from search_space import Target

    return Target.host()


@pytest.fixture(scope="session")
def fast_policy():
    from measure import TimingPolicy

    return TimingPolicy(warmup=1, min_sample_s=0.0005, repeats=3, min_repeats=3, max_total_s=0.5)


def made_once(tmp_path_factory, name: str, make) -> dict[str, Path]:
    """``make(folder)``'s paths by name, made once per test session in a folder of the
    session's: under pytest-xdist the first worker to ask makes them and the others wait for it
    and take the same files (they are only read), instead of measuring them again."""
    from filelock import FileLock

    root = session_folder(tmp_path_factory)
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():  # a worker whose make failed leaves nothing: the next one tries again
            folder = root / name
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            done.write_text(json.dumps({key: str(path) for key, path in make(folder).items()}))
    return {key: Path(path) for key, path in json.loads(done.read_text()).items()}


@pytest.fixture(scope="session")
def mlflow_tables(tmp_path_factory) -> Path:
    """An empty MLflow SQLite store with its tables made, once per session. Making them runs
    every schema migration, about a second of CPU: tests of a store that exists copy this one
    (``fakes.copied_store``), and only those of a new store pay it."""
    def make(folder):
        from mlflow import MlflowClient

        path = folder / "mlflow.db"
        MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
        return {"db": path}

    return made_once(tmp_path_factory, "mlflow-tables", make)["db"]


@pytest.fixture
def mlflow_store(tmp_path, mlflow_tables) -> str:
    """The URI of an empty MLflow store in this test's folder."""
    from fakes import copied_store

    return copied_store(mlflow_tables, tmp_path)


@pytest.fixture(scope="session")
def sweep_logs(tmp_path_factory, fast_policy):
    """Real sweeps of two small gemv spaces (every config measured once), shared by the
    replay, transfer, CLI and notebook tests: {"target": path, "other": path}."""
    from fakes import SMALL_SWEEPS, record_sweep

    def make(folder):
        paths = {}
        for name, (op, shape) in SMALL_SWEEPS.items():
            paths[name] = folder / f"{name}.jsonl"
            record_sweep(paths[name], op, shape, fast_policy)
        return paths

    return made_once(tmp_path_factory, "sweeps", make)


# Small tasks of every kind a kernel library holds: a threaded kernel (pthreads), bfloat16
# words, int4 codes in bytes, two outputs, two buckets of one dynamic dim, two dynamic dims,
# a workspace.
LIBRARY_TASKS = (
    ("gemv", {"M": 1, "N": 64, "K": 128}, "float32", {}, (), {"threads": [2]}),
    ("gemv", {"M": 2, "N": 32, "K": 64}, "bfloat16", {}, (), None),
    ("gemv_q4", {"M": 1, "N": 32, "K": 128}, "float32", {"group_size": 32}, (), None),
    ("rmsnorm", {"M": 8, "N": 64}, "float32", {"residual": True}, ("M",), None),
    ("rmsnorm", {"M": 64, "N": 64}, "float32", {"residual": True}, ("M",), None),
    ("attention_decode", {"B": 1, "H": 4, "HKV": 2, "D": 32, "S": 64, "L": 64}, "float32", {}, ("S", "L"), None),
    ("rope", {"T": 8, "H": 4, "D": 32}, "float32", {}, ("T",), None),
)


@pytest.fixture(scope="session")
def library_log(tmp_path_factory, host, fast_policy):
    """A real tuning log of LIBRARY_TASKS (a few random trials each)."""
    from autotune.tuners import RandomTuner
    from measure import LocalBuilder, LocalRunner
    from records import RecordLog
    from search_space import Task

    def make(folder):
        log = RecordLog(folder / "tune.jsonl")
        with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=fast_policy) as runner:
            for op, dims, dtype, attrs, dynamic, restrict in LIBRARY_TASKS:
                task = Task.make(op, dims, dtype, attrs, dynamic)
                summary = RandomTuner(task, host, seed=1, restrict=restrict).tune(4, builder, runner, batch_size=4,
                                                                                  log=log)
                assert summary.best is not None, task.key
        return {"log": log.path}

    return made_once(tmp_path_factory, "library-log", make)["log"]


@pytest.fixture(scope="session")
def exported_library(tmp_path_factory, library_log):
    """The library exported from ``library_log`` (read-only for tests: copy it to change it)."""
    from export import export_library

    require_tools("cc")
    from records import load_records

    def make(folder):
        export_library(load_records([library_log]), folder / "lib")
        return {"library": folder / "lib"}

    return made_once(tmp_path_factory, "library", make)["library"]


@pytest.fixture
def fake_gpu(tmp_path, monkeypatch):
    """pycuda is ``tests/fake_pycuda`` here and in the workers this test starts (device memory
    is host memory, kernels run on the CPU emulator); returns the fake's cubin registry."""
    import sys

    from fakes import FAKE_PYCUDA

    require_tools("emulator")

    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("FAKE_PYCUDA_REGISTRY", str(registry))
    monkeypatch.syspath_prepend(str(FAKE_PYCUDA))
    yield registry
    for name in [m for m in sys.modules if m == "pycuda" or m.startswith("pycuda.")]:
        del sys.modules[name]
