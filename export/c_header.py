"""The C header of an exported CPU kernel library: one typed prototype per entry.

Every CPU kernel is ``void entry(pointers..., int64_t dims...)`` (see
``search_space.codegen.llvm``); the header gives each pointer the C type of its elements and
says, per entry, which task it was tuned for, the shape of every array and how many bytes
each workspace needs, so a C caller can allocate them.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

C_ELEMENT = {"float32": "float", "float16": "uint16_t", "bfloat16": "uint16_t", "uint8": "uint8_t",
             "int32": "int32_t", "int64": "int64_t"}


def c_parameter(arg: Mapping[str, Any]) -> str:
    role, name = arg["role"], arg["name"]
    if role == "scalar":
        return f"int64_t {name}"
    if role == "workspace":
        return f"void *{name}"
    element = C_ELEMENT[arg["dtype"]]
    return f"{'const ' if role == 'in' else ''}{element} *{name}"


def _shape_text(arg: Mapping[str, Any], dims: Mapping[str, int], dynamic: Iterable[str]) -> str:
    dynamic = set(dynamic)
    parts = []
    for d in arg["shape"]:
        if isinstance(d, int):
            parts.append(str(d))
        elif d in dynamic:
            parts.append(f"{d} (run time)")
        else:
            parts.append(f"{d}={dims[d]}")
    return "[" + ", ".join(parts) + "]"


def entry_comment(kernel: Mapping[str, Any]) -> list[str]:
    dims, dynamic = kernel["dims"], kernel["dynamic"]
    lines = [f"{kernel['entry']}: {kernel['task']}"]
    if dynamic:
        lines.append("  dynamic dims " + ", ".join(f"{d} (tuned at {dims[d]})" for d in dynamic)
                     + ": passed as the trailing int64_t arguments")
    for arg in kernel["args"]:
        if arg["role"] in ("in", "out"):
            lines.append(f"  {arg['name']}: {arg['role']}put {arg['dtype']}{_shape_text(arg, dims, dynamic)}"
                         + (" (raw 16-bit words)" if arg["dtype"] in ("bfloat16", "float16") else ""))
        elif arg["role"] == "workspace":
            lines.append(f"  {arg['name']}: scratch of {arg['nbytes']} bytes, 64-byte aligned, "
                         "one per concurrent caller")
    if kernel.get("seconds"):
        lines.append(f"  measured {kernel['seconds'] * 1e3:.4f} ms ({kernel.get('gflops', 0.0):.1f} GFLOP/s)")
    return lines


def header_text(kernels: Iterable[Mapping[str, Any]], target_key: str, guard: str = "LLM_AUTOTUNE_KERNELS_H") -> str:
    out = [
        f"/* Tuned kernels for {target_key}, exported by llm-autotune; see manifest.json.",
        " * Arrays are dense and row-major; every kernel returns when its outputs are written. */",
        f"#ifndef {guard}",
        f"#define {guard}",
        "",
        "#include <stdint.h>",
        "",
        "#ifdef __cplusplus",
        'extern "C" {',
        "#endif",
        "",
    ]
    for kernel in kernels:
        comment = entry_comment(kernel)
        out.append("/* " + comment[0])
        out.extend(" * " + line for line in comment[1:])
        out.append(" */")
        params = ", ".join(c_parameter(a) for a in kernel["args"]) or "void"
        out.append(f"void {kernel['entry']}({params});")
        out.append("")
    out += ["#ifdef __cplusplus", "}", "#endif", "", f"#endif /* {guard} */", ""]
    return "\n".join(out)
