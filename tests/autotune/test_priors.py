"""Priors of the search: seed configs a template declares for a target and the best configs of
other shapes from the logs given are measured first; seeds a space rejects are skipped."""
from __future__ import annotations

import pytest

from autotune.tuners import make_tuner
from cost_model.transfer import best_configs_elsewhere
from fakes import SyntheticRunner
from measure import MeasureInput, MeasureResult
from records import Record
from search_space import Target, Task, get_template

CUDA = Target.from_dict({"kind": "cuda", "arch": "sm_90a", "sm_count": 132, "max_threads_per_block": 1024,
                         "max_shared_memory_per_block": 227 << 10, "max_registers_per_block": 65536,
                         "l2_bytes": 50 << 20, "clock_mhz": 1980})


def test_the_xgb_tuner_measures_its_seeds_first_in_order_and_skips_rejected_ones(host):
    task = Task.make("gemm", {"M": 64, "N": 64, "K": 64})
    template = get_template("gemm", "cpu")
    space = template.space(task, host)
    picks = [space.get(i).as_dict() for i in space.valid_indices()[5:8]]
    rejected = dict(picks[0], threads=10 ** 6)  # no such value: not in the space
    tuner = make_tuner("xgb", task, host, seed=0, seeds=[picks[2], rejected, picks[0], picks[1], picks[0]])
    runner = SyntheticRunner({"gemm": 1e-4})
    summary = tuner.tune(5, runner, runner, batch_size=2)
    measured = [r.config for r in summary.records]
    assert measured[:3] == [picks[2], picks[0], picks[1]]
    assert len({r.config_index for r in summary.records}) == 5


def test_the_best_configs_of_other_shapes_come_first_best_interleaved(host):
    template = get_template("gemm", "cpu")
    mine = Task.make("gemm", {"M": 64, "N": 64, "K": 64})
    records = []
    for first, shape, seconds in ((0, {"M": 32, "N": 64, "K": 64}, (3e-5, 1e-5, 2e-5)),
                                  (3, {"M": 128, "N": 64, "K": 64}, (5e-5, 4e-5, 9e-5)),
                                  (6, {"M": 64, "N": 64, "K": 64}, (1e-9, 1e-9, 1e-9))):  # the task itself: left out
        task = Task.make("gemm", shape)
        space = template.space(task, host)
        for index, s in zip(space.valid_indices()[first:first + 3], seconds):
            records.append(Record.from_measure(MeasureInput(task, space.get(index), host), MeasureResult((s, s, s)), "t"))
    failed = MeasureResult.failed(next(iter(type(records[0].result.error))), "broken")
    other = Task.make("gemm", {"M": 32, "N": 64, "K": 64})
    records.append(Record.from_measure(MeasureInput(other, template.space(other, host).get(
        template.space(other, host).valid_indices()[9]), host), failed, "t"))
    seeds = best_configs_elsewhere(records, mine, host, per_task=2)
    by_time = {(r.task.key, r.result.median if r.ok else None): r.config for r in records}
    m32, m128 = "gemm/float32/M=32,N=64,K=64", "gemm/float32/M=128,N=64,K=64"
    assert seeds == [by_time[(m128, 4e-5)], by_time[(m32, 1e-5)], by_time[(m128, 5e-5)], by_time[(m32, 2e-5)]]


def test_rope_append_attention_starts_from_the_best_attention_decode_configs_of_its_dims():
    """The two share the split-KV schedule: the captured step's fused attention, never tuned,
    starts where attention_decode of the same dims was fastest (and the other way round)."""
    from autotune.tuning import prior_configs

    dims = {"B": 1, "H": 8, "HKV": 2, "D": 64, "S": 256, "L": 256}
    plain = Task.make("attention_decode", dims, "float16", {"lengths": "per_sequence"}, ("S", "L"))
    fused = Task.make("rope_append_attention", dims, "float16", {}, ("S", "L"))
    template = get_template("attention_decode", "cuda")
    space = template.space(plain, CUDA)
    picks = [space.get(i) for i in space.valid_indices()[10:13]]
    records = [Record.from_measure(MeasureInput(plain, config, CUDA), MeasureResult((s, s, s)), "t")
               for config, s in zip(picks, (3e-6, 1e-6, 2e-6))]
    assert prior_configs(records, fused, CUDA)[:2] == [picks[1].as_dict(), picks[2].as_dict()]
    fused_records = [Record.from_measure(MeasureInput(fused, picks[0], CUDA), MeasureResult((1e-6,) * 3), "t")]
    assert prior_configs(fused_records, plain, CUDA)[0] == picks[0].as_dict()
    assert not best_configs_elsewhere(records, Task.make("softmax", {"M": 1, "N": 256}, "float16"), CUDA)


