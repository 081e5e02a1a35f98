"""The C header of an exported CPU kernel library: one typed prototype per entry.

Every CPU kernel is ``void entry(pointers..., int64_t dims...)`` (see
``search_space.codegen.llvm``); the header gives each pointer the C type of its elements and
says, per entry, which task it was tuned for, what it computes with which attributes, the
shape of every array and how many bytes each workspace needs, so a C caller can allocate
them; and, once, what holds for every entry (the CPU it needs, aliasing, threads, dims).
"""
from __future__ import annotations

import json
import textwrap
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


# What a C caller must know of the int4 weights (runtime/q4.py says the same)
Q4_LAYOUT = ("WQ packs two 4-bit codes per byte along K: k = 2j in the low nibble of byte j, k = 2j + 1 in the "
             "high one; a weight is (code - z) * scale, scale from SCALES and z from ZEROS (with zero points) for "
             "its group of group_size consecutive k, else z = 8")


def _attr_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):  # longrope's factors: as the manifest writes them
        return json.dumps(list(value))
    return "true" if value is True else "false" if value is False else str(value)


def _operator_lines(kernel: Mapping[str, Any]) -> list[str]:
    """What the entry computes, with every attribute it was compiled with (defaults included)."""
    from search_space import Task
    from search_space.registry import op_definition

    try:
        operator = op_definition(kernel["op"])
    except ValueError:  # an operator of a plugin that is not loaded here
        return []
    lines = [f"  computes: {operator.description}"] if operator.description else []
    attrs = operator.attrs(Task.make(kernel["op"], dict(kernel["dims"]), kernel["dtype"], dict(kernel["attrs"])))
    if attrs:
        lines.append("  attributes: " + ", ".join(f"{k}={_attr_text(v)}" for k, v in attrs.items()))
    if any(a["name"] == "WQ" for a in kernel["args"]):
        lines.append("  " + Q4_LAYOUT)
    return lines


def entry_comment(kernel: Mapping[str, Any]) -> list[str]:
    from runtime.kernel import COUNTED_WITHIN

    dims, dynamic = kernel["dims"], kernel["dynamic"]
    lines = [f"{kernel['entry']}: {kernel['task']}", *_operator_lines(kernel)]
    if dynamic:
        lines.append("  dynamic dims " + ", ".join(f"{d} (tuned at {dims[d]})" for d in dynamic)
                     + ": passed as the trailing int64_t arguments")
    for count, rows in COUNTED_WITHIN.get(kernel["op"], {}).items():
        if any(a["role"] == "scalar" and a["name"] == count for a in kernel["args"]):
            lines.append(f"  {rows}: the rows each cache holds (its capacity); {count}: how many of them are "
                         f"valid, 1 <= {count} <= {rows}")
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


COMMENT_WIDTH = 96  # after " * ": header lines stay within 100 columns


def _comment_lines(text: str, indent: str = "", break_words: bool = True) -> list[str]:
    """``text`` as lines of a block comment, wrapped at spaces to ``COMMENT_WIDTH`` (a longer
    word cut too, unless ``break_words`` is false)."""
    return [" * " + part for part in textwrap.wrap(text, COMMENT_WIDTH, subsequent_indent=indent,
                                                   break_on_hyphens=False, break_long_words=break_words)]


def header_text(kernels: Iterable[Mapping[str, Any]], target_key: str, guard: str = "LLM_AUTOTUNE_KERNELS_H",
                cpu_features: Iterable[str] = ()) -> str:
    kernels = list(kernels)
    needs = ", ".join(cpu_features)
    threaded = any(int((k.get("launch") or {}).get("threads", 1) or 1) > 1 for k in kernels)
    # an AVX-512 host needs a dozen extensions: wrapped, so the comment keeps its width
    cpu = (f"CPU: the kernels use {needs or 'the instructions of the machine they were tuned on'}; on a CPU "
           "without them a call dies with SIGILL (check first, e.g. with __builtin_cpu_supports; the Python "
           "runtime refuses such a library at load).")
    out = [
        f"/* Tuned kernels for {target_key}, exported by llm-autotune; see manifest.json.",
        " *",
        *_comment_lines(cpu),
        " * Arrays: dense, row-major, any alignment (workspaces: 64-byte aligned). An output may not",
        " * overlap an input or another output. Every kernel returns when its outputs are written.",
        " * Dims: a dynamic dim runs at any value from 1 up to what the arrays hold; a dim that is not",
        " * the outermost axis of an array (a cache's S) is part of its layout: pass the true one.",
        " * Threads: entries may be called from several threads at once, each with its own workspace.",
        " * Names: an entry's name changes when its arguments or workspace sizes do; rebuild against",
        " * the header of every new export (one whose convention changed then fails to link). One",
        " * exported library per program: every export has this soname and include guard.",
    ]
    if threaded:
        out += [" * Entries tuned with threads > 1 share a pool of worker threads that the library starts at",
                " * their first call and keeps until the process exits; the library is linked NODELETE, so",
                " * dlclose leaves it loaded (its workers run its code). The workers take the CPU affinity",
                " * of the thread that first calls one, and their number is the tuned one. One caller at a",
                " * time: a call made while another thread's is in the pool runs its shares on the calling",
                " * thread. A child made by fork() starts a pool of its own. An idle worker spins up to 0.5 ms",
                " * before it sleeps: processes whose threads outnumber the cores keep each other waiting."]
    out += [
        " */",
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
        # a description or attribute (a plugin's) that says "*/" must not end the comment early
        comment = [line.replace("*/", "* /") for line in entry_comment(kernel)]
        if " " in kernel["task"]:  # a list attribute (longrope's factors): the key wrapped at its spaces
            first, *more = _comment_lines(comment[0], "  ", break_words=False)
            out += ["/*" + first[2:], *more]
        else:
            out.append("/* " + comment[0])
        for line in comment[1:]:
            if len(line) <= COMMENT_WIDTH:
                out.append(" * " + line)
                continue
            indent = " " * (len(line) - len(line.lstrip()) + 2)  # a long line continues further in
            out.extend(_comment_lines(line, indent))
        out.append(" */")
        params = ", ".join(c_parameter(a) for a in kernel["args"]) or "void"
        out.append(f"void {kernel['entry']}({params});")
        out.append("")
    out += ["#ifdef __cplusplus", "}", "#endif", "", f"#endif /* {guard} */", ""]
    return "\n".join(out)
