"""One tuning job, described once and run one way.

A ``TuningJob`` says what to tune (one operator instance, or every kernel of a model), where
(the target), how (tuner, budget, batch, seed, restriction, timing, timeouts, the cost
model's transfer) and where the measurements go (the log, MLflow). The CLI's ``tune``,
``sweep`` and ``tune-model``, the Python API and the notebooks all build one and hand it to
``run_job``; its ``params()`` are what MLflow records, and ``to_dict``/``from_dict`` carry
it to another process.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
import sys
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

from measure import LocalBuilder, LocalRunner, TimingPolicy
from measure.backends import get_backend
from measure.timing import CACHE_CONDITIONS, cache_condition, condition_of, policy_for
from records import LogLockedError, LogWriteError, RecordLog, load_records
from search_space import Target, Task, get_template
from search_space.space import knob_values

from .scheduler import ModelTuneSummary
from .tune_model import ModelWorkload, tune_model, tune_model_on_cluster
from .tuners import TUNERS, TuneSummary
from .tuning import pretrained_model, remeasure_task, tune_task, tune_task_on_cluster, with_priors


# A model job's timing unless the job gives one: each sample the fastest of 3 runs
# (``TimingPolicy.best_of``). The scheduler sets each task's template default against a few
# candidates; on a shared machine the default's samples can mostly fall inside an episode of
# other work, and a candidate that met none then replaces a default that is faster in the model.
MODEL_TIMING = TimingPolicy(best_of=3)


class JobError(ValueError):
    """The job cannot run as described (bad input): one line for the user."""


@dataclass(frozen=True)
class TuningJob:
    """What to tune, where, how, and where to keep the measurements.

    Exactly one of ``task`` (one operator instance) and ``model`` (every kernel a model's
    passes call, one budget over all of them) is given. ``trials`` counts the records
    already in the log. ``timing=None`` keeps the runner's default. ``cache`` says in which
    cache condition candidates are timed on the CPU (``cache_condition``): "cold" (inputs out
    of cache, as a model too large for the last-level cache runs each kernel), "warm" (inputs in
    cache: for a model, copies filling what one pass touches; for an operator, the same buffers
    every call) or "auto": a model job decides from the bytes one forward pass touches, an
    operator job times warm. A model job
    without ``timing`` takes best-of-3 samples (``MODEL_TIMING``).
    ``transfer_from`` (one log or several), ``load_model`` and ``save_model`` give the xgb
    tuner's cost model a start and keep it; ``tuner_options`` go to the tuner as they are;
    ``timing`` is a ``measure.TimingPolicy``; ``extra_params`` are recorded
    in MLflow beside the job's own. ``remeasure_stale``: instead of searching, measure again
    the configs of the task's stale records in the log (``records.stale_configs``), appending
    fresh records; the tuner and the budget are not used.
    ``cluster``: ``"ray"`` or ``"ray://HOST:PORT"`` measures on a Ray cluster
    (``measure.cluster``): one tuner (one scheduler for a model) per target its runners report,
    each with the job's budget; ``runner_cpus``: the cores a CPU host's runner times on (the
    rest of the host compiles). None measures here, and Ray is never imported.

    ``seed`` seeds the tuner and the inputs: with the same seed and the same measurements the
    same configs are proposed. Real timings are noisy, so the model-based tuners (xgb,
    optuna-tpe, optuna-cmaes) diverge from an earlier run once their measurements differ;
    random and grid proposals do not depend on timings at all.

    A job is checked when built (JobError): the task against its operator's template for the
    target, the numbers (numpy integers are taken), the restriction against the task's space
    (one value may be given alone: ``{"threads": 1}``). ``run_job`` checks the rest (the log,
    the GPU, a space with no valid config) before anything starts.
    """

    target: Target
    task: Task | None = None
    model: ModelWorkload | None = None
    tuner: str = "xgb"
    trials: int = 64
    batch: int = 8
    seed: int = 0
    log: str = "tune.jsonl"
    restrict: Mapping[str, list] | None = None
    tuner_options: Mapping[str, Any] = field(default_factory=dict)
    transfer_from: tuple[str, ...] = ()
    load_model: str | None = None
    save_model: str | None = None
    mlflow: bool = True
    tracking_uri: str | None = None
    experiment: str = "llm-autotune"
    build_timeout: float = 60.0
    run_timeout: float = 20.0
    timing: TimingPolicy | None = None
    cache: str = "auto"
    extra_params: Mapping[str, Any] = field(default_factory=dict)
    remeasure_stale: bool = False
    cluster: str | None = None
    runner_cpus: int = 1
    time_limit: float | None = None
    early_stopping: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.target, Target):
            raise JobError(f"target must be a Target (Target.host(), Target.from_name('sm_90a')), got {self.target!r}")
        if (self.task is None) == (self.model is None):
            raise JobError("a tuning job tunes either one task or one model")
        if self.task is not None and not isinstance(self.task, Task):
            raise JobError(f"task must be a Task (Task.make(op, dims)), got {self.task!r}")
        if self.model is not None and not isinstance(self.model, ModelWorkload):
            raise JobError(f"model must be a ModelWorkload, got {type(self.model).__name__}")
        if self.task is not None:  # said now, not as the first candidate fails inside run_job
            try:
                get_template(self.task.op, self.target.kind).check(self.task)
            except ValueError as exc:
                raise JobError(f"task {self.task.key}: {exc}") from None
        if not isinstance(self.tuner, str) or self.tuner not in TUNERS:
            raise JobError(f"unknown tuner {self.tuner!r}: choose from {', '.join(TUNERS)}")
        for name, least in (("trials", 1), ("batch", 1), ("seed", 0), ("runner_cpus", 1)):
            value = getattr(self, name)
            # numpy's integers too (np.int64(8)), kept as a Python int: the job goes to JSON
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < least:
                raise JobError(f"{name} must be an integer >= {least}, got {value!r}")
            object.__setattr__(self, name, int(value))
        if not isinstance(self.log, (str, os.PathLike)) or not os.fspath(self.log).strip():
            raise JobError(f"log must name the log file (a str or a path), got {self.log!r}")
        if self.restrict is not None:
            self._check_restrict()
        for name in ("build_timeout", "run_timeout", "time_limit"):
            value = getattr(self, name)
            if name == "time_limit" and value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise JobError(f"{name.replace('_', '-')} must be a number of seconds > 0, got {value!r}")
        if self.early_stopping is not None:
            if not isinstance(self.early_stopping, numbers.Integral) or isinstance(self.early_stopping, bool) \
                    or self.early_stopping < 1:
                raise JobError(f"early-stopping must be an integer >= 1, got {self.early_stopping!r}")
            object.__setattr__(self, "early_stopping", int(self.early_stopping))
        if (self.time_limit is not None or self.early_stopping is not None) and (
                self.model is not None or self.cluster is not None or self.remeasure_stale):
            raise JobError("time-limit and early-stopping end the search of one task tuned here "
                           "(not a model's, a cluster's or --remeasure-stale)")
        if (self.transfer_from or self.load_model or self.save_model) and self.tuner != "xgb":
            raise JobError("transfer_from, load_model and save_model need the xgb tuner")
        if self.mlflow and (not isinstance(self.experiment, str) or not self.experiment.strip()):
            raise JobError(f"experiment must name an MLflow experiment, got {self.experiment!r}")
        if self.timing is not None and not isinstance(self.timing, TimingPolicy):
            raise JobError(f"timing must be a measure.TimingPolicy (TimingPolicy(repeats=7, min_sample_s=0.005)), "
                           f"got {self.timing!r}")
        if not isinstance(self.tuner_options, Mapping):
            raise JobError(f"tuner_options must map option names to values, got {self.tuner_options!r}")
        if self.cache not in ("auto", *CACHE_CONDITIONS):
            raise JobError(f"unknown cache condition {self.cache!r}: use auto, cold or warm")
        if self.model is not None and not self.target.uses_cpu_threads and self.restrict:
            raise JobError("a restriction (threads) is for the cpu target")
        if self.remeasure_stale and self.task is None:
            raise JobError("remeasure_stale measures one task's stale records again: give a task, not a model")
        if self.cluster is not None:
            from measure.cluster import parse_cluster_address  # reads the address; Ray is not imported

            try:
                parse_cluster_address(self.cluster)
            except ValueError as exc:
                raise JobError(str(exc)) from None
        # one log may be given alone: a str is a path, not its characters
        given = (self.transfer_from,) if isinstance(self.transfer_from, (str, os.PathLike)) else self.transfer_from
        given = list(given) if isinstance(given, Iterable) else [given]
        if not all(isinstance(p, (str, os.PathLike)) for p in given):
            raise JobError(f"transfer_from must name tuning logs (a path or several), got {self.transfer_from!r}")
        object.__setattr__(self, "transfer_from", tuple(os.fspath(p) for p in given))
        object.__setattr__(self, "log", str(self.log))

    def _check_restrict(self) -> None:
        """``restrict`` as {knob: [values]} (one value may be given alone), checked against the
        task's space here; on a cluster the runners' spaces are checked when they report."""
        if not isinstance(self.restrict, Mapping):
            raise JobError(f"restrict must map knob names to values, like {{'threads': [1]}}, got {self.restrict!r}")
        restrict = {str(name): list(knob_values(values)) for name, values in self.restrict.items()}
        object.__setattr__(self, "restrict", restrict or None)
        if self.task is not None and restrict and self.cluster is None:
            try:
                get_template(self.task.op, self.target.kind).space(self.task, self.target).restrict(**restrict)
            except ValueError as exc:
                raise JobError(f"restrict: {exc}") from None

    @property
    def name(self) -> str:
        """The MLflow run name: tuner and what it tunes."""
        what = self.task.key if self.task is not None else f"model:{self.model.config.name}"
        return f"{'remeasure' if self.remeasure_stale else self.tuner}:{what}"

    def cache_condition(self) -> str | None:
        """"cold" or "warm": the cache condition CPU candidates are timed in (None on the GPU,
        whose runner times as it always has). With ``cache="auto"`` a model job times cold when
        one forward pass touches more bytes than the last-level cache holds (each kernel's
        weights then come from memory, as in a 7B model) and warm when the model stays in cache
        from one pass to the next (``measure.timing.cache_condition``)."""
        if not get_backend(self.target.kind).cache_conditions:
            return None
        if self.cache != "auto":
            return self.cache
        if self.model is None:
            return condition_of(self.timing or TimingPolicy())
        return cache_condition(self.model.working_set_bytes(), self.target)

    def params(self) -> dict[str, Any]:
        """What MLflow records about the job."""
        out: dict[str, Any] = {"target": self.target.key, "device": self.target.device_name, "tuner": self.tuner,
                               "batch": self.batch, "seed": self.seed, "log": self.log}
        condition = self.cache_condition()
        if condition is not None:
            out["cache"] = condition
        if self.task is not None:
            out.update(op=self.task.op, task=self.task.key, shape=self.task.dims, dtype=self.task.dtype,
                       trials=self.trials, restrict=dict(self.restrict or {}))
            out.update({k: v for k, v in (("time_limit", self.time_limit), ("early_stopping", self.early_stopping))
                        if v is not None})
        else:
            out.update(self.model.params(), trials_total=self.trials, tasks=len(self.model.tasks()))
        if self.transfer_from or self.load_model or self.save_model:
            out.update(transfer_from=list(self.transfer_from), load_model=self.load_model or "",
                       save_model=self.save_model or "")
        if self.remeasure_stale:
            out["remeasure_stale"] = True
        if self.cluster is not None:
            out.update(cluster=self.cluster, runner_cpus=self.runner_cpus)
        return {**out, **self.extra_params}

    def tags(self) -> dict[str, str]:
        if self.task is not None:
            return {"task": self.task.key, "target": self.target.key}
        return {"model": self.model.config.name, "target": self.target.key, "job": "tune-model"}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description; ``from_dict`` reads it back."""
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["target"] = self.target.to_dict()
        data["task"] = self.task.to_dict() if self.task is not None else None
        data["model"] = self.model.to_dict() if self.model is not None else None
        data["timing"] = asdict(self.timing) if self.timing is not None else None
        data["transfer_from"] = list(self.transfer_from)
        data["restrict"] = dict(self.restrict) if self.restrict else None
        data["tuner_options"], data["extra_params"] = dict(self.tuner_options), dict(self.extra_params)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TuningJob":
        fields = dict(data)
        fields["target"] = Target.from_dict(fields["target"])
        fields["task"] = Task.from_dict(fields["task"]) if fields.get("task") else None
        fields["model"] = ModelWorkload.from_dict(fields["model"]) if fields.get("model") else None
        fields["timing"] = TimingPolicy(**fields["timing"]) if fields.get("timing") else None
        fields["transfer_from"] = tuple(fields.get("transfer_from") or ())
        return cls(**fields)


