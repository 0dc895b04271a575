"""Mask refresh: the reference computation of new isolation masks (when it happens: schedule.py).

At a refresh step t the new mask of each tensor is ``key(S) >= tau`` where S are the scores at the
*start* of step t (before this step's EMA update) and tau comes from :mod:`epi_kernels.threshold`.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from . import threshold as th
from .mask import jaccard_counts, packed_numel, popcount, score_mask, threshold_mask
from .normalise import exponent_sums, mean_of_sums
from .threshold import (KEY_NONE, TIE_NONE, approx_threshold, approx_thresholds, eager_slots, exact_thresholds,
                        isolation_k, radix_thresholds, score_keys, slices, tie_counts, tie_cuts)

__all__ = ["RefreshOps", "EAGER_OPS", "Shard", "Scaled", "refresh_masks", "selection_shard", "release_heap"]


@dataclass(frozen=True)
class RefreshOps:
    """The elementwise passes of a refresh over scores, each run slice by slice (threshold.slices)
    and computing keys as it goes: eager ATen ops, or their torch.compile'd forms (compiled
    backend). Either way the same integers come out."""
    keys: Callable[[Tensor], Tensor] = score_keys
    bins: Callable[[Tensor, Tensor], Tensor] = eager_slots
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


class Scaled:
    """A tensor's scores divided by a 0-dim fp32 divisor, computed slice by slice as the engine
    reads them (threshold.slices), into a buffer reused from slice to slice (`scratch`): scope=
    "global" compares these without an fp32 copy of the group's scores. A slice holds the fp32
    quotients of a whole-tensor division (elementwise), until the next slice is read."""

    def __init__(self, scores: Tensor, divisor: Tensor, scratch: th.Scratch) -> None:
        self.scores, self.divisor, self.scratch = scores, divisor, scratch

    @property
    def device(self) -> torch.device:
        return self.scores.device

    def numel(self) -> int:
        return self.scores.numel()

    def __getitem__(self, index: slice) -> Tensor:
        if index.start == 0 and self.scores.device.type == "cpu" and self.scores.numel() > th.SLICE:
            # a pass over a group's tensors (its pooled histogram, radix levels, tie counts) starts
            # this tensor: hand back what the previous tensor's slices left free (_tidied)
            release_heap()
        part = self.scores[index]
        out = self.scratch(part, torch.float32)
        if part.dtype != torch.float32:
            return out.copy_(part).div_(self.divisor)
        return torch.div(part, self.divisor, out=out)


def _normalised(scores: Sequence[Tensor], numels: Sequence[int], ops: RefreshOps,
                reduce: Callable[[Tensor], Tensor]) -> list[Scaled]:
    """Each tensor's scores divided by its mean finite score (scope="global"; normalise.py defines
    the mean), as :class:`Scaled` sharing one set of slice buffers. `numels`: the whole tensors'
    numels; `reduce` sums the exponent sums of all the tensors over their shards in one call."""
    scratch = th.Scratch()
    flat = [s.detach().reshape(-1) for s in scores]
    sums = reduce(torch.stack([exponent_sums(s) for s in flat])) if flat else []
    return [Scaled(s, torch.tensor(mean_of_sums(row, n), dtype=torch.float32, device=s.device), scratch)
            for s, row, n in zip(flat, sums, numels)]


def _threshold(values: Sequence[Tensor], k: int, anchor: int, mode: str, ops: RefreshOps,
               reduce: Callable[[Tensor], Tensor] = th.identity) -> tuple[int, bool]:
    """The threshold of one selection over `values` (one tensor, or a group's pooled)."""
    if mode == "exact":  # the radix select: the exact k-th largest key, in bounded memory
        return radix_thresholds([values], [k], reduce, ops.keys)[0], True
    return approx_threshold(values, k, anchor, ops.bins, ops.keys, reduce)


def _store(state: dict, packed: Tensor, kept: Tensor, count: Tensor, tau: int, k: int, exact: bool) -> None:
    """Put a new packed mask in force; `kept` = |old & new|, `count` = |new| (whole-tensor counts)."""
    state["isolation_overlap"].copy_(jaccard_counts(kept, state["isolated_count"], count))
    state["isolation_mask"].copy_(packed)
    state["threshold_bits"].fill_(tau)
    state["isolation_k"].fill_(k)
    state["isolated_count"].copy_(count)
    state["threshold_exact"].fill_(exact)


def _tidied(values: Tensor, out):
    """`out`, after handing the C heap's free pages back (release_heap) if `values`, just read, are
    a CPU tensor of several slices: each slice's passes can leave about a slice's worth of free
    heap behind (blocks that are freed and asked for again do not always refit), which would add
    up over a tensor's slices and a group's tensors."""
    if values.device.type == "cpu" and values.numel() > th.SLICE:
        release_heap()
    return out


def _cuts(values: Sequence[Tensor], taus: Sequence[tuple[int, bool]], ks: Sequence[int], ops: RefreshOps,
          shard: Shard | None, scope: str) -> list[int]:
    """Tie cuts (threshold.tie_cuts) of the tensors of one refresh batch. Only exact thresholds can
    need one, so window answers cost nothing; shards of a batch share one collective."""
    exact = [i for i, (tau, repaired) in enumerate(taus) if repaired]
    cuts = [TIE_NONE] * len(values)
    if not exact:
        return cuts
    scratch = th.Scratch()  # one set of slice buffers for all the tensors
    if scope == "global":  # one selection over the group's tensors: tensor order, then shard order
        tau = taus[0][0]
        counts = torch.stack([_tidied(v, tie_counts(v, tau, ops.keys, scratch)) for v in values])
        width, position = (shard.shards, shard.position) if shard is not None else (1, 0)
        if shard is not None:  # every shard's counts of tensor i in row i * width + its position
            rows = torch.zeros(len(values), width, 2, dtype=torch.int64)
            rows[:, position] = counts
            counts = shard.reduce(rows).reshape(-1, 2)
        return tie_cuts(counts, [(i * width + position, v) for i, v in enumerate(values)], tau, ks[0], ops.keys)
    counts = torch.stack([_tidied(values[i], tie_counts(values[i], taus[i][0], ops.keys, scratch)) for i in exact])
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
    packed = [_tidied(v, _mask(v, tau, cut, ops)) for v, (tau, _), cut in zip(values, taus, cuts)]
    counts = [(popcount(pk, st["isolation_mask"]), popcount(pk)) for st, pk in zip(states, packed)]
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
    refresh step). scope="tensor": one top-k per tensor; scope="global": one top-k over all
    tensors' mean-normalised scores (normalise.py), sharing one threshold. `shards[i]` describes
    state i's tensor when it is a shard of a larger one (FSDP2, a ZeRO partition's piece): its
    counts are summed over the shard group, so k and the threshold are the whole tensor's (with
    scope="global", every tensor must be a shard of one group, or none: selection_shard). The
    shards of a group go through each phase together: one collective for all their window
    histograms, one for all their mask counts (and, for tensors the window cannot answer, one per
    radix level per threshold.RADIX_BATCH tensors; for scope="global", first one for the means).
    """
    shards = list(shards) if shards is not None else [None] * len(states)
    scores = list(scores) if scores is not None else [st["importance"] for st in states]
    if scope == "global":
        _refresh_group(states, scores, shards, isolation_ratio, threshold, ops)
    else:
        _refresh_tensors(states, scores, shards, isolation_ratio, threshold, ops)
    if any(s.device.type == "cpu" for s in scores):
        release_heap()


def selection_shard(shards: Sequence[Shard | None], where: str = "") -> Shard | None:
    """The shard group of a scope="global" selection over tensors described by `shards`: None when
    no tensor is sharded; ValueError unless every tensor is sharded over the same group at the same
    position (a replicated tensor beside shards would be counted once per rank)."""
    first = shards[0] if shards else None
    if all(s is None for s in shards):
        return None
    if any(s is None or (s.reduce, s.position, s.shards) != (first.reduce, first.position, first.shards)
           for s in shards):
        raise ValueError(f"scope='global'{where} selects over tensors that are all sharded over one process "
                         "group (FSDP2 fully_shard, HSDP, DeepSpeed ZeRO) or none of them; this group mixes "
                         "sharded and unsharded tensors or shard groups: put them in separate param groups")
    return first


def _refresh_group(states: Sequence[dict], scores: Sequence[Tensor], shards: Sequence[Shard | None],
                   isolation_ratio: float, threshold: str, ops: RefreshOps) -> None:
    """scope="global": one top-k over all tensors' mean-normalised scores, one threshold."""
    shard = selection_shard(shards)
    reduce = shard.reduce if shard is not None else th.identity
    numels = [sh.numel if sh is not None else s.numel() for s, sh in zip(scores, shards)]
    values = _normalised(scores, numels, ops, reduce)
    k = isolation_k(isolation_ratio, sum(numels))
    anchor = int(states[0]["threshold_bits"]) if states else KEY_NONE
    tau = _threshold(values, k, anchor, threshold, ops, reduce)
    if any(v.device.type == "cpu" for v in values):
        release_heap()
    _apply(states, values, [tau] * len(states), [k] * len(states), ops, shard, scope="global")


