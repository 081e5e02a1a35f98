"""The registry of operators and templates, by op name and target kind.

Kept apart from ``template`` so that ``Task`` (whose FLOPs and bytes come from its
operator's definition) can look an operator up without importing the template module,
which imports ``Task``. The built-in operators register themselves when ``search_space.ops``
is first imported, a built-in template when its module is: a lookup imports only the module of
the template it names, a listing all of them.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .template import Operator, Template

_OPERATORS: dict[str, type[Operator]] = {}
_TEMPLATES: dict[tuple[str, str], type[Template]] = {}


def register_operator(cls: type[Operator]) -> type[Operator]:
    """Class decorator: the definition of operator ``cls.op``."""
    if not cls.op:
        raise ValueError(f"{cls.__name__} needs an op name")
    _OPERATORS[cls.op] = cls
    return cls


def register_template(cls: type[Template]) -> type[Template]:
    """Class decorator: make ``cls`` the template for (cls.op, cls.target_kind)."""
    if not cls.op or cls.target_kind not in ("cpu", "cuda"):
        raise ValueError(f"{cls.__name__} needs op and target_kind ('cpu' or 'cuda')")
    _TEMPLATES[(cls.op, cls.target_kind)] = cls
    _OPERATORS.setdefault(cls.op, cls)
    return cls


def _load_builtin() -> None:
    """Register every built-in operator and template (for listings and unknown names)."""
    from .templates import MODULES

    importlib.import_module("search_space.ops")
    for module in MODULES.values():
        importlib.import_module(module)


def _load_template(op: str, target_kind: str) -> None:
    """Register the template a lookup names by importing its module alone (a process that builds
    or runs one kernel pays for no other template's import); unknown names load everything."""
    if (op, target_kind) in _TEMPLATES:  # every lookup after the first
        return
    from .templates import MODULES

    module = MODULES.get((op, target_kind))
    if module is not None:
        importlib.import_module(module)
    if (op, target_kind) not in _TEMPLATES:
        _load_builtin()


def get_template(op: str, target_kind: str = "cpu") -> Template:
    """The registered template for ``op`` on ``target_kind``; ValueError names the known ones."""
    _load_template(op, target_kind)
    cls = _TEMPLATES.get((op, target_kind))
    if cls is None:
        known = sorted(o for o, k in _TEMPLATES if k == target_kind)
        raise ValueError(f"unknown op {op!r} for target {target_kind}: known ops are {', '.join(known)}")
    return cls()


def op_definition(op: str) -> Operator:
    importlib.import_module("search_space.ops")  # every built-in operator; a template may add others
    if op not in _OPERATORS:
        _load_builtin()
    cls = _OPERATORS.get(op)
    if cls is None:
        raise ValueError(f"unknown op {op!r}: known ops are {', '.join(sorted(_OPERATORS))}")
    return cls()


def list_operators() -> list[Operator]:
    """Every registered operator definition (what an op computes, its dims), by name."""
    _load_builtin()
    return [cls() for _, cls in sorted(_OPERATORS.items())]


def list_templates(target_kind: str | None = None) -> list[Template]:
    """The templates (an op's kernels and their knobs) for ``target_kind`` ("cpu" or "cuda";
    None: both), by op."""
    _load_builtin()
    return [cls() for (op, kind), cls in sorted(_TEMPLATES.items())
            if target_kind is None or kind == target_kind]


def template_module(op: str, target_kind: str) -> str:
    """The module that registers a template: worker processes import it to find the template."""
    get_template(op, target_kind)
    return _TEMPLATES[(op, target_kind)].__module__
