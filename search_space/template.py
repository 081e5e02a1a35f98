"""Operators and the schedule templates that implement them (registered in ``registry``).

An ``Operator`` says what is computed, independent of any target: its dims, FLOPs and
bytes, random inputs and a numpy reference. A ``Template`` says how one target computes
it: the space of schedules, a sensible default, a renderer that turns a config into
kernel source, and analytic features for the cost model. A template subclasses its
operator, so ``template.reference(...)`` works as the design describes.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import numpy as np

from runtime.abi import ROLES, ArgSpec, attr_kind, attr_value_fits  # noqa: F401  (the kernel ABI, re-exported)

from .space import Config, ConfigSpace
from .target import Target
from .registry import (get_template, list_operators, list_templates, op_definition, register_operator,
                       register_template, template_module)
from .task import Task

# --------------------------------------------------------------------------- kernel source


@dataclass(frozen=True)
class KernelSource:
    """What a renderer produces: source text plus everything needed to call it."""

    lang: str  # "llvm" | "cuda"
    code: str
    entry: str
    args: tuple[ArgSpec, ...]
    launch: tuple[tuple[str, Any], ...] = ()  # cpu: threads; cuda: grid, block, smem
    notes: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def launch_dims(self) -> dict[str, Any]:
        return dict(self.launch)

    def digest(self, flags: str = "") -> str:
        """Content hash of source and compiler flags: the artifact cache key."""
        h = hashlib.sha256()
        for part in (self.lang, flags, self.entry, self.code):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()[:32]

    def to_dict(self) -> dict[str, Any]:
        return {"lang": self.lang, "entry": self.entry, "args": [a.to_dict() for a in self.args],
                "launch": dict(self.launch), "code": self.code}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelSource":
        return cls(data["lang"], data["code"], data["entry"],
                   tuple(ArgSpec.from_dict(a) for a in data["args"]),
                   tuple(sorted(data.get("launch", {}).items())))


# --------------------------------------------------------------------------- operator

TOLERANCE = {"float32": 2e-4, "bfloat16": 2e-2, "float16": 5e-3}


class Operator:
    """What an LLM operator computes. Subclasses set the class attributes and methods.

    ``signature(task)`` is the contract every template of the operator renders: the input
    and output arrays by name, in order, with their shapes (dim names) and dtypes. A
    template's kernel takes those arrays (plus its own workspaces and the dynamic dims as
    int64 scalars) so that inputs from ``make_inputs`` and outputs of ``reference`` line
    up with the kernel's arguments by name.
    """

    op: ClassVar[str] = ""
    dims: ClassVar[tuple[str, ...]] = ()
    example_shape: ClassVar[dict[str, int]] = {}
    dynamic_dims: ClassVar[tuple[str, ...]] = ()  # dims that may be runtime arguments
    dtypes: ClassVar[tuple[str, ...]] = ("float32",)
    default_attrs: ClassVar[Mapping[str, Any]] = {}
    attr_docs: ClassVar[dict[str, str]] = {}  # what each attribute means, for `autotune ops`
    description: ClassVar[str] = ""

    def attrs(self, task: Task) -> dict[str, Any]:
        """The task's attributes with this operator's defaults filled in."""
        merged = dict(self.default_attrs)
        merged.update(task.attr)
        return merged

    def signature(self, task: Task) -> tuple[ArgSpec, ...]:
        raise NotImplementedError

    def check(self, task: Task) -> None:
        """Raise ValueError when ``task`` is not a legal instance of this operator."""
        if task.op != self.op:
            raise ValueError(f"task op {task.op!r} is not {self.op!r}")
        given = set(task.dims)
        if given != set(self.dims):
            raise ValueError(f"{self.op} takes dims {','.join(self.dims)}; got {','.join(task.dims) or 'none'}")
        if task.dtype not in self.dtypes:
            raise ValueError(f"{self.op} supports dtypes {', '.join(self.dtypes)}; got {task.dtype}")
        bad = [d for d in task.dynamic if d not in self.dynamic_dims]
        if bad:
            raise ValueError(f"{self.op}: dims {bad} cannot be dynamic")
        unknown = set(task.attr) - set(self.default_attrs)
        if unknown:
            raise ValueError(f"{self.op} has no attributes {sorted(unknown)}; it takes {sorted(self.default_attrs)}")
        for name, value in task.attrs:
            default = self.default_attrs[name]
            if not attr_value_fits(default, value):
                raise ValueError(f"{self.op}: {name} = {value!r} is not a {attr_kind(default)} like "
                                 f"{json.dumps(default)}")
            # an epsilon under a square root: a negative one makes NaN rows, which the check
            # against numpy takes as right wherever numpy's are NaN too
            if name == "eps" and not value > 0:
                raise ValueError(f"{self.op}: eps = {value!r} is not a positive number")

    def resident_inputs(self, task: Task) -> tuple[str, ...]:
        """The inputs a model keeps from one pass to the next (weights, a KV cache): a model's
        kernel reads them from wherever the rest of the pass left them, while its other inputs
        were just written by the kernel before it. Timing for a model cycles copies of these
        (``measure.backends.cpu.cold_copies``). None: the operator has no such inputs."""
        return ()

    def resident_read_share(self, task: Task) -> float:
        """The share of its resident inputs' bytes one call reads: 1, or L / S for a KV cache of
        capacity S holding L rows. Cold timing counts its copies by the bytes read, so that a
        cache much larger than its rows still cycles through enough memory."""
        return 1.0

    def flops(self, task: Task) -> float:
        raise NotImplementedError

    def min_bytes(self, task: Task) -> float:
        """Fewest bytes any kernel must move: every input read once, every output written once."""
        raise NotImplementedError

    def make_inputs(self, task: Task, rng: np.random.Generator) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def reference(self, task: Task, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The outputs by name, computed with numpy in float64."""
        raise NotImplementedError

    def tolerance(self, task: Task) -> float:
        return TOLERANCE[task.dtype]

    def numpy_baseline(self, task: Task, inputs: dict[str, np.ndarray]) -> tuple[str, Callable[[], object]]:
        """(description, zero-argument callable) computing the op the fastest plain-numpy way,
        in float32: what ``autotune bench`` compares a tuned kernel against."""
        raise NotImplementedError(f"{self.op} has no numpy baseline")


class Template(Operator):
    """How one target kind computes an operator: space, default, render, features."""

    target_kind: ClassVar[str] = ""
    # operators whose templates on this target kind share this one's knobs and kernel, so that
    # their best configs are priors of its search (and the other way round); () for none
    schedule_family: ClassVar[tuple[str, ...]] = ()

    def space(self, task: Task, target: Target) -> ConfigSpace:
        raise NotImplementedError

    def default(self, task: Task, target: Target) -> Config:
        raise NotImplementedError

    def render(self, task: Task, config: Config, target: Target) -> KernelSource:
        raise NotImplementedError

    def features(self, task: Task, config: Config, target: Target) -> dict[str, float]:
        """Analytic features, named the same across operators (see cost_model.features)."""
        return {}

    def seed_configs(self, task: Task, target: Target) -> list[dict[str, Any]]:
        """Configs known to suit ``target`` (knob values; knobs left out take the default's),
        measured first by a tuner that uses priors. Seeds the space rejects for a task are
        skipped, so a template may offer the same list for every shape."""
        return []