def _refresh_tensors(states: Sequence[dict], scores: Sequence[Tensor], shards: Sequence[Shard | None],
                     isolation_ratio: float, threshold: str, ops: RefreshOps) -> None:
    """scope="tensor": one top-k per tensor; the shards of one process group as one batch."""
    by_group: dict = {}
    for i, shard in enumerate(shards):
        by_group.setdefault((shard.reduce, shard.position, shard.shards) if shard else None, []).append(i)
    for key, idx in by_group.items():
        for batch in ([[i] for i in idx] if key is None else [idx]):
            sts = [states[i] for i in batch]
            shard = shards[batch[0]]
            values = [scores[i].reshape(-1) for i in batch]
            ks = [isolation_k(isolation_ratio, shards[i].numel if shards[i] else v.numel())
                  for i, v in zip(batch, values)]
            anchors = [int(st["threshold_bits"]) for st in sts]
            if shard is None:
                taus = [_tidied(v, _threshold([v], k, a, threshold, ops)) for v, k, a in zip(values, ks, anchors)]
            elif threshold == "exact":
                taus = [(tau, True) for tau in exact_thresholds([[v] for v in values], ks, shard.reduce, ops.keys)]
            else:
                taus = approx_thresholds([[v] for v in values], ks, anchors, ops.bins, ops.keys, shard.reduce)
            _apply(sts, values, taus, ks, ops, shard)


