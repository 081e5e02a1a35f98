"""What a tuned library may not do to the process that loads it: kernels are called only on
arrays and dims they can handle, a manifest is believed only as far as it checks out, and
weights files are read only once their header makes sense.

Calls that would crash today's code run in a child process (``run_numpy_only``), so that a
regression fails the test instead of killing pytest."""
from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
from fakes import run_library_attempts, run_numpy_only

import runtime
from runtime.library import LibraryFormatError


# ----------------------------------------------------------------------------- dynamic dims of a bound call


def test_a_bound_call_refuses_dims_its_arrays_do_not_hold(tmp_path, exported_library):
    out = run_library_attempts(tmp_path, exported_library, """
        kernel = library.get("rmsnorm", {"M": 8, "N": 64}, attrs={"residual": True}, dynamic=["M"])
        x, r, g, y, s = f32(8, 64), f32(8, 64), f32(64), np.zeros((8, 64), np.float32), np.zeros((8, 64), np.float32)
        call = kernel.bind({"X": x, "R": r, "G": g, "Y": y, "S": s})
        for m in (100000, 64, 9, -5, 0, 3.5, True):
            out[repr(m)] = attempt(lambda: call(M=m))
        out["refused ones changed nothing"] = call.scalars == {"M": 8}
        out["M=5"] = attempt(lambda: call(M=5))
        out["M=8"] = attempt(lambda: call(M=8))
        out["call()"] = attempt(call)
        out["bind M=-5"] = attempt(lambda: kernel.bind({"X": x, "R": r, "G": g, "Y": y, "S": s}, dims={"M": -5}))
        out["call M=7.5"] = attempt(lambda: kernel(x[:7], r[:7], g, dims={"M": 7.5}))
    """)
    for value in ("100000", "64", "9", "-5", "0", "3.5", "True"):
        assert out[value].startswith("ValueError") and "dim M" in out[value], (value, out[value])
    assert "exceeds 8, what the bound arrays hold" in out["100000"]
    assert "must be at least 1" in out["-5"] and "must be an int" in out["3.5"]
    assert out["refused ones changed nothing"] is True
    assert out["M=5"] == out["M=8"] == out["call()"] == "ok"
    assert out["bind M=-5"].startswith("ValueError") and "dim M = -5" in out["bind M=-5"]
    assert out["call M=7.5"].startswith("ValueError") and "dim M must be an int, not 7.5" in out["call M=7.5"]


# ----------------------------------------------------------------------------- arrays handed to C


def test_outputs_must_be_writeable_and_every_array_exactly_what_the_kernel_takes(tmp_path, exported_library):
    readonly = tmp_path / "readonly.bin"
    np.zeros((8, 64), np.float32).tofile(readonly)
    out = run_library_attempts(tmp_path, exported_library, f"""
        kernel = library.get("rmsnorm", {{"M": 8, "N": 64}}, attrs={{"residual": True}}, dynamic=["M"])
        x, r, g, s = f32(8, 64), f32(8, 64), f32(64), np.zeros((8, 64), np.float32)
        frozen = bytes(8 * 64 * 4)
        cases = {{
            "over bytes": np.frombuffer(frozen, np.float32).reshape(8, 64),
            "read-only memmap": np.memmap({str(readonly)!r}, np.float32, mode="r", shape=(8, 64)),
            "transposed shape": np.zeros((64, 8), np.float32),
            "float64": np.zeros((8, 64), np.float64),
            "strided": np.zeros((8, 128), np.float32)[:, ::2],
            "a list": [[0.0] * 64] * 8,
        }}
        for name, y in cases.items():
            out["call " + name] = attempt(lambda: kernel(x, r, g, out={{"Y": y, "S": s}}))
            out["bind " + name] = attempt(lambda: kernel.bind({{"X": x, "R": r, "G": g, "Y": y, "S": s}}))
        out["bytes untouched"] = frozen == bytes(8 * 64 * 4)
        gemv = library.get("gemv", {{"M": 1, "N": 64, "K": 128}})
        out["gemv W transposed"] = attempt(lambda: gemv(f32(1, 128), f32(128, 64)))
        out["gemv W as rows"] = attempt(lambda: gemv(f32(1, 128), f32(64, 128)))
        out["input read-only"] = attempt(lambda: kernel(x, r, np.frombuffer(g.tobytes(), np.float32)))
    """)
    for case, words in (("over bytes", "read-only"), ("read-only memmap", "read-only"),
                        ("transposed shape", "expected (8, 64) float32, got (64, 8)"),
                        ("float64", "float64"), ("strided", "C-contiguous"), ("a list", "a numpy array")):
        for how in ("call", "bind"):
            message = out[f"{how} {case}"]
            assert message.startswith("ValueError") and " Y" in message and words in message, (how, case, message)
    assert out["bytes untouched"] is True
    assert out["gemv W transposed"].startswith("ValueError") and "input W" in out["gemv W transposed"]
    assert out["gemv W as rows"] == out["input read-only"] == "ok"  # inputs are only read


