"""The kernel cache reuses an artifact only when today's compiler built it, and every build
says which compiler that was (part of a record's code identity)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from measure import LocalBuilder, MeasureError, MeasureInput
from measure.builder import compiler_identity
from search_space import Task, get_template


def test_an_artifact_from_another_compiler_is_built_again(host, tmp_path):
    task = Task.make("add", {"M": 4, "N": 64})
    inp = MeasureInput(task, get_template("add", "cpu").default(task, host), host)
    with LocalBuilder(n_parallel=1, cache_dir=tmp_path) as builder:
        first = builder.build([inp])[0]
        assert not first.cached and first.stats["compiler"] == compiler_identity(host)
        assert compiler_identity(host).startswith("LLVM ")
        assert builder.build([inp])[0].cached
        stats = tmp_path / (first.digest + ".json")
        stats.write_text(json.dumps(dict(json.loads(stats.read_text()), compiler="LLVM 1.0.0 (llvmlite 0.1.0)")))
        again = builder.build([inp])[0]
        assert not again.cached and again.stats["compiler"] == compiler_identity(host)
        assert json.loads(stats.read_text())["compiler"] == compiler_identity(host)
        assert builder.build([inp])[0].cached


def test_a_damaged_artifact_is_built_again_not_loaded(host, tmp_path, monkeypatch):
    """The JIT trusts an object file: one cut short on disk took the loading process down (a
    notebook's, through TunedKernels). The cache keeps each artifact's sha256 and builds again
    on a mismatch, or where it kept none (a cache from before it did)."""
    from export import TunedKernels

    task = Task.make("add", {"M": 4, "N": 64})
    inp = MeasureInput(task, get_template("add", "cpu").default(task, host), host)
    with LocalBuilder(n_parallel=1, cache_dir=tmp_path) as builder:
        first = builder.build([inp])[0]
        artifact = Path(first.artifact)
        whole = artifact.read_bytes()
        assert "artifact_sha256" not in first.stats  # the cache's own, not a stat of the build
        artifact.write_bytes(whole[: len(whole) // 2])
        again = builder.build([inp])[0]
        assert not again.cached and artifact.read_bytes() == whole and "artifact_sha256" not in again.stats
        stats = tmp_path / (first.digest + ".json")
        stats.write_text(json.dumps({k: v for k, v in json.loads(stats.read_text()).items() if k != "artifact_sha256"}))
        assert not builder.build([inp])[0].cached
        assert builder.build([inp])[0].cached
    artifact.write_bytes(b"\x7fELF" + b"\0" * 60)  # loaded, this was a segfault
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(tmp_path))
    with TunedKernels([], target=host, warn_untuned=False) as kernels:
        x, y = np.ones((4, 64), np.float32), np.full((4, 64), 2.0, np.float32)
        np.testing.assert_allclose(kernels.get("add", {"M": 4, "N": 64})(x, y), np.full((4, 64), 3.0))


def test_a_cache_that_cannot_be_written_is_a_warning_not_a_compile_error(host, tmp_path, monkeypatch):
    """A container with a read-only home: the kernels compile, so they are kept in this user's
    private folder under the temp dir (said once), found there again, and run; a tuning log
    would otherwise record every candidate as a compile error for good."""
    import warnings

    from export import TunedKernels

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    task = Task.make("add", {"M": 4, "N": 64})
    inp = MeasureInput(task, get_template("add", "cpu").default(task, host), host)
    with LocalBuilder(n_parallel=1, cache_dir=blocked / "cache") as builder:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = builder.build([inp])[0]
            assert first.error == MeasureError.NO_ERROR and not first.cached, first.message
            assert builder.build([inp])[0].cached  # from the private folder
        said = [str(w.message) for w in caught]
        assert len(said) == 1 and "cannot be written" in said[0] and "AUTOTUNE_CACHE_DIR" in said[0]
    private = Path(first.artifact).parent
    assert private.parent == tmp_path / "tmp" and private.stat().st_mode & 0o777 == 0o700
    monkeypatch.setenv("AUTOTUNE_CACHE_DIR", str(blocked / "cache"))
    x, y = np.random.rand(4, 64).astype(np.float32), np.random.rand(4, 64).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with TunedKernels.defaults() as kernels:
            np.testing.assert_allclose(kernels.get("add", {"M": 4, "N": 64})(x, y), x + y, rtol=1e-6)


def test_a_private_folder_that_others_can_write_is_not_used(host, tmp_path, monkeypatch):
    from measure.builder import fallback_cache_dir

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)  # read TMPDIR again in this process
    folder = fallback_cache_dir(create=True)
    assert folder is not None and folder.parent == tmp_path
    folder.chmod(0o777)
    assert fallback_cache_dir(create=True) is None


def test_the_cache_is_shown_and_cleared_by_kernel_never_touching_other_files(host, tmp_path):
    """`autotune cache` shows what the cache holds; --clear removes its kernels (all, or those
    built more than --older-than days ago) and leftovers of killed writes, and nothing else."""
    import os
    import subprocess
    import sys
    import time

    from measure.kernel_cache import clear, usage

    cache = tmp_path / "cache"
    with LocalBuilder(n_parallel=1, cache_dir=cache) as builder:
        built = [builder.build([MeasureInput(task, get_template("add", "cpu").default(task, host), host)])[0]
                 for task in (Task.make("add", {"M": 4, "N": 64}), Task.make("add", {"M": 4, "N": 128}))]
    (cache / "notes.txt").write_text("mine")
    (cache / f".{built[0].digest}.o.123.tmp").write_bytes(b"cut short")
    held = usage(cache)
    assert held.kernels == {".o": 2} and held.files == 7 and held.bytes > 0
    old = time.time() - 3 * 86400
    for path in cache.glob(built[0].digest + "*"):
        os.utime(path, (old, old))
    env = dict(os.environ, AUTOTUNE_CACHE_DIR=str(cache))
    cli = [sys.executable, "-m", "autotune.cli", "cache"]
    shown = subprocess.run(cli + ["--json"], env=env, capture_output=True, text=True)
    assert json.loads(shown.stdout)["kernels"] == 2
    bad = subprocess.run(cli + ["--older-than", "2"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "--older-than is for --clear" in bad.stderr
    gone = subprocess.run(cli + ["--clear", "--older-than", "2", "--json"], env=env, capture_output=True, text=True)
    out = json.loads(gone.stdout)
    assert out["removed"]["kernels"] == 1 and out["left"]["kernels"] == 1
    assert not list(cache.glob(built[0].digest + "*")) and list(cache.glob(built[1].digest + "*"))
    assert clear(cache).kernels == {".o": 1} and usage(cache).files == 0
    assert (cache / "notes.txt").read_text() == "mine"  # not the cache's: never removed
