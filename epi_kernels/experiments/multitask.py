"""The main job: mixed-task SFT whose task mix shifts over training, so each task is in turn
dominant then rare (the paper's setting of shifting importance); per-task exact match over time,
the final EM per task, and each run's worst-task drop (the deepest fall of a task below its best).

The mix moves through one phase per task; in phase i, task i has weight 0.8 and the others share
0.2. Static isolation refreshes once, at the end of the first phase; EPI refreshes at the same step
and every `refresh_interval` steps after; AdamW never isolates. Every (method, seed) run starts from
the same initialisation and data order for that seed, so methods are compared paired by seed.
"""
from __future__ import annotations

import time

from .. import EPIAdamW
from .data import LEARNED_MARGIN, exact_match, majority_baseline, make_tasks
from .model import model_factory
from .report import fmt, log, mean_std, paired_table, plot_paired, pyplot, table
from .train import configure, run_many, sampler, train


def mix(n_tasks: int, steps: int):
    phase = max(1, steps // n_tasks)

    def weights(step: int) -> list[float]:
        cur = min((step - 1) // phase, n_tasks - 1)
        return [0.8 if i == cur else 0.2 / (n_tasks - 1) for i in range(n_tasks)]
    return weights, phase


def largest_drop(ems: list[float]) -> float:
    """The deepest fall of a task's EM below its best so far, over the evaluations of a run: how much
    of a task was lost while others dominated, even if it was relearned later (0 if it never fell)."""
    best, drop = 0.0, 0.0
    for em in ems:
        best = max(best, em)
        drop = max(drop, best - em)
    return drop


def mean_drop(ems: list[float]) -> float:
    """How far a task's EM sits below its best so far, averaged over the evaluations of a run: the
    seesaw's area rather than its deepest point, so one unlucky evaluation moves it by 1/len(ems)
    of what it moves `largest_drop` (0 if the task never fell)."""
    best, total = 0.0, 0.0
    for em in ems:
        best = max(best, em)
        total += best - em
    return total / len(ems)


def measures(curve: list[dict], tasks: list[str]) -> dict[str, object]:
    """A run's measures, all functions of its EM curve: the final EM, the largest and the mean drop
    below the best so far, and the EM over training (the area under the curve over its length), per
    task and averaged over tasks (the worst-task drop: the largest drop of any task)."""
    ems = {n: [c[n] for c in curve] for n in tasks}
    final = {n: e[-1] for n, e in ems.items()}
    drops = {n: largest_drop(e) for n, e in ems.items()}
    below_best = {n: mean_drop(e) for n, e in ems.items()}
    over_training = {n: sum(e) / len(e) for n, e in ems.items()}
    worst = max(drops, key=drops.get)
    return {"final": final, "final_average": _average(final), "largest_drop": drops,
            "mean_largest_drop": _average(drops), "worst_drop": drops[worst], "worst_task": worst,
            "mean_drop": below_best, "mean_drop_average": _average(below_best),
            "em_over_training": over_training, "em_over_training_average": _average(over_training)}


def _average(per_task: dict[str, float]) -> float:
    return sum(per_task.values()) / len(per_task)


def one_run(args, tasks, label: str, method: str, overrides: dict, seed: int) -> dict:
    """One training run of a variant (a method with optional refresh_interval / importance_beta
    overrides): its EM curve, final EM per task, largest drops and seconds."""
    settings = {"refresh_interval": args.refresh_interval, "importance_beta": args.importance_beta, **overrides}
    weights, phase = mix(len(tasks), args.steps)
    tok, new_model, nll = model_factory(args)
    model = new_model(seed)
    nll_before = nll(model) if nll else None
    opt = EPIAdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                   importance_beta=settings["importance_beta"], scope=args.scope)
    # first refresh at the end of phase 1, once the scores have history
    configure(opt, method, ratio=args.ratio, refresh_interval=settings["refresh_interval"], seed=seed,
              delay=phase - 1)
    curve = []

    def evaluate(step: int) -> None:
        curve.append({"step": step, **{t.name: exact_match(model, tok, t.eval) for t in tasks}})

    start = time.perf_counter()
    train(model, opt, tok, sampler([t.train for t in tasks], weights), args.steps, batch_size=args.batch,
          seed=seed, desc=f"{label} seed {seed}", progress=args.progress, every=args.eval_every, on_every=evaluate)
    seconds = time.perf_counter() - start
    record = {"seed": seed, "variant": label, "method": method, **settings, "curve": curve, "seconds": seconds,
              **measures(curve, [t.name for t in tasks]),
              "heldout_nll_increase": nll(model) - nll_before if nll else None}
    log(f"{label} seed {seed}: final average EM {record['final_average']:.3f}, worst-task drop "
        f"{record['worst_drop']:.3f} ({record['worst_task']}), {seconds:.0f} s")
    return record


def metrics(tasks: list[str]) -> dict[str, tuple]:
    """The paired metrics of a run record: {label: (function of the record, higher is better)}.
    Averages over the evaluations (EM over training, mean drop below best) are the robust ones; the
    worst-task drop, a maximum over tasks and evaluations, and the final EM, one evaluation, are
    noisier (measured: `verdicts.split_half`)."""
    return {"final average EM": (lambda r: r["final_average"], True),
            "EM over training": (lambda r: r["em_over_training_average"], True),
            "worst-task drop (lower is better)": (lambda r: r["worst_drop"], False),
            "mean drop below best (lower is better)": (lambda r: r["mean_drop_average"], False),
            **{f"{n} EM": ((lambda r, n=n: r["final"][n]), True) for n in tasks}}


def run(args, folder) -> tuple[dict, str]:
    return run_variants(args, folder, [(m, m, {}) for m in args.methods], "multitask")


def run_variants(args, folder, variants: list[tuple[str, str, dict]], experiment: str) -> tuple[dict, str]:
    """Every (label, method, overrides) variant for every seed, in parallel runs (--jobs)."""
    tasks = make_tasks(args)
    _, phase = mix(len(tasks), args.steps)
    seeds = range(args.seed, args.seed + args.seeds)
    runs = run_many(one_run, {label: (args, tasks, label, method, over) for label, method, over in variants}, seeds,
                    jobs=args.jobs, threads=args.threads)
    return analyse(args, folder, experiment, runs, {t.name: majority_baseline(t) for t in tasks}, phase)


def analyse(args, folder, experiment: str, runs: dict[str, list[dict]], baselines: dict[str, float],
            phase: int) -> tuple[dict, str]:
    """Summary, paired differences, plots and tables of the runs of every variant (in seed order;
    `baselines`: each task's majority-answer EM)."""
    names = list(baselines)
    nll = next(iter(runs.values()))[0]["heldout_nll_increase"] is not None
    summary = {label: {"final_average": mean_std([r["final_average"] for r in rs]),
                       "worst_drop": mean_std([r["worst_drop"] for r in rs]),
                       "mean_largest_drop": mean_std([r["mean_largest_drop"] for r in rs]),
                       "mean_drop_average": mean_std([r["mean_drop_average"] for r in rs]),
                       "em_over_training_average": mean_std([r["em_over_training_average"] for r in rs]),
                       **{n: mean_std([r["final"][n] for r in rs]) for n in names},
                       "seconds": mean_std([r["seconds"] for r in rs]),
                       **({"heldout_nll_increase": mean_std([r["heldout_nll_increase"] for r in rs])} if nll else {})}
               for label, rs in runs.items()}
    differences, paired_text = paired_table(runs, metrics(names))
    best = {n: max(s[n]["mean"] for s in summary.values()) for n in names}
    barely = [n for n, em in best.items() if em < baselines[n] + LEARNED_MARGIN]
    if barely:
        log("warning: barely learned by every method (final EM near the majority-answer baseline): "
            + ", ".join(barely))
    results = {"experiment": experiment, "config": vars(args), "tasks": names, "majority_baseline": baselines,
               "barely_learned": barely, "phase_steps": phase, "runs": runs, "summary": summary,
               "paired": differences}
    _plot(results, folder)
    plot_paired(differences, folder / f"{experiment}-paired.png", f"{experiment}, paired by seed")
    rows = [[label, *(fmt(s[n]) for n in names), fmt(s["final_average"]), fmt(s["em_over_training_average"]),
             fmt(s["worst_drop"]), fmt(s["mean_drop_average"]), f"{s['seconds']['mean']:.1f}"]
            + ([fmt(s["heldout_nll_increase"])] if nll else []) for label, s in summary.items()]
    rows.append(["majority-answer baseline", *(f"{baselines[n]:.3f}" for n in names), "", "", "", "", ""]
                + ([""] if nll else []))
    text = (f"{experiment.capitalize()} ({args.model} model): {args.steps} steps, task mix shifting every {phase} "
            f"steps ({' -> '.join(names)} dominant, 0.8 of each batch), ratio {args.ratio}, "
            + ("" if experiment == "ablation" else
               f"refresh every {args.refresh_interval}, importance beta {args.importance_beta}, ")
            + f"{args.seeds} seeds (mean ± std); final exact match per task on {args.eval_items} held-out "
              f"questions each, evaluated every {args.eval_every} steps; EM over training: the mean over those "
              f"evaluations and tasks; worst-task drop: the largest fall of any task's EM below its best so far; "
              f"mean drop below best: how far below its best so far a task's EM sits, averaged over the "
              f"evaluations and tasks\n\n"
            + table(["variant" if experiment == "ablation" else "method", *names, "final average",
                     "EM over training", "worst-task drop", "mean drop below best", "train s"] + (["held-out NLL increase"] if nll else []), rows)
            + "\n\nPaired by seed (same initialisation and data order): mean difference [95 % t interval; * "
              "where it excludes zero], seeds in which the method was better\n\n" + paired_text)
    return results, text


def _plot(r: dict, folder) -> None:
    plt = pyplot()
    tasks = r["tasks"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.6), sharey=True)
    for ax, task in zip(axes, tasks):
        for label, rs in r["runs"].items():
            steps = [c["step"] for c in rs[0]["curve"]]
            mean = [sum(run["curve"][i][task] for run in rs) / len(rs) for i in range(len(steps))]
            ax.plot(steps, mean, label=label)
        ax.axhline(r["majority_baseline"][task], color="k", lw=0.8, ls="--")
        for i in range(1, len(tasks)):
            ax.axvline(i * r["phase_steps"], color="gray", ls=":")
        ax.set_title(task, fontsize=9)
        ax.set_xlabel("step")
    axes[0].set_ylabel("exact match (mean over seeds)")
    axes[0].legend(fontsize=7)
    fig.suptitle("dotted: the dominant task changes; dashed: majority-answer baseline", fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / f"{r['experiment']}.png", dpi=120)
    plt.close(fig)