def _print_note(text: str) -> None:
    print(text, file=sys.stderr)


def run_job(job: TuningJob, progress: bool = True, builder=None, runner=None,
            note: Callable[[str], None] = _print_note) -> TuneSummary | ModelTuneSummary:
    """Run ``job``: resume from its log, measure up to its budget, log every record as it is
    measured (and to MLflow), return the summary. ``builder``/``runner`` replace the local
    ones (tests, replay); ``note`` receives one-line remarks (what the cost model started from).

    Raises JobError before measuring anything when the job's inputs cannot be used (a log
    that is not a tuning log or cannot be written, a task whose space, restricted, holds no
    valid config, a CUDA target without this machine's GPU to measure on), LogLockedError when
    another job holds the log, and ``measure.cluster.ClusterError`` when a job's cluster cannot
    be used."""
    if job.task is not None and not job.remeasure_stale and job.cluster is None:
        check_space(job.task, job.target, job.restrict)  # a cluster's runners' spaces are checked as they report
    log = writable_log(job.log)
    if job.cluster is not None and builder is None and runner is None:
        return _run_on_cluster(job, log, progress, note)
    if runner is None:
        check_local_gpu(job.target)
    if builder is None:
        check_compiler(job.target)
    with ExitStack() as stack:
        builder = builder or stack.enter_context(LocalBuilder(timeout_s=job.build_timeout))
        runner = runner or stack.enter_context(_runner(job))
        if job.task is not None and job.remeasure_stale:
            return remeasure_task(job, log, builder, runner, progress, note)
        if job.task is not None:
            return tune_task(job, log, builder, runner, _tuner_options(job, note), progress, note)
        return tune_model(job, log, builder, runner, progress, note)


