"""Importance drift with isolation off: how much the per-tensor top-p importance masks change over
training, on one task and across a switch to a second task.

The masks are the exact top-p of EPIAdamW's own score EMA (threshold.exact_threshold), snapshotted
every `snapshot_every` steps for every weight matrix; the overlap of two snapshots is the Jaccard
index |A & B| / |A | B|, averaged over matrices. Two independent random masks of ratio p overlap by
p / (2 - p) in expectation: the floor the measured overlaps are compared with.
"""
from __future__ import annotations

import torch

from .. import EPIAdamW
from ..threshold import exact_threshold, isolation_k, score_keys
from .data import exact_match, make_tasks
from .model import model_factory
from .report import pyplot, table
from .train import sampler, train


def top_p_masks(opt: EPIAdamW, named: dict, ratio: float) -> dict[str, torch.Tensor]:
    masks = {}
    for name, p in named.items():
        keys = score_keys(opt.state[p]["importance"])
        masks[name] = keys >= exact_threshold([keys], isolation_k(ratio, keys.numel()))
    return masks


def overlap(a: dict, b: dict) -> float:
    """Mean over matrices of the Jaccard index of two snapshots."""
    vals = [float((a[n] & b[n]).sum()) / max(1, float((a[n] | b[n]).sum())) for n in a]
    return sum(vals) / len(vals)


def run(args, folder) -> tuple[dict, str]:
    tok, new_model, _ = model_factory(args)
    tasks = make_tasks(args)
    model = new_model(args.seed)
    named = {n: p for n, p in model.named_parameters() if p.dim() == 2}
    opt = EPIAdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, isolation_ratio=0.0,
                   importance_beta=args.importance_beta)
    snaps, steps, done = [], [], [0]

    def snap(step: int) -> None:
        snaps.append(top_p_masks(opt, named, args.ratio))
        steps.append(done[0] + step)

    ems = []
    for i, (task, n) in enumerate(zip(tasks, (args.stage1_steps, args.stage2_steps))):
        train(model, opt, tok, sampler([task.train]), n, batch_size=args.batch, seed=args.seed + i,
              desc=f"task {i + 1} ({task.name})", progress=args.progress, every=args.snapshot_every, on_every=snap)
        done[0] += n
        ems.append({t.name: exact_match(model, tok, t.eval) for t in tasks})
    boundary = sum(1 for s in steps if s <= args.stage1_steps)  # snapshots taken during task 1
    matrix = [[overlap(a, b) for b in snaps] for a in snaps]
    consecutive = [matrix[i][i + 1] for i in range(len(snaps) - 1)]
    floor = args.ratio / (2 - args.ratio)
    within1 = consecutive[:boundary - 1]
    within2 = consecutive[boundary:]
    results = {
        "experiment": "drift", "config": vars(args), "tasks": [t.name for t in tasks], "steps": steps,
        "boundary_after_snapshot": boundary, "overlap_matrix": matrix, "consecutive": consecutive,
        "first_vs_last_task1": matrix[0][boundary - 1], "first_vs_last": matrix[0][-1],
        "across_boundary": matrix[boundary - 1][boundary] if boundary < len(snaps) else None,
        "task1_end_vs_task2_end": matrix[boundary - 1][-1], "independent_floor": floor,
        "mean_consecutive_task1": sum(within1) / len(within1) if within1 else None,
        "mean_consecutive_task2": sum(within2) / len(within2) if within2 else None,
        "exact_match_after_each_task": ems}
    _plot(results, folder)
    r = results
    rows = [["consecutive snapshots, task 1 (mean)", _f(r["mean_consecutive_task1"])],
            ["first vs last snapshot of task 1", _f(r["first_vs_last_task1"])],
            ["last of task 1 vs first of task 2 (across the switch)", _f(r["across_boundary"])],
            ["consecutive snapshots, task 2 (mean)", _f(r["mean_consecutive_task2"])],
            ["end of task 1 vs end of task 2", _f(r["task1_end_vs_task2_end"])],
            ["first vs last snapshot (whole run)", _f(r["first_vs_last"])],
            [f"independent masks, p / (2 - p) at p = {args.ratio}", _f(floor)]]
    text = (f"Drift: top-{args.ratio:g} importance masks of {len(named)} weight matrices, snapshots every "
            f"{args.snapshot_every} steps, {tasks[0].name} ({args.stage1_steps} steps) then {tasks[1].name} "
            f"({args.stage2_steps} steps), isolation off, importance_beta {args.importance_beta}\n\n"
            + table(["Jaccard overlap of", "value"], rows))
    return results, text


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _plot(r: dict, folder) -> None:
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    steps = r["steps"]
    a.plot(steps, r["overlap_matrix"][0], "o-", label="vs first snapshot")
    a.plot(steps[1:], r["consecutive"], "s-", label="vs previous snapshot")
    a.axhline(r["independent_floor"], color="gray", ls="--", label="independent masks p/(2-p)")
    a.axvline(r["config"]["stage1_steps"], color="red", ls=":", label="task switch")
    a.set_xlabel("step")
    a.set_ylabel("Jaccard overlap")
    a.set_ylim(0, 1)
    a.legend(fontsize=8)
    im = b.imshow(r["overlap_matrix"], vmin=0, vmax=1, cmap="viridis")
    b.set_xticks(range(len(steps)), steps, rotation=90, fontsize=7)
    b.set_yticks(range(len(steps)), steps, fontsize=7)
    b.set_xlabel("snapshot step")
    b.set_ylabel("snapshot step")
    b.set_title("pairwise overlap of snapshots", fontsize=10)
    fig.colorbar(im, ax=b)
    fig.suptitle(f"importance drift: {r['tasks'][0]} then {r['tasks'][1]}")
    fig.tight_layout()
    fig.savefig(folder / "drift.png", dpi=120)
    plt.close(fig)
