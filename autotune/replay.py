"""Replay: run tuners against recorded measurements, without compiling or measuring.

A sweep log (``autotune sweep``) holds measurements of a whole space or of a random
subset of it. ``RecordedSpace`` limits the task's space to the recorded configs, and
``ReplayRunner`` answers every candidate with its recorded result, so any tuner runs
through its ordinary ``Tuner.tune`` loop in milliseconds per trial and many seeds can
be compared exactly on the same data (Kernel Tuner's simulation mode does the same).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

import numpy as np

from cost_model import LIVE_MARGIN, FeatureExtractor, XGBConfig, XGBCostModel, pairwise_accuracy
from cost_model.transfer import pretrain, throughput_of, training_set
from measure import BuildResult, MeasureError, MeasureInput, MeasureResult
from records import Record
from search_space import ConfigSpace, Target, Task, Template, get_template

from .tuners import Tuner, XGBTuner, make_tuner

STATISTICS = ("median", "min")
TRANSFER = "xgb+transfer"  # the xgb tuner starting from a model pre-trained on other tasks


class ReplayBuilder:
    """Builds nothing: the recording already holds each candidate's outcome."""

    def build(self, inputs: list[MeasureInput]) -> list[BuildResult]:
        return [BuildResult(None, None) for _ in inputs]


class ReplayRunner:
    """Answers each candidate with its recorded result (an unrecorded config is INVALID_CONFIG)."""

    def __init__(self, results: dict[int, MeasureResult]):
        self.results = results
        self.calls = 0

    def run(self, inputs: list[MeasureInput], builds: list[BuildResult]) -> list[MeasureResult]:
        self.calls += len(inputs)
        return [self.results.get(inp.config.index) or MeasureResult.failed(
            MeasureError.INVALID_CONFIG, "not recorded in the sweep") for inp in inputs]


@dataclass
class RecordedSpace:
    """One task's recorded measurements and the space limited to them."""

    task: Task
    target: Target
    template: Template
    space: ConfigSpace              # the template's space, limited to the recorded configs
    results: dict[int, MeasureResult]  # config index in ``space`` -> recorded result
    records: list[Record] = field(default_factory=list)
    outside: int = 0                # records whose config the template no longer has

    @classmethod
    def from_records(cls, records: Iterable[Record], statistic: str = "median") -> list["RecordedSpace"]:
        """One RecordedSpace per (task, target) in ``records``; the last record of a config wins.

        ``statistic`` is the recorded time each candidate is answered with: ``median`` (what a
        tuning job ranks by) or ``min`` of the timed samples (robust to other work on a busy
        machine, which only ever adds time).
        """
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}: use {' or '.join(STATISTICS)}")
        grouped: dict[tuple[str, str], list[Record]] = {}
        for record in records:
            grouped.setdefault((record.task.key, record.target.key), []).append(record)
        spaces = []
        for items in grouped.values():
            task, target = items[0].task, items[0].target
            template = get_template(task.op, target.kind)
            full = template.space(task, target)
            results: dict[int, MeasureResult] = {}
            kept: list[Record] = []
            outside = 0
            for record in items:
                try:
                    index = full.index_of(record.config)
                except (KeyError, ValueError):
                    outside += 1
                    continue
                result = record.result
                if statistic == "min" and result.ok:
                    result = replace(result, costs=(min(result.costs),))
                results[index] = result
                kept.append(record)
            if any(result.ok for result in results.values()):  # with no verified config there is no best to reach
                spaces.append(cls(task, target, template, full.only(sorted(results)), results, kept, outside))
        return spaces

    @property
    def key(self) -> str:
        return self.task.key

    def gflops(self) -> np.ndarray:
        """GFLOP/s of every recorded config (0 for failures), in ``sorted(results)`` order."""
        return np.array([throughput_of(self.task, self.results[i]) / 1e9 for i in sorted(self.results)])

    @property
    def best_gflops(self) -> float:
        values = self.gflops()
        return float(values.max()) if len(values) else 0.0

    def share_within(self, fraction: float) -> float:
        """Share of the recorded configs at or above ``fraction`` of the best: how easy the space is."""
        values = self.gflops()
        return float(np.mean(values >= fraction * self.best_gflops)) if len(values) else math.nan

    def summary(self) -> dict:
        from .units import format_rate

        values = self.gflops()
        best_seconds = self.task.flops / (self.best_gflops * 1e9) if self.best_gflops > 0 else math.nan
        return {"task": self.task.key, "target": self.target.key, "op": self.task.op, "configs": len(values),
                "failed": int(np.sum(values <= 0)), "best_gflops": self.best_gflops,
                # as tune and best print it: GB/s for a memory-bound operator
                "best_rate": format_rate(self.task, best_seconds),
                "median_gflops": float(np.median(values[values > 0])) if np.any(values > 0) else 0.0,
                "share_within_90": self.share_within(0.90), "share_within_95": self.share_within(0.95),
                "outside_space": self.outside}


