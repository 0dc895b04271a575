"""`--replicate FILE`: rerun a committed experiment with the settings its results.json records and
say, per paired difference, whether the verdict held.

Runs are deterministic per machine, not across machines (environment.py), so a replication on
another machine is not expected to reproduce the numbers, only the verdicts. The rerun's settings
are the file's own; only where and how fast it runs (LOCAL) comes from the command line.
"""
from __future__ import annotations

import json
from pathlib import Path

from .environment import differences
from .verdicts import replication

REPLICABLE = ("multitask", "ablation", "forgetting")  # the experiments whose results have "paired"
LOCAL = ("jobs", "out", "progress", "cache_dir")  # results do not depend on these (tested)


def load(path: str) -> dict:
    """A committed results.json that can be replicated; ValueError saying what is wrong otherwise."""
    try:
        results = json.loads(Path(path).read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(results, dict) or not {"experiment", "config", "paired"} <= results.keys():
        raise ValueError(f"{path} is not an experiment's results.json (no experiment, config and paired entries)")
    if results["experiment"] not in REPLICABLE:
        raise ValueError(f"{path} is a {results['experiment']} run; replication compares paired differences, "
                         f"which {', '.join(REPLICABLE)} runs have")
    if not results["paired"]:
        raise ValueError(f"{path} has no paired differences to replicate (one method only)")
    return results


def settings(committed: dict, args) -> dict[str, object]:
    """The rerun's settings: the committed run's config, with `args`' LOCAL flags; settings the
    file does not record (an older version) keep this version's defaults."""
    keep = {"replicate", "combine", *LOCAL}  # a rerun of a combined result runs its seeds, it combines nothing
    return {key: value for key, value in committed["config"].items() if key not in keep and hasattr(args, key)}


def report(committed: dict, path: str, rerun: dict) -> tuple[dict, str]:
    """The environment differences and the verdict-by-verdict comparison: results.json's
    "replication" entry and the text appended to the rerun's table."""
    # a combined file's runs ran where its sources did, not where they were combined
    sources = [(c["path"], c.get("environment") or {}) for c in committed.get("combined_from", ())]
    env = {source: differences(recorded, rerun["environment"])
           for source, recorded in sources or [(path, committed.get("environment", {}))]}
    rows, text = replication(committed["paired"], rerun["paired"])
    held = sum(r["held"] for r in rows)
    head = (f"Replication of {path}: {held} of {len(rows)} verdicts held (better / worse where the 95 % interval "
            f"excludes zero, else no difference; numbers are not expected to match across machines)")
    envtext = "".join(f"\n\nEnvironment differences from the run of {source}:\n" + "\n".join(f"- {x}" for x in lines)
                      if lines else f"\n\nEnvironment: the same as the run of {source} (date and host aside)"
                      for source, lines in env.items())
    return ({"committed": path, "environment_differences": env, "held": held, "verdicts": rows},
            head + envtext + "\n\n" + text)
