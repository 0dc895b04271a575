"""Mask refresh: the reference computation of new isolation masks (when it happens: schedule.py).

At a refresh step t the new mask of each tensor is ``key(S) >= tau`` where S are the scores at the
*start* of step t (before this step's EMA update) and tau comes from :mod:`epi_kernels.threshold`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from .mask import jaccard_counts, packed_numel, popcount, score_mask, threshold_mask
from .threshold import (KEY_NONE, TIE_NONE, approx_threshold, approx_thresholds, isolation_k,
                        radix_thresholds, score_keys, score_slots, slices, tie_counts, tie_cuts)

__all__ = ["RefreshOps", "EAGER_OPS", "Shard", "refresh_masks"]


@dataclass(frozen=True)
class RefreshOps:
    """The elementwise passes of a refresh over scores, each run slice by slice (threshold.slices)
    and computing keys as it goes: eager ATen ops, or their torch.compile'd forms (compiled
    backend). Either way the same integers come out."""
    keys: Callable[[Tensor], Tensor] = score_keys
    bins: Callable[[Tensor, Tensor], Tensor] = score_slots
    mask: Callable[[Tensor, Tensor], Tensor] = score_mask


EAGER_OPS = RefreshOps()


@dataclass(frozen=True)
class Shard:
    """This process's part of a tensor sharded over a process group (FSDP2): the whole tensor's
    numel, and `reduce`, which sums integer counts over the group (all ranks get the same sums,
    so they reach the same threshold for the whole tensor). `position` of `shards`: this shard's
    place in the tensor's order (the order of the tie rule, threshold.tie_cuts)."""
    numel: int
    reduce: Callable[[Tensor], Tensor]
    position: int = 0
    shards: int = 1


def _global_values(scores: Tensor) -> Tensor:
    """Scores divided by their tensor's mean finite score (scope="global"): an fp32 copy, the one
    refresh temporary that scales with the tensor (4 B per element of the group).

    The mean is accumulated in float64; non-finite scores count as 0 and stay ineligible.
    """
    s = scores.detach()
    if s.numel() == 0:
        return s.to(torch.float32)
    total = sum(torch.where(part.isfinite(), part, 0).sum(dtype=torch.float64) for _, part in slices(s))
    return s.to(torch.float32) / (total / s.numel()).to(torch.float32)


def _threshold(values: Sequence[Tensor], k: int, anchor: int, mode: str, ops: RefreshOps) -> tuple[int, bool]:
    if mode == "exact":  # the radix select: the exact k-th largest key, in bounded memory
        return radix_thresholds([values], [k], keys=ops.keys)[0], True
    return approx_threshold(values, k, anchor, ops.bins, ops.keys)


def _store(state: dict, packed: Tensor, kept: Tensor, count: Tensor, tau: int, k: int, exact: bool) -> None:
    """Put a new packed mask in force; `kept` = |old & new|, `count` = |new| (whole-tensor counts)."""
    state["isolation_overlap"].copy_(jaccard_counts(kept, state["isolated_count"], count))
    state["isolation_mask"].copy_(packed)
    state["threshold_bits"].fill_(tau)
    state["isolation_k"].fill_(k)
    state["isolated_count"].copy_(count)
    state["threshold_exact"].fill_(exact)


def _cuts(values: Sequence[Tensor], taus: Sequence[tuple[int, bool]], ks: Sequence[int], ops: RefreshOps,
          shard: Shard | None, scope: str) -> list[int]:
    """Tie cuts (threshold.tie_cuts) of the tensors of one refresh batch. Only exact thresholds can
    need one, so window answers cost nothing; shards of a batch share one collective."""
    exact = [i for i, (tau, repaired) in enumerate(taus) if repaired]
    cuts = [TIE_NONE] * len(values)
    if not exact:
        return cuts
    if scope == "global":  # one selection over the group's tensors, in order
        tau = taus[0][0]
        counts = torch.stack([tie_counts(v, tau, ops.keys) for v in values])
        return tie_cuts(counts, list(enumerate(values)), tau, ks[0], ops.keys)
    counts = torch.stack([tie_counts(values[i], taus[i][0], ops.keys) for i in exact])
    if shard is not None:  # every shard's counts, each in its own row: [shards, len(exact), 2]
        rows = torch.zeros(shard.shards, *counts.shape, dtype=torch.int64)
        rows[shard.position] = counts
        counts = shard.reduce(rows)
    position = shard.position if shard is not None else 0
    for j, i in enumerate(exact):
        per_piece = counts[:, j] if shard is not None else counts[j:j + 1]
        cuts[i] = tie_cuts(per_piece, [(position, values[i])], taus[i][0], ks[i], ops.keys)[0]
    return cuts


def _mask(values: Tensor, tau: int, cut: int, ops: RefreshOps) -> Tensor:
    """The packed mask of threshold `tau` and tie cut `cut`, slice by slice."""
    packed = torch.empty(packed_numel(values.numel()), dtype=torch.uint8, device=values.device)
    at = torch.tensor(tau, dtype=torch.int32, device=values.device)
    for start, part in slices(values):
        local = cut - start  # the cut within this slice (<= 0: none of its tied keys)
        words = ops.mask(part, at) if local >= part.numel() else threshold_mask(ops.keys(part), tau, max(local, 0))
        packed[start // 8:start // 8 + words.numel()] = words
    return packed


def _apply(states: Sequence[dict], values: Sequence[Tensor], taus: Sequence[tuple[int, bool]], ks: Sequence[int],
           ops: RefreshOps, shard: Shard | None = None, scope: str = "tensor") -> None:
    """Masks from thresholds and tie cuts, their counts (summed over shards through one reduce),
    the states."""
    cuts = _cuts(values, taus, ks, ops, shard, scope)
    packed = [_mask(v, tau, cut, ops) for v, (tau, _), cut in zip(values, taus, cuts)]
    counts = [(popcount(st["isolation_mask"] & pk), popcount(pk)) for st, pk in zip(states, packed)]
    if shard is not None:  # shards: the whole tensors' counts
        counts = [tuple(row.unbind(0)) for row in shard.reduce(torch.stack([torch.stack(c) for c in counts]))]
    for st, pk, (kept, count), (tau, exact), k in zip(states, packed, counts, taus, ks):
        _store(st, pk, kept, count, tau, k, exact)


def refresh_masks(states: Sequence[dict], *, isolation_ratio: float, scope: str, threshold: str,
                  ops: RefreshOps = EAGER_OPS, shards: Sequence[Shard | None] | None = None,
                  scores: Sequence[Tensor] | None = None) -> None:
    """Recompute the isolation masks of one param group's stepped tensors from their scores
    (`scores[i]`, default: each state's "importance"; importance="exp_avg_sq" passes exp_avg_sq).

    Writes each state's packed mask, threshold and refresh statistics (the caller records the
    refresh step). scope="tensor": one top-k
    per tensor; scope="global": one top-k over all tensors' mean-normalised scores, sharing one
    threshold. `shards[i]` describes state i's tensor when it is a shard of a larger one (FSDP2):
    its counts are summed over the shard group, so k and the threshold are the whole tensor's;
    the shards of a group go through each phase together: one collective for all their window
    histograms, one for all their mask counts (and, for tensors the window cannot answer, one per
    radix level per threshold.RADIX_BATCH tensors).
    """
    shards = list(shards) if shards is not None else [None] * len(states)
    scores = list(scores) if scores is not None else [st["importance"] for st in states]
    if any(shards) and (scope != "tensor" or threshold != "approx"):
        raise NotImplementedError("sharded (FSDP2) parameters support scope='tensor' with threshold='approx' only")
    if scope == "tensor":
        by_group: dict = {}
        for i, shard in enumerate(shards):
            by_group.setdefault((shard.reduce, shard.position, shard.shards) if shard else None, []).append(i)
        for key, idx in by_group.items():
            batches = [[i] for i in idx] if key is None else [idx]
            for batch in batches:
                sts = [states[i] for i in batch]
                shard = shards[batch[0]]
                values = [scores[i].reshape(-1) for i in batch]
                ks = [isolation_k(isolation_ratio, shards[i].numel if shards[i] else v.numel())
                      for i, v in zip(batch, values)]
                anchors = [int(st["threshold_bits"]) for st in sts]
                if shard is None:
                    taus = [_threshold([v], k, a, threshold, ops) for v, k, a in zip(values, ks, anchors)]
                else:
                    taus = approx_thresholds([[v] for v in values], ks, anchors, ops.bins, ops.keys, shard.reduce)
                _apply(sts, values, taus, ks, ops, shard)
        return
    values = [_global_values(s.reshape(-1)) for s in scores]
    k = isolation_k(isolation_ratio, sum(v.numel() for v in values))
    anchor = int(states[0]["threshold_bits"]) if states else KEY_NONE
    tau = _threshold(values, k, anchor, threshold, ops)
    _apply(states, values, [tau] * len(states), [k] * len(states), ops, scope="global")
