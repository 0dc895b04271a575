"""The repair path: the exact k-th largest eligible key of each flagged tensor, by an MSB-first
radix select over the stored scores (threshold.radix_threshold defines the result; any exact
method gives the same integer). Digits are 11, 10 and 10 bits of the 31-bit key, so the scratch
histogram is 2048 counters per tensor. Unflagged tensors cost one flag load per program, so the
kernels are launched without reading the flags on the host (no synchronisation)."""
import triton
import triton.language as tl

from .tensor_table import IMPORTANCE, column, load_chunk
from .threshold_math import KEY_NONE, flush_histogram, score_key, select_bin

LEVELS = ((20, 11), (10, 10), (0, 10))  # (shift, bits) of each digit, most significant first
SCRATCH = 1 << max(bits for _, bits in LEVELS)


@triton.jit
def radix_count_kernel(table_ptr, chunk_ptr, repair_ptr, prefix_ptr, scratch_ptr,
                       S_TYPE: tl.constexpr, SHIFT: tl.constexpr, BITS: tl.constexpr,
                       BLOCK: tl.constexpr, TILES: tl.constexpr):
    """Histogram of one digit over the eligible keys that match the digits chosen so far."""
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    if tl.load(repair_ptr + tid) != 0:
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        high = tl.load(prefix_ptr + tid) >> (SHIFT + BITS)
        h = tl.zeros([1 << BITS], tl.int32)
        for i in range(TILES):
            offs = first + i * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            key = score_key(tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32))
            match = inb & (key > 0) & ((key >> (SHIFT + BITS)) == high)
            h += tl.histogram((key >> SHIFT) & ((1 << BITS) - 1), 1 << BITS, mask=match)
        flush_histogram(scratch_ptr + tid * SCRATCH, h, 1 << BITS)


@triton.jit
def radix_select_kernel(scratch_ptr, repair_ptr, prefix_ptr, need_ptr, tau_ptr,
                        SHIFT: tl.constexpr, BITS: tl.constexpr, FIRST: tl.constexpr, LAST: tl.constexpr,
                        TILE: tl.constexpr):
    """Pick this level's digit (k clipped to the number of eligible keys on the first level),
    append it to the prefix and zero the scratch row; the last level stores tau."""
    tid = tl.program_id(0)
    if tl.load(repair_ptr + tid) != 0:
        row = scratch_ptr + tid * SCRATCH
        need = tl.load(need_ptr + tid)
        if FIRST:
            total = tl.zeros([], tl.int32)
            for j in range((1 << BITS) // TILE):
                total += tl.sum(tl.load(row + j * TILE + tl.arange(0, TILE)), 0)
            need = tl.minimum(need, total)
        b, need, _ = select_bin(row, 0, need, 1 << BITS, TILE)
        prefix = tl.load(prefix_ptr + tid) | (b << SHIFT)
        for j in range((1 << BITS) // TILE):
            tl.store(row + j * TILE + tl.arange(0, TILE), tl.zeros([TILE], tl.int32))
        tl.store(prefix_ptr + tid, prefix)
        tl.store(need_ptr + tid, need)
        if b < 0:  # no eligible key at all: isolate nothing
            tl.store(tau_ptr + tid, KEY_NONE)
            tl.store(repair_ptr + tid, 0)
        elif LAST:
            tl.store(tau_ptr + tid, prefix)
            tl.store(repair_ptr + tid, 0)
