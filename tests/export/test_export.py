"""`autotune export`: the library directory, its shared object and header (called from C), the
safety of replacing a library, records read back from MLflow, and bad input."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from measure import MeasureError, MeasureResult
from export import ExportFailed, export_library
from export.library_writer import HEADER, LIBRARY
from records import Record, RecordLog, load_records

CLI = [sys.executable, "-m", "autotune.cli"]


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def test_the_library_directory_holds_every_kernel_its_sources_and_a_header(exported_library, library_log, host):
    manifest = _manifest(exported_library)
    assert manifest["format"] == "llm-autotune-kernels" and manifest["schema"] == 2
    assert manifest["target"]["kind"] == "cpu" and manifest["target"]["arch"] == host.arch
    assert manifest["library"] == LIBRARY and manifest["header"] == HEADER and manifest["package_version"]
    kernels = manifest["kernels"]
    best = {r.task.key: r for r in load_records([library_log]) if r.ok}
    for r in load_records([library_log]):
        if r.ok and r.seconds < best[r.task.key].seconds:
            best[r.task.key] = r
    assert sorted(k["task"] for k in kernels) == sorted(best)
    entries = [k["entry"] for k in kernels]
    assert len(set(entries)) == len(entries) and all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", e) for e in entries)
    for kernel in kernels:
        record = best[kernel["task"]]
        assert kernel["config"] == record.config and kernel["seconds"] == record.seconds
        assert kernel["gflops"] == pytest.approx(record.gflops) and kernel["tuned"] is True
        assert kernel["dims"] == record.task.dims and kernel["dynamic"] == list(record.task.dynamic)
        assert kernel["attrs"] == record.task.attr and kernel["dtype"] == record.task.dtype
        source = (exported_library / kernel["source"]).read_bytes()
        assert hashlib.sha256(source).hexdigest() == kernel["source_sha256"]
        assert f"define void @{kernel['symbol']}(" not in source.decode()  # renamed only in the object
        roles = [a["role"] for a in kernel["args"]]
        assert roles == sorted(roles, key=lambda r: r == "scalar")  # pointers first, then the dims
        assert [a["name"] for a in kernel["args"] if a["role"] == "scalar"] == kernel["dynamic"]
        assert kernel["launch"]["threads"] == kernel["config"]["threads"]
    attention = next(k for k in kernels if k["op"] == "attention_decode")
    assert [a["nbytes"] > 0 for a in attention["args"] if a["role"] == "workspace"] == [True]
    # the shared object exports exactly the entries: every helper is internal
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(exported_library / LIBRARY)], capture_output=True,
                             text=True, check=True).stdout
    exported = {line.split()[-1] for line in symbols.splitlines() if " T " in line}
    assert exported == set(entries)
    header = (exported_library / HEADER).read_text()
    bf16 = next(k for k in kernels if k["dtype"] == "bfloat16")
    assert f"void {bf16['entry']}(const uint16_t *X, const uint16_t *W, uint16_t *Y);" in header
    assert f"void {attention['entry']}(const float *Q, const float *K, const float *V, float *O, void *workspace, " \
           "int64_t S, int64_t L);" in header
    assert f"workspace: scratch of {attention['args'][4]['nbytes']} bytes" in header
    q4 = next(k for k in kernels if k["op"] == "gemv_q4")
    assert f"void {q4['entry']}(const float *X, const uint8_t *WQ, const float *SCALES, float *Y" in header
    assert all(f"void {e}(" in header for e in entries)


C_PROGRAM = r"""
#include <stdio.h>
#include <stdlib.h>
#include "llm_autotune_kernels.h"

/* in.bin: X[1,128] W[64,128] | RX[5,64] RR[5,64] RG[64] | Q[1,4,32] K[1,2,20,32] V[1,2,20,32] */
enum { NX = 128, NW = 64 * 128, NY = 64, NR = 5 * 64, NG = 64, NQ = 4 * 32, NK = 2 * 20 * 32 };

