"""EPI's two knobs at one isolation ratio, in the main job's setting (multitask.py): the refresh
interval (each of --intervals at the default beta) and the importance EMA factor (each of --betas at
the default interval), with AdamW and static isolation as the paired baselines."""
from __future__ import annotations

from .multitask import run_variants


def variants(args) -> list[tuple[str, str, dict]]:
    """(label, method, overrides): the baselines, then EPI's interval sweep, then its beta sweep
    (the default setting once)."""
    out = [("adamw", "adamw", {}), ("static", "static", {})]
    settings = [(i, args.importance_beta) for i in args.intervals]
    settings += [(args.refresh_interval, b) for b in args.betas if (args.refresh_interval, b) not in settings]
    for interval, beta in settings:
        out.append((f"epi interval {interval} beta {beta:g}", "epi",
                    {"refresh_interval": interval, "importance_beta": beta}))
    return out


def run(args, folder) -> tuple[dict, str]:
    return run_variants(args, folder, variants(args), "ablation")