def test_an_array_may_merge_adjacent_axes_but_not_regroup_them():
    from runtime.kernel import same_layout

    assert same_layout((8, 4, 32), (8, 4, 32)) and same_layout((8, 128), (8, 4, 32))
    assert same_layout((32, 32), (8, 4, 32)) and same_layout((1024,), (8, 4, 32)) and same_layout((4, 1), (4,))
    assert not same_layout((64, 8), (8, 64)) and not same_layout((8, 64), (8, 32))
    assert not same_layout((16, 64), (8, 128))


# ----------------------------------------------------------------------------- what the manifest may say


def _copy(exported_library, tmp_path) -> Path:
    copy = tmp_path / "lib"
    shutil.copytree(exported_library, copy)
    return copy


def _edit(folder: Path, change) -> None:
    """Apply ``change(manifest, folder)`` to the library's manifest.json."""
    manifest = json.loads((folder / "manifest.json").read_text())
    change(manifest, folder)
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _kernel(manifest: dict, op: str) -> dict:
    return next(k for k in manifest["kernels"] if k["op"] == op and k["dtype"] == "float32")


def _gemv(manifest: dict) -> dict:
    return _kernel(manifest, "gemv")


def _workspace(manifest: dict) -> dict:
    return next(a for a in _kernel(manifest, "attention_decode")["args"] if a["role"] == "workspace")


def _drop_dim_arguments(manifest: dict, folder: Path) -> None:
    rmsnorm = _kernel(manifest, "rmsnorm")
    rmsnorm["args"] = [a for a in rmsnorm["args"] if a["role"] != "scalar"]


_X_MAP = {"name": "X_map", "role": "tensor_map", "dtype": "float32", "shape": [16, 32], "of": "X", "swizzle": 128}

