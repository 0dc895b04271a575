"""The repair path: the exact k-th largest eligible key of each flagged tensor, by an MSB-first
radix select over the stored scores (threshold.radix_thresholds defines the result; any exact
split into digits gives the same integer). Digits (abi.TRITON_RADIX_LEVELS) are 6 then 5 bits of
the 31-bit key, so a level
counts into at most 64 bins: tl.histogram then costs a few instructions per key on every Triton
version (3.6 lowers it to ballots and one popcount per bin and lane, so its cost grows with the
bins). Six passes over the scores, on the rare refreshes the window cannot answer. Unflagged
tensors cost one flag load per program, so the kernels are launched without reading the flags on
the host (no synchronisation).

The last level also finds out whether the exact threshold needs a tie cut (threshold.tie_cuts: more
than k + tolerance keys would be selected), and tie_cut_kernel then finds the cut of those tensors."""
import triton
import triton.language as tl

from ..abi import TRITON_RADIX_LEVELS as LEVELS
from .tensor_table import IMPORTANCE, NUMEL, WIDTH, column, load_chunk
from .threshold_math import KEY_NONE, flush_histogram, select_bin, stored_key, tolerance

SCRATCH = tl.constexpr(1 << max(bits for _, bits in LEVELS))  # int64 counters per tensor


@triton.jit
def radix_count_kernel(table_ptr, chunk_ptr, repair_ptr, prefix_ptr, scratch_ptr, mean_ptr,
                       S_TYPE: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                       BLOCK: tl.constexpr, TILES: tl.constexpr, MEAN: tl.constexpr):
    """Histogram of one digit over the eligible keys that match the digits chosen so far, into the
    tensor's scratch row. With MEAN (scope="global"): keys of the scores over their tensor's mean
    (float32 [T]), with the group's flag and prefix (entry 0)."""
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    slot = tid
    if MEAN:
        slot = tid * 0
    if tl.load(repair_ptr + slot) != 0:
        mean = 1.0
        if MEAN:
            mean = tl.load(mean_ptr + tid)
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        high = tl.load(prefix_ptr + slot) >> (SHIFT + BITS)
        h = tl.zeros([1 << BITS], tl.int32)
        for i in range(TILES):
            offs = first + i * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            key = stored_key(tl.load(s_ptr + offs, mask=inb, other=0.0), mean, MEAN)
            match = inb & (key > 0) & ((key >> (SHIFT + BITS)) == high)
            h += tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=match)
        flush_histogram(scratch_ptr + tid * SCRATCH, h, 1 << BITS)


@triton.jit
def radix_select_kernel(scratch_ptr, repair_ptr, prefix_ptr, need_ptr, tau_ptr, k_ptr, tie_ptr,
                        SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr):
    """Pick this level's digit (k clipped to the number of eligible keys on the first level),
    append it to the prefix and zero the scratch row; the last level stores tau, and in tie[t] the
    number of keys equal to tau to isolate when the tensor needs a tie cut. scratch int64
    [T, SCRATCH], need, k, tie int64 [T]; prefix, tau, repair int32 [T]."""
    tid = tl.program_id(0).to(tl.int64)
    if tl.load(repair_ptr + tid) != 0:
        row = scratch_ptr + tid * SCRATCH
        need = tl.load(need_ptr + tid)
        if FIRST:
            need = tl.minimum(need, tl.sum(tl.load(row + tl.arange(0, 1 << BITS)), 0))
        b, need, count = select_bin(row, 0, need, 1 << BITS, 1 << BITS)
        prefix = tl.load(prefix_ptr + tid) | (b << SHIFT)
        tl.store(row + tl.arange(0, 1 << BITS), tl.zeros([1 << BITS], tl.int64))
        tl.store(prefix_ptr + tid, prefix)
        tl.store(need_ptr + tid, need)
        if b < 0:  # no eligible key at all: isolate nothing
            tl.store(tau_ptr + tid, KEY_NONE)
            tl.store(repair_ptr + tid, 0)
        elif LAST:
            tl.store(tau_ptr + tid, prefix)
            tl.store(repair_ptr + tid, 0)
            # the bin is one key value: `count` keys equal tau, `need` of them complete the top k
            # (threshold.needs_tie_cut; with k clipped, need == count)
            if count - need > tolerance(tl.load(k_ptr + tid)):
                tl.store(tie_ptr + tid, need)


@triton.jit
def tie_cut_kernel(table_ptr, tie_ptr, tau_ptr, cut_ptr, mean_ptr, S_TYPE: tl.constexpr, TILE: tl.constexpr,
                   MEAN: tl.constexpr):
    """One program per tensor: for a tensor with tie[t] = need > 0, cut[t] = 1 + the flat index of
    the need-th key equal to tau[t] (threshold.tie_cuts). A scan in flat order that stops in the
    tile holding it; other tensors return at once. table: the tensor table; tie, cut int64 [T];
    MEAN: keys of the scores over their tensor's mean (float32 [T], scope="global"), and the
    group's tau (entry 0)."""
    tid = tl.program_id(0).to(tl.int64)
    need = tl.load(tie_ptr + tid)
    if need > 0:
        slot = tid
        mean = 1.0
        if MEAN:
            slot = tid * 0
            mean = tl.load(mean_ptr + tid)
        row = table_ptr + tid * WIDTH
        n = tl.load(row + NUMEL)
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        tau = tl.load(tau_ptr + slot)
        start = tl.zeros([], tl.int64)
        while (need > 0) & (start < n):
            offs = start + tl.arange(0, TILE)
            inb = offs < n
            tied = ((stored_key(tl.load(s_ptr + offs, mask=inb, other=0.0), mean, MEAN) == tau) & inb).to(tl.int32)
            c = tl.sum(tied, 0)
            if c >= need:  # exactly one tied key of the tile has rank `need`
                rank = tl.cumsum(tied, 0)
                tl.store(cut_ptr + tid, tl.sum(tl.where((rank == need) & (tied != 0), offs, 0), 0) + 1)
            need -= c
            start += TILE
