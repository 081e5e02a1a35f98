"""Model-based search: an XGBoost ranker picks the candidates to measure.

After every batch the cost model is refitted on everything measured (failed candidates
count as zero throughput). Candidates come from annealing walks over the space, started
at the best measured configs and at random points, that move one knob at a time and
keep the best predicted unvisited configs; a space whose valid configs are few (at most
``exhaustive_limit``, e.g. a decode gemv, or the configs a sweep recorded) is ranked
whole instead. A batch is not simply the top of that ranking: each pick must differ from
the batch's earlier picks in at least ``diversity`` knobs (else the next best that does is
taken), so that a batch tries several regions the model rates highly rather than one
region's near-copies; where the model is wrong about a region, the batch loses one trial
to it, not all. A share ``epsilon`` of each batch is drawn at random to keep exploring. A
config already measured is never proposed again.

Transfer: given a pre-trained ``base_model`` (other shapes or operators, see
``cost_model.transfer``), the tuner lays its features out as the base model's and lets it
rank the batches until the task has ``min_train`` measurements of its own; from then on a
model fitted on those alone ranks. Letting the base keep steering (adding the task's trees
to the base's) cost trials wherever the other shapes' best configs differ from this one's
(replays in benchmarks/RESULTS.md); the base's picks of the first batch are what carries
over. ``save_model`` still keeps the base's knowledge: it saves the base continued on this
task's measurements.
"""
from __future__ import annotations

import heapq
from typing import Mapping, Sequence

import numpy as np

from cost_model import FeatureExtractor, XGBConfig, XGBCostModel
from cost_model.transfer import throughput_of
from measure import MeasureInput, MeasureResult
from search_space import Config

from .base import Tuner


