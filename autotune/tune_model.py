"""A model's tuning: what to tune it for, its tasks, the scheduler, the log, MLflow, progress."""
from __future__ import annotations

import numbers
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

from records import Record, RecordLog
from runtime.model_config import ModelConfig

from .model_tasks import ModelTask, model_tasks, workload_bytes
from .progress import ProgressDisplay
from .resume_notes import other_conditions, other_tuners
from .scheduler import ClusterRounds, ModelTuneSummary, TaskScheduler
from .units import format_time


@dataclass(frozen=True)
class ModelWorkload:
    """What to tune a model for: the passes it runs and how its weights are stored."""

    config: ModelConfig
    prefill_tokens: tuple[int, ...] = (128,)
    decode_batch: tuple[int, ...] = (1,)
    kv_len: tuple[int, ...] = (512,)
    quantize: str = "none"
    group_size: int = 128
    dtype: str = "float32"  # the model's precision (runtime.plan)
    resident: bool = False  # the decode step a CUDA model captures as a graph (runtime.plan.decode_calls)
    weights: str | None = None  # the linear layers' weights when not in dtype: weight-only (runtime.plan)
    dynamic_rows: bool = False  # a prefill's linear layers take M at run time (runtime.plan, the CPU's)

    def __post_init__(self) -> None:
        # the sizes as tuples of ints, one size given alone too (a str would be read digit by digit)
        for name in ("prefill_tokens", "decode_batch", "kv_len"):
            value = getattr(self, name)
            sizes = (value,) if isinstance(value, numbers.Integral) else value
            sizes = () if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Iterable) else tuple(sizes)
            if not sizes or not all(isinstance(n, numbers.Integral) and not isinstance(n, bool) for n in sizes):
                raise ValueError(f"{name} must be a size or sizes (128 or (128, 512)), got {value!r}")
            object.__setattr__(self, name, tuple(int(n) for n in sizes))

    def tasks(self) -> list[ModelTask]:
        return model_tasks(self.config, list(self.prefill_tokens), list(self.decode_batch), list(self.kv_len),
                           self.quantize, self.group_size, dtype=self.dtype, resident=self.resident,
                           weights=self.weights, dynamic_rows=self.dynamic_rows)

    def working_set_bytes(self) -> int:
        """The most bytes one forward pass of the workload touches (weights, activations, KV
        cache): above the last-level cache, every kernel's weights come from memory."""
        return workload_bytes(self.config, list(self.prefill_tokens), list(self.decode_batch), list(self.kv_len),
                              self.quantize, self.group_size, self.dtype, self.weights)

    def params(self) -> dict:
        return {"model": self.config.name, "prefill_tokens": list(self.prefill_tokens),
                "decode_batch": list(self.decode_batch), "kv_len": list(self.kv_len), "quantize": self.quantize,
                "group_size": self.group_size, "dtype": self.dtype, "resident": self.resident,
                "weights": self.weights or self.dtype, "dynamic_rows": self.dynamic_rows,
                "parameters": self.config.parameters,
                "working_set_bytes": self.working_set_bytes()}

    def to_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.config),
                "prefill_tokens": list(self.prefill_tokens), "decode_batch": list(self.decode_batch),
                "kv_len": list(self.kv_len), "quantize": self.quantize, "group_size": self.group_size,
                "dtype": self.dtype, "resident": self.resident, "weights": self.weights,
                "dynamic_rows": self.dynamic_rows}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelWorkload":
        return cls(ModelConfig(**data["config"]), tuple(data["prefill_tokens"]),
                   tuple(data["decode_batch"]), tuple(data["kv_len"]), data["quantize"], data["group_size"],
                   data.get("dtype", "float32"), data.get("resident", False), data.get("weights"),
                   data.get("dynamic_rows", False))


class ModelProgress:
    """Progress over the whole budget, advancing per measured candidate, with the estimated
    model latency after each round."""

    def __init__(self, name: str, total: int, stream=None):
        self.display = ProgressDisplay(name, total, stream)
        self.done = 0
        self.status = ""

    def building(self, n: int) -> None:
        self.display.update(figures=f"compiling {n}  {self.status}".strip())

    def measured(self, record: Record, trial: int) -> None:
        self.done += 1
        self.display.update(self.done, f"measuring {record.task.op}  {self.status}".strip())

    def __call__(self, scheduler: TaskScheduler, index: int, records: list[Record]) -> None:
        latency = scheduler.estimated_latency()
        self.status = f"estimated {format_time(latency)} per workload" if latency < float("inf") else ""
        self.display.update(self.done, f"last: {scheduler.tasks[index].task.op}  {self.status}".strip(), line=True)

    def close(self) -> None:
        self.display.close()


