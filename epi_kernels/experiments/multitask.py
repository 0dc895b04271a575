"""Mixed-task SFT whose task mix shifts over training (a curriculum), so each task is in turn
dominant then rare: per-task exact match over time (the "seesaw") and the final average.

The mix moves through one phase per task; in phase i, task i has weight 0.8 and the others share
0.2. Static isolation refreshes once, at the end of the first phase; EPI refreshes at the same step
and every `refresh_interval` steps after; AdamW never isolates.
"""
from __future__ import annotations

import time

from .. import EPIAdamW
from .data import LEARNED_MARGIN, CharTokenizer, exact_match, majority_baseline, make_task
from .model import tiny_llama
from .report import fmt, log, mean_std, paired_table, pyplot, table
from .train import configure, sampler, train


def mix(n_tasks: int, steps: int):
    phase = max(1, steps // n_tasks)

    def weights(step: int) -> list[float]:
        cur = min((step - 1) // phase, n_tasks - 1)
        return [0.8 if i == cur else 0.2 / (n_tasks - 1) for i in range(n_tasks)]
    return weights, phase


def run(args, folder) -> tuple[dict, str]:
    tok = CharTokenizer()
    tasks = [make_task(name, args.pool, args.eval_items, seed=1000 + i, max_len=args.max_len,
                       level=args.level)
             for i, name in enumerate(args.tasks)]
    weights, phase = mix(len(tasks), args.steps)
    runs = {m: [] for m in args.methods}
    for seed in range(args.seed, args.seed + args.seeds):
        for method in args.methods:
            model = tiny_llama(tok.vocab_size, seed, max_len=args.max_len)
            opt = EPIAdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                           importance_beta=args.importance_beta, scope=args.scope)
            # first refresh at the end of phase 1, once the scores have history
            configure(opt, method, ratio=args.ratio, refresh_interval=args.refresh_interval, seed=seed,
                      delay=phase - 1)
            curve = []

            def evaluate(step: int) -> None:
                curve.append({"step": step, **{t.name: exact_match(model, tok, t.eval) for t in tasks}})

            start = time.perf_counter()
            train(model, opt, tok, sampler([t.train for t in tasks], weights), args.steps, batch_size=args.batch,
                  seed=seed, desc=f"{method} seed {seed}", progress=args.progress, every=args.eval_every,
                  on_every=evaluate)
            seconds = time.perf_counter() - start
            final = curve[-1]
            peak_drop = [max(c[t.name] for c in curve) - final[t.name] for t in tasks]
            runs[method].append({"seed": seed, "curve": curve, "seconds": seconds,
                                 "final": {t.name: final[t.name] for t in tasks},
                                 "final_average": sum(final[t.name] for t in tasks) / len(tasks),
                                 "mean_drop_from_peak": sum(peak_drop) / len(tasks)})
    summary = {m: {"final_average": mean_std([r["final_average"] for r in rs]),
                   "mean_drop_from_peak": mean_std([r["mean_drop_from_peak"] for r in rs]),
                   **{t.name: mean_std([r["final"][t.name] for r in rs]) for t in tasks},
                   "seconds": mean_std([r["seconds"] for r in rs])} for m, rs in runs.items()}
    differences, paired_text = paired_table(runs, {
        "final average EM": (lambda r: r["final_average"], True),
        "drop from peak (lower is better)": (lambda r: r["mean_drop_from_peak"], False),
        **{f"{t.name} EM": ((lambda r, n=t.name: r["final"][n]), True) for t in tasks}})
    baselines = {t.name: majority_baseline(t) for t in tasks}
    best = {t.name: max(s[t.name]["mean"] for s in summary.values()) for t in tasks}
    barely = [name for name, em in best.items() if em < baselines[name] + LEARNED_MARGIN]
    if barely:
        log("warning: barely learned by every method (final EM near the majority-answer baseline): "
            + ", ".join(barely))
    results = {"experiment": "multitask", "config": vars(args), "tasks": [t.name for t in tasks],
               "majority_baseline": baselines, "barely_learned": barely,
               "phase_steps": phase, "runs": runs, "summary": summary, "paired": differences}
    _plot(results, folder)
    rows = [[m, *(fmt(s[t.name]) for t in tasks), fmt(s["final_average"]), fmt(s["mean_drop_from_peak"]),
             f"{s['seconds']['mean']:.1f}"] for m, s in summary.items()]
    text = (f"Multitask: {args.steps} steps, task mix shifting every {phase} steps "
            f"({' -> '.join(t.name for t in tasks)} dominant, 0.8 of each batch), ratio {args.ratio}, "
            f"refresh every {args.refresh_interval}, {args.seeds} seeds (mean ± std); final exact match per task "
            f"(majority-answer baselines: {', '.join(f'{n} {b:.3f}' for n, b in baselines.items())})\n\n"
            + table(["method", *(t.name for t in tasks), "final average", "drop from peak (mean over tasks)",
                     "train s"], rows)
            + "\n\nPaired by seed (same initialisation and data order): mean difference [95 % t interval; * "
              "where it excludes zero], seeds in which the method was better\n\n" + paired_text)
    return results, text


def _plot(r: dict, folder) -> None:
    plt = pyplot()
    tasks = r["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        for method, rs in r["runs"].items():
            steps = [c["step"] for c in rs[0]["curve"]]
            mean = [sum(run["curve"][i][task] for run in rs) / len(rs) for i in range(len(steps))]
            ax.plot(steps, mean, label=method)
        for i in range(1, len(tasks)):
            ax.axvline(i * r["phase_steps"], color="gray", ls=":")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("exact match (mean over seeds)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "multitask.png", dpi=120)
    plt.close(fig)
