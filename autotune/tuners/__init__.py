"""Search strategies behind one ``Tuner`` base whose ``tune`` owns the loop."""
from __future__ import annotations

from .base import Tuner, TuneSummary
from .simple import GridTuner, RandomTuner, SweepTuner
from .optuna_tuner import OptunaCmaEsTuner, OptunaTPETuner, OptunaTuner
from .xgb_tuner import XGBTuner

TUNERS: dict[str, type[Tuner]] = {"xgb": XGBTuner, "random": RandomTuner, "grid": GridTuner, "sweep": SweepTuner,
                                 "optuna-tpe": OptunaTPETuner, "optuna-cmaes": OptunaCmaEsTuner}


def make_tuner(name: str, task, target, seed: int = 0, **kwargs) -> Tuner:
    """A tuner of ``TUNERS`` by ``name`` for ``task`` on ``target``, seeded with ``seed``;
    ``kwargs`` go to its constructor (``restrict``, a tuner's own options). Raises ValueError
    for an unknown name."""
    try:
        cls = TUNERS[name]
    except KeyError:
        raise ValueError(f"unknown tuner {name!r}: choose from {', '.join(TUNERS)}") from None
    return cls(task, target, seed=seed, **kwargs)


__all__ = ["GridTuner", "OptunaCmaEsTuner", "OptunaTPETuner", "OptunaTuner", "RandomTuner", "SweepTuner", "TUNERS", "TuneSummary", "Tuner", "XGBTuner", "make_tuner"]
