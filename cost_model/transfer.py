"""Transfer: pre-train a cost model on measurements of other tasks.

Measurements of other shapes or other operators become rows laid out in the columns of
the model being trained (knobs by name, shared features by name; what a task lacks stays
NaN), each task its own ranking group with labels normalised to that task's best. The
tuner of a new task ranks with this model until the task has measurements of its own
(``autotune.tuners.xgb_tuner``).

Samples are duck-typed: anything with ``task``, ``target``, ``config`` (knob values by
name) and ``result`` (a ``MeasureResult``), such as a tuning log's records.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np

from search_space import get_template

from .features import FeatureExtractor
from .xgb_model import XGBConfig, XGBCostModel


@dataclass
class TrainingSet:
    """Rows from many tasks: features, throughput (FLOP/s, failures 0) and the task group of each."""

    features: np.ndarray
    throughput: np.ndarray
    groups: np.ndarray
    columns: list[str]
    tasks: list[str] = field(default_factory=list)  # group number -> task key
    skipped: int = 0  # samples whose operator, shape or config the templates no longer know

    def __len__(self) -> int:
        return len(self.throughput)


def throughput_of(task, result) -> float:
    """FLOP/s of a measurement; 0 for a failed one (the ranking labels' zero)."""
    seconds = result.median if result.ok else math.inf
    return task.flops / seconds if 0 < seconds < math.inf else 0.0


def training_set(samples: Iterable[Any], columns: Sequence[str],
                 exclude: Iterable[tuple[str, str]] = ()) -> TrainingSet:
    """Rows of ``samples`` in ``columns``, skipping tasks keyed (task key, target key) in ``exclude``."""
    excluded = set(exclude)
    by_task: dict[tuple[str, str], list[Any]] = {}
    for sample in samples:
        key = (sample.task.key, sample.target.key)
        if key not in excluded:
            by_task.setdefault(key, []).append(sample)
    rows: list[np.ndarray] = []
    throughput: list[float] = []
    groups: list[int] = []
    tasks: list[str] = []
    skipped = 0
    for key, items in by_task.items():
        task, target = items[0].task, items[0].target
        try:
            template = get_template(task.op, target.kind)
            space = template.space(task, target)
        except (ValueError, KeyError):
            skipped += len(items)
            continue
        extractor = FeatureExtractor(template, task, target, space, columns=columns)
        group = len(tasks)
        used = 0
        for sample in items:
            try:
                config = space.from_values(sample.config)
            except (KeyError, ValueError):  # another template version: knobs changed
                skipped += 1
                continue
            rows.append(extractor.row(config, getattr(sample.result, "stats", None)))
            throughput.append(throughput_of(task, sample.result))
            groups.append(group)
            used += 1
        if used:
            tasks.append(f"{key[0]}@{key[1]}")
    features = np.stack(rows) if rows else np.zeros((0, len(columns)), dtype=np.float32)
    return TrainingSet(features, np.asarray(throughput, dtype=np.float64), np.asarray(groups, dtype=np.int64),
                       list(columns), tasks, skipped)


def best_configs_elsewhere(records: Iterable[Any], task, target, per_task: int = 4) -> list[dict[str, Any]]:
    """The knob values of the ``per_task`` fastest verified configs of every other task of
    ``task``'s operator (or of one sharing its template's schedule: ``Template.schedule_family``)
    on ``target``'s kind, best first, fastest tasks' picks interleaved: where a search on a new
    shape starts when logs of other shapes are given (``--transfer-from``)."""
    ops = {task.op, *get_template(task.op, target.kind).schedule_family}
    by_task: dict[str, list[Any]] = {}
    for record in records:
        if (record.task.op in ops and record.target.kind == target.kind and record.task.key != task.key
                and record.ok):
            by_task.setdefault(f"{record.task.key}@{record.target.key}", []).append(record)
    ranked = [sorted(items, key=lambda r: r.result.median)[:per_task] for _, items in sorted(by_task.items())]
    seeds: list[dict[str, Any]] = []
    for rank in range(per_task):  # each task's best, then each task's second best, ...
        for items in ranked:
            if rank < len(items) and dict(items[rank].config) not in seeds:
                seeds.append(dict(items[rank].config))
    return seeds


def pretrain(data: TrainingSet, config: XGBConfig | None = None, seed: int = 0,
             base: XGBCostModel | None = None) -> XGBCostModel:
    """A model fitted on ``data`` (continuing from ``base`` when given).

    Raises ValueError when no task in ``data`` has a verified measurement to learn from.
    """
    useful = {int(g) for g in np.unique(data.groups) if np.max(data.throughput[data.groups == g]) > 0}
    if not useful:
        raise ValueError("nothing to pre-train on: no verified measurement of another task")
    mask = np.isin(data.groups, sorted(useful))
    model = XGBCostModel(config, seed=seed, base=base)
    return model.fit(data.features[mask], data.throughput[mask], data.groups[mask], feature_names=data.columns)
