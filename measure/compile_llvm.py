"""LLVM IR text -> verified, O3-optimised native object code for a CPU target.

Call it in a worker process: the llvmlite wheels have LLVM assertions on, and a failed
assertion aborts the process that runs it.
"""
from __future__ import annotations

import functools

from search_space import Target
from search_space.codegen.llvm_pool import CODE_MODEL

OPT_LEVEL = 3


def compile_flags(target: Target) -> str:
    """Everything besides the source that decides the object code: part of the cache key."""
    return f"llvm;cpu={target.arch};features={target.features};O{OPT_LEVEL};cm={CODE_MODEL}"


def compiler_version() -> str:
    """The LLVM that compiles CPU kernels, as kept in each record: another LLVM may make
    other code of the same source (part of the record's code identity)."""
    import llvmlite
    import llvmlite.binding as llvm

    return f"LLVM {'.'.join(map(str, llvm.llvm_version_info))} (llvmlite {llvmlite.__version__})"


@functools.lru_cache(maxsize=8)
def target_machine(arch: str, features: str):
    """A shared target machine for compiling. Never hand it to an execution engine: the
    engine takes ownership and frees it (see ``new_target_machine``)."""
    return new_target_machine(arch, features)


def new_target_machine(arch: str, features: str):
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    triple = llvm.get_process_triple()
    return llvm.Target.from_triple(triple).create_target_machine(
        cpu=arch, features=features, opt=OPT_LEVEL, reloc="pic", codemodel=CODE_MODEL
    )


def optimize(module_text: str, target: Target):
    """Parse, verify and optimise; returns the llvmlite ModuleRef."""
    import llvmlite.binding as llvm

    tm = target_machine(target.arch, target.features)
    module = llvm.parse_assembly(module_text)
    module.triple = llvm.get_process_triple()
    module.data_layout = str(tm.target_data)
    module.verify()
    tuning = llvm.create_pipeline_tuning_options(speed_level=OPT_LEVEL)
    tuning.loop_vectorization = True
    tuning.slp_vectorization = True
    tuning.loop_unrolling = True
    builder = llvm.create_pass_builder(tm, tuning)
    builder.getModulePassManager().run(module, builder)
    module.verify()
    return module


def compile_to_object(module_text: str, target: Target) -> bytes:
    module = optimize(module_text, target)
    return target_machine(target.arch, target.features).emit_object(module)


# --------------------------------------------------------------------------- library objects
# An exported library links many kernels into one shared object: each kernel's entry gets a
# name unique in the library and everything else it defines becomes internal, so helpers of
# the same name in two kernels never clash (and O3 is free to inline or drop them).

_LOCAL_LINKAGES = ("internal", "private")


def export_only(module, entry: str, symbol: str) -> None:
    """Rename ``entry`` to ``symbol`` and make every other definition in ``module`` internal."""
    import llvmlite.binding as llvm

    found = False
    for fn in module.functions:
        if fn.is_declaration:
            continue
        if fn.name == entry:
            fn.name = symbol
            fn.linkage = llvm.Linkage.external
            found = True
        elif fn.linkage.name not in _LOCAL_LINKAGES:
            fn.linkage = llvm.Linkage.internal
    for variable in module.global_variables:
        if not variable.is_declaration and variable.linkage.name not in _LOCAL_LINKAGES:
            variable.linkage = llvm.Linkage.internal
    if not found:
        raise ValueError(f"the module defines no function {entry!r}")


def compile_library_object(module_text: str, entry: str, symbol: str, target: Target) -> bytes:
    """Object code of one kernel for a shared library: its only global symbol is ``symbol``."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    module = llvm.parse_assembly(module_text)
    export_only(module, entry, symbol)
    return compile_to_object(str(module), target)