MANIFEST_EDITS = {  # what an edit does to the manifest, and the words the refusal has
    "absolute library path": (lambda m, lib: m.update(library=str(lib.resolve() / m["library"])),
                              "is not a path inside the library folder"),
    "library path with ..": (lambda m, lib: m.update(library=f"../lib/{m['library']}"),
                             "is not a path inside the library folder"),
    "source path with ..": (lambda m, lib: _gemv(m).update(source="../outside.ll"), "is not a path inside"),
    # an OSError and a ValueError of the file system's before: not a LibraryFormatError
    "a name past the length limit": (lambda m, lib: m.update(library="a" * 300), "cannot be opened: File name too long"),
    "a name with a NUL": (lambda m, lib: _gemv(m).update(source="sources/x\0.ll"), "is not a path inside"),
    "a dim edited": (lambda m, lib: _gemv(m)["dims"].update(K=16), "do not match its task"),
    "a dim of zero": (lambda m, lib: _gemv(m)["dims"].update(K=0), "dim K = 0 is not a positive int"),
    "a dim as text": (lambda m, lib: _gemv(m)["dims"].update(K="128"), "dim K = '128' is not a positive int"),
    "a dim as float": (lambda m, lib: _gemv(m)["dims"].update(K=128.0), "dim K = 128.0 is not a positive int"),
    "an unknown dim in a shape": (lambda m, lib: _gemv(m)["args"][0].update(shape=["M", "Q"]), "'Q' is not a dim"),
    "a negative size in a shape": (lambda m, lib: _gemv(m)["args"][0].update(shape=["M", -128]), "-128 is not a dim"),
    "an unknown dtype": (lambda m, lib: _gemv(m)["args"][0].update(dtype="float128"), "needs a known dtype"),
    "a huge workspace": (lambda m, lib: _workspace(m).update(nbytes=1 << 40), "bytes (at most"),
    "a negative workspace": (lambda m, lib: _workspace(m).update(nbytes=-8), "of -8 bytes"),
    "a dynamic dim not passed": (_drop_dim_arguments, "are not all int64 arguments"),
    "an unknown role": (lambda m, lib: _gemv(m)["args"][2].update(role="inout"), "role 'inout'"),
    "a libc symbol": (lambda m, lib: _gemv(m).update(symbol="system"), "not an entry name"),
    "an entry named like libc": (lambda m, lib: _gemv(m).update(entry="abort", symbol="abort"), "not an entry name"),
    "two kernels of one name": (lambda m, lib: m["kernels"].append(m["kernels"][0]), "share an entry name"),
    "the target kind": (lambda m, lib: m["target"].update(kind="tpu"), "target kind"),
    "a tensor map on a CPU kernel": (lambda m, lib: _gemv(m)["args"].insert(0, dict(_X_MAP)), "takes no tensor maps"),
    "a tensor map after an array": (lambda m, lib: _gemv(m)["args"].insert(1, dict(_X_MAP)), "comes after an array"),
    "a tensor map of no array": (lambda m, lib: _gemv(m)["args"].insert(0, dict(_X_MAP, of="Q")), "is not of an array"),
    "a cubin in a CPU library": (lambda m, lib: _gemv(m).update(cubin="cubins/x.cubin"), "not 'llvm' code or a cubin"),
    "CUDA code in a CPU library": (lambda m, lib: _gemv(m).update(lang="cuda"), "not 'cuda' code"),
}


@pytest.mark.parametrize("case", MANIFEST_EDITS)
def test_a_manifest_is_checked_before_anything_reaches_ctypes(case, tmp_path, exported_library):
    library = _copy(exported_library, tmp_path)
    change, words = MANIFEST_EDITS[case]
    _edit(library, change)
    with pytest.raises(LibraryFormatError, match=re.escape(words)):
        runtime.load(library)