@dataclass
class Trajectory:
    """One tuner run on a recording: GFLOP/s of each trial in order, plus the model's quality."""

    tuner: str
    seed: int
    gflops: list[float]
    wall_s: float
    heldout_accuracy: float = math.nan   # a model of the measured configs, ranking all the others
    live_accuracy: float = math.nan      # mean of the live per-batch pairwise accuracies
    live_topk_recall: float = math.nan

    def best_so_far(self) -> np.ndarray:
        return np.maximum.accumulate(np.asarray(self.gflops, dtype=np.float64)) if self.gflops else np.zeros(0)

    def trials_to(self, target_gflops: float) -> int | None:
        """The first trial (1-based) whose best so far reaches ``target_gflops``, or None."""
        hits = np.nonzero(self.best_so_far() >= target_gflops)[0]
        return int(hits[0]) + 1 if len(hits) else None


def pretrain_for(space: RecordedSpace, records: Sequence[Record], config: XGBConfig | None = None,
                 seed: int = 0) -> XGBCostModel:
    """A model pre-trained on ``records`` of other tasks, laid out in ``space``'s feature columns.

    Records of the replayed task itself are left out: the model must not have seen the answers.
    """
    columns = FeatureExtractor(space.template, space.task, space.target, space.space).names
    data = training_set(records, columns, exclude=[(space.task.key, space.target.key)])
    return pretrain(data, config, seed)


def heldout_accuracy(space: RecordedSpace, measured: set[int], model: XGBCostModel | None = None,
                     config: XGBConfig | None = None, seed: int = 0, margin: float = LIVE_MARGIN) -> float:
    """Pairwise accuracy on the recorded configs not in ``measured``.

    ``model`` is used as it is (a tuner's); without it a fresh model is fitted on ``measured``.
    Pairs closer than ``margin`` (relative) are left out, as in the live figures.
    """
    rest = [i for i in sorted(space.results) if i not in measured]
    if len(rest) < 2:
        return math.nan
    extractor = (model_features(model, space) if model is not None
                 else FeatureExtractor(space.template, space.task, space.target, space.space))
    if model is None:
        seen = sorted(measured)
        throughput = np.array([throughput_of(space.task, space.results[i]) for i in seen])
        if len(seen) < 2 or throughput.max() <= 0:
            return math.nan
        model = XGBCostModel(config, seed=seed).fit(extractor.matrix([space.space.get(i) for i in seen]),
                                                     throughput, feature_names=extractor.names)
    predicted = model.predict(extractor.matrix([space.space.get(i) for i in rest]))
    truth = np.array([throughput_of(space.task, space.results[i]) for i in rest])
    return pairwise_accuracy(predicted, truth, margin)


def model_features(model: XGBCostModel, space: RecordedSpace) -> FeatureExtractor:
    return FeatureExtractor(space.template, space.task, space.target, space.space, columns=model.feature_names)


def replay_tuner(space: RecordedSpace, tuner: str, seed: int, trials: int, batch: int = 8,
                 base_model: XGBCostModel | None = None, model_config: XGBConfig | None = None,
                 tuner_options: dict | None = None, log=None, transfer_seeds: Sequence[dict] = ()) -> Trajectory:
    """Run one tuner for ``trials`` trials on the recording; ``log`` (a RecordLog) keeps its records.
    The xgb tuner starts from the template's seed configs, ``xgb+transfer`` also from
    ``transfer_seeds`` (the best configs of the other shapes, ``best_configs_elsewhere``); a seed
    the sweep did not record is skipped (its time is unknown here)."""
    options = dict(tuner_options or {})
    name = "xgb" if tuner == TRANSFER else tuner
    if name == "xgb":
        options.setdefault("model_config", model_config)
        seeds = list(transfer_seeds) if tuner == TRANSFER else []
        options.setdefault("seeds", seeds + space.template.seed_configs(space.task, space.target))
        if tuner == TRANSFER:
            if base_model is None:
                raise ValueError(f"{TRANSFER} needs a pre-trained model (--transfer-from)")
            options["base_model"] = base_model
    instance: Tuner = make_tuner(name, space.task, space.target, seed=seed, template=space.template,
                                 space=space.space, **options)
    start = time.perf_counter()
    summary = instance.tune(min(trials, len(space.results)), ReplayBuilder(), ReplayRunner(space.results),
                            batch_size=batch, log=log)
    wall = time.perf_counter() - start
    records = summary.records
    gflops = [throughput_of(space.task, r.result) / 1e9 for r in records]
    measured = {r.config_index for r in records}
    model = instance.model if isinstance(instance, XGBTuner) and instance.model.fitted else None
    accuracy = heldout_accuracy(space, measured, model, model_config, seed)
    live = [r.model for r in records if "pairwise_accuracy" in r.model]
    recall = [r.model["topk_recall"] for r in records if "topk_recall" in r.model]
    return Trajectory(tuner, seed, gflops, wall, accuracy,
                      float(np.mean([m["pairwise_accuracy"] for m in live])) if live else math.nan,
                      float(np.mean(recall)) if recall else math.nan)
