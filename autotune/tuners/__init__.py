"""Search strategies behind one ``Tuner`` base whose ``tune`` owns the loop."""
from __future__ import annotations

from .base import Tuner, TuneSummary
from .simple import GridTuner, RandomTuner
from .xgb_tuner import XGBTuner

TUNERS: dict[str, type[Tuner]] = {"xgb": XGBTuner, "random": RandomTuner, "grid": GridTuner}


def make_tuner(name: str, task, target, seed: int = 0, **kwargs) -> Tuner:
    try:
        cls = TUNERS[name]
    except KeyError:
        raise ValueError(f"unknown tuner {name!r}: choose from {', '.join(TUNERS)}") from None
    return cls(task, target, seed=seed, **kwargs)


__all__ = ["GridTuner", "RandomTuner", "TUNERS", "TuneSummary", "Tuner", "XGBTuner", "make_tuner"]
