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
