"""Triton forms of the threshold engine's integer steps (:mod:`epi_kernels.threshold` documents the
algorithm; the constants come from the kernel ABI, :mod:`epi_kernels.abi`, as the reference's do).

Every function here is integer math on int32 keys and int64 counts: given the same scores, the
kernels reach the same thresholds as the reference, bit for bit (contract C2). Counts are int64
because a tensor may hold more than 2**31 elements (and so a bin more than 2**31 keys).
"""
import triton
import triton.language as tl

from .. import abi

KEY_NONE = tl.constexpr(abi.KEY_NONE)
BIN_SHIFT = tl.constexpr(abi.BIN_SHIFT)
BIN_WIDTH = tl.constexpr(abi.BIN_WIDTH)
WINDOW_BINS = tl.constexpr(abi.WINDOW_BINS)
WINDOW_KEYS = tl.constexpr(abi.WINDOW_KEYS)  # keys spanned by the window
TOLERANCE_DIVISOR = tl.constexpr(abi.TOLERANCE_DIVISOR)
TOLERANCE_MIN = tl.constexpr(abi.TOLERANCE_MIN)


@triton.jit
def score_key(s):
    """threshold.score_keys of fp32 scores: bits of |s|; zero and non-finite scores get key 0."""
    bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits >= KEY_NONE, 0, bits)


@triton.jit
def stored_key(raw, mean, MEAN: tl.constexpr):
    """score_key of stored scores (any storage type); with MEAN (scope="global") of the scores
    divided by their tensor's mean first, one IEEE division as in the reference (normalise.py)."""
    x = raw.to(tl.float32)
    if MEAN:
        x = tl.div_rn(x, mean)
    return score_key(x)


@triton.jit
def tolerance(k):
    """threshold.tolerance: the count error a selection may have, max(k // 200, 4)."""
    return tl.maximum(k // TOLERANCE_DIVISOR, TOLERANCE_MIN)


@triton.jit
def count_in_window(key, origin, valid, hist_row):
    """Count keys into one tensor's window histogram (int64 [WINDOW_BINS] in global memory at
    `hist_row`) and return how many lie above the window (int64). Keys below the window are not
    counted (only the k-th largest matters); `valid` masks lanes out; origin 0 means no window.

    One relaxed atomic add per key inside the window, straight to global memory: a constant
    per-element cost on every Triton version. tl.histogram is not used: Triton 3.6 lowers it to
    ballots and a popcount per bin and lane (about 128 popcounts per element for 4096 bins)."""
    # no window: a start no eligible key reaches (a scalar select; Triton's interpreter rejects
    # atomics masked by a scalar broadcast)
    rel = key - tl.where(origin > 0, origin, KEY_NONE)  # origin >= BIN_WIDTH > 0: rel >= 0 implies eligible
    counted = valid & (key > 0) & (rel >= 0)
    inside = counted & (rel < WINDOW_KEYS)
    tl.atomic_add(hist_row + (rel >> BIN_SHIFT), inside.to(tl.int64), mask=inside, sem="relaxed")
    return tl.sum(tl.ravel((counted & ~inside).to(tl.int32)), 0)  # at most a tile: int32


@triton.jit
def flush_histogram(dst_ptr, h, NBINS: tl.constexpr):
    """Add a program's histogram into a global int64 one: integer atomics, so the sum is the same
    in any order (deterministic); empty bins are skipped."""
    tl.atomic_add(dst_ptr + tl.arange(0, NBINS), h.to(tl.int64), mask=h > 0, sem="relaxed")


@triton.jit
def select_bin(hist_ptr, above, k, NBINS: tl.constexpr, TILE: tl.constexpr):
    """threshold.select_bin on a global int64 histogram: (b, need, count) of the bin holding the
    k-th largest key, with b = -1 when it is not in the histogram (k < 1, above >= k, or fewer
    than k keys). Tiles are scanned from the top, keeping the running count of keys above."""
    idx = tl.arange(0, TILE)
    run = tl.zeros([], tl.int64) + above
    b = tl.full([], -1, tl.int32)
    need = tl.full([], 0, tl.int64)
    count = tl.full([], 0, tl.int64)
    for j in range(NBINS // TILE):
        first = (NBINS // TILE - 1 - j) * TILE
        h = tl.load(hist_ptr + first + idx).to(tl.int64)
        total = tl.sum(h, 0)
        c = total - tl.cumsum(h, 0) + h + run  # C(i): keys in bins >= i, plus those above
        last = tl.max(tl.where(c >= k, idx, -1), 0)  # C is non-increasing: candidates are a prefix
        hit = (b < 0) & (last >= 0)
        c_last = tl.sum(tl.where(idx == last, c, 0), 0)
        h_last = tl.sum(tl.where(idx == last, h, 0), 0)
        b = tl.where(hit, first + last, b)
        need = tl.where(hit, k - (c_last - h_last), need)
        count = tl.where(hit, h_last, count)
        run += total
    found = (k >= 1) & (above < k) & (b >= 0)
    return tl.where(found, b, -1), need, count
