"""LLVM IR text -> verified, O3-optimised native object code for a CPU target.

Call it in a worker process: the llvmlite wheels have LLVM assertions on, and a failed
assertion aborts the process that runs it.
"""
from __future__ import annotations

import functools

from search_space import Target

OPT_LEVEL = 3


def compile_flags(target: Target) -> str:
    """Everything besides the source that decides the object code: part of the cache key."""
    return f"llvm;cpu={target.arch};features={target.features};O{OPT_LEVEL}"


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
        cpu=arch, features=features, opt=OPT_LEVEL, reloc="pic", codemodel="default"
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


def compile_to_assembly(module_text: str, target: Target) -> str:
    module = optimize(module_text, target)
    return target_machine(target.arch, target.features).emit_assembly(module)
