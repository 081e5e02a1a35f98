"""The CUDA side of the command line, as a user runs it: compile-only builds, clear errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_cli import run_refused

CLI = [sys.executable, "-m", "autotune.cli"]


def run(*args, cwd=None, env=None, timeout=900):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def one_line_error(proc, fragment: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: error:"), proc.stderr
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr


@pytest.fixture
def without_pycuda(tmp_path):
    """An environment where ``import pycuda`` fails, whatever this machine has installed."""
    fake = tmp_path / "nopycuda" / "pycuda"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('pycuda is not usable here')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(fake.parent)] + [p for p in sys.path if p])
    return env


@pytest.mark.tools("nvcc")
def test_compile_only_reports_registers_shared_memory_and_spills(tmp_path):
    # two configs, each a few seconds of nvcc: a third would repeat the same checks
    proc = run("tune", "--op", "gemm", "--shape", "M=100,N=72,K=96", "--dtype", "float16", "--target", "sm_90a",
               "--trials", "2", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2
    for row in rows:
        assert {"config", "status", "registers", "smem_static", "smem_dynamic", "spill_stores", "spill_loads",
                "threads", "grid"} <= set(row)
        assert row["status"] == "NO_ERROR" and row["registers"] > 0 and row["threads"] >= 32
        assert row["smem_dynamic"] > 0  # the tensor-core pipeline stages tiles in shared memory
    assert len({json.dumps(r["config"], sort_keys=True) for r in rows}) == 2
    assert not (tmp_path / "tune.jsonl").exists()  # nothing ran, nothing was logged
    # the same report from Python (its builds come from the kernel cache the command filled)
    from autotune import compile_only_report
    from search_space import Target, Task

    task = Task.make("gemm", {"M": 100, "N": 72, "K": 96}, "float16")
    same = compile_only_report(task, Target.from_name("sm_90a"), n_configs=2)
    assert [(r["config"], r["registers"]) for r in same] == [(r["config"], r["registers"]) for r in rows]
    with pytest.raises(ValueError, match="for CUDA targets"):
        compile_only_report(Task.make("gemv", {"M": 1, "N": 64, "K": 64}, "float32"), Target.host())


@pytest.mark.tools("nvcc")
def test_compile_only_keeps_to_restricted_knobs_and_finds_the_seed_schedules(tmp_path):
    """A narrow --restrict of a huge space: random draws rarely land in it, the template's seeds do."""
    proc = run("tune", "--op", "gemm", "--shape", "M=4096,N=4096,K=4096", "--dtype", "bfloat16", "--target",
               "sm_90a", "--restrict", "pipeline=tma", "--restrict", "cluster=2", "--trials", "2", "--json",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == 2 and all(r["config"]["pipeline"] == "tma" and r["config"]["cluster"] == 2 for r in rows)
    assert all(r["status"] == "NO_ERROR" and r["threads"] == 384 for r in rows)
    proc = run_refused("tune", "--op", "gemm", "--shape", "M=64,N=64,K=64", "--dtype", "float16", "--target", "sm_90a",
                      "--restrict", "cluster=2", "--compile-only", cwd=tmp_path)
    one_line_error(proc, "--restrict: no config of gemm's space at gemm/float16/M=64,N=64,K=64 is valid")


@pytest.mark.tools("nvcc")
def test_compile_only_text_for_the_cuda_target(tmp_path):
    proc = run("tune", "--op", "gemv_q4", "--shape", "M=1,N=512,K=512", "--dtype", "bfloat16", "--target", "cuda",
               "--compile-only", "--trials", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "2 of 2 configs build and fit the target" in lines[0]
    assert all("regs" in line and "spills" in line for line in lines[1:])


@pytest.mark.parametrize("command", ["tune", "bench"])
def test_cuda_target_without_pycuda_is_one_line_exit_2(tmp_path, without_pycuda, command):
    proc = run(command, "--op", "gemv", "--shape", "M=1,N=256,K=256", "--dtype", "float16", "--target", "cuda",
               cwd=tmp_path, env=without_pycuda)
    one_line_error(proc, "cuda target unavailable")


@pytest.mark.parametrize("args", [
    ["sweep", "--op", "gemv", "--shape", "M=1,N=256,K=256", "--sample", "2", "--log", "s.jsonl", "--no-mlflow"],
    ["tune-model", "--model", "tiny", "--trials-total", "2", "--log", "s.jsonl", "--no-mlflow"],
    ["bench", "--op", "gemv", "--shape", "M=1,N=256,K=256"],
])
def test_an_arch_measures_only_on_its_gpu(tmp_path, without_pycuda, args):
    """An arch names what to compile for; where something is measured it needs that GPU. Without
    one, every candidate was recorded as failed, and a rerun took the failures as done."""
    proc = run(*args, "--dtype", "float16", "--target", "sm_90a", cwd=tmp_path, env=without_pycuda)
    one_line_error(proc, "cuda target unavailable")
    assert not (tmp_path / "s.jsonl").exists() or not (tmp_path / "s.jsonl").read_text()


@pytest.mark.parametrize("args, fragment", [
    (["tune", "--op", "gemm", "--shape", "M=8,N=8,K=8", "--compile-only"], "--compile-only is for CUDA targets"),
    (["tune", "--op", "gemm", "--shape", "M=8,N=8,K=8", "--target", "sm_90a", "--threads", "2"],
     "--threads is for the cpu target"),
    (["tune", "--op", "gemm", "--shape", "M=8,N=8", "--target", "sm_90a"], "takes dims M,N,K"),
    (["tune", "--op", "nosuchop", "--shape", "M=8", "--target", "sm_90a"], "unknown op 'nosuchop' for target cuda"),
])
def test_bad_cuda_input_is_one_line_exit_2(tmp_path, args, fragment):
    one_line_error(run_refused(*args, cwd=tmp_path), fragment)


def test_ops_lists_the_cuda_matmul_templates():
    proc = run("ops", "--target", "cuda", "--json")
    assert proc.returncode == 0, proc.stderr
    ops = {o["op"]: o for o in json.loads(proc.stdout)}
    assert {"gemm", "gemv", "gemm_q4", "gemv_q4"} <= set(ops)
    assert set(ops["gemm"]["dtypes"]) == {"float16", "bfloat16", "float32"}


def _cuda_library(folder) -> None:
    """A well-formed CUDA library of one kernel (its cubin is never opened here)."""
    import hashlib

    from runtime.abi import MANIFEST_FORMAT, MANIFEST_SCHEMA_VERSION
    from runtime.library import seal_contracts

    (folder / "cubins").mkdir(parents=True)
    (folder / "sources").mkdir()
    cubin, source = b"\x7fELF not run here", b"// not run here\n"
    (folder / "cubins" / "k.cubin").write_bytes(cubin)
    (folder / "sources" / "k.cu").write_bytes(source)
    entry = {"op": "rmsnorm", "task": "rmsnorm/float16/M=8,N=64", "dims": {"M": 8, "N": 64}, "dynamic": [],
             "dtype": "float16", "attrs": {}, "config": {}, "entry": "rmsnorm_f16_0123456789", "symbol": "rmsnorm",
             "lang": "cuda", "launch": {"grid": [8], "block": [64]},
             "args": [{"name": "X", "role": "in", "dtype": "float16", "shape": ["M", "N"]},
                      {"name": "G", "role": "in", "dtype": "float16", "shape": ["N"]},
                      {"name": "Y", "role": "out", "dtype": "float16", "shape": ["M", "N"]}],
             "cubin": "cubins/k.cubin", "cubin_sha256": hashlib.sha256(cubin).hexdigest(),
             "source": "sources/k.cu", "source_sha256": hashlib.sha256(source).hexdigest()}
    manifest = {"format": MANIFEST_FORMAT, "schema": MANIFEST_SCHEMA_VERSION,
                "target": {"kind": "cuda", "arch": "sm_90a"}, "library": None, "kernels": [entry]}
    seal_contracts(manifest)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_run_on_a_cuda_library_without_a_gpu_is_one_line_exit_2(tmp_path, without_pycuda):
    import runtime

    _cuda_library(tmp_path / "lib")
    assert len(runtime.load(tmp_path / "lib").entries) == 1  # the library itself is fine
    proc = run("run", "--model", "tiny", "--lib", "lib", "--new-tokens", "2", cwd=tmp_path, env=without_pycuda)
    one_line_error(proc, "cuda target unavailable")


def test_without_nvcc_a_cuda_job_is_one_line_and_writes_no_log(tmp_path):
    """On a GPU machine whose nvcc is not on PATH every candidate would be recorded as a
    COMPILE_ERROR, and a rerun would take those as done: refused before anything starts."""
    from pathlib import Path

    fake = Path(__file__).resolve().parents[1] / "fake_pycuda"  # a GPU that answers, so only nvcc is missing
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and not (Path(p) / "nvcc").exists()]
    env = dict(os.environ, PATH=os.pathsep.join(path),
               PYTHONPATH=os.pathsep.join([str(fake)] + [p for p in sys.path if p]))
    common = ["--dtype", "float16", "--no-mlflow"]
    for args in (["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--target", "cuda", "--trials", "2",
                  "--log", "t.jsonl", *common],
                 ["tune-model", "--model", "tiny", "--target", "cuda", "--trials-total", "2", "--log", "m.jsonl",
                  "--quiet", *common],
                 ["sweep", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--target", "cuda", "--sample", "2",
                  "--log", "s.jsonl", *common]):
        proc = run(*args, cwd=tmp_path, env=env)
        assert proc.returncode == 2 and "autotune: error: nvcc not found on PATH" in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    proc = run("tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--dtype", "float16", "--target", "sm_90a",
               "--compile-only", "--trials", "2", cwd=tmp_path, env=env)
    one_line_error(proc, "nvcc not found on PATH")
    assert not list(tmp_path.glob("*.jsonl"))


def test_options_that_do_nothing_on_cuda_are_refused(tmp_path):
    base = ["tune", "--op", "gemv", "--shape", "M=1,N=64,K=64", "--dtype", "float16", "--target", "sm_90a",
            "--trials", "2"]
    one_line_error(run_refused(*base, "--cold-cache", cwd=tmp_path), "--cold-cache is for the cpu target")
    one_line_error(run_refused(*base, "--early-stopping", "3", cwd=tmp_path), "--compile-only builds --trials configs")
    one_line_error(run_refused(*base, "--time-limit", "5", cwd=tmp_path), "--compile-only builds --trials configs")