int main(int argc, char **argv) {
    if (argc != 3) return 2;
    static float in[NX + NW + 2 * NR + NG + NQ + 2 * NK], out[NY + 2 * NR + NQ];
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(in, sizeof in, 1, f) != 1) return 3;
    fclose(f);
    float *x = in, *w = x + NX, *rx = w + NW, *rr = rx + NR, *rg = rr + NR, *q = rg + NG, *k = q + NQ, *v = k + NK;
    float *y = out, *ry = y + NY, *rs = ry + NR, *o = rs + NR;
    void *workspace = aligned_alloc(64, (ATTENTION_WORKSPACE + 63) / 64 * 64);
    GEMV(x, w, y);
    RMSNORM(rx, rr, rg, ry, rs, 5);          /* M = 5 at run time */
    ATTENTION(q, k, v, o, workspace, 20, 13); /* a cache of S = 20 rows, L = 13 of them valid */
    free(workspace);
    f = fopen(argv[2], "wb");
    if (!f || fwrite(out, sizeof out, 1, f) != 1) return 4;
    fclose(f);
    return 0;
}
"""


def _cc() -> str:
    from export.library_writer import find_c_compiler

    return find_c_compiler()[0]


def test_a_c_program_compiled_against_the_header_calls_the_kernels(tmp_path, exported_library):
    kernels = _manifest(exported_library)["kernels"]
    gemv = next(k for k in kernels if k["op"] == "gemv" and k["dtype"] == "float32")
    rmsnorm = next(k for k in kernels if k["op"] == "rmsnorm" and k["dims"]["M"] == 8)
    attention = next(k for k in kernels if k["op"] == "attention_decode")
    workspace = next(a["nbytes"] for a in attention["args"] if a["role"] == "workspace")
    (tmp_path / "main.c").write_text(C_PROGRAM)
    binary = tmp_path / "main"
    built = subprocess.run([_cc(), "-std=c11", "-Wall", "-Wextra", "-Werror", f"-I{exported_library}",
                    f"-DGEMV={gemv['entry']}", f"-DRMSNORM={rmsnorm['entry']}", f"-DATTENTION={attention['entry']}",
                    f"-DATTENTION_WORKSPACE={workspace}", str(tmp_path / "main.c"), "-o", str(binary),
                    f"-L{exported_library}", "-lllm_autotune_kernels", f"-Wl,-rpath,{exported_library}"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((1, 128)), rng.standard_normal((64, 128))
    rx, rr, rg = rng.standard_normal((5, 64)), rng.standard_normal((5, 64)), rng.standard_normal(64)
    q, k, v = rng.standard_normal((1, 4, 32)), rng.standard_normal((1, 2, 20, 32)), rng.standard_normal((1, 2, 20, 32))
    inputs = [a.astype(np.float32) for a in (x, w, rx, rr, rg, q, k, v)]
    np.concatenate([a.reshape(-1) for a in inputs]).tofile(tmp_path / "in.bin")
    proc = subprocess.run([str(binary), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    out = np.fromfile(tmp_path / "out.bin", dtype=np.float32)
    x, w, rx, rr, rg, q, k, v = (a.astype(np.float64) for a in inputs)
    y, ry, rs, o = np.split(out, np.cumsum([64, 320, 320]))
    np.testing.assert_allclose(y, (x @ w.T).reshape(-1), rtol=1e-4, atol=1e-4)
    total = rx + rr
    np.testing.assert_allclose(rs, total.reshape(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ry, (total / np.sqrt((total ** 2).mean(1, keepdims=True) + 1e-5) * rg).reshape(-1),
                               rtol=1e-4, atol=1e-5)
    qg = q.reshape(2, 2, 32)                                     # HKV, group, D
    scores = qg @ k[0, :, :13].transpose(0, 2, 1) / np.sqrt(32)  # HKV, group, L
    p = np.exp(scores - scores.max(-1, keepdims=True))
    np.testing.assert_allclose(o, ((p / p.sum(-1, keepdims=True)) @ v[0, :, :13]).reshape(-1), rtol=1e-4, atol=1e-5)


DLCLOSE_PROGRAM = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <unistd.h>

int main(int argc, char **argv) {
    static float x[128], w[64 * 128], y[64];
    for (int round = 0; round < 2; ++round) {  /* call, close, open again, call */
        void *library = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
        if (!library) return 3;
        void (*gemv)(const float *, const float *, float *) =
            (void (*)(const float *, const float *, float *))dlsym(library, argv[2]);
        if (!gemv) return 4;
        x[0] = w[0] = 2.0f;
        gemv(x, w, y);
        if (y[0] != 4.0f) return 5;
        if (dlclose(library) != 0) return 6;
        usleep(100000);  /* the pool's workers wake and sleep meanwhile */
    }
    puts("alive");
    return 0;
}
"""


