"""Per-tensor top-k thresholds from integer histograms of the scores' fp32 bit patterns.

This module is the reference for every backend: the Triton and CUDA kernels build the same
histograms and must reach the same threshold, bit for bit (DESIGN.md, "The threshold contract").
Its integer constants are the kernel ABI's (:mod:`epi_kernels.abi`).
Everything after the histogram is integer arithmetic, so no rounding can differ between devices.

The algorithm
-------------
1. **Keys.** A score ``s`` maps to ``key(s) = bits(fp32(|s|))``, an int32. For non-negative floats
   the bit pattern is monotone in value, so ``s_i >= s_j  <=>  key_i >= key_j``. Scores that can never
   be isolated get key 0: zeros (no gradient evidence yet) and non-finite values (NaN/Inf policy:
   a non-finite score is never isolated and never counted). Only keys >= 1 are *eligible*.
   The isolation mask is ``key >= tau`` for an integer threshold ``tau >= 1``; ``tau = KEY_NONE``
   (the key of +inf, which no eligible key reaches) isolates nothing.

2. **Window histogram** (the fused-pass path). Given the previous threshold ``anchor``, the window
   starts at ``origin = max(BIN_WIDTH, floor_to_bin(anchor - 2**23))`` (one octave below) and has
   ``WINDOW_BINS = WINDOW_OCTAVES * 2**MANTISSA_BITS`` bins of ``BIN_WIDTH = 2**(23 - MANTISSA_BITS)``
   keys each: within an octave the key is linear in the value, so every bin is a fixed relative
   width (2**-10). Eligible keys at or above the window end are counted in ``over``; keys below
   the origin are not needed (the CPU histogram spreads them over scratch counters only for speed).

3. **Bin selection** (:func:`select_bin`). With ``C(b)`` = number of eligible keys in bins >= b plus
   ``over``, the k-th largest key lies in ``b* = max{b : C(b) >= k}``; ``need = k - C(b*+1)`` keys must
   still come from that bin, which holds ``count`` keys. If ``over >= k`` or ``C(0) < k`` the k-th
   largest lies outside the window: a *miss*.

4. **Interpolation** (:func:`window_threshold`). Assuming the bin's keys are spread evenly,
   ``tau = bin_hi - ceil(need * BIN_WIDTH / count)``, which always lies inside the bin (C3). The number
   selected is then within ``count - 1`` of k for any input. If that bound exceeds
   :func:`tolerance` (a coarse bin: ties, very flat data), the result is not accepted.

5. **Repair** (:func:`radix_thresholds`): on a miss, a coarse bin, or with no previous threshold,
   an exact two-level radix select. Level 1 counts ``key >> 15`` (65536 buckets) and picks the
   bucket of the k-th largest; level 2 counts the low 15 bits of the keys in that bucket. The result
   is exactly the k-th largest eligible key (k clipped to the number of eligible keys, so a tensor
   with fewer than k positive finite scores isolates all of them).

6. **Tie cut** (:func:`tie_cuts`): an exact threshold can sit on a value many keys share (a bias
   whose gradients are all equal). When ``#{key > tau} + #{key == tau} > k + tolerance(k)``, only
   the first ``need = k - #{key > tau}`` tied keys in flat (logical) order are isolated: the mask
   is ``key > tau or (key == tau and i < cut)`` with ``cut`` one past the need-th tied element, so
   exactly k are selected. Otherwise ``cut = TIE_NONE`` and the mask is ``key >= tau``. The window
   path never needs a cut: its count error is bounded by the tolerance already (step 4).

Element order is the logical (row-major) order of the tensor, whatever its strides.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Callable, Iterator, Sequence

import torch
from torch import Tensor

from .abi import (BIN_SHIFT, BIN_WIDTH, KEY_NONE, MANTISSA_BITS, TIE_NONE, TOLERANCE_DIVISOR, TOLERANCE_MIN,
                  WINDOW_BINS, WINDOW_OCTAVES)

__all__ = [
    "KEY_NONE", "TIE_NONE", "MANTISSA_BITS", "WINDOW_OCTAVES", "BIN_SHIFT", "BIN_WIDTH", "WINDOW_BINS",
    "RADIX_SHIFT", "RADIX_BATCH", "UNDER_SLOTS", "identity", "score_keys", "isolation_k", "tolerance", "window_origin", "window_bins", "window_histogram",
    "select_bin", "window_threshold", "radix_thresholds", "exact_thresholds", "approx_threshold",
    "approx_thresholds", "exact_threshold", "needs_tie_cut", "tie_counts", "tie_cuts", "tie_cut", "SLICE", "slices", "score_slots",
    "eager_slots", "Scratch",
]

RADIX_SHIFT = 15  # repair: level 1 = key >> 15 (2**16 buckets), level 2 = low 15 bits
RADIX_BATCH = 32  # tensors whose repairs share one reduce per level (approx_thresholds)


def score_keys(scores: Tensor) -> Tensor:
    """int32 keys of a score tensor, flattened in logical order; ineligible scores get key 0."""
    bits = scores.detach().reshape(-1).to(torch.float32).view(torch.int32) & 0x7FFFFFFF
    return bits.masked_fill_(bits >= KEY_NONE, 0)


def isolation_k(ratio: float, numel: int) -> int:
    """k = floor(ratio * numel), with the ratio read as the decimal the user wrote.

    ``floor(0.29 * 100)`` is 28 in binary floating point; ``Fraction(repr(0.29))`` is exactly 29/100.
    """
    return int(Fraction(repr(float(ratio))) * numel)


def tolerance(k: int) -> int:
    """Largest count error accepted from interpolation: max(floor(k / 200), 4) (C4's 0.5 % slack)."""
    return max(k // TOLERANCE_DIVISOR, TOLERANCE_MIN)


def window_origin(anchor: int | Tensor) -> int | Tensor:
    """First key of the window for a previous threshold `anchor`: one octave lower, bin aligned,
    and never below BIN_WIDTH, so that key 0 (ineligible) always falls below the window (a k-th
    largest key under BIN_WIDTH, a denormal below 1.2e-41, is left to the repair path).
    Elementwise on an int32 tensor of anchors (the kernels' origin tables)."""
    origin = ((anchor - (1 << 23)) >> BIN_SHIFT) << BIN_SHIFT
    return origin.clamp(min=BIN_WIDTH) if isinstance(origin, Tensor) else max(BIN_WIDTH, origin)


def identity(values: Tensor) -> Tensor:
    """Values that already are keys."""
    return values


SLICE = 1 << 18  # elements per pass of the eager engine (a multiple of 64); below compiled.STATIC_NUMEL


def slices(values: Tensor) -> Iterator[tuple[int, Tensor]]:
    """(offset, view) of consecutive SLICE-element slices of a flat tensor (a multiple of 64, so
    each slice's packed mask is whole words). Every eager pass works slice by slice, so a refresh's
    temporaries (keys, slots, digits, comparisons, float64 partial sums) take at most about 9 B per
    element of one slice (2.3 MiB) at a time, whatever the tensor's size. On the CPU that is what
    the heap grows by during a refresh (glibc serves blocks this size from its heap, a few times
    their size with reuse), which is why slices are small (bench/memory.py); refresh.release_heap
    hands it back after the refresh. `values` may also be any object with ``numel()`` and slicing
    (refresh.Scaled)."""
    for start in range(0, values.numel(), SLICE):
        yield start, values[start:start + SLICE]


def _keys(values: Sequence[Tensor], keys: Callable[[Tensor], Tensor]) -> Iterator[Tensor]:
    """The keys of `values`, slice by slice."""
    for v in values:
        for _, part in slices(v):
            yield keys(part)


class Scratch:
    """Buffers reused from slice to slice by one pass (out= of its elementwise steps): one block per
    dtype for the whole pass instead of a new one per slice, which the heap would not refit (see
    refresh.release_heap)."""

    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, Tensor] = {}

    def __call__(self, like: Tensor, dtype: torch.dtype) -> Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < like.numel() or buf.device != like.device:
            buf = self.buffers[dtype] = torch.empty(like.numel(), dtype=dtype, device=like.device)
        return buf[:like.numel()]


def needs_tie_cut(k: int, above: int, tied: int) -> bool:
    """Whether `key >= tau` (``above`` keys greater, ``tied`` equal) selects more than k + tolerance(k)
    and so needs a tie cut (C5). Only an exact threshold can: the window's error is bounded."""
    return above + tied > k + tolerance(k)


def _nth_tied(values: Tensor, tau: int, n: int, keys: Callable[[Tensor], Tensor]) -> int:
    """Flat index of the n-th (1-based) key equal to tau, of values holding at least n of them."""
    for start, part in slices(values):
        tied = (keys(part) == tau).nonzero()
        if n <= tied.shape[0]:
            return start + int(tied[n - 1, 0])
        n -= tied.shape[0]
    raise ValueError("fewer tied keys than counted")


def tie_counts(values: Tensor, tau: int, keys: Callable[[Tensor], Tensor] = identity,
               scratch: Scratch | None = None) -> Tensor:
    """(#{key > tau}, #{key == tau}) of one piece of values (`keys` maps them to keys): int64 [2], on the CPU.
    `scratch`: buffers to reuse (one set for the pieces of a selection)."""
    counts = torch.zeros(2, dtype=torch.int64)
    scratch = Scratch() if scratch is None else scratch
    for key in _keys([values], keys):
        flags = scratch(key, torch.bool)
        above = torch.count_nonzero(torch.gt(key, tau, out=flags))
        counts += torch.stack([above, torch.count_nonzero(torch.eq(key, tau, out=flags))]).cpu()
    return counts


def tie_cuts(counts: Tensor, pieces: Sequence[tuple[int, Tensor]], tau: int, k: int,
             keys: Callable[[Tensor], Tensor] = identity) -> list[int]:
    """The tie cut of each held piece of one selection (threshold `tau`, top-k `k`).

    A selection is one tensor, a param group's tensors in order (scope="global"), or a tensor's
    shards in order (FSDP2). `counts` int64 [n, 2] holds :func:`tie_counts` of all n pieces in that
    order; `pieces` are (index, values) of the pieces this process holds (`keys` maps values to
    keys). Every cut is TIE_NONE unless :func:`needs_tie_cut`; then the first ``k - #{key > tau}``
    tied keys in flat order across the pieces are isolated: a piece's cut is 0 (none of its tied keys), TIE_NONE (all of them), or
    one past the flat index of its last isolated tied key."""
    above, tied = (int(c) for c in counts.sum(0))
    if tau >= KEY_NONE or not needs_tie_cut(k, above, tied):
        return [TIE_NONE] * len(pieces)
    need = k - above  # in [1, tied]: tau is the exact k-th largest
    before = torch.cumsum(counts[:, 1], 0) - counts[:, 1]
    cuts = []
    for j, piece in pieces:
        left = need - int(before[j])
        if left <= 0:
            cuts.append(0)
        elif left >= int(counts[j, 1]):
            cuts.append(TIE_NONE)
        else:
            cuts.append(_nth_tied(piece, tau, left, keys) + 1)
    return cuts


def tie_cut(values: Tensor, tau: int, k: int, keys: Callable[[Tensor], Tensor] = identity) -> int:
    """The tie cut of one unsharded tensor (:func:`tie_cuts` with a single piece)."""
    return tie_cuts(tie_counts(values, tau, keys)[None], [(0, values)], tau, k, keys)[0]


UNDER_SLOTS = 64  # keys below the window are spread over this many slots (see window_bins)


def score_slots(scores: Tensor, origin: int | Tensor) -> Tensor:
    """:func:`window_bins` of the keys of scores (one pass from scores to slots). Pure tensor code:
    the compiled backend compiles it (:func:`eager_slots` is the eager engine's form)."""
    return window_bins(score_keys(scores), origin)


def eager_slots(scores: Tensor, origin: int | Tensor) -> Tensor:
    """:func:`score_slots` with fewer temporaries (9 B per element at most, against 17): its keys
    are its own, so they become the below-window slots in place, and the result is written over
    the window slots. The same integers; eager only (out= of an input)."""
    key = score_keys(scores)
    b = key - origin
    b >>= BIN_SHIFT
    b.clamp_(max=WINDOW_BINS).add_(1)
    key &= UNDER_SLOTS - 1
    key += WINDOW_BINS + 2
    return torch.where(b > 0, b, key, out=b)


def window_bins(key: Tensor, origin: int | Tensor) -> Tensor:
    """Histogram slot of each key: 1 + b for window bin b, WINDOW_BINS + 1 above the window, and for
    keys below it (or ineligible) WINDOW_BINS + 2 + (key % UNDER_SLOTS). Most keys of a tensor lie
    below the window; spreading them over 64 counters instead of one avoids a serial chain of
    increments to a single counter in the histogram. Slot 0 is unused. Pure tensor code (the
    compiled backend compiles it)."""
    b = key - origin
    b >>= BIN_SHIFT
    b.clamp_(max=WINDOW_BINS).add_(1)
    return torch.where(b > 0, b, (key & (UNDER_SLOTS - 1)) + (WINDOW_BINS + 2))


def _window_slots(values: Sequence[Tensor], origin: int, bins: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """This process's histogram slot counts (int64 [WINDOW_BINS + 2 + UNDER_SLOTS], on the CPU)."""
    slots = WINDOW_BINS + 2 + UNDER_SLOTS
    counts = torch.zeros(slots, dtype=torch.int64)
    for v in values:
        at = torch.tensor(origin, dtype=torch.int32, device=v.device)
        for _, part in slices(v):
            counts += torch.bincount(bins(part, at), minlength=slots).cpu()
    return counts


def window_histogram(values: Sequence[Tensor], origin: int,
                     bins: Callable[[Tensor, Tensor], Tensor] = window_bins,
                     reduce: Callable[[Tensor], Tensor] = identity) -> tuple[Tensor, int]:
    """Counts of eligible keys in each window bin (int64 [WINDOW_BINS]) and the count above it.

    `bins` computes the slots of `values` (:func:`window_bins` of keys, or a compiled function that
    computes the keys of scores and their slots in one pass). `reduce` sums the counts over the
    shards of a tensor held by several processes (FSDP2; identity otherwise)."""
    counts = reduce(_window_slots(values, origin, bins))
    return counts[1:WINDOW_BINS + 1], int(counts[WINDOW_BINS + 1])


def select_bin(counts: Tensor, above: int, k: int) -> tuple[int, int, int] | None:
    """(b*, need, count) for the bin holding the k-th largest key, or None when it is not in `counts`.

    `counts` are bins in increasing key order; `above` counts eligible keys beyond the last bin.
    """
    if k < 1 or above >= k:
        return None
    suffix = counts.flip(0).cumsum(0).flip(0) + above  # C(b)
    n_ge = int((suffix >= k).sum())  # C is non-increasing, so {b : C(b) >= k} = [0, b*]
    if n_ge == 0:
        return None
    b = n_ge - 1
    above_b = int(suffix[b + 1]) if b + 1 < counts.numel() else above
    return b, k - above_b, int(counts[b])


def window_threshold(counts: Tensor, over: int, k: int, origin: int) -> int | None:
    """Interpolated threshold from a window histogram, or None if the window cannot answer.

    None means: the k-th largest is outside the window, or its bin holds so many keys that the
    interpolation's count error could exceed :func:`tolerance` (the repair path takes over).
    """
    found = select_bin(counts, over, k)
    if found is None:
        return None
    b, need, count = found
    if count - 1 > tolerance(k):
        return None
    bin_hi = origin + ((b + 1) << BIN_SHIFT)
    return bin_hi - -(-need * BIN_WIDTH // count)  # >= the bin's low edge >= origin >= 1


def radix_thresholds(values: Sequence[Sequence[Tensor]], ks: Sequence[int],
                     reduce: Callable[[Tensor], Tensor] = identity,
                     keys: Callable[[Tensor], Tensor] = identity) -> list[int]:
    """Exact k-th largest eligible key of each tensor by a two-level radix select (the repair path).

    k is clipped to the number of eligible keys; KEY_NONE when k = 0 or none is eligible. Each
    level's counts of all the tensors go through one `reduce`, which sums counts over the shards of
    a tensor (one collective per level; see :func:`window_histogram`). `keys` maps values to keys
    (identity: they are keys), slice by slice."""
    n_hi, n_lo = 1 << (31 - RADIX_SHIFT), 1 << RADIX_SHIFT
    hi, zeros = [], []
    scratch = Scratch()
    for tensor_values in values:
        counts = torch.zeros(n_hi, dtype=torch.int64)
        zero = 0
        for key in _keys(tensor_values, keys):
            zero += key.numel() - int(torch.count_nonzero(key))
            digits = torch.bitwise_right_shift(key, RADIX_SHIFT, out=scratch(key, key.dtype))
            counts += torch.bincount(digits, minlength=n_hi).cpu()
        zeros.append(zero)
        counts[0] -= zero  # key 0 (ineligible) shares bucket 0 with the smallest denormals
        hi.append(counts)
    taus, level2 = [KEY_NONE] * len(values), []
    for i, counts in enumerate(reduce(torch.stack(hi)) if hi else []):
        found = select_bin(counts, 0, min(ks[i], int(counts.sum())))  # k clipped to the eligible keys
        if found is not None:
            level2.append((i, found[0], found[1]))
    lo = []
    for i, bucket, _ in level2:
        counts = torch.zeros(n_lo, dtype=torch.int64)
        for key in _keys(values[i], keys):
            digits = torch.bitwise_right_shift(key, RADIX_SHIFT, out=scratch(key, key.dtype))
            inside = torch.eq(digits, bucket, out=scratch(key, torch.bool))
            counts += torch.bincount(key[inside].bitwise_and_(n_lo - 1), minlength=n_lo).cpu()
        if bucket == 0:
            counts[0] -= zeros[i]
        lo.append(counts)
    for (i, bucket, need), counts in zip(level2, reduce(torch.stack(lo)) if lo else []):
        taus[i] = (bucket << RADIX_SHIFT) | select_bin(counts, 0, need)[0]
    return taus


def approx_thresholds(values: Sequence[Sequence[Tensor]], ks: Sequence[int], anchors: Sequence[int],
                      bins: Callable[[Tensor, Tensor], Tensor] = window_bins,
                      keys: Callable[[Tensor], Tensor] = identity,
                      reduce: Callable[[Tensor], Tensor] = identity) -> list[tuple[int, bool]]:
    """:func:`approx_threshold` of several tensors at once (`values[i]`, `ks[i]`, `anchors[i]`):
    the window histograms of all of them go through one `reduce` (33 KiB per tensor), then the
    repairs through one per radix level per RADIX_BATCH tensors, so sharded tensors cost one
    collective per refresh when every window answers, not one per tensor."""
    out = [(KEY_NONE, False)] * len(values)
    window = [i for i, (k, anchor) in enumerate(zip(ks, anchors)) if k >= 1 and anchor < KEY_NONE]
    counts = reduce(torch.stack([_window_slots(values[i], window_origin(anchors[i]), bins) for i in window])) \
        if window else []
    answered = set()
    for i, row in zip(window, counts):
        tau = window_threshold(row[1:WINDOW_BINS + 1], int(row[WINDOW_BINS + 1]), ks[i], window_origin(anchors[i]))
        if tau is not None:
            out[i] = (tau, False)
            answered.add(i)
    repair = [i for i, k in enumerate(ks) if k >= 1 and i not in answered]
    for i, tau in zip(repair, exact_thresholds([values[i] for i in repair], [ks[i] for i in repair], reduce, keys)):
        out[i] = (tau, True)
    return out


def exact_thresholds(values: Sequence[Sequence[Tensor]], ks: Sequence[int],
                     reduce: Callable[[Tensor], Tensor] = identity,
                     keys: Callable[[Tensor], Tensor] = identity) -> list[int]:
    """:func:`radix_thresholds` of several tensors, RADIX_BATCH at a time (bounded memory: 512 KiB
    of level-1 counts per tensor; one `reduce` per level per batch)."""
    out: list[int] = []
    for j in range(0, len(values), RADIX_BATCH):
        out += radix_thresholds(values[j:j + RADIX_BATCH], ks[j:j + RADIX_BATCH], reduce, keys)
    return out


def approx_threshold(values: Sequence[Tensor], k: int, anchor: int,
                     bins: Callable[[Tensor, Tensor], Tensor] = window_bins,
                     keys: Callable[[Tensor], Tensor] = identity,
                     reduce: Callable[[Tensor], Tensor] = identity) -> tuple[int, bool]:
    """Threshold for the top-k of the eligible keys of one tensor (or of several, pooled).

    `anchor` is the previous threshold (KEY_NONE if none). Returns (tau, repaired): the window
    answer when it is accurate enough, else the exact radix answer with ``repaired=True``.
    `values` are keys, unless `bins` and `keys` map them to slots and keys (the compiled backend
    passes scores, so that computing keys fuses into the histogram pass).
    """
    return approx_thresholds([values], [k], [anchor], bins, keys, reduce)[0]


def exact_threshold(keys: Sequence[Tensor], k: int) -> int:
    """Exact k-th largest eligible key with torch.kthvalue: the tests' oracle (threshold="exact"
    refreshes with :func:`radix_thresholds`, the same integer in bounded memory)."""
    eligible = torch.cat([key[key > 0] for key in keys]) if keys else torch.zeros(0, dtype=torch.int32)
    k = min(k, eligible.numel())
    if k < 1:
        return KEY_NONE
    return int(eligible.kthvalue(eligible.numel() - k + 1).values)