def writable_log(path: str) -> RecordLog:
    """The job's log, checked as the CLI's ``--log`` is (``RecordLog.check_writable``): a file
    that is not a tuning log, a compressed one, one in a missing directory is bad input, said
    before anything starts. A log another job holds stays a LogLockedError."""
    log = RecordLog(path)
    try:
        log.check_writable()
    except LogLockedError:
        raise
    except LogWriteError as exc:
        raise JobError(str(exc)) from None
    return log


def check_space(task: Task, target: Target, restrict: Mapping[str, list] | None) -> None:
    """A space (restricted) with no valid config would run zero trials and look like success:
    bad input. A space merely spent by the log's records is not this (the job resumes them)."""
    space = get_template(task.op, target.kind).space(task, target)
    try:
        space = space.restrict(**restrict) if restrict else space
    except ValueError as exc:
        raise JobError(f"restrict: {exc}") from None
    if not space.has_valid_config():
        if restrict:
            raise JobError(f"the restriction {dict(restrict)} leaves no valid config of {task.key} on {target.key}")
        raise JobError(f"no config of {task.key} is valid on {target.key}")


def check_compiler(target: Target) -> None:
    """A CUDA job's candidates are built by nvcc here: without it every candidate would be
    recorded as a COMPILE_ERROR, and a rerun would take those as done."""
    if target.kind != "cuda":
        return
    from measure.compile_cuda import CudaCompileError, nvcc_path

    try:
        nvcc_path()
    except CudaCompileError as exc:
        raise JobError(str(exc)) from None


