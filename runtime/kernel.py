"""The runtime's one kernel interface: a compiled CPU kernel called on numpy arrays.

Kernels come from tuning logs (``export.TunedKernels``, compiled on first use) or from an
exported library (``runtime.library``, a shared object loaded with ctypes); both hand out
``Kernel`` objects, chosen by the same rule (``select``): the operator, dtype, attributes
and dynamic dims must match, static dims exactly, dynamic dims (token counts, KV lengths)
at the nearest tuned bucket. Only numpy and ctypes are imported here, so that a deployment
that loads an exported library needs nothing else.

Calling conventions: array arguments first (in the order of ``args``), then one int64 per
dynamic dim. ``kernel(x, w)`` checks every argument and allocates the outputs; a hot loop
binds its buffers once (``kernel.bind({...})``) and then pays only the foreign call.
"""
from __future__ import annotations

import ctypes
import functools
import itertools
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, TypeVar

import numpy as np

from .abi import NUMPY_DTYPES, ArgSpec, KernelSpec, numpy_dtype  # noqa: F401  (the ABI, re-exported)

class UntunedShapeWarning(UserWarning):
    """A call ran the template default because no tuned kernel serves its shape."""


T = TypeVar("T")


def distance(have: KernelSpec, want: KernelSpec) -> float | None:
    """How far a kernel tuned for ``have`` is from the call ``want``; None when it cannot serve it.

    Static dims must be equal; each dynamic dim adds |log(have / want)|, so the nearest bucket
    on a ratio scale wins (a kernel tuned at KV length 2048 serves 1800 rather than 512)."""
    if (have.op, have.dtype, set(have.dynamic)) != (want.op, want.dtype, set(want.dynamic)):
        return None
    if have.attr != want.attr:
        return None
    a, b = have.dims, want.dims
    if set(a) != set(b):
        return None
    total = 0.0
    for name, value in b.items():
        if name in want.dynamic:
            total += abs(math.log(a[name] / value))
        elif a[name] != value:
            return None
    return total


def select(candidates: Iterable[T], spec_of: Callable[[T], KernelSpec], want: KernelSpec) -> T | None:
    """The candidate whose spec serves ``want`` best (see ``distance``), or None."""
    best, best_d = None, math.inf
    for item in candidates:
        d = distance(spec_of(item), want)
        if d is not None and d < best_d:
            best, best_d = item, d
    return best


def buckets(specs: Iterable[KernelSpec], op: str, dim: str, **fixed: int) -> list[int]:
    """Sorted values of ``dim`` among the kernels of ``op`` whose other ``fixed`` dims match:
    e.g. the token counts a prefill GEMM was tuned at, for padding a prompt up to one."""
    values = set()
    for spec in specs:
        shape = spec.dims
        if spec.op == op and dim in shape and all(shape.get(k) == v for k, v in fixed.items()):
            values.add(shape[dim])
    return sorted(values)


def same_layout(shape: Sequence[int], want: Sequence[int]) -> bool:
    """Whether a C-contiguous array of ``shape`` holds ``want`` element for element: the same
    shape, or it with runs of adjacent axes merged (the model's ``[rows, width]`` activations
    for a ``[T, H, D]`` argument); not a transposed or otherwise regrouped one of the same size."""
    if math.prod(shape) != math.prod(want):
        return False
    boundaries = set(itertools.accumulate(want, operator.mul))
    return all(b in boundaries for b in itertools.accumulate(shape, operator.mul))


# A dim that sizes no array but counts the valid part of one: attention_decode reads the
# first L of the S rows its KV cache holds, so L may never exceed S (rope_append_attention's L,
# the length it was tuned at, likewise).
COUNTED_WITHIN = {"attention_decode": {"L": "S"}, "rope_append_attention": {"L": "S"}}