def test_the_header_says_what_a_c_caller_must_know(exported_library):
    from runtime.library import required_cpu_features
    from search_space import Target

    header = (exported_library / HEADER).read_text()
    have = required_cpu_features(Target.host().to_dict())
    prose = " ".join(line[2:].strip() for line in header.splitlines() if line.startswith(" *"))
    assert f"CPU: the kernels use {', '.join(have)}; on a CPU without them a call dies with SIGILL" in prose
    assert "An output may not\n * overlap an input or another output" in header
    assert "library is linked NODELETE" in header  # a threads=2 gemv is in the library
    assert "attributes: eps=1e-05, residual=true" in header  # the defaults are what the kernel computes with
    assert "WQ packs two 4-bit codes per byte along K" in header
    assert "S: the rows each cache holds (its capacity); L: how many of them are valid, 1 <= L <= S" in header
    assert max(len(line) for line in header.splitlines() if line.startswith(" *")) <= 100


def test_a_long_list_of_cpu_features_is_wrapped_in_the_header():
    from export.c_header import header_text

    features = ["avx512f", "avx512dq", "avx512ifma", "avx512cd", "avx512bw", "avx512vl", "avx512bf16",
                "avx512fp16", "avx512vbmi", "avx512vbmi2", "avx512vnni", "avx512bitalg", "avx512vpopcntdq"]
    header = header_text([], "cpu-llvm-sapphirerapids", cpu_features=features)
    assert max(len(line) for line in header.splitlines()) <= 100
    prose = " ".join(line[2:].strip() for line in header.splitlines() if line.startswith(" *"))
    assert f"CPU: the kernels use {', '.join(features)}; on a CPU without them" in prose


def test_a_list_attribute_is_wrapped_in_the_header():
    """A longrope kernel's key and attributes hold its factors (48 for Phi-3.5): wrapped at their
    spaces, the key's words kept whole."""
    from export.c_header import header_text
    from runtime.rope_frequencies import rope_attrs
    from search_space import Task

    factors = [1.0 + i / 47 * 1.8399994373321533 for i in range(48)]
    task = Task.make("rope", {"T": 8, "H": 32, "D": 96}, attrs=rope_attrs(1e4, "longrope", short_factor=factors,
                                                                           attention_factor=1.19), dynamic=("T",))
    kernel = {"entry": "rope_f32_x", "task": task.key, "op": "rope", "dims": task.dims, "dtype": "float32",
              "attrs": task.attr, "dynamic": ["T"], "launch": {"threads": 1},
              "args": [{"name": "X", "role": "in", "dtype": "float32", "shape": ["T", "H", "D"]}]}
    lines = header_text([kernel], "cpu-test").splitlines()
    assert max(len(line) for line in lines) <= 100
    first = next(i for i, line in enumerate(lines) if line.startswith("/* rope_f32_x:"))
    key = " ".join(line[3:].strip() for line in lines[first:first + 20]).split(" attributes:")[0]
    assert key.startswith(f"rope_f32_x: {task.key}")
    assert any(f"short_factor={json.dumps(factors[:2])[:-1]}" in line for line in lines)


def test_no_attribute_ends_a_header_comment_early():
    from export.c_header import header_text

    kernel = {"entry": "rope_f32_x", "task": "rope/float32/T=1,H=1,D=2", "op": "rope", "dims": {"T": 1, "H": 1, "D": 2},
              "dtype": "float32", "attrs": {"rope_type": "x*/y"}, "dynamic": [], "launch": {"threads": 1},
              "args": [{"name": "X", "role": "in", "dtype": "float32", "shape": ["T", "H", "D"]}]}
    header = header_text([kernel], "cpu-test")
    comments = [line for line in header.splitlines() if line.startswith(" *") and line != " */"]
    assert comments and not any("*/" in line for line in comments) and "rope_type=x* /y" in header


