"""The kernel cache reuses an artifact only when today's compiler built it, and every build
says which compiler that was (part of a record's code identity)."""
from __future__ import annotations

import json

from measure import LocalBuilder, MeasureInput
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