class XGBTuner(Tuner):
    name = "xgb"

    def __init__(self, task, target, template=None, seed: int = 0, epsilon: float = 0.1,
                 min_train: int = 8, sa_points: int = 96, sa_steps: int = 40,
                 model_config: XGBConfig | None = None, restrict: dict | None = None,
                 base_model: XGBCostModel | None = None, exhaustive_limit: int = 4096, space=None,
                 diversity: int = 2, seeds: Sequence[Mapping] = ()):
        super().__init__(task, target, template, seed, restrict, space)
        self.epsilon = epsilon
        self.diversity = diversity
        self.min_train = min_train
        self.sa_points = sa_points
        self.sa_steps = sa_steps
        self.exhaustive_limit = exhaustive_limit
        self.prior = base_model if base_model is not None and base_model.fitted else None
        columns = self.prior.feature_names if self.prior is not None else None
        self.features = FeatureExtractor(self.template, task, target, self.space, columns=columns)
        self.model = XGBCostModel(model_config, seed=seed)  # this task's measurements only
        self._rows: list[np.ndarray] = []
        self._throughput: list[float] = []
        self._configs: list[Config] = []
        self._pool_configs: list[Config] | None = None
        # priors: configs measured before the model proposes (the template's seeds for the
        # target, the best configs of other shapes); those this space rejects are dropped
        self.seeds = self._accepted(seeds)

    def _accepted(self, seeds: Sequence[Mapping]) -> list[Config]:
        return self.space.accepted(seeds, self.template.default(self.task, self.target).as_dict())

    # -- learning ----------------------------------------------------------------------
    def update(self, inputs: Sequence[MeasureInput], results: Sequence[MeasureResult]) -> None:
        super().update(inputs, results)
        for inp, res in zip(inputs, results):
            self._rows.append(self.features.row(inp.config, res.stats))
            self._throughput.append(throughput_of(self.task, res))
            self._configs.append(inp.config)
        if len(self._rows) >= self.min_train and max(self._throughput, default=0.0) > 0:
            self.model.fit(np.stack(self._rows), np.asarray(self._throughput), feature_names=self.features.names)

    def ranker(self) -> XGBCostModel | None:
        """The model that ranks now: the task's own once fitted, else the pre-trained one."""
        return self.model if self.model.fitted else self.prior

    def predict(self, configs: Sequence[Config]) -> np.ndarray:
        ranker = self.ranker()
        if ranker is None:
            raise RuntimeError("the cost model has not been fitted")
        return ranker.predict(self.features.matrix(configs), self.features.names)

    def predict_batch(self, configs: Sequence[Config]) -> np.ndarray | None:
        return self.predict(configs) if self.ranker() is not None and configs else None

    def save_model(self, path: str) -> None:
        """The cost model for ``--load-model`` later: with a pre-trained base, the base
        continued on this task's measurements (what it knew plus this task), else the task's own."""
        model = self.model
        if self.prior is not None and self.model.fitted:
            model = XGBCostModel(self.model.config, seed=self.seed, base=self.prior).fit(
                np.stack(self._rows), np.asarray(self._throughput), feature_names=self.features.names)
        elif self.prior is not None:
            model = self.prior
        model.save(path)

    # -- proposing ---------------------------------------------------------------------
    def next_batch(self, n: int) -> list[Config]:
        seeds = [c for c in self.seeds if c.index not in self.visited][:n]
        return seeds + self._propose(n - len(seeds), self.visited | {c.index for c in seeds})

    def _propose(self, n: int, taken: set[int]) -> list[Config]:
        """``n`` configs not in ``taken``: the model's best (some at random), or random before it has one."""
        if n <= 0:
            return []
        if self.ranker() is None:
            return self.space.sample(self.rng, n, exclude=taken)
        n_random = sum(1 for _ in range(n) if self.rng.random() < self.epsilon)
        n_model = n - n_random
        pool = self._pool()
        # more candidates than picks, for the diversity rule to choose from
        ranked = self._rank_pool(pool) if pool is not None else self._anneal(4 * n_model)
        chosen = self._diverse([c for c in ranked if c.index not in taken], n_model)
        taken = taken | {c.index for c in chosen}
        chosen += self.space.sample(self.rng, n - len(chosen), exclude=taken)
        return chosen

    def _pool(self) -> list[int] | None:
        """Every valid index when there are few enough to rank them all, else None."""
        count = self.space.valid_count(self.exhaustive_limit)
        return self.space.valid_indices() if count is not None and count <= self.exhaustive_limit else None

    def _rank_pool(self, pool: list[int]) -> list[Config]:
        """Every unvisited config of the pool, best predicted first."""
        if self._pool_configs is None:  # built once: the pool is ranked before every batch
            self._pool_configs = [self.space.get(i) for i in pool]
        configs = [c for c in self._pool_configs if c.index not in self.visited]
        if not configs:
            return []
        scores = self.predict(configs)
        return [configs[int(i)] for i in np.argsort(-scores, kind="stable")]

    def _diverse(self, ranked: Sequence[Config], n: int) -> list[Config]:
        """Up to ``n`` of ``ranked`` (best first), each differing from the earlier picks in at
        least ``diversity`` knobs; filled up in ranked order when too few do."""
        if n <= 0:
            return []
        ranked = [c for c in ranked if c.index not in self.visited]
        chosen: list[Config] = []
        digits: list[np.ndarray] = []
        for config in ranked:
            d = np.asarray(self.space.digits(config))
            if all(np.count_nonzero(d != e) >= self.diversity for e in digits):
                chosen.append(config)
                digits.append(d)
                if len(chosen) == n:
                    return chosen
        taken = {c.index for c in chosen}
        return chosen + [c for c in ranked if c.index not in taken][: n - len(chosen)]

    def _start_points(self) -> list[Config]:
        order = np.argsort(self._throughput)[::-1]
        top = [self._configs[i] for i in order[: max(self.sa_points // 4, 1)] if self._throughput[i] > 0]
        return top + self.space.sample(self.rng, self.sa_points - len(top))

    def _anneal(self, n: int) -> list[Config]:
        """The ``n`` best predicted unvisited configs seen along annealing walks."""
        if n <= 0:
            return []
        points = self._start_points()
        if not points:
            return []
        scores = self.predict(points)
        scale = float(np.std(scores)) or 1.0
        best: list[tuple[float, int, Config]] = []  # min-heap of (score, index, config)
        in_heap: set[int] = set()

        def offer(configs: Sequence[Config], values: np.ndarray) -> None:
            for config, value in zip(configs, values):
                if config.index in self.visited or config.index in in_heap:
                    continue
                item = (float(value), config.index, config)
                if len(best) < n:
                    heapq.heappush(best, item)
                    in_heap.add(config.index)
                elif item[0] > best[0][0]:
                    dropped = heapq.heapreplace(best, item)
                    in_heap.discard(dropped[1])
                    in_heap.add(config.index)

        offer(points, scores)
        for step in range(self.sa_steps):
            temperature = max(1.0 - step / self.sa_steps, 0.05)
            moves = [self.space.random_neighbor(p, self.rng) or p for p in points]
            new_scores = self.predict(moves)
            offer(moves, new_scores)
            gain = (new_scores - scores) / scale
            accept = np.log(self.rng.random(len(points)) + 1e-12) < np.minimum(gain / temperature, 0.0)
            accept |= gain >= 0
            points = [m if a else p for m, p, a in zip(moves, points, accept)]
            scores = np.where(accept, new_scores, scores)
        return [item[2] for item in sorted(best, key=lambda item: -item[0])]
