"""Window histogram of the stored scores, for tensors whose histogram the fused step did not
collect on the step before a refresh (a checkpoint was loaded, the tensor had no gradient then,
scope="global", or the window histogram is wanted on its own)."""
import triton
import triton.language as tl

from .tensor_table import IMPORTANCE, column, load_chunk
from .threshold_math import WINDOW_BINS, count_in_window, stored_key


@triton.jit
def histogram_kernel(table_ptr, chunk_ptr, origin_ptr, hist_ptr, over_ptr, mean_ptr,
                     S_TYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, MEAN: tl.constexpr):
    """Each tensor's keys into its row of hist [T, WINDOW_BINS] / over [T] around origin[t]; with
    MEAN (scope="global") every tensor's keys of its scores over its mean (mean float32 [T]) into
    row 0, the group's one window around origin[0]."""
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    slot = tid
    mean = 1.0
    if MEAN:
        slot = tid * 0
        mean = tl.load(mean_ptr + tid)
    origin = tl.load(origin_ptr + slot)
    if origin > 0:  # 0: no previous threshold, no window (the repair path computes tau)
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        over = tl.zeros([], tl.int32)
        for i in range(TILES):
            offs = first + i * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            key = stored_key(tl.load(s_ptr + offs, mask=inb, other=0.0), mean, MEAN)
            over += count_in_window(key, origin, inb, hist_ptr + slot * WINDOW_BINS)
        tl.atomic_add(over_ptr + slot, over.to(tl.int64), sem="relaxed")