@pytest.mark.parametrize("op,shape,dtype", [("gemm", {"M": 4096, "N": 4096, "K": 4096}, "float16"),
                                            ("gemm", {"M": 512, "N": 11008, "K": 4096}, "bfloat16"),
                                            ("gemm", {"M": 4096, "N": 4096, "K": 4096}, "float32"),
                                            ("gemv", {"M": 1, "N": 11008, "K": 4096}, "float16"),
                                            ("gemv_q4", {"M": 1, "N": 11008, "K": 4096}, "float16")])
def test_the_cuda_seed_configs_fit_the_spaces_of_the_shapes_they_were_picked_for(op, shape, dtype):
    template = get_template(op, "cuda")
    task = Task.make(op, shape, dtype)
    space, default = template.space(task, CUDA), template.default(task, CUDA).as_dict()
    seeds = template.seed_configs(task, CUDA)
    assert seeds and all(space.accepts({**default, **seed}) for seed in seeds)


def test_a_job_with_transfer_from_measures_the_best_config_of_the_other_shape_first(host, tmp_path):
    from autotune.job import TuningJob, run_job
    from records import RecordLog

    other = Task.make("rmsnorm", {"M": 2, "N": 256})
    run_job(TuningJob(host, other, tuner="random", trials=4, batch=4, seed=3, log=str(tmp_path / "other.jsonl"),
                      mlflow=False), progress=False)
    best = min((r for r in RecordLog(tmp_path / "other.jsonl").records() if r.ok), key=lambda r: r.result.median)
    mine = Task.make("rmsnorm", {"M": 4, "N": 256})
    run_job(TuningJob(host, mine, tuner="xgb", trials=2, batch=2, seed=0, log=str(tmp_path / "mine.jsonl"),
                      transfer_from=(str(tmp_path / "other.jsonl"),), mlflow=False), progress=False)
    first = RecordLog(tmp_path / "mine.jsonl").records()[0]
    assert first.config == best.config


def test_a_model_tuning_starts_each_task_from_its_plain_variant_in_the_log():
    """A GEMV that fuses its norm is a new task in a resumed log: its xgb search starts from the
    best config of the plain GEMV of the same dims, then the template's seeds, then other shapes'
    best."""
    from autotune.model_tasks import ModelTask
    from autotune.scheduler import TaskScheduler

    template = get_template("gemv", "cuda")
    fused = Task.make("gemv", {"M": 1, "N": 4096, "K": 4096}, "float16", {"norm": "rmsnorm", "eps": 1e-5})
    records = []
    for shape, picks in (({"M": 1, "N": 11008, "K": 4096}, (3, 1e-5)), ({"M": 1, "N": 4096, "K": 4096}, (40, 2e-5))):
        task = Task.make("gemv", shape, "float16")
        space = template.space(task, CUDA)
        index, seconds = picks
        config = space.get(space.valid_indices()[index])
        records.append(Record.from_measure(MeasureInput(task, config, CUDA), MeasureResult((seconds,) * 3), "t"))
    scheduler = TaskScheduler([ModelTask(fused, 1.0)], CUDA, "xgb", priors=records)
    seeds = [c.as_dict() for c in scheduler.tuners[0].seeds]
    declared = template.space(fused, CUDA).accepted(template.seed_configs(fused, CUDA),
                                                   template.default(fused, CUDA).as_dict())
    # the same dims first (though slower), then the template's seeds, then other shapes' best
    head = [records[1].config] + [c.as_dict() for c in declared if c.as_dict() != records[1].config]
    assert seeds == head + [records[0].config]
    assert TaskScheduler([ModelTask(fused, 1.0)], CUDA, "random", priors=records).tuners[0].name == "random"
