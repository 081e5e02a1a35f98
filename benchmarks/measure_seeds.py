"""Add the configs a tuner with priors starts from to a recorded sweep, so a replay can answer them.

    python benchmarks/measure_seeds.py --log SWEEP.jsonl --transfer-from OTHER1.jsonl OTHER2.jsonl

A sweep records a random sample of the space; ``autotune replay`` can only answer configs that
were recorded. The xgb tuner with ``--transfer-from`` first measures the best configs of the
other shapes in those logs (``cost_model.transfer.best_configs_elsewhere``) and the template's
seed configs; this measures those the sweep lacks, on this machine, timed as the sweep was
(``--repeats``, ``--min-sample-ms``, one thread), and appends them to the sweep's log as
records of the tuner ``sweep``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log", required=True, help="the sweep's log (one task)")
    parser.add_argument("--transfer-from", nargs="+", required=True, help="logs of other shapes of the operator")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--min-sample-ms", type=float, default=1.0)
    args = parser.parse_args()

    from cost_model.transfer import best_configs_elsewhere
    from measure import LocalBuilder, LocalRunner, MeasureInput, TimingPolicy
    from records import Record, RecordLog, load_records
    from search_space import get_template

    log = RecordLog(args.log)
    recorded = log.records(warn=False)
    if not recorded or len({r.task.key for r in recorded}) != 1:
        raise SystemExit(f"{args.log}: expected the records of one task")
    task, target = recorded[0].task, recorded[0].target
    template = get_template(task.op, target.kind)
    space = template.space(task, target).restrict(threads=[1])
    default = template.default(task, target).as_dict()
    seeds = (best_configs_elsewhere(load_records(args.transfer_from, warn=False), task, target)
             + template.seed_configs(task, target))
    done = {r.config_index for r in recorded}
    inputs = []
    for values in seeds:
        full = {**default, **values}
        if space.accepts(full) and space.index_of(full) not in done | {i.config.index for i in inputs}:
            inputs.append(MeasureInput(task, space.from_values(full), target))
    print(f"{task.key}: {len(seeds)} seed configs, {len(inputs)} not yet recorded")
    policy = TimingPolicy(min_sample_s=args.min_sample_ms / 1e3, repeats=args.repeats, min_repeats=min(3, args.repeats))
    with LocalBuilder(n_parallel=2) as builder, LocalRunner(policy=policy) as runner:
        results = runner.run(inputs, builder.build(inputs))
    log.append([Record.from_measure(i, r, "sweep") for i, r in zip(inputs, results)])
    for inp, result in zip(inputs, results):
        speed = f"{task.flops / result.median / 1e9:.1f} GFLOP/s" if result.ok else result.error.name
        print(f"  {inp.config}: {speed}")


if __name__ == "__main__":
    main()
