"""Knobs, the space they span, and one point in it."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np

Values = Mapping[str, Any]
Constraint = Callable[[Values], bool]
KEPT = "one of the kept configs"  # the constraint ``ConfigSpace.only`` adds


@dataclass(frozen=True)
class Knob:
    """A tunable choice: a name and its ordered values (ints or strings).

    ``legacy``: for a knob added to a template after logs were written, the value that
    reproduces the code from before the knob existed; a record without the knob is read as
    that value, so old measurements keep their place in the space (replay, transfer, a
    resumed search). Whether today's code for that config is still what was measured is the
    record's code identity's to say (``records.freshness``). None: every config must name the knob.
    """

    name: str
    values: tuple[Any, ...]
    legacy: Any = None

    def __post_init__(self) -> None:
        if not self.values:
            raise ValueError(f"knob {self.name} has no values")
        if len(set(self.values)) != len(self.values):
            raise ValueError(f"knob {self.name} repeats a value: {self.values}")
        if self.legacy is not None and self.legacy not in self.values:
            raise ValueError(f"knob {self.name}: legacy value {self.legacy!r} is not one of {self.values}")

    def __len__(self) -> int:
        return len(self.values)

    @property
    def is_numeric(self) -> bool:
        return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in self.values)


@dataclass(frozen=True)
class Config:
    """One point of a space: knob values by name, plus its index in that space."""

    values: tuple[tuple[str, Any], ...]
    index: int

    def __getitem__(self, name: str) -> Any:
        for key, value in self.values:
            if key == name:
                return value
        raise KeyError(name)

    def get(self, name: str, default: Any = None) -> Any:
        try:
            return self[name]
        except KeyError:
            return default

    def as_dict(self) -> dict[str, Any]:
        return dict(self.values)

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "values": dict(self.values)}

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.values)


def knob_values(values: Any) -> tuple[Any, ...]:
    """Values a restriction allows a knob: a list of them, or one alone (a string is one value,
    not its characters)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        return (values,)
    return tuple(values)


def _holds(check: Constraint, values: Values) -> bool:
    try:
        return bool(check(values))
    except (ArithmeticError, KeyError, ValueError, TypeError):
        return False