def test_a_library_closed_after_its_worker_pool_ran_is_not_unmapped_under_the_workers(tmp_path, exported_library):
    threaded = next(k for k in _manifest(exported_library)["kernels"]
                    if k["op"] == "gemv" and k["dtype"] == "float32" and k["launch"]["threads"] > 1)
    (tmp_path / "main.c").write_text(DLCLOSE_PROGRAM)
    built = subprocess.run([_cc(), "-std=c11", str(tmp_path / "main.c"), "-o", str(tmp_path / "main"), "-ldl"],
                           capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    proc = subprocess.run([str(tmp_path / "main"), str(exported_library / LIBRARY), threaded["entry"]],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "alive", (proc.returncode, proc.stderr)


def test_a_wrong_kernel_never_replaces_a_library(tmp_path, exported_library, host):
    """Export checks every kernel of the new library before it replaces the old one."""
    from fakes import FAULT_OP
    from search_space import Task

    out = tmp_path / "lib"
    shutil.copytree(exported_library, out)
    before = (out / "manifest.json").read_text()
    task = Task.make(FAULT_OP, {"N": 256})
    # a record that claims a wrong config verified: what the check at export is there to catch
    liar = Record(task, host, {"mode": "wrong", "repeat": 1}, 3, MeasureResult((1e-6,)))
    with pytest.raises(ExportFailed, match="wrong answer.*relative error"):
        export_library([liar], out)
    crash = dataclasses.replace(liar, config={"mode": "crash", "repeat": 1})
    with pytest.raises(ExportFailed, match=r"checking fault_probe_f32_\w+ \(fault_probe/float32/N=256\): "
                                           "the worker died .*SIGSEGV"):
        export_library([crash], out)
    assert (out / "manifest.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lib"], "a partial library was left behind"
    honest = dataclasses.replace(liar, config={"mode": "ok", "repeat": 2})
    summary = export_library([liar, dataclasses.replace(honest, result=MeasureResult((1e-7,)))], out)
    assert [k["config"] for k in summary.kernels] == [{"mode": "ok", "repeat": 2}] and summary.verified == 1
    assert [k["op"] for k in _manifest(out)["kernels"]] == [FAULT_OP]


# ----------------------------------------------------------------------------- MLflow and the CLI


@pytest.fixture(scope="module")
def mlflow_job(tmp_path_factory, host, mlflow_tables):
    """Two real tuning jobs into one log, each an MLflow run in a temporary SQLite store."""
    from autotune import TuningJob, run_job
    from search_space import Task

    from fakes import copied_store

    folder = tmp_path_factory.mktemp("mlflow-export")
    store = copied_store(mlflow_tables, folder)
    log = RecordLog(folder / "job.jsonl")
    for task in (Task.make("gemv", {"M": 1, "N": 32, "K": 64}), Task.make("softmax", {"M": 4, "N": 48})):
        run_job(TuningJob(host, task, tuner="random", trials=2, batch=2, log=log.path, tracking_uri=store),
                progress=False)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("llm-autotune").experiment_id
    runs = client.search_runs([experiment], order_by=["attributes.start_time DESC"])
    empty = client.create_run(experiment).info.run_id  # a run that logged no tuning log
    return {"store": store, "run": runs[0].info.run_id, "log": log.path, "empty": empty, "folder": folder}


def _cli(*args, cwd):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.mark.tools("cc")
def test_export_from_an_mlflow_run_gives_the_kernels_of_its_log(mlflow_job, tmp_path, capsys):
    from autotune.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["export", "--mlflow-run", mlflow_job["run"], "--tracking-uri", mlflow_job["store"],
              "--out", str(tmp_path / "from-run"), "--json"])
    out = capsys.readouterr()
    assert exit.value.code == 0 and out.err == "", out.err
    printed = json.loads(out.out)
    assert printed["verified"] == 2 and {k["op"] for k in printed["kernels"]} == {"gemv", "softmax"}
    from_log = export_library(load_records([mlflow_job["log"]]), tmp_path / "from-log")
    a, b = _manifest(tmp_path / "from-log")["kernels"], _manifest(tmp_path / "from-run")["kernels"]
    assert a == b == from_log.kernels and [k["entry"] for k in a] == [k["entry"] for k in printed["kernels"]]
    assert (tmp_path / "from-log" / LIBRARY).read_bytes() == (tmp_path / "from-run" / LIBRARY).read_bytes()


@pytest.mark.tools("cc")
def test_the_cli_says_what_it_exported(library_log, tmp_path):
    proc = _cli("export", "--log", str(library_log), "--out", "lib", "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.match(r"exported 7 kernel\(s\) for cpu-\S+ to \S+/lib \([\d.]+ KiB; not checked here\)", lines[0]), lines[0]
    assert lines[1].startswith(f"  {LIBRARY}  ") and len(lines) == 2 + 7


@pytest.mark.parametrize("case, message", [
    ("missing-log", "does not exist"),
    ("no-records", "either --log LOG [LOG...] or --mlflow-run RUN_ID"),
    ("both", "either --log LOG [LOG...] or --mlflow-run RUN_ID"),
    ("unknown-run", "no MLflow run 0123456789abcdef"),
    ("no-store", "no MLflow store at sqlite:///"),
    ("server-down", "--mlflow-run 0123456789abcdef: no tracking server answers at 127.0.0.1:9"),
    ("run-without-log", "has no .jsonl tuning log"),
    ("no-verified", "the records hold no verified measurement"),
    ("other-target", "no verified record for target sm_90a: the records hold kernels for cpu-"),
    ("out-parent-missing", "does not exist"),
    ("out-parent-file", "is not a directory"),
    ("out-not-a-library", "holds no kernel library: refusing to replace it"),
    ("out-unwritable", "cannot create a directory there"),
])
def test_bad_input_is_one_line_and_exit_2(case, message, mlflow_job, tmp_path, capsys, monkeypatch):
    from autotune.cli import main

    monkeypatch.chdir(tmp_path)

    log, store = str(mlflow_job["log"]), mlflow_job["store"]
    failed = tmp_path / "failed.jsonl"
    records = RecordLog(log).records()
    RecordLog(failed).append(dataclasses.replace(r, result=MeasureResult.failed(MeasureError.WRONG_ANSWER, "wrong"))
                             for r in records)
    (tmp_path / "a-file").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    args = {
        "missing-log": ["--log", str(tmp_path / "nope.jsonl"), "--out", "lib"],
        "no-records": ["--out", "lib"],
        "both": ["--log", log, "--mlflow-run", mlflow_job["run"], "--out", "lib"],
        "unknown-run": ["--mlflow-run", "0123456789abcdef", "--tracking-uri", store, "--out", "lib"],
        "no-store": ["--mlflow-run", mlflow_job["run"], "--tracking-uri", f"sqlite:///{tmp_path}/none.db", "--out", "lib"],
        "run-without-log": ["--mlflow-run", mlflow_job["empty"], "--tracking-uri", store, "--out", "lib"],
        "server-down": ["--mlflow-run", "0123456789abcdef", "--tracking-uri", "http://127.0.0.1:9", "--out", "lib"],
        "no-verified": ["--log", str(failed), "--out", "lib"],
        "other-target": ["--log", log, "--out", "lib", "--target", "sm_90a"],
        "out-parent-missing": ["--log", log, "--out", str(tmp_path / "no" / "lib")],
        "out-parent-file": ["--log", log, "--out", str(tmp_path / "a-file" / "lib")],
        "out-not-a-library": ["--log", log, "--out", str(tmp_path / "mine")],
        "out-unwritable": ["--log", log, "--out", "/proc/llm-autotune-lib"],
    }[case]
    with pytest.raises(SystemExit) as exit:
        main(["export", *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("autotune: error: ") and "Traceback" not in err, err
    assert message in lines[0]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "lib").exists()


def test_an_entry_keeps_its_name_while_its_calling_convention_does(host):
    """A C program calls an entry by name with the arguments of the header it was built
    against: a re-export whose tuned config changes only the code keeps the name; one that
    changes a workspace's size (rope's per-thread table) or drops it gets another, so the old
    program fails to link instead of overflowing the workspace or reading a pointer as a dim."""
    from export.library_writer import entry_name
    from search_space import Task, get_template

    task = Task.make("rope", {"T": 16, "H": 2, "D": 32}, dynamic=("T",))
    template = get_template("rope", "cpu")
    space = template.space(task, host)
    base = template.default(task, host).as_dict()

    def name(**changes):
        config = space.from_values({**base, **changes})
        return entry_name(task, host, template.render(task, config, host))

    one_thread = name(table="per_token", threads=1)
    assert name(table="per_token", threads=1, unroll=1) == one_thread  # other code, same arguments
    if 2 in space.knob("threads").values:
        assert name(table="per_token", threads=2) != one_thread  # a table twice the size
    assert name(table="per_head", threads=1) != one_thread  # no table at all
