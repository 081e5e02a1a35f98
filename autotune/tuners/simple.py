"""Model-free baselines: uniform random sampling and grid enumeration."""
from __future__ import annotations

from search_space import Config

from .base import Tuner


class RandomTuner(Tuner):
    """Valid configs drawn uniformly without replacement."""

    name = "random"

    def next_batch(self, n: int) -> list[Config]:
        return self.space.sample(self.rng, n, exclude=self.visited)


class GridTuner(Tuner):
    """Valid configs in index order (the last knob varies fastest)."""

    name = "grid"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._cursor = 0

    def next_batch(self, n: int) -> list[Config]:
        batch: list[Config] = []
        while len(batch) < n and self._cursor < len(self.space):
            config = self.space.get(self._cursor)
            self._cursor += 1
            if config.index not in self.visited and self.space.is_valid(config):
                batch.append(config)
        return batch

    def has_next(self) -> bool:
        return self._cursor < len(self.space) and super().has_next()


class SweepTuner(Tuner):
    """Measures a fixed plan: every valid config, or a seeded random subset of ``sample``.

    The plan is a seeded random permutation, so a sweep cut short is still a uniform
    random subset, and a sweep resumed with the same seed continues the same plan.
    """

    name = "sweep"

    def __init__(self, *args, sample: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        space = self.space
        if sample is not None and len(space) > space.ENUMERATE_LIMIT:
            # too large to enumerate: the first ``sample`` valid configs of a seeded permutation of
            # the whole space, which is a uniform random subset of the valid ones all the same
            self.plan: list[int] = []
            for index in self.rng.permutation(len(space)):
                if space.is_valid(space.get(int(index))):
                    self.plan.append(int(index))
                    if len(self.plan) == sample:
                        break
        else:
            valid = space.valid_indices()
            order = self.rng.permutation(len(valid))
            if sample is not None:
                order = order[:sample]
            self.plan = [valid[int(i)] for i in order]
        self._cursor = 0

    def next_batch(self, n: int) -> list[Config]:
        batch: list[Config] = []
        while len(batch) < n and self._cursor < len(self.plan):
            index = self.plan[self._cursor]
            self._cursor += 1
            if index not in self.visited:
                batch.append(self.space.get(index))
        return batch

    def has_next(self) -> bool:
        return any(i not in self.visited for i in self.plan[self._cursor:])