def test_an_edited_dim_never_reaches_a_kernel(tmp_path, exported_library):
    """What the tracker reported: K edited from 128 to 16 made the kernel read past the arrays."""
    library = _copy(exported_library, tmp_path)
    _edit(library, lambda m, lib: _gemv(m)["dims"].update(K=16))
    proc = run_numpy_only(tmp_path, textwrap.dedent("""
        import sys
        import numpy as np
        import runtime
        try:
            library = runtime.load(sys.argv[1])
        except ValueError as exc:
            print("refused:", exc)
            raise SystemExit(0)
        kernel = library.get("gemv", {"M": 1, "N": 64, "K": 16})
        print("ran:", kernel(np.ones((1, 16), np.float32), np.ones((64, 16), np.float32)).sum())
    """), str(library), timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("refused:"), (proc.returncode, proc.stdout, proc.stderr)
    assert "do not match its task 'gemv/float32/M=1,N=64,K=128'" in proc.stdout


def _gemv_of(manifest: dict, n: int) -> dict:
    return next(k for k in manifest["kernels"] if k["op"] == "gemv" and k["dims"]["N"] == n)


def _dims_with_their_task(manifest: dict, folder: Path) -> None:
    from runtime.library import expected_task_key

    gemv = _gemv(manifest)
    gemv["dims"]["N"] = 8
    gemv["task"] = expected_task_key(gemv)


def _swap_kernels(manifest: dict, folder: Path) -> None:
    """Two gemv records naming each other's code: each entry stays well formed."""
    a, b = _gemv_of(manifest, 64), _gemv_of(manifest, 32)
    for key in ("entry", "symbol"):
        a[key], b[key] = b[key], a[key]


def _static_dim(manifest: dict, folder: Path) -> None:
    from runtime.library import expected_task_key

    rmsnorm = _kernel(manifest, "rmsnorm")
    rmsnorm["dynamic"] = []
    rmsnorm["args"] = [a for a in rmsnorm["args"] if a["role"] != "scalar"]
    rmsnorm["task"] = expected_task_key(rmsnorm)


# Edits that keep every entry well formed on its own: what the code expects is known only to
# the seal export put on each entry (contract_sha256). Each of them crashed the process before.
CONTRACT_EDITS = {
    "dims and task edited together": _dims_with_their_task,
    "two kernels' code swapped": _swap_kernels,
    "a dynamic dim made static": _static_dim,
    "a smaller output": lambda m, lib: _gemv(m)["args"][2].update(shape=["M"]),
    "an output of bytes": lambda m, lib: _gemv(m)["args"][2].update(dtype="uint8"),
    "a weight of one column": lambda m, lib: _gemv(m)["args"][1].update(shape=["N", 1]),
    "an argument dropped": lambda m, lib: _gemv(m)["args"].pop(1),
    "an output declared an input": lambda m, lib: _gemv(m)["args"][2].update(role="in"),
    "a workspace of no bytes": lambda m, lib: _workspace(m).update(nbytes=0),
    "the seal itself": lambda m, lib: _gemv(m).update(contract_sha256="0" * 64),
    "the code's hash dropped": lambda m, lib: m.pop("library_sha256"),
    # a loader that took an unsealed entry as one from an older export ran it unchecked
    "one entry's seal dropped": lambda m, lib: _gemv(m).pop("contract_sha256"),
    # the features a CPU is checked against before the library is loaded (a CPU without them: SIGILL)
    "the target's features cut": lambda m, lib: m["target"].update(features="+64bit"),
    "every seal dropped, the schema kept": lambda m, lib: [k.pop("contract_sha256") for k in m["kernels"]],
}


@pytest.mark.parametrize("case", CONTRACT_EDITS)
def test_an_entry_edited_after_export_is_refused(case, tmp_path, exported_library):
    library = _copy(exported_library, tmp_path)
    _edit(library, CONTRACT_EDITS[case])
    with pytest.raises(LibraryFormatError, match="was edited after export"):
        runtime.load(library)


def test_a_target_without_its_feature_string_is_refused(tmp_path, exported_library):
    """The features are what a CPU is checked against before the library is loaded: a list, or
    none, would check nothing (and a CPU without AVX-512 would die of SIGILL at the first call)."""
    library = _copy(exported_library, tmp_path)
    _edit(library, lambda m, lib: m["target"].update(features=m["target"]["features"].split(",")))
    with pytest.raises(LibraryFormatError, match="not LLVM's feature string"):
        runtime.load(library)
    _edit(library, lambda m, lib: m["target"].pop("features"))
    with pytest.raises(LibraryFormatError, match="None are not LLVM's feature string"):
        runtime.load(library)


def test_a_schema_1_library_with_its_contracts_loads_unwarned(tmp_path, exported_library):
    """Schema 1 sealed each entry without the target: such a library still loads, checked."""
    from runtime.library import seal_contracts

    library = _copy(exported_library, tmp_path)
    _edit(library, lambda m, lib: [m.update(schema=1), seal_contracts(m)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(runtime.load(library).entries) == 7
    _edit(library, lambda m, lib: _gemv(m).pop("contract_sha256"))  # one seal gone: edited
    with pytest.raises(LibraryFormatError, match="was edited after export"):
        runtime.load(library)


def test_two_libraries_in_one_process_each_run_their_own_code(tmp_path, exported_library):
    """dlopen hands back a library it loaded before under the same path: each library must be
    opened under its own, or the second runs the first's code on arrays sized for its own."""
    first, second = _copy(exported_library, tmp_path / "a"), _copy(exported_library, tmp_path / "b")
    a, b = runtime.load(first), runtime.load(second)
    assert a._code._dll._handle != b._code._dll._handle
    x, w = np.ones((1, 128), np.float32), np.ones((64, 128), np.float32)
    for library in (a, b):
        np.testing.assert_allclose(library.get("gemv", {"M": 1, "N": 64, "K": 128})(x, w), np.full((1, 64), 128.0))


def _with_other_bytes(library: Path, in_place: bool) -> None:
    """The library's shared object with other bytes (as a new export's would be) and its
    manifest to match: a new file put at its path, as export puts one, or rewritten in place."""
    import hashlib
    import os

    from runtime.library import seal_contracts

    so = library / "libllm_autotune_kernels.so"
    data = so.read_bytes() + b"\0" * 64
    if in_place:
        with so.open("r+b") as f:
            f.write(data)
    else:
        (library / "new.so").write_bytes(data)
        os.replace(library / "new.so", so)

    def rehash(manifest, folder):
        manifest["library_sha256"] = hashlib.sha256(data).hexdigest()
        seal_contracts(manifest)

    _edit(library, rehash)


def test_a_library_exported_again_to_a_place_loaded_before_runs_as_the_new_one(tmp_path, exported_library):
    """dlopen would hand back the library loaded first from that path (a notebook that exports
    and loads again): the new file is opened under another spelling of the path."""
    library = _copy(exported_library, tmp_path)
    old = runtime.load(library)
    _with_other_bytes(library, in_place=False)
    new = runtime.load(library)
    assert new._code._dll._handle != old._code._dll._handle
    assert runtime.load(library)._code._dll._handle == new._code._dll._handle  # the same one again
    x, w = np.ones((1, 128), np.float32), np.ones((64, 128), np.float32)
    np.testing.assert_allclose(new.get("gemv", {"M": 1, "N": 64, "K": 128})(x, w), np.full((1, 64), 128.0))


def test_a_library_rewritten_in_place_after_it_was_loaded_is_refused(tmp_path, exported_library):
    """The same file with other bytes: dlopen would hand back what it mapped first. In a child:
    the file under a live mapping changes."""
    library = _copy(exported_library, tmp_path)
    script = textwrap.dedent("""
        import sys
        import runtime
        runtime.load(sys.argv[1])
        print("first", flush=True)
        input()  # the test rewrites the library now
        try:
            runtime.load(sys.argv[1])
            print("loaded")
        except ValueError as exc:
            print("refused:", exc)
    """)
    site_proc = run_numpy_only(tmp_path, "print('ready')")  # lays out the numpy-only site
    assert site_proc.returncode == 0, site_proc.stderr
    path = tmp_path / "twice.py"
    path.write_text(f"import sys\nsys.path[:] = [{str(tmp_path / 'site')!r}] + "
                    "[p for p in sys.path if 'site-packages' not in p]\n" + script)
    child = subprocess.Popen([sys.executable, "-I", "-S", str(path), str(library)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "first", child.stderr.read()
        _with_other_bytes(library, in_place=True)
        out, err = child.communicate("\n", timeout=120)
    finally:
        child.kill()
    assert "refused:" in out and "rewritten in place" in out, (out, err)


def test_every_kernel_of_a_library_from_before_contracts_still_loads_and_is_found(tmp_path, exported_library):
    """Without seals only the checks of the entries themselves stand; a symbol the shared
    library lacks is refused at load, not at the kernel's first call."""
    from runtime.library import UnverifiedLibraryWarning

    library = _copy(exported_library, tmp_path)
    _edit(library, lambda m, lib: [m.update(schema=1)] + [k.pop("contract_sha256") for k in m["kernels"]])
    with pytest.warns(UnverifiedLibraryWarning, match="records no contract of"):
        assert len(runtime.load(library).entries) == 7
    _edit(library, lambda m, lib: _gemv(m).update(entry="gemv_f32_0123456789", symbol="gemv_f32_0123456789"))
    with pytest.warns(UnverifiedLibraryWarning), pytest.raises(LibraryFormatError, match="has no symbol"):
        runtime.load(library)


def test_a_shared_object_cut_short_is_refused_not_mapped(tmp_path, exported_library):
    """dlopen of a truncated shared object dies of SIGBUS; its segments are checked first (an
    old library records no hash that would catch it). In a child: a regression kills it, not pytest."""
    library = _copy(exported_library, tmp_path)
    _edit(library, _as_before_hashes)
    so = library / "libllm_autotune_kernels.so"
    so.write_bytes(so.read_bytes()[:4096])
    proc = run_numpy_only(tmp_path, textwrap.dedent("""
        import sys, warnings
        import runtime
        warnings.simplefilter("ignore")
        try:
            runtime.load(sys.argv[1])
        except ValueError as exc:
            print("refused:", exc)
    """), str(library), timeout=120)
    assert proc.returncode == 0 and "refused:" in proc.stdout, (proc.returncode, proc.stdout, proc.stderr)
    assert "lies past its end (the file is cut short)" in proc.stdout
    so.write_bytes(b"not an ELF file at all" * 10)
    with pytest.warns(UserWarning), pytest.raises(LibraryFormatError, match="is not a 64-bit ELF shared object"):
        runtime.load(library)


ODD_VALUES = ([1], {"a": 1}, None, True, 1.5, "x", -1)


def _odd_edits(manifest: dict):
    """(where, change) for every field of the manifest's top level, its target, a kernel record
    and each of its arguments, set to each of ODD_VALUES."""
    paths = [("manifest", manifest, k) for k in manifest if k != "kernels"]
    paths += [("target", manifest["target"], k) for k in manifest["target"]]
    gemv = _gemv(manifest)
    paths += [("kernel", gemv, k) for k in gemv]
    paths += [(f"arg {a['name']}", a, k) for a in gemv["args"] for k in a]
    paths += [("dims", gemv["dims"], k) for k in gemv["dims"]]
    return [(f"{where}.{key} = {value!r}", holder, key, value) for where, holder, key in paths for value in ODD_VALUES]


def test_a_field_of_any_json_type_is_refused_in_one_line_or_harmless(tmp_path, exported_library):
    """Whatever JSON type a field holds, loading either works (an informational field) or
    raises LibraryFormatError: never a TypeError or a crash from inside the checks."""
    import copy

    library = _copy(exported_library, tmp_path)
    original = json.loads((library / "manifest.json").read_text())
    escaped = []
    for i in range(len(_odd_edits(original))):
        manifest = copy.deepcopy(original)
        what, holder, key, value = _odd_edits(manifest)[i]
        holder[key] = value
        (library / "manifest.json").write_text(json.dumps(manifest))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                loaded = runtime.load(library)
                loaded.kernel(_gemv(original)["entry"])
        except LibraryFormatError:
            pass
        except Exception as exc:  # noqa: BLE001 - what this test looks for
            escaped.append(f"{what}: {type(exc).__name__}: {exc}")
    assert not escaped, escaped


@pytest.mark.parametrize("text, words", [
    ('{"format": "llm-autotune-library", "schema": true}', "has schema True"),
    ("[" * 100000 + "]" * 100000, "cannot be read"),
])
def test_a_manifest_that_is_not_one_is_refused(text, words, tmp_path, exported_library):
    from runtime.abi import MANIFEST_FORMAT

    library = _copy(exported_library, tmp_path)
    (library / "manifest.json").write_text(text.replace("llm-autotune-library", MANIFEST_FORMAT))
    with pytest.raises(LibraryFormatError, match=re.escape(words)):
        runtime.load(library)


@pytest.mark.parametrize("where", ["shared library", "source"])
def test_a_file_changed_after_export_is_refused(where, tmp_path, exported_library):
    library = _copy(exported_library, tmp_path)
    manifest = json.loads((library / "manifest.json").read_text())
    name = manifest["library"] if where == "shared library" else _gemv(manifest)["source"]
    with (library / name).open("ab") as f:
        f.write(b"\n")
    with pytest.raises(LibraryFormatError, match=f"{where}.*sha256 .* does not match the manifest's"):
        runtime.load(library)


def test_a_symlink_out_of_the_folder_is_refused(tmp_path, exported_library):
    library = _copy(exported_library, tmp_path)
    outside = tmp_path / "elsewhere.so"
    (library / "libllm_autotune_kernels.so").rename(outside)
    (library / "libllm_autotune_kernels.so").symlink_to(outside)
    with pytest.raises(LibraryFormatError, match="leads out of the library folder"):
        runtime.load(library)
    manifest = tmp_path / "elsewhere.json"  # the manifest itself is read only from inside the folder
    (library / "manifest.json").rename(manifest)
    (library / "manifest.json").symlink_to(manifest)
    with pytest.raises(LibraryFormatError, match="manifest.json leads out of the library folder"):
        runtime.load(library)
    (library / "manifest.json").unlink()
    manifest.rename(library / "manifest.json")
    inside = library / "sources" / "kept.so"  # a link that stays inside is a file of the library
    (library / "libllm_autotune_kernels.so").unlink()
    outside.rename(inside)
    (library / "libllm_autotune_kernels.so").symlink_to(inside)
    assert len(runtime.load(library).entries) == 7


def test_the_export_records_the_hash_of_the_shared_library(exported_library):
    import hashlib

    manifest = json.loads((exported_library / "manifest.json").read_text())
    shared_library = (exported_library / manifest["library"]).read_bytes()
    assert manifest["library_sha256"] == hashlib.sha256(shared_library).hexdigest()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a library with its hashes loads without a warning
        runtime.load(exported_library)


def _as_before_hashes(manifest: dict, folder: Path) -> None:
    """What an export from before hashes and contracts were recorded wrote."""
    manifest["schema"] = 1
    manifest.pop("library_sha256")
    for kernel in manifest["kernels"]:
        kernel.pop("contract_sha256")


def test_a_schema_1_library_without_hashes_loads_with_a_warning(tmp_path, exported_library):
    from runtime.library import UnverifiedLibraryWarning

    library = _copy(exported_library, tmp_path)
    _edit(library, _as_before_hashes)
    with pytest.warns(UnverifiedLibraryWarning) as warned:
        loaded = runtime.load(library)
    said = " | ".join(str(w.message) for w in warned)
    assert "records no sha256 of libllm_autotune_kernels.so" in said and "records no contract of" in said, said
    gemv = loaded.get("gemv", {"M": 1, "N": 64, "K": 128})
    x, w = np.ones((1, 128), np.float32), np.ones((64, 128), np.float32)
    np.testing.assert_allclose(gemv(x, w), np.full((1, 64), 128.0))


# ----------------------------------------------------------------------------- safetensors headers

CLI = [sys.executable, "-m", "autotune.cli"]


def _weights_file(folder: Path, case: str) -> None:
    folder.mkdir()
    path = folder / "model.safetensors"
    if case == "huge header length":
        path.write_bytes(struct.pack("<Q", 1 << 62) + b"{}" + bytes(64))
    elif case == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    elif case == "header past the end":
        path.write_bytes(struct.pack("<Q", 1000) + b'{"a": 1}')
    elif case == "header not an object":
        path.write_bytes(struct.pack("<Q", 2) + b"[]")
    elif case == "offsets past the end":
        header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [128], "data_offsets": [0, 512]}}).encode()
        path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))


