from __future__ import annotations

import os
import shutil

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        import pycuda.driver as drv

        drv.init()
        return drv.Device.count() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU and pycuda")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def kernel_cache(tmp_path_factory):
    """A fresh artifact cache per test session, shared by every worker it starts."""
    path = tmp_path_factory.mktemp("kernel-cache")
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


@pytest.fixture(scope="session")
def sweep_logs(tmp_path_factory, fast_policy):
    """Real sweeps of two small gemv spaces (every config measured once), shared by the
    replay, transfer, CLI and notebook tests: {"target": path, "other": path}."""
    from fakes import SMALL_SWEEPS, record_sweep

    folder = tmp_path_factory.mktemp("sweeps")
    paths = {}
    for name, (op, shape) in SMALL_SWEEPS.items():
        paths[name] = folder / f"{name}.jsonl"
        record_sweep(paths[name], op, shape, fast_policy)
    return paths