def check_runtime_dims(spec: KernelSpec, values: Mapping[str, int], limits: Mapping[str, int] | None = None) -> None:
    """Refuse runtime dim ``values`` the kernel would read or write past its buffers with: each
    must be an int >= 1, at most its ``limits`` value (what the bound arrays were checked to
    hold) and, for a count of valid rows (``COUNTED_WITHIN``), at most the rows there are."""
    within = COUNTED_WITHIN.get(spec.op, {})
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{spec.key}: dim {name} must be an int, not {value!r}")
        if value < 1:
            raise ValueError(f"{spec.key}: dim {name} = {value} must be at least 1")
        if name in within:
            other = within[name]
            bound = values.get(other, spec.dims.get(other))
            if bound is not None and value > bound:
                raise ValueError(f"{spec.key}: dim {name} = {value} exceeds {other} = {bound}")
        elif limits is not None and name in limits and value > limits[name]:
            raise ValueError(f"{spec.key}: dim {name} = {value} exceeds {limits[name]}, "
                             "what the bound arrays hold (bind larger arrays)")


def aligned_empty(nbytes: int, align: int = 64) -> np.ndarray:
    """Scratch bytes aligned for vector stores."""
    raw = np.empty(nbytes + align, dtype=np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset:offset + nbytes]


