"""From paired differences to verdicts a rerun can be expected to repeat.

A verdict is what a paired 95 % t interval says: "better" or "worse" where it excludes zero (the
metric's label says when lower is better), "no difference" where it does not. With 5 seeds such
a verdict is fragile: one seed moves an interval across zero. `split_half` measures how fragile:
it splits the seeds into two disjoint halves in every possible way and counts how often the two
halves reach the same verdict. A verdict is stated only where the halves agree in at least
`STABLE` of the splits; elsewhere it is "inconclusive", whatever the pooled interval says.
"""
from __future__ import annotations

from itertools import combinations

from .report import fmt_paired, paired_differences, table

BETTER, WORSE, NO_DIFFERENCE, INCONCLUSIVE = "better", "worse", "no difference", "inconclusive"
STABLE = 0.75  # the share of half-splits whose halves must agree for a verdict to be stated
MIN_HALF = 3  # seeds per half below which a half's t interval is too wide to say anything


def higher_is_better(label: str) -> bool:
    """Paired-metric labels say "(lower is better)" where it is (the drops, forgetting)."""
    return "lower is better" not in label


def verdict(d: dict, label: str) -> str:
    """better / worse / no difference, from a paired summary's 95 % interval (none: no difference)."""
    if d["ci95"] is None:
        return NO_DIFFERENCE
    lo, hi = d["ci95"]
    if lo <= 0 <= hi:
        return NO_DIFFERENCE
    return BETTER if (lo > 0) == higher_is_better(label) else WORSE


def split_half(diffs: list[float], label: str) -> dict | None:
    """Every split of the seeds into two disjoint halves (each once; with an odd count, the larger
    half takes the odd seed): the share of splits whose halves reach the same verdict, and the
    verdicts of the first and the second half of the seeds in order (e.g. the committed seeds 0-4
    and new seeds 5-9). None below 2 * MIN_HALF seeds."""
    n, size = len(diffs), len(diffs) // 2
    if size < MIN_HALF:
        return None
    hib = higher_is_better(label)

    def half_verdict(indices) -> str:
        return verdict(paired_differences([diffs[i] for i in indices], hib), label)

    # each unordered split once: with even n, the half that holds seed 0
    firsts = [c for c in combinations(range(n), size) if n % 2 or 0 in c]
    agree = sum(half_verdict(c) == half_verdict(sorted(set(range(n)) - set(c))) for c in firsts)
    return {"splits": len(firsts), "agreement": agree / len(firsts),
            "first_half": half_verdict(range(size)), "second_half": half_verdict(range(size, n))}


def stated(d: dict, label: str, check: dict | None) -> str:
    """The verdict to state: the pooled one where the split-half check finds it stable, else
    inconclusive (also when there are too few seeds to check)."""
    if check is None or check["agreement"] < STABLE:
        return INCONCLUSIVE
    return verdict(d, label)


def verdict_table(paired: dict[str, dict[str, dict]]) -> tuple[dict, str]:
    """For every paired difference and metric of a results.json "paired" entry: the pooled verdict,
    the split-half check and the stated verdict; and a markdown table of the stated verdicts with
    the share of agreeing splits."""
    out, rows = {}, []
    metrics = list(next(iter(paired.values()), {}))
    for row, entries in paired.items():
        out[row] = {}
        for label, d in entries.items():
            check = split_half(d["diffs"], label)
            out[row][label] = {"pooled": verdict(d, label), "split_half": check, "stated": stated(d, label, check)}
        rows.append([row, *(_cell(out[row][label]) for label in metrics)])
    stability = {label: _mean([v[label]["split_half"]["agreement"] for v in out.values() if v[label]["split_half"]])
                 for label in metrics}
    if all(x is not None for x in stability.values()):  # which metric's verdicts a rerun repeats most often
        rows.append(["splits agreeing, mean over rows", *(f"{x:.0%}" for x in stability.values())])
    return out, table(["paired difference", *metrics], rows)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _cell(v: dict) -> str:
    check = v["split_half"]
    if check is None:
        return f"{v['stated']} (too few seeds to split)"
    return f"{v['stated']} ({check['agreement']:.0%} of splits agree)"


def replication(committed: dict[str, dict[str, dict]], rerun: dict[str, dict[str, dict]]) -> tuple[list, str]:
    """Per paired difference and metric in both runs: each interval and verdict side by side and
    whether the verdict held (the same verdict; numbers are not expected to match across machines)."""
    out, rows = [], []
    for row, entries in committed.items():
        for label, old in entries.items():
            new = rerun.get(row, {}).get(label)
            if new is None:
                continue
            before, after = verdict(old, label), verdict(new, label)
            out.append({"difference": row, "metric": label, "committed": old, "rerun": new,
                        "committed_verdict": before, "rerun_verdict": after, "held": before == after})
            rows.append([row, label, f"{fmt_paired(old)} ({before})", f"{fmt_paired(new)} ({after})",
                         "yes" if before == after else "**no**"])
    return out, table(["paired difference", "metric", "committed", "rerun", "verdict held"], rows)