def check_local_gpu(target: Target) -> None:
    """A CUDA job measured here needs this machine's GPU 0, of the job's arch: without one every
    candidate would be recorded as a failure, and a rerun would take those as done. The CLI's
    ``resolve_target`` refuses the same before it builds a job."""
    if target.kind != "cuda":
        return
    try:
        gpu = Target.cuda(0)
    except Exception as exc:  # no pycuda, no driver, no device
        raise JobError(f"cuda target unavailable: {exc}") from None
    if gpu.arch != target.arch:
        raise JobError(f"target {target.key}: this machine's GPU 0 is {gpu.arch} ({gpu.device_name}): "
                       "measure with Target.cuda()")


def _runner(job: TuningJob):
    """The runner for the job's target: the GPU's, or a local CPU one timing as the job says."""
    return LocalRunner(timeout_s=job.run_timeout, seed=job.seed, policy=runner_policy(job, job.target),
                       kind=job.target.kind)


def model_timing(target: Target) -> TimingPolicy:
    """How a model job without ``timing`` times candidates on ``target``: best-of-3 samples on
    the CPU (``MODEL_TIMING``), the runner's own timing on a GPU."""
    backend = get_backend(target.kind)
    return MODEL_TIMING if backend.cache_conditions else backend.default_policy


def runner_policy(job: TuningJob, target: Target) -> TimingPolicy | None:
    """How candidates of ``job`` are timed on ``target`` (None: the runner's default)."""
    if not get_backend(target.kind).cache_conditions:  # times as it always has (a GPU flushes L2)
        return job.timing
    policy = job.timing if job.timing is not None or job.model is None else model_timing(target)
    if job.cache != "auto" or job.model is not None:
        # cold: as in a model too big for the cache, each kernel's weights come from memory;
        # warm: as in one that fits, they are still in cache from the previous pass
        pass_bytes = job.model.working_set_bytes() if job.model is not None else 0
        policy = policy_for(job.cache_condition(), target, policy, pass_bytes)
    return policy