@dataclass
class Kernel:
    """A loaded kernel for one spec. ``function`` is a ctypes function taking the array
    pointers then the dynamic dims as int64; ``keepalive`` holds whatever owns its code."""

    spec: KernelSpec
    args: tuple[ArgSpec, ...]
    function: Callable[..., Any]
    tuned: bool
    seconds: float | None = None      # measured time of the tuned config, when known
    config: dict[str, Any] = field(default_factory=dict)
    entry: str = ""
    keepalive: Any = None
    # CUDA: the kernel waits for the one before it before reading its data, so a captured graph
    # may join them by a programmatic edge (``codegen.cuda_ptx.GRID_DEPENDENCY_HELPERS``)
    programmatic: bool = False

    def __post_init__(self) -> None:
        self.input_names = [a.name for a in self.args if a.role == "in"]
        self.output_names = [a.name for a in self.args if a.role == "out"]
        self.scalar_names = [a.name for a in self.args if a.role == "scalar"]

    @property
    def op(self) -> str:
        return self.spec.op

    def dims_for(self, arrays: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None) -> dict[str, int]:
        """The call's dims: the kernel's, with dynamic ones read off array shapes or given
        (a dim the kernel takes at run time though its task fixed it keeps the task's value)."""
        out = self.spec.dims
        given = dict(dims or {})
        runtime_dims = list(self.spec.dynamic) + [n for n in self.scalar_names if n not in self.spec.dynamic]
        for name in runtime_dims:
            if name in given:
                out[name] = given.pop(name)  # an int, checked below: 3.5 is refused, not rounded
                continue
            for arg in self.args:
                array = arrays.get(arg.name)
                # not an array (numpy's or a device array): refused by name when the arrays are checked
                if hasattr(array, "shape") and name in arg.shape and len(array.shape) == len(arg.shape):
                    out[name] = int(array.shape[arg.shape.index(name)])
                    break
            else:
                if name not in self.spec.dynamic:  # a runtime argument of a task tuned at one size
                    continue
                # an array that holds the dim but has another number of dims: the array is wrong,
                # not the call for leaving the dim out
                for arg in self.args:
                    array = arrays.get(arg.name)
                    if hasattr(array, "shape") and name in arg.shape:
                        raise ValueError(f"{self.spec.op} {arg.role}put {arg.name}: expected a {len(arg.shape)}-D "
                                         f"array of shape ({', '.join(map(str, arg.shape))}), got shape "
                                         f"{tuple(array.shape)}")
                raise TypeError(f"{self.spec.key}: pass the dynamic dim {name} (dims={{'{name}': ...}})")
        for name, value in given.items():
            if out.get(name) != value:
                raise ValueError(f"{self.spec.key}: dim {name} is compiled in as {out.get(name)}, not {value}")
        for name, other in COUNTED_WITHIN.get(self.spec.op, {}).items():
            # the valid rows of a cache larger or smaller than the tuned one are the caller's to say:
            # the tuned count would read part of it, or past the rows it holds
            if name in runtime_dims and name not in (dims or {}) and out.get(other) != self.spec.dims.get(other):
                raise TypeError(f"{self.spec.key}: the arrays hold {other} = {out.get(other)}, not the tuned "
                                f"{self.spec.dims.get(other)}: pass how many rows are valid (dims={{'{name}': ...}})")
        check_runtime_dims(self.spec, {n: out[n] for n in runtime_dims if n in out})
        return {name: int(value) for name, value in out.items()}

    def _check(self, arg: ArgSpec, array: np.ndarray, dims: Mapping[str, int]) -> np.ndarray:
        """``array`` if the kernel may be handed it for ``arg``: a numpy array of the argument's
        dtype and shape (see ``same_layout``), C-contiguous and aligned, writeable if an output."""
        if not isinstance(array, np.ndarray):
            raise ValueError(f"{self.spec.op} {arg.role}put {arg.name}: expected a numpy array, "
                             f"got {type(array).__name__}")
        want = arg.resolve_shape(dims)
        if array.dtype != numpy_dtype(arg.dtype) or not same_layout(array.shape, want):
            raise ValueError(f"{self.spec.op} {arg.role}put {arg.name}: expected {want} {arg.dtype}, "
                             f"got {array.shape} {array.dtype}")
        if not (array.flags.c_contiguous and array.flags.aligned):
            raise ValueError(f"{self.spec.op} argument {arg.name} must be C-contiguous and aligned")
        if arg.role == "out" and not array.flags.writeable:
            raise ValueError(f"{self.spec.op} output {arg.name} is read-only: the kernel writes it")
        return array

    def bind(self, arrays: Mapping[str, np.ndarray], dims: Mapping[str, int] | None = None) -> "BoundCall":
        """Check ``arrays`` (every input and output by name) once; the result calls the kernel on
        them with nothing but the foreign call, taking new values of the dynamic dims if given."""
        self.check_names(arrays)
        call_dims = self.dims_for(arrays, dims)
        pointers: list[int] = []
        scratch: dict[str, np.ndarray] = {}
        for arg in self.args:
            if arg.role in ("in", "out"):
                if arg.name not in arrays:
                    raise TypeError(f"{self.spec.op} needs {arg.role}put {arg.name}")
                pointers.append(self._check(arg, arrays[arg.name], call_dims).ctypes.data)
            elif arg.role == "workspace":
                # a workspace per bound call: calls of one kernel on two threads never share scratch
                scratch[arg.name] = aligned_empty(arg.nbytes)
                pointers.append(scratch[arg.name].ctypes.data)
        self.check_no_overlap(arrays)
        return BoundCall(self, pointers, {n: call_dims[n] for n in self.scalar_names}, {**arrays, **scratch})

    def check_names(self, arrays: Mapping[str, Any]) -> None:
        """Refuse an array the kernel does not take: its buffer would silently not be read or written."""
        unknown = sorted(set(arrays) - set(self.input_names) - set(self.output_names))
        if unknown:
            raise TypeError(f"{self.spec.op} has no argument {unknown[0]!r}: inputs {self.input_names}, "
                            f"outputs {self.output_names}")

    def check_no_overlap(self, buffers: Mapping[str, np.ndarray]) -> None:
        """Refuse an output that shares memory with an input (the kernel reads its inputs while it
        writes) or with another output (one of the two results would be lost)."""
        for i, name in enumerate(self.output_names):
            others = self.input_names + self.output_names[:i]
            clash = next((n for n in others if np.may_share_memory(buffers[name], buffers[n])), None)
            if clash is not None:
                what = "input" if clash in self.input_names else "output"
                raise ValueError(f"{self.spec.op} output {name} overlaps {what} {clash}: give it a buffer of its own")

    def host_buffers(self, arrays: Sequence[np.ndarray], named: Mapping[str, np.ndarray],
                     out: Mapping[str, np.ndarray] | None, dims: Mapping[str, int] | None
                     ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
        """A call's numpy buffers by name (inputs made contiguous, outputs given or allocated) and its dims."""
        # an array the kernel does not take is a mistake the caller would never see: its buffer
        # would simply not be read, or not be written
        if len(arrays) > len(self.input_names):
            raise TypeError(f"{self.spec.op} takes {len(self.input_names)} inputs {self.input_names}, "
                            f"got {len(arrays)}")
        unknown = sorted(set(named) - set(self.input_names)) + sorted(set(out or {}) - set(self.output_names))
        if unknown:
            raise TypeError(f"{self.spec.op} has no argument {unknown[0]!r}: inputs {self.input_names}, "
                            f"outputs {self.output_names}")
        inputs = dict(zip(self.input_names, arrays))
        twice = sorted(set(inputs) & set(named))
        if twice:  # as Python's own calls: which of the two was meant is not for the kernel to guess
            raise TypeError(f"{self.spec.op} got input {twice[0]!r} both by position and by name")
        inputs.update(named)
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise TypeError(f"{self.spec.op} needs inputs {self.input_names}; missing {missing}")
        buffers = {n: np.ascontiguousarray(inputs[n]) for n in self.input_names}
        call_dims = self.dims_for(buffers, dims)
        for arg in self.args:
            if arg.role == "out":
                given = (out or {}).get(arg.name)
                buffers[arg.name] = given if given is not None else np.empty(arg.resolve_shape(call_dims),
                                                                              numpy_dtype(arg.dtype))
        return buffers, call_dims

    def __call__(self, *arrays: np.ndarray, out: Mapping[str, np.ndarray] | None = None,
                 dims: Mapping[str, int] | None = None, **named: np.ndarray):
        """Run on inputs (positional in argument order, or by name); returns the output(s)."""
        buffers, call_dims = self.host_buffers(arrays, named, out, dims)
        self.bind(buffers, call_dims)()
        outputs = tuple(buffers[n] for n in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs


class BoundCall:
    """A kernel bound to its buffers: ``call()`` or ``call(L=129)`` for a new dynamic value.

    A new value is checked before the foreign call (``check_runtime_dims``): it may not exceed
    the value the arrays were bound and checked at, nor (L) the rows of the cache it counts in,
    and a dim that sets the arrays' layout (``layout_dims``) keeps its bound value. New values
    stay for the calls after it.

    A decode step makes a few dozen calls of a few microseconds each, so the Python around
    the foreign call is kept to a minimum: the argument tuple is built when the dims change,
    not per call, and so is each dim's largest allowed value (``_maxima``), so a call with a
    new in-range int is one comparison per dim. ``run`` is the foreign call on the current
    arguments (a ``functools.partial``, cheaper than a method) with nothing around it, for a
    hot loop that sets no dims.

    ``values_at(dims)``, where given, makes the non-scalar arguments again for new dims: a CUDA
    kernel's TMA descriptors hold the arrays' shapes (the edge past which a copy reads zeros),
    so they are encoded again when a dynamic dim changes."""

    __slots__ = ("kernel", "pointers", "scalars", "limits", "layout_dims", "arrays", "_function", "_maxima",
                 "_values_at", "run")

    def __init__(self, kernel: Kernel, pointers: list, scalars: dict[str, int], arrays: dict,
                 values_at: Callable[[Mapping[str, int]], list] | None = None):
        self.kernel = kernel
        self.pointers = pointers
        self.scalars = scalars
        self.limits = dict(scalars)  # what the bound arrays hold: no dim may grow past it
        self.layout_dims = layout_dims(kernel.args, {**kernel.spec.dims, **scalars}) & set(scalars)
        self.arrays = arrays  # keeps the buffers alive while the pointers are in use
        self._function = kernel.function
        self._values_at = values_at
        self._update()

    def _update(self) -> None:
        """Rebuild what a call uses from ``scalars``: ``run`` (the arguments bound) and each dim's
        largest allowed value. A dim that bounds another one (S, which the KV length L counts
        within) has none: a new value of it takes the full check, which calls this again."""
        self.run = functools.partial(self._function, *self.pointers, *self.scalars.values())
        within = COUNTED_WITHIN.get(self.kernel.spec.op, {})
        shape = self.kernel.spec.dims
        maxima = {}
        for name in self.scalars:
            if name in within.values() or name in self.layout_dims:
                continue  # bounds another dim, or sets the arrays' layout: checked in full
            if name in within:
                bound = self.scalars.get(within[name], shape.get(within[name]))
                maxima[name] = math.inf if bound is None else bound  # as check_runtime_dims: no bound, no limit
            else:
                maxima[name] = self.limits[name]
        self._maxima = maxima

    def __call__(self, **dims: int) -> None:
        if dims:
            self._set_dims(dims)
        self.run()

    def _set_dims(self, dims: Mapping[str, int]) -> None:
        maxima = self._maxima
        for name, value in dims.items():
            # the common case, cheaply: a plain int within what the arrays hold; anything else
            # (a numpy int, a bool, out of range, an unknown or a bounding dim) takes the full check
            if value.__class__ is not int or not 1 <= value <= maxima.get(name, 0):
                return self._set_dims_checked(dims)
        if self._values_at is not None and any(self.scalars[name] != value for name, value in dims.items()):
            self.pointers = self._values_at({**self.scalars, **dims})  # a refused descriptor changes nothing
        self.scalars.update(dims)
        self.run = functools.partial(self._function, *self.pointers, *self.scalars.values())

    def _set_dims_checked(self, dims: Mapping[str, int]) -> None:
        for name in dims:
            if name not in self.scalars:
                raise TypeError(f"{self.kernel.spec.op}: {name} is not a dynamic dim of this kernel")
        values = {**self.scalars, **dims}
        check_runtime_dims(self.kernel.spec, values, self.limits)
        for name in self.layout_dims & set(dims):
            if values[name] != self.limits[name]:
                raise ValueError(f"{self.kernel.spec.key}: dim {name} = {values[name]} is not the {self.limits[name]} "
                                 "the arrays were bound at: it sets where their rows lie (bind arrays of that size)")
        values = {name: int(value) for name, value in values.items()}
        if self._values_at is not None and values != self.scalars:
            self.pointers = self._values_at(values)  # a refused descriptor changes nothing
        self.scalars = values
        self._update()


def layout_dims(args: Sequence[ArgSpec], dims: Mapping[str, int]) -> set[str]:
    """The dims that set where an array's elements lie: any axis of an input or output with a
    larger axis than 1 outside it (a KV cache's S in [B, HKV, S, D]). A bound call may run at a
    smaller value of an outermost dim (fewer rows, the same layout), never at another value of
    one of these."""
    out = set()
    for arg in args:
        if arg.role not in ("in", "out"):
            continue
        outer = 1
        for axis in arg.shape:
            if isinstance(axis, str) and outer > 1:
                out.add(axis)
            outer *= axis if isinstance(axis, int) else int(dims.get(axis, 1))
    return out


def ctypes_signature(args: Sequence[ArgSpec]) -> list:
    """ctypes argument types of a kernel with these arguments (pointers, then int64 dims)."""
    return [ctypes.c_int64 if a.role == "scalar" else ctypes.c_void_p for a in args]


class KernelProvider(Protocol):
    """Where a model gets its kernels: a tuning log, an exported library, template defaults."""

    def get(self, op: str, shape: Mapping[str, int], dtype: str = "float32", attrs: Mapping | None = None,
            dynamic: Sequence[str] = ()) -> Kernel: ...

    def specs(self) -> list[KernelSpec]: ...

    def close(self) -> None: ...
