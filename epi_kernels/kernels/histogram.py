"""Window histogram of the stored scores, for tensors whose histogram the fused step did not
collect on the step before a refresh (a checkpoint was loaded, the tensor had no gradient then,
or the window histogram is wanted on its own)."""
import triton
import triton.language as tl

from .tensor_table import IMPORTANCE, column, load_chunk
from .threshold_math import WINDOW_BINS, flush_histogram, score_key, window_counts


@triton.jit
def histogram_kernel(table_ptr, chunk_ptr, origin_ptr, hist_ptr, over_ptr,
                     S_TYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    origin = tl.load(origin_ptr + tid)
    if origin > 0:  # 0: no previous threshold, no window (the repair path computes tau)
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        h = tl.zeros([WINDOW_BINS], tl.int32)
        n_over = tl.zeros([], tl.int32)
        for i in range(TILES):
            offs = first + i * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            hh, oo = window_counts(score_key(tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32)), origin, inb)
            h += hh
            n_over += oo
        flush_histogram(hist_ptr + tid * WINDOW_BINS, h, WINDOW_BINS)
        tl.atomic_add(over_ptr + tid, n_over, sem="relaxed")
