"""Compare tuners on recorded sweeps: many seeds each, summarised as a table, JSON and a plot.

For every recorded space and tuner, each seed's run is a ``Trajectory``; the summary gives
the trials needed to reach 90% and 95% of the sweep's best (median and quartiles over
seeds; a seed that never gets there within the budget counts as budget + 1 and the
number of seeds that did is given), the best found after the budget as a share of the
sweep's best, and the held-out pairwise ranking accuracy of a cost model trained on the
configs the tuner measured.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import numpy as np

from cost_model import XGBConfig, XGBCostModel
from cost_model.transfer import best_configs_elsewhere
from records import Record

from .replay import TRANSFER, RecordedSpace, Trajectory, pretrain_for, replay_tuner

LEVELS = (0.90, 0.95)


def _quartiles(values: Sequence[float]) -> dict[str, float]:
    data = np.asarray(values, dtype=np.float64)
    data = data[np.isfinite(data)]
    if not len(data):
        return {"median": math.nan, "p25": math.nan, "p75": math.nan}
    p25, median, p75 = np.percentile(data, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75)}


def summarise_tuner(space: RecordedSpace, runs: Sequence[Trajectory], trials: int) -> dict:
    best = space.best_gflops
    out: dict = {"tuner": runs[0].tuner, "seeds": len(runs)}
    for level in LEVELS:
        hits = [run.trials_to(level * best) for run in runs]
        stats = _quartiles([h if h is not None else trials + 1 for h in hits])
        stats["reached"] = sum(h is not None for h in hits)
        out[f"trials_to_{round(level * 100)}"] = stats
    finals = [run.best_so_far()[-1] / best if run.gflops and best > 0 else 0.0 for run in runs]
    out["best_after_trials"] = _quartiles(finals)
    out["heldout_pairwise_accuracy"] = _quartiles([run.heldout_accuracy for run in runs])
    out["live_pairwise_accuracy"] = _quartiles([run.live_accuracy for run in runs])
    out["live_topk_recall"] = _quartiles([run.live_topk_recall for run in runs])
    out["wall_s_per_run"] = float(np.mean([run.wall_s for run in runs]))
    return out


def compare_tuners(spaces: Sequence[RecordedSpace], tuners: Sequence[str], seeds: int, trials: int, batch: int = 8,
                   transfer: Sequence[Record] = (), model_config: XGBConfig | None = None,
                   tuner_options: dict[str, dict] | None = None,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Replay every tuner with seeds 0..seeds-1 on every space; the full report as a dict.

    With ``transfer`` records, ``xgb+transfer`` (the xgb tuner starting from a model
    pre-trained on them, the replayed task's own records left out) is run beside ``xgb``.
    """
    for name, value in (("seeds", seeds), ("trials", trials), ("batch", batch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    report: dict = {"trials": trials, "seeds": seeds, "batch": batch, "spaces": []}
    for space in spaces:
        names = list(tuners)
        base: XGBCostModel | None = None
        starts: list[dict] = []  # the best configs of the transfer tasks, tried first
        entry: dict = {"space": space.summary(), "tuners": [], "curves": {}}
        if transfer:
            start = time.perf_counter()
            base = pretrain_for(space, transfer, model_config)
            starts = best_configs_elsewhere(transfer, space.task, space.target)
            entry["transfer"] = {"records": len(transfer), "pretrain_s": time.perf_counter() - start,
                                 "trees": base.n_trees}
            if "xgb" in names and TRANSFER not in names:
                names.insert(names.index("xgb") + 1, TRANSFER)
        for name in names:
            runs = [replay_tuner(space, name, seed, trials, batch, base_model=base, model_config=model_config,
                                 tuner_options=(tuner_options or {}).get(name), transfer_seeds=starts)
                    for seed in range(seeds)]
            summary = summarise_tuner(space, runs, trials)
            entry["tuners"].append(summary)
            curves = [run.best_so_far() / space.best_gflops for run in runs]
            entry["curves"][name] = [[round(float(v), 5) for v in curve] for curve in curves]
            if progress:
                t95 = summary["trials_to_95"]
                progress(f"{space.key} on {space.target.key}: {name:<13} 95% of best after {format_trials(t95, trials)} trials "
                         f"(median of {seeds}), {summary['wall_s_per_run']:.1f} s per run")
        report["spaces"].append(entry)
    return report


def to_json(report: dict) -> str:
    """The report as strict JSON: undefined figures (NaN) become null."""
    from .strict_json import dumps

    return dumps(report, indent=1)


def format_trials(stats: dict, trials: int) -> str:
    median = stats["median"]
    if not math.isfinite(median):
        return "-"
    return f">{trials}" if median > trials else f"{median:.0f}"


def space_title(summary: dict) -> str:
    """A replayed space as the report names it: its task, and the machine when known (one log
    may hold sweeps of one task on several)."""
    return f"{summary['task']} on {summary['target']}" if summary.get("target") else summary["task"]


def format_table(report: dict) -> str:
    """One block per space: the space's difficulty, then one line per tuner."""
    trials = report["trials"]
    lines = []
    for entry in report["spaces"]:
        s = entry["space"]
        skipped = f"; {s['outside_space']} records outside today's space skipped" if s.get("outside_space") else ""
        lines.append(f"{space_title(s)}: {s['configs']} recorded configs, best {s['best_rate']}; "
                     f"{s['share_within_95'] * 100:.1f}% of them within 95% of it, "
                     f"{s['share_within_90'] * 100:.1f}% within 90%{skipped}")
        lines.append(f"  {'tuner':<13} {'to 90% (IQR)':>18} {'reached':>8} {'to 95% (IQR)':>18} {'reached':>8} "
                     f"{'best@' + str(trials) + ' (IQR)':>22} {'held-out acc':>12}")
        for t in entry["tuners"]:
            cells = []
            for level in ("trials_to_90", "trials_to_95"):
                q = t[level]
                iqr = f"({format_trials({'median': q['p25']}, trials)}-{format_trials({'median': q['p75']}, trials)})"
                cells.append(f"{format_trials(q, trials) + ' ' + iqr:>18} {str(q['reached']) + '/' + str(t['seeds']):>8}")
            b = t["best_after_trials"]
            best = f"{b['median'] * 100:.1f}% ({b['p25'] * 100:.1f}-{b['p75'] * 100:.1f})"
            acc = t["heldout_pairwise_accuracy"]["median"]
            lines.append(f"  {t['tuner']:<13} {cells[0]} {cells[1]} {best:>22} "
                         f"{(f'{acc:.3f}' if math.isfinite(acc) else '-'):>12}")
        lines.append("")
    return "\n".join(lines)


def plot_formats() -> set[str]:
    """The file suffixes ``plot_convergence`` can write (matplotlib's Agg canvas decides)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    return set(FigureCanvasAgg.get_supported_filetypes())


def plot_convergence(report: dict, path: str) -> None:
    """Median best-so-far (share of the sweep's best) against trials, quartile bands, a panel per space."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spaces = report["spaces"]
    fig, axes = plt.subplots(1, len(spaces), figsize=(5.5 * len(spaces), 4.2), squeeze=False)
    for ax, entry in zip(axes[0], spaces):
        for name, curves in entry["curves"].items():
            length = min(len(c) for c in curves)
            data = np.array([c[:length] for c in curves])
            x = np.arange(1, length + 1)
            median = np.median(data, axis=0)
            line, = ax.plot(x, median, label=name)
            ax.fill_between(x, np.percentile(data, 25, axis=0), np.percentile(data, 75, axis=0),
                            color=line.get_color(), alpha=0.15)
        ax.axhline(0.95, color="grey", linestyle=":", linewidth=1)
        ax.set_title(space_title(entry["space"]), fontsize=9)
        ax.set_xlabel("trials")
        ax.set_ylabel("best so far / sweep best")
        ax.set_ylim(bottom=max(0.0, ax.get_ylim()[0]), top=1.02)
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(f"median over {report['seeds']} seeds, quartiles shaded", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