class ConfigSpace:
    """The product of knobs, filtered by named constraints.

    ``len(space)`` counts the raw product; ``get(i)`` may return a config that breaks a
    constraint (``is_valid`` tells). ``sample`` and ``neighbors`` return valid configs only.
    The last knob varies fastest in the index.
    """

    def __init__(self, knobs: Sequence[Knob], constraints: Sequence[tuple[str, Constraint]] = ()):
        names = [k.name for k in knobs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate knob names in {names}")
        self.knobs: tuple[Knob, ...] = tuple(knobs)
        self.constraints: tuple[tuple[str, Constraint], ...] = tuple(constraints)
        self._by_name = {k.name: k for k in self.knobs}
        self._radix = [len(k) for k in self.knobs]
        self._size = math.prod(self._radix) if self.knobs else 1
        self._valid: list[int] | None = None  # every valid index, enumerated on demand

    def __len__(self) -> int:
        return self._size

    def __contains__(self, config: Config) -> bool:
        try:
            return self.index_of(config) == config.index
        except (KeyError, ValueError):
            return False

    @property
    def names(self) -> list[str]:
        return [k.name for k in self.knobs]

    def restrict(self, **allowed: Sequence[Any] | Any) -> "ConfigSpace":
        """The same space with some knobs limited to the given values (e.g. threads=[1]; one
        value may be given alone: threads=1, stores="cached"). ValueError for a knob the space
        lacks or values it does not take."""
        knobs = []
        for knob in self.knobs:
            if knob.name in allowed:
                wanted = knob_values(allowed[knob.name])
                keep = tuple(v for v in knob.values if v in wanted)
                if not keep:
                    raise ValueError(f"knob {knob.name} has none of the values {list(wanted)}; "
                                     f"it takes {list(knob.values)}")
                knob = Knob(knob.name, keep, knob.legacy if knob.legacy in keep else None)
            knobs.append(knob)
        unknown = set(allowed) - set(self.names)
        if unknown:
            raise ValueError(f"no knob named {', '.join(sorted(unknown))}; knobs are {', '.join(self.names)}")
        return ConfigSpace(knobs, self.constraints)

    def only(self, indices: Sequence[int]) -> "ConfigSpace":
        """The same space limited to the given indices (e.g. the configs a sweep recorded).

        Indices stay those of this space; sampling, neighbours and validity see only the
        kept configs, and the kept valid configs are known without enumerating the space.
        """
        keep = frozenset(int(i) for i in indices)
        space = ConfigSpace(self.knobs, self.constraints + (
            (KEPT, lambda c: self.index_of(c) in keep),))
        space._valid = sorted(i for i in keep if 0 <= i < self._size and self.is_valid(self.get(i)))
        return space

    def valid_count(self, limit: int) -> int | None:
        """The number of valid configs when it is cheap to know (already enumerated, or a raw
        space of at most ``limit`` points), else None."""
        if self._valid is None and self._size > limit:
            return None
        return len(self.valid_indices())

    def knob(self, name: str) -> Knob:
        return self._by_name[name]

    def get(self, index: int) -> Config:
        if not 0 <= index < self._size:
            raise IndexError(f"config index {index} outside space of size {self._size}")
        values = []
        rest = index
        for knob, radix in zip(reversed(self.knobs), reversed(self._radix)):
            rest, digit = divmod(rest, radix)
            values.append((knob.name, knob.values[digit]))
        return Config(tuple(reversed(values)), index)

    def index_of(self, config: Config | Values) -> int:
        values = config.as_dict() if isinstance(config, Config) else dict(config)
        for knob in self.knobs:  # logs from before a knob existed: the value that was built then
            if knob.name not in values and knob.legacy is not None:
                values[knob.name] = knob.legacy
        missing = [k.name for k in self.knobs if k.name not in values]
        if missing:
            raise KeyError(f"config lacks knobs {missing}")
        index = 0
        for knob, radix in zip(self.knobs, self._radix):
            try:
                digit = knob.values.index(values[knob.name])
            except ValueError:
                raise ValueError(f"{values[knob.name]!r} is not a value of knob {knob.name} {knob.values}") from None
            index = index * radix + digit
        return index

    def from_values(self, values: Values) -> Config:
        """The config with knob ``values`` (by name; a knob with a legacy value may be left out),
        valid or not (``is_valid`` tells). KeyError for a missing knob, ValueError for a value
        the knob does not take."""
        return self.get(self.index_of(values))

    def digits(self, config: Config) -> list[int]:
        """Each knob's position within its values: the config in knob-index coordinates."""
        return [knob.values.index(value) for knob, (_, value) in zip(self.knobs, config.values)]

    def _values(self, config: Config | Values) -> Values:
        """A config's values; a knob that ``config`` lacks and that has a legacy value takes it."""
        if isinstance(config, Config):
            return config.as_dict()
        missing = {k.name: k.legacy for k in self.knobs if k.name not in config and k.legacy is not None}
        return {**config, **missing} if missing else config

    def violations(self, config: Config | Values) -> list[str]:
        """The names of the constraints ``config`` breaks; a check that raises counts as broken
        (it may assume the ones before it hold: a warp tile that divides the block tile)."""
        values = self._values(config)
        return [name for name, check in self.constraints if not _holds(check, values)]

    def accepts(self, values: Values) -> bool:
        """True when every knob has a legal value in ``values`` and the constraints hold."""
        try:
            index = self.index_of(values)
        except (KeyError, ValueError):
            return False
        return self.is_valid(self.get(index))

    def accepted(self, value_sets: Iterable[Values], defaults: Values) -> list[Config]:
        """The configs ``value_sets`` name, each completed by ``defaults`` for the knobs it leaves
        out (seed configs are partial), in order and without repeats; those the space rejects
        are skipped."""
        configs: dict[int, Config] = {}
        for values in value_sets:
            full = {**defaults, **values}
            if self.accepts(full):
                config = self.from_values(full)
                configs.setdefault(config.index, config)
        return list(configs.values())

    def is_valid(self, config: Config | Values) -> bool:
        values = self._values(config)
        return all(_holds(check, values) for _, check in self.constraints)

    def __iter__(self) -> Iterator[Config]:
        """Every valid config in index order."""
        for index in range(self._size):
            config = self.get(index)
            if self.is_valid(config):
                yield config

    ENUMERATE_LIMIT = 2_000_000

    def valid_indices(self) -> list[int]:
        """Every valid index (enumerated once, then cached). Used when sampling is hard."""
        if self._valid is None:
            self._valid = [c.index for c in self]
        return self._valid

    def sample(self, rng: np.random.Generator, n: int, exclude: set[int] | None = None) -> list[Config]:
        """Up to ``n`` distinct valid configs drawn uniformly, skipping indices in ``exclude``.

        Fewer than ``n`` come back only when fewer valid configs remain. Draws uniformly
        and rejects invalid ones; when the constraints reject most draws, it enumerates
        the valid configs once and draws from those, or, in a space too large to enumerate,
        repairs random draws into valid configs (``_repaired``).
        """
        exclude = exclude or set()
        if n <= 0:
            return []
        if self._valid is None and self._size > 4096:
            chosen: dict[int, Config] = {}
            attempts = 0
            while len(chosen) < n and attempts < 50 * n:
                attempts += 1
                index = int(rng.integers(self._size))
                if index in chosen or index in exclude:
                    continue
                config = self.get(index)
                if self.is_valid(config):
                    chosen[index] = config
            if len(chosen) < n and self._size > self.ENUMERATE_LIMIT:
                chosen.update(self._repaired(rng, n - len(chosen), exclude | set(chosen)))
            if len(chosen) == n or self._size > self.ENUMERATE_LIMIT:
                return list(chosen.values())
        pool = [i for i in self.valid_indices() if i not in exclude]
        picks = rng.choice(len(pool), size=min(n, len(pool)), replace=False) if pool else []
        return [self.get(pool[int(i)]) for i in picks]

    def has_valid_config(self) -> bool:
        """Whether any config of the space is valid: exact up to ``ENUMERATE_LIMIT`` configs,
        beyond it as far as ``sample`` finds one (a space whose constraints leave none)."""
        return bool(self.sample(np.random.default_rng(0), 1))

    def repair(self, values: Values, rng: np.random.Generator, steps: int = 60) -> Config | None:
        """A valid config reached from ``values`` by a min-conflicts walk (set a random knob to
        the value that breaks the fewest constraints, ties at random, until none is broken), or
        None when the walk does not get there in ``steps``: a way to a nearby valid config in a
        space too large to enumerate."""
        values = dict(values)
        broken = len(self.violations(values))
        for _ in range(steps):
            if not broken:
                break
            knob = self.knobs[int(rng.integers(len(self.knobs)))]
            scores = [(len(self.violations({**values, knob.name: value})), rng.random(), value)
                      for value in knob.values]
            broken, _, best = min(scores, key=lambda score: score[:2])
            values[knob.name] = best
        return None if broken else self.from_values(values)

    def _repaired(self, rng: np.random.Generator, n: int, exclude: set[int], walks_per_config: int = 20) -> dict[int, Config]:
        """Up to ``n`` valid configs not in ``exclude``, each ``repair``ed from a uniform draw: for
        spaces too large to enumerate whose valid configs are too rare for rejection (a narrow
        ``restrict`` of a large space); not uniform, but every valid config can be reached."""
        found: dict[int, Config] = {}
        for _ in range(min(walks_per_config * n, 2000)):  # bounded: a space may hold no valid config
            values = {k.name: k.values[int(rng.integers(len(k)))] for k in self.knobs}
            config = self.repair(values, rng)
            if config is not None and config.index not in exclude and config.index not in found:
                found[config.index] = config
                if len(found) == n:
                    break
        return found

    def neighbors(self, config: Config) -> list[Config]:
        """Valid configs that differ from ``config`` in exactly one knob."""
        out = []
        base = config.as_dict()
        for knob in self.knobs:
            for value in knob.values:
                if value == base[knob.name]:
                    continue
                candidate = dict(base, **{knob.name: value})
                if self.is_valid(candidate):
                    out.append(self.from_values(candidate))
        return out

    def random_neighbor(self, config: Config, rng: np.random.Generator, tries: int = 20) -> Config | None:
        """A valid config one knob away, or None when none was found in ``tries`` draws."""
        base = config.as_dict()
        movable = [k for k in self.knobs if len(k) > 1]
        if not movable:
            return None
        for _ in range(tries):
            knob = movable[int(rng.integers(len(movable)))]
            value = knob.values[int(rng.integers(len(knob)))]
            if value == base[knob.name]:
                continue
            candidate = dict(base, **{knob.name: value})
            if self.is_valid(candidate):
                return self.from_values(candidate)
        return None

    def describe(self) -> str:
        parts = [f"{k.name}{list(k.values)}" for k in self.knobs]
        return f"ConfigSpace({len(self)} points: " + ", ".join(parts) + ")"

    __repr__ = describe