class ModelMLflow:
    """Per round: each trial's GFLOP/s at its global step, and the estimated latency."""

    def __init__(self, run, first_step: int):
        self.run = run
        self.step = first_step

    def __call__(self, scheduler: TaskScheduler, index: int, records: list[Record]) -> None:
        latency = scheduler.estimated_latency()
        extra = {"estimated_latency_ms": latency * 1e3} if latency < float("inf") else {}
        self.run.log_trials_or_stop(records, self.step, extra=extra)
        self.step += len(records)


def tune_model(job, log: RecordLog, builder, runner, progress: bool, note: Callable[[str], None]) -> ModelTuneSummary:
    """Every task of ``job.model`` (a ``TuningJob``, see ``autotune.job.run_job``) over one
    budget, the scheduler choosing where each round goes."""
    from .tuning import observed

    tasks = job.model.tasks()
    keys = {t.key for t in tasks}
    resumed = [r for r in log.records(warn=False) if r.task.key in keys and r.target.key == job.target.key]
    mixed = other_conditions(resumed, job.cache_condition())
    if mixed:
        note(f"warning: {log.path} holds {mixed} of these tasks; this job times {job.cache_condition()} and resumes "
             "them as they are, so the best times mix both (use a new --log to tune in one condition only)")
    others = other_tuners(resumed, job.tuner)
    if others:
        note(f"warning: {log.path} holds records of these tasks measured by other tuners ({others}): they count "
             f"toward --trials-total as {job.tuner}'s; compare tuners on logs of their own")
    # the log's records of other shapes and variants (a fused GEMV's plain one) are where new tasks start
    cold = job.cache_condition() == "cold"
    read_rate = memory_read_rate(job.target, job.restrict, note) if cold else 0.0
    if read_rate:
        note(f"memory reads at {read_rate / 1e9:.1f} GB/s (read probe): a GEMV or decode attention at that rate "
             "leaves its rounds to other tasks")
    scheduler = TaskScheduler(tasks, job.target, job.tuner, seed=job.seed, batch=job.batch, restrict=job.restrict,
                              priors=log.records(warn=False), weights_from_memory=cold, read_rate=read_rate)
    bar = ModelProgress(f"{job.model.config.name} ({len(tasks)} tasks)", job.trials) if progress else None
    with observed(job, note, bar, lambda run, status, summary: _finish(run, log, status, summary)) as (
            tracking, outcome):
        callbacks = [c for c in (ModelMLflow(tracking.run, 0) if tracking.run else None, bar) if c is not None]
        outcome["summary"] = scheduler.tune(job.trials, builder, runner, log, on_round=callbacks)
    warn_unmeasured_defaults(scheduler, note)
    warn_stale_passed_over(outcome["summary"], log, note)
    return outcome["summary"]


def warn_stale_passed_over(summary: ModelTuneSummary, log: RecordLog, note: Callable[[str], None]) -> None:
    """Name the tasks whose resumed log holds faster records of code this version no longer
    builds: their best, here and in ``run``/``export``, is the fastest fresh record, and the job
    did not measure those configs again (they count as measured)."""
    stale = summary.stale_passed_over
    if stale:
        shown = ", ".join(f"{key} ({n})" for key, n in list(stale.items())[:3])
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        note(f"warning: {len(stale)} task(s) have faster records of code this version no longer builds (stale), "
             f"passed over: {shown}{more}; `autotune tune --remeasure-stale --log {log.path}` measures them again")


def warn_unmeasured_defaults(scheduler: TaskScheduler, note: Callable[[str], None]) -> None:
    """Name the tasks whose log lacks today's template default: their best record may be slower
    than the default itself, which a few more trials would measure."""
    missing = scheduler.unmeasured_defaults()
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        note(f"warning: {len(missing)} task(s) have no record of their template's current default ({shown}); "
             "the template's default changed since the log was tuned, or the log was tuned under another "
             "restriction. Raise --trials-total: a resumed task measures its default in its first round")


