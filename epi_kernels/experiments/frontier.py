"""The stability-plasticity frontier: the forgetting experiment's stage 2 swept over isolation
ratios. A method that freezes more forgets less and learns less, so methods are compared by the
curve of forgetting (x) against new-task EM (y) they trace as the ratio varies, not at one ratio.
Every (ratio, seed) shares the one stage-1 checkpoint; AdamW (ratio 0) is the curve's common start."""
from __future__ import annotations

from .forgetting import stage1, stage2
from .report import fmt, fmt_paired, mean_std, paired, pyplot, table
from .train import run_many


def run(args, folder) -> tuple[dict, str]:
    ctx = stage1(args)
    t2 = ctx["t2"]
    seeds = range(args.seed, args.seed + args.seeds)
    grid = [("adamw", 0.0)] + [(m, r) for m in args.methods if m != "adamw" for r in args.ratios]
    by_point = run_many(stage2, {(m, r): (ctx, args, m, r) for m, r in grid}, seeds, jobs=args.jobs,
                        threads=args.threads)
    adamw = by_point.pop(("adamw", 0.0))
    curves = {m: {r: by_point[(m, r)] for r in args.ratios} for m in args.methods if m != "adamw"}
    rows, points = [], {}
    for method, by_ratio in curves.items():
        for ratio, rs in by_ratio.items():
            forgetting, em2 = mean_std([r["forgetting"] for r in rs]), mean_std([r["em_t2"] for r in rs])
            bases = {"adamw": adamw}
            if "static" in curves and method != "static":
                bases["static"] = curves["static"][ratio]  # same ratio, same seeds
            vs = {base: {key: paired([r[key] for r in rs], [r[key] for r in runs], better)
                         for key, better in (("forgetting", False), ("em_t2", True))}
                  for base, runs in bases.items()}
            points.setdefault(method, []).append({"ratio": ratio, "forgetting": forgetting, "em_t2": em2,
                                                  **{f"vs_{base}": d for base, d in vs.items()}})
            rows.append([method, f"{ratio:g}", fmt(forgetting), fmt(em2),
                         *(fmt_paired(vs[base][key]) if base in vs else "" for base in ("adamw", "static")
                           for key in ("forgetting", "em_t2"))])
    base = {"forgetting": mean_std([r["forgetting"] for r in adamw]), "em_t2": mean_std([r["em_t2"] for r in adamw])}
    results = {"experiment": "frontier", "config": vars(args), "tasks": [ctx["t1"].name, t2.name],
               "stage1": ctx["stage1"], "adamw": {"runs": adamw, **base},
               "runs": {m: {str(r): rs for r, rs in by.items()} for m, by in curves.items()}, "points": points}
    _plot(results, folder)
    text = (f"Frontier: stage 1 = {ctx['t1'].name} ({args.stage1_steps} steps, EM {ctx['stage1']['em_t1']:.3f}), "
            f"stage 2 = {t2.name} ({args.stage2_steps} steps), ratios {' '.join(f'{r:g}' for r in args.ratios)}, "
            f"{args.seeds} seeds; AdamW: forgetting {fmt(base['forgetting'])}, {t2.name} EM {fmt(base['em_t2'])}. "
            "Paired columns: difference by seed to AdamW and to static isolation at the same ratio, mean "
            "[95 % t interval; * where it excludes zero], seeds better\n\n"
            + table(["method", "ratio", "forgetting", f"{t2.name} EM", "forgetting - AdamW", "EM - AdamW",
                     "forgetting - static", "EM - static"], rows))
    return results, text


def _plot(results: dict, folder) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    base = results["adamw"]
    ax.errorbar([base["forgetting"]["mean"]], [base["em_t2"]["mean"]], xerr=[base["forgetting"]["std"]],
                yerr=[base["em_t2"]["std"]], fmt="ks", label="adamw (ratio 0)")
    for method, pts in results["points"].items():
        xs = [base["forgetting"]["mean"]] + [p["forgetting"]["mean"] for p in pts]
        ys = [base["em_t2"]["mean"]] + [p["em_t2"]["mean"] for p in pts]
        line = ax.plot(xs, ys, "o-", label=method)[0]
        ax.errorbar(xs[1:], ys[1:], xerr=[p["forgetting"]["std"] for p in pts],
                    yerr=[p["em_t2"]["std"] for p in pts], fmt="none", ecolor=line.get_color(), alpha=0.5)
        for p in pts:
            ax.annotate(f"{p['ratio']:g}", (p["forgetting"]["mean"], p["em_t2"]["mean"]), fontsize=7)
    ax.set_xlabel(f"forgetting: {results['tasks'][0]} EM lost (lower is better)")
    ax.set_ylabel(f"{results['tasks'][1]} EM (higher is better)")
    ax.set_title("stability-plasticity frontier (labels: isolation ratio; bars: std over seeds)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "frontier.png", dpi=120)
    plt.close(fig)
