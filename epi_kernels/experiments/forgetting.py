"""Two-stage SFT: forgetting of task 1 and learning of task 2 per method, from one shared stage-1
checkpoint. Stage 1 trains with EPIAdamW at ratio 0 (exactly AdamW) while its importance scores
accumulate; stage 2 restarts from that model + optimizer state with each method (train.configure):
static and EPI take their first mask from the stage-1 importance at the first stage-2 step."""
from __future__ import annotations

import copy
import time

from .. import EPIAdamW
from .data import LEARNED_MARGIN, exact_match, majority_baseline, make_tasks
from .model import model_factory
from .report import fmt, log, mean_std, paired_table, plot_paired, pyplot, table
from .train import configure, run_many, sampler, train


def stage1(args) -> dict:
    """Stage 1 (task 1 at ratio 0, scores accumulating) and what every stage-2 run starts from."""
    tok, new_model, nll = model_factory(args)
    t1, t2 = make_tasks(args)
    opt_kw = dict(lr=args.lr, weight_decay=args.weight_decay, importance_beta=args.importance_beta,
                  scope=args.scope)
    model = new_model(args.seed)
    base_nll = nll(model) if nll else None
    opt = EPIAdamW(model.parameters(), isolation_ratio=0.0, **opt_kw)
    start = time.perf_counter()
    train(model, opt, tok, sampler([t1.train]), args.stage1_steps, batch_size=args.batch, seed=args.seed,
          desc=f"stage 1 ({t1.name})", progress=args.progress)
    first = {"em_t1": exact_match(model, tok, t1.eval), "em_t2": exact_match(model, tok, t2.eval),
              "seconds": time.perf_counter() - start, "heldout_nll": nll(model) if nll else None,
              "base_heldout_nll": base_nll, "majority_baseline": majority_baseline(t1)}
    log(f"stage 1: {t1.name} EM {first['em_t1']:.3f}, {t2.name} EM {first['em_t2']:.3f}, "
        f"{first['seconds']:.0f} s")
    if first["em_t1"] < first["majority_baseline"] + LEARNED_MARGIN:
        log(f"warning: stage 1 ended near the majority-answer baseline ({first['em_t1']:.3f} against "
            f"{first['majority_baseline']:.3f}): {t1.name} was barely learned, so forgetting is capped; "
            "train longer (--stage1-steps) or pick an easier task or --level")
    # plain data only: stage-2 runs may go to worker processes
    return {"t1": t1, "t2": t2, "opt_kw": opt_kw, "stage1": first,
            "checkpoint": (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))}


def stage2(ctx: dict, args, method: str, ratio: float, seed: int) -> dict:
    """One stage-2 run from the stage-1 checkpoint: its record (EMs, forgetting, seconds, ...)."""
    t1, t2 = ctx["t1"], ctx["t2"]
    tok, new_model, nll = model_factory(args)
    m = new_model(args.seed)
    m.load_state_dict(ctx["checkpoint"][0])
    o = EPIAdamW(m.parameters(), **ctx["opt_kw"])
    o.load_state_dict(copy.deepcopy(ctx["checkpoint"][1]))
    configure(o, method, ratio=ratio, refresh_interval=args.refresh_interval, seed=seed)
    start = time.perf_counter()
    train(m, o, tok, sampler([t2.train]), args.stage2_steps, batch_size=args.batch, seed=seed,
          desc=f"stage 2 {method} seed {seed}", progress=args.progress)
    seconds = time.perf_counter() - start
    em1, em2 = exact_match(m, tok, t1.eval), exact_match(m, tok, t2.eval)
    isolated = sum(int(o.isolation_mask(p).sum()) for p in m.parameters()) / sum(p.numel() for p in m.parameters())
    first = ctx["stage1"]
    log(f"stage 2 {method:>6} ratio {ratio} seed {seed}: {t1.name} EM {em1:.3f} (stage 1: {first['em_t1']:.3f}), "
        f"{t2.name} EM {em2:.3f}, {seconds:.0f} s")
    return {"seed": seed, "ratio": ratio, "em_t1": em1, "em_t2": em2, "forgetting": first["em_t1"] - em1,
            "seconds": seconds, "isolated_fraction": isolated,
            "heldout_nll_increase": nll(m) - first["base_heldout_nll"] if nll else None}


