"""Run folders, result tables, JSON and plots (matplotlib, headless)."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def log(line: str) -> None:
    """A progress line that does not break tqdm's bars."""
    from tqdm.auto import tqdm  # noqa: PLC0415

    tqdm.write(line)


def run_folder(root: str, experiment: str) -> Path:
    folder = Path(root) / f"{experiment}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": list(values)}


def fmt(ms: dict[str, float], digits: int = 3) -> str:
    """mean ± std; a single run has no spread to show."""
    if len(ms.get("values", ())) == 1:
        return f"{ms['mean']:.{digits}f}"
    return f"{ms['mean']:.{digits}f} ± {ms['std']:.{digits}f}"


# two-sided 95 % quantiles of Student's t by degrees of freedom (standard tables); 1.96 beyond 30
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042}


def paired(values: list[float], baseline: list[float], higher_is_better: bool) -> dict[str, object]:
    """The per-seed differences values - baseline (same seed, checkpoint and data order): mean, a
    95 % t confidence interval (None for one seed), and in how many seeds the method was better."""
    return paired_differences([v - b for v, b in zip(values, baseline)], higher_is_better)


def paired_differences(diffs: list[float], higher_is_better: bool) -> dict[str, object]:
    """`paired`'s summary of per-seed differences already taken (e.g. a subset of the seeds)."""
    mean = statistics.fmean(diffs)
    half = (_T975.get(len(diffs) - 1, 1.96) * statistics.stdev(diffs) / len(diffs) ** 0.5) if len(diffs) > 1 else None
    better = sum((d > 0) if higher_is_better else (d < 0) for d in diffs)
    return {"mean": mean, "ci95": None if half is None else [mean - half, mean + half], "better": better,
            "n": len(diffs), "diffs": diffs}


def fmt_paired(d: dict[str, object], digits: int = 3) -> str:
    """mean [CI], k/n better; '*' where the interval excludes zero."""
    text = f"{d['mean']:+.{digits}f}"
    if d["ci95"] is not None:
        lo, hi = d["ci95"]
        text += f" [{lo:+.{digits}f}, {hi:+.{digits}f}]" + (" *" if lo > 0 or hi < 0 else "")
    return text + f", {d['better']}/{d['n']} better"


def paired_table(runs: dict[str, list[dict]], metrics: dict[str, tuple],
                 baselines=("adamw", "static", "epi")) -> tuple[dict, str]:
    """Paired differences of every method to each baseline present, per metric (EPI is the
    baseline of its own variants: epi-global, epi-v).

    `metrics`: {label: (function of a run's record, higher is better)}. Returns the numbers (for
    results.json) and a markdown table with one row per (method, baseline)."""
    out, rows, done = {}, [], {None}
    for base in (b for b in baselines if b in runs):
        for method, rs in runs.items():
            if method == base or method in done:  # (static - adamw is shown, adamw - static is not)
                continue
            entry = {label: paired([f(r) for r in rs], [f(r) for r in runs[base]], better)
                     for label, (f, better) in metrics.items()}
            out[f"{method} - {base}"] = entry
            rows.append([f"{method} - {base}", *(fmt_paired(entry[label]) for label in metrics)])
        done.add(base)
    return out, table(["paired difference", *metrics], rows)


def plot_paired(differences: dict, path: Path, title: str) -> None:
    """A forest plot of `paired_table`'s numbers: one panel per metric, one row per (method -
    baseline), the mean difference with its 95 % interval and the zero line; filled where the
    interval excludes zero. Nothing is drawn when no baseline was run next to another method."""
    if not differences:
        return
    plt = pyplot()
    rows = list(differences)
    metrics = list(next(iter(differences.values())))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 1.5, 0.35 * len(rows) + 1.6),
                             sharey=True, squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for y, row in enumerate(rows):
            d = differences[row][metric]
            lo, hi = d["ci95"] or (d["mean"], d["mean"])
            clear = lo > 0 or hi < 0
            ax.plot([lo, hi], [y, y], color="k", lw=1)
            ax.plot([d["mean"]], [y], "o", color="k", mfc="k" if clear else "w", ms=5)
        ax.axvline(0, color="gray", ls=":")
        ax.set_title(metric, fontsize=8)
        ax.set_xlabel("paired difference (EM)", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0][0].set_yticks(range(len(rows)), rows)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{title}: mean and 95 % t interval over seeds (filled: excludes zero)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table (prints well in a terminal and pastes into the README)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write(folder: Path, results: dict, text: str) -> None:
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    (folder / "results.md").write_text(text + "\n")


def pyplot():
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt
