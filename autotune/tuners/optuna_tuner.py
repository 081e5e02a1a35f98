"""Optuna samplers as tuners, through ask/tell: TPE (``optuna-tpe``) and CMA-ES (``optuna-cmaes``).

Each knob is one parameter: numeric knobs (and, for CMA-ES, every knob) as the integer
position of their value, so neighbouring values are neighbouring numbers; string knobs
as categories for TPE. The study maximises GFLOP/s. A proposal that breaks a constraint,
and a candidate that fails to build, run or verify, is told to the study as a failed
trial, never as a slow one, so the sampler avoids its region without mistaking it for a
measured bad value. A proposal already measured is told its recorded value and asked
again; configs the study did not propose (resumed from the log, random fill when it only
proposes visited ones) are added to it as trials of their own.

In a space limited to a recorded subset (``ConfigSpace.only``, as in ``autotune replay``
of a random-subset sweep), a proposal that is valid but was not recorded is answered by
the nearest recorded config not yet measured (by knob positions): that config is
measured and the study is told its value for the proposal.
"""
from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from typing import Any, Sequence

import numpy as np

from measure import MeasureInput, MeasureResult
from search_space import Config
from search_space.space import KEPT

from .base import Tuner


@contextmanager
def quiet_optuna(optuna):
    """Optuna's info lines (a trial finished) and its notice that multivariate TPE and CMA-ES
    with margin are experimental are noise in a tuning job: silenced while the tuner calls
    Optuna, and the process's own settings (a notebook's) restored after."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        optuna.logging.set_verbosity(level)


class OptunaTuner(Tuner):
    """Base of the Optuna tuners; subclasses choose the sampler."""

    name = "optuna"
    categorical_strings = True  # string knobs as categories (TPE) or as positions (CMA-ES)

    def __init__(self, task, target, template=None, seed: int = 0, restrict: dict | None = None,
                 asks_per_config: int = 10, space=None):
        super().__init__(task, target, template, seed, restrict, space)
        import optuna
        from optuna.distributions import CategoricalDistribution, IntDistribution

        self._optuna = optuna
        self.asks_per_config = asks_per_config
        self.distributions: dict[str, Any] = {}
        for knob in self.space.knobs:
            if self.categorical_strings and not knob.is_numeric:
                self.distributions[knob.name] = CategoricalDistribution(list(knob.values))
            else:
                self.distributions[knob.name] = IntDistribution(0, len(knob) - 1)
        with quiet_optuna(optuna):
            self.study = optuna.create_study(direction="maximize", sampler=self.make_sampler(seed))
        self._pending: dict[int, list[Any]] = {}  # config index -> asked trials waiting for it
        self._values: dict[int, float | None] = {}  # measured config index -> GFLOP/s (None: failed)
        self.failed_proposals = 0  # proposals told as failed because they broke a constraint
        self._pool: np.ndarray | None = None

    def make_sampler(self, seed: int):
        raise NotImplementedError

    # -- parameters <-> configs ----------------------------------------------------------
    def _decode(self, params: dict[str, Any]) -> dict[str, Any]:
        values = {}
        for knob in self.space.knobs:
            value = params[knob.name]
            values[knob.name] = value if isinstance(self.distributions[knob.name],
                                                    self._optuna.distributions.CategoricalDistribution) \
                else knob.values[int(value)]
        return values

    def _encode(self, config: Config) -> dict[str, Any]:
        params = {}
        for knob, (name, value) in zip(self.space.knobs, config.values):
            dist = self.distributions[name]
            params[name] = value if isinstance(dist, self._optuna.distributions.CategoricalDistribution) \
                else knob.values.index(value)
        return params

    # -- ask ------------------------------------------------------------------------------
    def next_batch(self, n: int) -> list[Config]:
        with quiet_optuna(self._optuna):
            return self._next_batch(n)

    def _next_batch(self, n: int) -> list[Config]:
        batch: list[Config] = []
        asks = 0
        while len(batch) < n and asks < self.asks_per_config * n + 20:
            asks += 1
            trial = self.study.ask(self.distributions)
            values = self._decode(trial.params)
            broken = self.space.violations(values)
            if broken == [KEPT]:  # valid, but not among the recorded configs
                config = self._nearest_kept(values, exclude={c.index for c in batch})
                if config is None:
                    self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
                    continue
            elif broken:
                self.failed_proposals += 1
                self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
                continue
            else:
                config = self.space.from_values(values)
            if config.index in self._values:  # measured already: tell what was measured
                self._tell(trial, self._values[config.index])
                continue
            if config.index not in self._pending:
                batch.append(config)
            self._pending.setdefault(config.index, []).append(trial)
        if len(batch) < n:  # the sampler keeps proposing measured configs: explore at random
            taken = self.visited | {c.index for c in batch}
            batch += self.space.sample(self.rng, n - len(batch), exclude=taken)
        return batch

    def _nearest_kept(self, values: dict[str, Any], exclude: set[int]) -> Config | None:
        """The valid unmeasured config nearest to ``values`` in knob positions (ties: lowest index);
        in a space too large to enumerate, one a short walk from ``values`` reaches."""
        if len(self.space) > self.space.ENUMERATE_LIMIT:
            for _ in range(20):
                config = self.space.repair(values, self.rng)
                if config is not None and config.index not in self.visited and config.index not in exclude:
                    return config
            return None
        if self._pool is None:  # the kept configs in knob positions scaled to [0, 1], computed once
            self._pool = np.asarray(self.space.valid_indices(), dtype=np.int64)
            self._scale = np.array([max(len(k) - 1, 1) for k in self.space.knobs], dtype=np.float64)
            self._pool_digits = np.array([self.space.digits(self.space.get(int(i))) for i in self._pool],
                                         dtype=np.float64).reshape(len(self._pool), -1) / self._scale
        free = np.array([int(i) not in self.visited and int(i) not in exclude for i in self._pool], dtype=bool)
        if not free.any():
            return None
        want = np.array([k.values.index(values[k.name]) for k in self.space.knobs], dtype=np.float64) / self._scale
        distance = np.where(free, np.abs(self._pool_digits - want).sum(axis=1), np.inf)
        return self.space.get(int(self._pool[int(np.argmin(distance))]))

    # -- tell -----------------------------------------------------------------------------
    def _tell(self, trial, value: float | None) -> None:
        if value is None:
            self.study.tell(trial, state=self._optuna.trial.TrialState.FAIL)
        else:
            self.study.tell(trial, value)

    def update(self, inputs: Sequence[MeasureInput], results: Sequence[MeasureResult]) -> None:
        super().update(inputs, results)
        with quiet_optuna(self._optuna):
            self._learn(inputs, results)

    def _learn(self, inputs: Sequence[MeasureInput], results: Sequence[MeasureResult]) -> None:
        from optuna.trial import TrialState, create_trial

        for inp, res in zip(inputs, results):
            index = inp.config.index
            value = self.task.flops / res.median / 1e9 if res.ok and 0 < res.median < math.inf else None
            self._values[index] = value
            trials = self._pending.pop(index, [])
            for trial in trials:
                self._tell(trial, value)
            if not trials:  # resumed from the log or drawn at random: the study learns it too
                self.study.add_trial(create_trial(
                    state=TrialState.COMPLETE if value is not None else TrialState.FAIL, value=value,
                    params=self._encode(inp.config), distributions=self.distributions))


class OptunaTPETuner(OptunaTuner):
    name = "optuna-tpe"

    def make_sampler(self, seed: int):
        # multivariate TPE models knobs jointly (tile sizes interact); constant liar keeps a
        # batch's proposals apart while they wait to be measured
        return self._optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                                n_startup_trials=8)


class OptunaCmaEsTuner(OptunaTuner):
    name = "optuna-cmaes"
    categorical_strings = False  # CMA-ES samples numbers only: every knob by position

    def make_sampler(self, seed: int):
        # with_margin keeps integer parameters from collapsing onto one value
        return self._optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=8, with_margin=True,
                                                  warn_independent_sampling=False)