def _run_on_cluster(job: TuningJob, log: RecordLog, progress: bool, note: Callable[[str], None]):
    """``run_job`` on a Ray cluster: place the runners, learn their targets, tune on each."""
    from measure.cluster import open_cluster

    # before the cluster starts: a log that cannot be pre-trained on is bad input, said at once
    options = _tuner_options(job, note) if job.task is not None and not job.remeasure_stale else {}
    with open_cluster(job.cluster, build_timeout=job.build_timeout, runner_cpus=job.runner_cpus,
                      note=note) as cluster:
        targets = cluster.start_runners(job.target.kind, run_timeout=job.run_timeout, seed=job.seed)
        for target in targets:
            cluster.set_policy(target.key, runner_policy(job, target))
        note(f"Ray cluster {job.cluster}: {len(cluster.runners)} runner(s) measuring "
             f"{', '.join(f'{t.key} ({t.device_name or t.arch})' for t in targets)}; "
             f"builds on {cluster.build_cpus} CPU(s)")
        _check_restriction(job, targets)
        if job.task is not None and job.remeasure_stale:  # the stale records of the job's own target
            here = next((t for t in targets if t.key == job.target.key), None)
            if here is None:
                raise JobError(f"no runner of the cluster measures {job.target.key}, the target of these records")
            return remeasure_task(dataclasses.replace(job, target=here), log, cluster, cluster, progress, note)
        if job.task is not None:
            return tune_task_on_cluster(job, log, cluster, targets, options, progress, note)
        return tune_model_on_cluster(job, log, cluster, targets, progress, note)


def _check_restriction(job: TuningJob, targets: list[Target]) -> None:
    """A restriction (--threads) that a runner's space cannot take is bad input, said at once."""
    if not job.restrict:
        return
    tasks = [job.task] if job.task is not None else [t.task for t in job.model.tasks()]
    for target in targets:
        for task in tasks:
            try:
                check_space(task, target, job.restrict)
            except JobError as exc:
                raise JobError(f"{task.op} on the cluster's {target.key} runners ({target.cores} core(s) each): "
                               f"{exc}") from None


def _tuner_options(job: TuningJob, note: Callable[[str], None]) -> dict[str, Any]:
    """The tuner's options for one task: the job's own, and for xgb its priors (``seeds``) and
    its starting model (``base_model``), the ``transfer_from`` logs read once for both."""
    if job.tuner != "xgb":
        return dict(job.tuner_options)
    records = _transfer_records(job)
    options = with_priors(job.tuner, job.task, job.target, records, job.tuner_options)
    base = _base_model(job, records, note)
    if base is not None:
        options["base_model"] = base
    return options


def _transfer_records(job: TuningJob) -> list:
    """The records of the ``transfer_from`` logs (lines that cannot be read are skipped with a
    warning, as in the job's own log); logs that cannot be read, or hold no record, are bad
    input: the job would run without the transfer it was asked for."""
    if not job.transfer_from:
        return []
    try:
        records = load_records(job.transfer_from)
    except OSError as exc:  # LogReadError, or a log that does not exist
        raise JobError(f"--transfer-from: {exc}") from None
    if not records:
        raise JobError(f"--transfer-from: {', '.join(job.transfer_from)} hold(s) no record: nothing to pre-train on")
    return records


def _base_model(job: TuningJob, records: list, note: Callable[[str], None]):
    """The xgb tuner's starting model: loaded, then pre-trained on other tasks' records."""
    if not (job.transfer_from or job.load_model):
        return None
    try:
        base, text = pretrained_model(records, job.load_model, job.task, job.target, job.seed)
    except ValueError as exc:
        raise JobError(str(exc)) from None
    if text:
        note(text)
    return base