def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; absent elsewhere (musl, macOS, Windows)
    except (AttributeError, OSError, TypeError):
        return None


_TRIM = _malloc_trim()
RELEASE_HEAP = True  # set False to leave the C heap as the refresh left it


def release_heap() -> None:
    """Hand the free pages of the C heap back to the system (glibc's malloc_trim(0); a no-op where
    there is none or RELEASE_HEAP is False): refresh_masks calls it after the passes over each CPU
    tensor of several slices and at its end.

    glibc serves blocks under its mmap threshold from its heap, and the threshold rises to the size
    of any freed mmapped block (up to 32 MiB), so a training process soon gets a refresh's slice
    temporaries (threshold.SLICE) from the heap. Freed heap memory stays resident, and blocks that
    are freed and asked for again do not refit their holes exactly (torch asks for 64-byte aligned
    blocks; small allocations take the slivers between them), so the heap grows by a few times a
    slice's temporaries per tensor, and that stayed resident, adding to every later step's peak
    (bench/README.md, "Peak memory of a step and of a refresh": 3 to 6 B/param on a 20M-element
    tensor, scope="tensor", before this). A release walks the heap's free blocks (under a
    millisecond); the cost is that the next tensor's passes fault the returned pages in again,
    zeroed: about 0.1 s per refresh of a 20M-parameter model on a 2-core CPU (bench/README.md).
    """
    if RELEASE_HEAP and _TRIM is not None:
        _TRIM(0)
