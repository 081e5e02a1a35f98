"""Launch geometry of CUDA kernels as data: ints, or integer arithmetic over dim names
(``"(M + 63) // 64"``), so that a kernel with dynamic dims gets its grid at each call.

Renderers write these expressions (``search_space.codegen.cuda``); the runtime reads them
from a library's manifest without importing the project.
"""
from __future__ import annotations

import ast
import operator
from typing import Mapping

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Mod: operator.mod}


def evaluate(expr: int | str, dims: Mapping[str, int]) -> int:
    """An int, or integer arithmetic (+ - * // % and parentheses) over dim names."""
    if isinstance(expr, int):
        return expr

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return int(dims[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"unsupported launch expression {expr!r}")

    return int(walk(ast.parse(str(expr), mode="eval")))