def run(args, folder) -> tuple[dict, str]:
    ctx = stage1(args)
    t1, t2, first = ctx["t1"], ctx["t2"], ctx["stage1"]
    base_nll = first["base_heldout_nll"]
    nll = base_nll is not None
    seeds = range(args.seed, args.seed + args.seeds)
    runs = run_many(stage2, {m: (ctx, args, m, args.ratio) for m in args.methods}, seeds, jobs=args.jobs,
                    threads=args.threads)
    keys = ("em_t1", "em_t2", "forgetting", "seconds") + (("heldout_nll_increase",) if nll else ())
    summary = {method: {key: mean_std([r[key] for r in rs]) for key in keys} for method, rs in runs.items()}
    differences, paired_text = paired_table(runs, {
        "forgetting (lower is better)": (lambda r: r["forgetting"], False),
        f"{t2.name} EM": (lambda r: r["em_t2"], True),
        "average EM": (lambda r: (r["em_t1"] + r["em_t2"]) / 2, True)})
    results = {"experiment": "forgetting", "config": vars(args), "tasks": [t1.name, t2.name],
               "stage1": first, "runs": runs, "summary": summary, "paired": differences}
    _plot(results, folder)
    plot_paired(differences, folder / "forgetting-paired.png", "forgetting, paired by seed")
    rows = [[m, fmt(s["em_t1"]), fmt(s["forgetting"]), fmt(s["em_t2"]),
             f"{(s['em_t1']['mean'] + s['em_t2']['mean']) / 2:.3f}", f"{s['seconds']['mean']:.1f}"]
            + ([fmt(s["heldout_nll_increase"])] if nll else []) for m, s in summary.items()]
    text = (f"Forgetting ({args.model} model): stage 1 = {t1.name} ({args.stage1_steps} steps, exact match "
            f"{first['em_t1']:.3f}; majority-answer baseline {first['majority_baseline']:.3f}), "
            f"stage 2 = {t2.name} ({args.stage2_steps} steps), ratio {args.ratio}, "
            f"refresh every {args.refresh_interval}, {args.seeds} seeds (mean ± std)"
            + (f"; held-out pydoc NLL: base {base_nll:.3f}, after stage 1 {first['heldout_nll']:.3f}" if nll else "")
            + "\n\n" + table(["method", f"{t1.name} EM after stage 2", "forgetting (EM lost)", f"{t2.name} EM",
                              "average EM", "stage 2 s"] + (["held-out NLL increase vs base"] if nll else []), rows)
            + "\n\nPaired by seed (same checkpoint and data order): mean difference [95 % t interval; * where "
              "it excludes zero], seeds in which the method was better\n\n" + paired_text)
    return results, text


def _plot(results: dict, folder) -> None:
    plt = pyplot()
    summary = results["summary"]
    methods = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "forgetting", "forgetting: task-1 EM lost (lower is better)"),
                           (axes[1], "em_t2", "plasticity: task-2 EM (higher is better)")):
        ax.bar(methods, [summary[m][key]["mean"] for m in methods], yerr=[summary[m][key]["std"] for m in methods],
               capsize=4, color=["#888888", "#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(methods)])
        for i, m in enumerate(methods):
            ax.scatter([i] * len(summary[m][key]["values"]), summary[m][key]["values"], color="k", s=10, zorder=3)
        ax.set_title(title, fontsize=10)
        ax.set_ylabel("exact match (EM)")
    fig.suptitle(f"{results['tasks'][0]} then {results['tasks'][1]}")
    fig.tight_layout()
    fig.savefig(folder / "forgetting.png", dpi=120)
    plt.close(fig)