@pytest.mark.parametrize("case", ["huge header length", "random bytes", "header past the end", "header not an object",
                                  "offsets past the end"])
def test_a_malformed_weights_file_is_one_line_and_exit_2(case, tmp_path, exported_library):
    _weights_file(tmp_path / "weights", case)
    proc = subprocess.run(CLI + ["run", "--model", "tiny", "--lib", str(exported_library), "--weights",
                                 str(tmp_path / "weights"), "--new-tokens", "2", "--prompt-tokens", "4"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("autotune: error: ") and "not a safetensors file" in lines[0], lines
    assert "MemoryError" not in proc.stderr and "internal error" not in proc.stderr


def test_a_good_weights_file_reads_as_before(tmp_path):
    from runtime.model_config import PRESETS
    from runtime.weights import ModelWeights, read_header

    weights = ModelWeights.random(PRESETS["tiny"], seed=1)
    weights.save(tmp_path)
    header, start = read_header(tmp_path / "model.safetensors")
    assert "model.norm.weight" in header and start > 8
    loaded = ModelWeights.load(PRESETS["tiny"], tmp_path)
    np.testing.assert_array_equal(loaded["model.norm.weight"], weights["model.norm.weight"])


# ----------------------------------------------------------------------------- device memory


def test_device_copies_stay_inside_their_buffers(fake_gpu):
    from runtime.arrays import CudaArrays

    arrays = CudaArrays()
    cache, rows = arrays.zeros((1, 2, 8, 4)), arrays.zeros((2, 4))
    with pytest.raises(ValueError, match="into a device buffer of"):
        arrays.set(rows, np.zeros(16, np.float32))
    with pytest.raises(ValueError, match="at position 8 of a cache of"):
        arrays.write_position(cache, rows, 8)
    with pytest.raises(ValueError, match="as 9 tokens into a cache of"):
        arrays.write_prompt(cache, arrays.zeros((9, 8)), 9)
    with pytest.raises(ValueError, match="cannot copy row 3"):
        arrays.rows_at(arrays.zeros((6, 4)), 2, 3, arrays.zeros((2, 4)))
    arrays.write_position(cache, arrays.upload(np.ones((2, 4), np.float32)), 7)
    assert arrays.get(cache)[0, :, 7].sum() == 8 and arrays.get(cache).sum() == 8


def test_a_cuda_call_with_lengths_past_its_cache_is_refused_before_the_launch(fake_gpu):
    """attention_decode with per-sequence lengths walks each sequence's cache up to LENS[b],
    read from memory unclamped: on a call with numpy inputs, each must lie in 0..L."""
    from fakes import FAKE_GPU_TARGET

    from runtime.abi import KernelSpec
    from runtime.library_cuda import CudaKernel, CudaModules
    from search_space import Task, get_template

    task = Task.make("attention_decode", {"B": 2, "H": 4, "HKV": 2, "D": 32, "S": 16, "L": 16}, "float16",
                     {"lengths": "per_sequence"}, ("S", "L"))
    template = get_template("attention_decode", "cuda")
    args = template.render(task, template.default(task, FAKE_GPU_TARGET), FAKE_GPU_TARGET).args  # not compiled

    def never_launched(*args, **kwargs):
        raise AssertionError("launched")

    kernel = CudaKernel(KernelSpec.make(task.op, task.dims, task.dtype, task.attr, task.dynamic), args,
                        never_launched, tuned=True, keepalive=(CudaModules(),))
    inputs = template.make_inputs(task, np.random.default_rng(0))
    for lens in ([3, 17], [-1, 4], [10**6, 2]):
        with pytest.raises(ValueError, match=r"input LENS: every length must lie in 0..L = 16"):
            kernel(**{**inputs, "LENS": np.array(lens, np.int32)}, dims={"L": 16})
    with pytest.raises(AssertionError, match="launched"):  # lengths within the cache go on to the launch
        kernel(**{**inputs, "LENS": np.array([0, 16], np.int32)}, dims={"L": 16})