def tune_model_on_cluster(job, log: RecordLog, cluster, targets, progress: bool,
                          note: Callable[[str], None]) -> ModelTuneSummary:
    """``tune_model`` on a cluster: one scheduler per target the runners report, each handing
    rounds of different tasks to the runners at once (``ClusterRounds``), the job's budget for
    each target. The driver alone writes the log and the MLflow run. With several targets the
    summary lists every target's tasks; its estimate and history are the first target's."""
    from .tuning import _log_cluster_params, measure_on_cluster, observed, written_by_a_thread

    tasks = job.model.tasks()
    priors = log.records(warn=False)
    # the runners' memory is not probed from here: the fastest streaming task's rate stands in
    schedulers = [TaskScheduler(tasks, target, job.tuner, seed=job.seed, batch=job.batch, restrict=job.restrict,
                                priors=priors, weights_from_memory=job.cache_condition() == "cold")
                  for target in targets]
    label = f"{job.model.config.name} ({len(tasks)} tasks)"
    bar = ModelProgress(label, job.trials * len(targets)) if progress else None
    with log.lock(), observed(job, note, bar, lambda run, status, summary: _finish(run, log, status, summary)) as (
            tracking, outcome):
        if tracking.run is not None:
            _log_cluster_params(tracking.run, cluster, targets)
        callbacks = [c for c in (ModelMLflow(tracking.run, 0) if tracking.run else None, bar) if c is not None]
        with written_by_a_thread(log) as writer:  # all written before the MLflow run takes the log
            runs = [ClusterRounds(s, job.trials, cluster, log, callbacks, writer=writer) for s in schedulers]
            measure_on_cluster(cluster, lambda: [r for run in runs for r in run.next_rounds()])
        summaries = [run.summary() for run in runs]
        outcome["summary"] = summaries[0] if len(summaries) == 1 else _all_targets(summaries)
    for scheduler in schedulers:
        warn_unmeasured_defaults(scheduler, note)
    warn_stale_passed_over(outcome["summary"], log, note)
    return outcome["summary"]


def memory_read_rate(target, restrict: dict | None, note: Callable[[str], None]) -> float:
    """The memory's read bytes/s on this machine with as many threads as the job's kernels may
    take (the roofline's read probe, in a worker: about 2 s); 0.0, said through ``note``, if the
    probe fails."""
    from measure.worker import WorkerProcess

    threads = max((restrict or {}).get("threads") or [max(target.cores, 1)])
    worker = WorkerProcess(name="autotune-read-probe")
    try:
        return float(worker.call("measure.roofline:measure_read_rate", {"target": target.to_dict(),
                                                                       "threads": threads}, 120))
    except Exception as exc:  # the scheduler then estimates the rate from the tasks alone
        note(f"warning: the memory read probe failed ({type(exc).__name__}: {exc}); the scheduler "
             "estimates the memory's rate from the tuned kernels")
        return 0.0
    finally:
        worker.close()


def _all_targets(summaries: list[ModelTuneSummary]) -> ModelTuneSummary:
    first = summaries[0]
    return ModelTuneSummary([t for s in summaries for t in s.tasks], [x for s in summaries for x in s.summaries],
                            trials=sum(s.trials for s in summaries), measured=sum(s.measured for s in summaries),
                            resumed=sum(s.resumed for s in summaries), rounds=sum(s.rounds for s in summaries),
                            wall_s=max(s.wall_s for s in summaries), history=first.history,
                            given_up=[k for s in summaries for k in s.given_up],
                            stale_passed_over={k: n for s in summaries for k, n in s.stale_passed_over.items()})


def _finish(run, log: RecordLog, status: str, summary: ModelTuneSummary | None) -> None:
    with run.closing_uploads():  # Tracking then ends the run, or says it could not
        if summary is not None:
            run.log_json("model_tasks.json", [
                {"task": t.key, "weight": t.weight, "uses": t.uses,
                 "best_seconds": s.best.seconds if s.best else None, "config": s.best.config if s.best else None,
                 "trials": s.trials} for t, s in zip(summary.tasks, summary.summaries)])
        if log.path.exists():
            run.log_artifact(log.path)
