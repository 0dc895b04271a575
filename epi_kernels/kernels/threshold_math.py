"""Triton forms of the threshold engine's integer steps (:mod:`epi_kernels.threshold` documents the
algorithm; the constants come from there, so the two cannot drift apart).

Every function here is integer math on int32 keys and counts: given the same scores, the kernels
reach the same thresholds as the reference, bit for bit (DESIGN.md section 3, C2).
"""
import triton
import triton.language as tl

from .. import threshold as _th

KEY_NONE = tl.constexpr(_th.KEY_NONE)
BIN_SHIFT = tl.constexpr(_th.BIN_SHIFT)
BIN_WIDTH = tl.constexpr(_th.BIN_WIDTH)
WINDOW_BINS = tl.constexpr(_th.WINDOW_BINS)
WINDOW_KEYS = tl.constexpr(_th.WINDOW_BINS << _th.BIN_SHIFT)  # keys spanned by the window


@triton.jit
def score_key(s):
    """threshold.score_keys of fp32 scores: bits of |s|; zero and non-finite scores get key 0."""
    bits = s.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.where(bits >= KEY_NONE, 0, bits)


@triton.jit
def window_counts(key, origin, valid):
    """Window histogram of one tile (int32[WINDOW_BINS]) and its count above the window.

    Keys below the window are not counted (only the k-th largest matters); `valid` masks lanes
    out. Bins are clamped before tl.histogram, whose out-of-range behaviour is unspecified."""
    rel = key - origin  # origin >= BIN_WIDTH > 0, so rel >= 0 implies an eligible key
    counted = valid & (key > 0) & (rel >= 0)
    over = counted & (rel >= WINDOW_KEYS)
    b = tl.minimum(tl.maximum(rel >> BIN_SHIFT, 0), WINDOW_BINS - 1)
    return tl.histogram(b, WINDOW_BINS, mask=counted & (rel < WINDOW_KEYS)), tl.sum(over.to(tl.int32), 0)


@triton.jit
def flush_histogram(dst_ptr, h, NBINS: tl.constexpr):
    """Add a program's histogram into a global one: integer atomics, so the sum is the same in
    any order (deterministic); empty bins are skipped."""
    tl.atomic_add(dst_ptr + tl.arange(0, NBINS), h, mask=h > 0, sem="relaxed")


@triton.jit
def select_bin(hist_ptr, above, k, NBINS: tl.constexpr, TILE: tl.constexpr):
    """threshold.select_bin on a global int32 histogram: (b, need, count) of the bin holding the
    k-th largest key, with b = -1 when it is not in the histogram (k < 1, above >= k, or fewer
    than k keys). Tiles are scanned from the top, keeping the running count of keys above."""
    idx = tl.arange(0, TILE)
    run = above
    b = tl.full([], -1, tl.int32)
    need = tl.full([], 0, tl.int32)
    count = tl.full([], 0, tl.int32)
    for j in range(NBINS // TILE):
        first = (NBINS // TILE - 1 - j) * TILE
        h = tl.load(hist_ptr + first + idx)
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
