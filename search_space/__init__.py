"""Targets, tasks, knobs, spaces and the schedule templates of every LLM operator."""
from __future__ import annotations

from .space import Config, ConfigSpace, Knob
from .target import Target
from .task import Task, format_shape, parse_attrs, parse_shape
from .template import (
    ArgSpec,
    KernelSource,
    Operator,
    Template,
    get_template,
    list_operators,
    list_templates,
    op_definition,
    register_operator,
    register_template,
    template_module,
)

__all__ = [
    "ArgSpec", "Config", "ConfigSpace", "KernelSource", "Knob", "Operator", "Target", "Task",
    "Template", "format_shape", "get_template", "list_operators", "list_templates", "op_definition",
    "parse_attrs", "parse_shape", "register_operator", "register_template", "template_module",
]
