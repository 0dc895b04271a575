"""`--combine FILE FILE ...`: one results.json from runs of one experiment with the same settings and
disjoint seeds, e.g. a committed 5-seed run and 5 more seeds run later or on another machine.

Each paired difference compares two methods started from the same seed on the same machine, so
pooling the seeds of several runs keeps every pair valid; differences between the machines then
count among the seed-to-seed noise (and the split-half check sees them). Every measure is
recomputed from the runs' EM curves (`multitask.measures`), so a file written by an older version
gains the measures it lacks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from .multitask import analyse, measures

COMBINABLE = ("multitask", "ablation")
# what may differ between the runs: which seeds and methods, and where and how fast they ran
FREE = ("seed", "seeds", "methods", "jobs", "out", "progress", "cache_dir", "replicate", "combine")


def load(paths: list[str]) -> list[dict]:
    """The files, checked to be runs of one experiment with the same settings, tasks and disjoint
    seeds, with at least two methods in common; ValueError saying what does not fit otherwise."""
    files = []
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path} as JSON ({e})") from None
        if not isinstance(results, dict) or results.get("experiment") not in COMBINABLE or "runs" not in results:
            raise ValueError(f"{path} is not the results.json of a {' or '.join(COMBINABLE)} run")
        files.append(results)
    first, seen = files[0], {}
    for path, results in zip(paths, files):
        if results["experiment"] != first["experiment"] or results["tasks"] != first["tasks"]:
            raise ValueError(f"{path} is a {results['experiment']} run on other tasks than {paths[0]}")
        for key in sorted(set(first["config"]) & set(results["config"]) - set(FREE)):
            if results["config"][key] != first["config"][key]:
                raise ValueError(f"{path} ran with {key}={results['config'][key]!r}, {paths[0]} with "
                                 f"{first['config'][key]!r}: only seeds and methods may differ")
        for seed in {r["seed"] for rs in results["runs"].values() for r in rs}:
            if seed in seen:
                raise ValueError(f"seed {seed} is in both {seen[seed]} and {path}: the seeds must be disjoint")
            seen[seed] = path
    if len(common(files)) < 2:
        raise ValueError("the files have fewer than two methods in common: nothing to pair")
    return files


def common(files: list[dict]) -> list[str]:
    """The variants every file ran, in the first file's order."""
    return [v for v in files[0]["runs"] if all(v in f["runs"] for f in files[1:])]


def run(args: argparse.Namespace, folder, files: list[dict]) -> tuple[dict, str]:
    """The pooled runs of the common variants, in seed order, analysed as one run would be."""
    first = files[0]
    runs = {v: sorted((r for f in files for r in f["runs"][v]), key=lambda r: r["seed"]) for v in common(files)}
    for rs in runs.values():
        for r in rs:
            r.update(measures(r["curve"], first["tasks"]))
    results, text = analyse(args, folder, first["experiment"], runs, first["majority_baseline"], first["phase_steps"])
    results["combined_from"] = [{"path": path, "seeds": sorted({r["seed"] for rs in f["runs"].values() for r in rs}),
                                 "methods": list(f["runs"]), "environment": f.get("environment")}
                                for path, f in zip(args.combine, files)]
    sources = "; ".join(f"{c['path']}: seeds {c['seeds'][0]}-{c['seeds'][-1]}" for c in results["combined_from"])
    return results, f"Combined from {sources}\n\n{text}"


def settings(files: list[dict], args: argparse.Namespace) -> dict[str, object]:
    """The combined run's settings: the first file's config, with the pooled seeds and methods."""
    pooled = sorted({r["seed"] for f in files for rs in f["runs"].values() for r in rs})
    out = {k: v for k, v in files[0]["config"].items() if k not in FREE and hasattr(args, k)}
    return {**out, "experiment": files[0]["experiment"], "seed": pooled[0], "seeds": len(pooled),
            "methods": common(files)}
