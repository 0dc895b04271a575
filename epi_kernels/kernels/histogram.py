"""Window histogram of the stored scores, for tensors whose histogram the fused step did not
collect on the step before a refresh (a checkpoint was loaded, the tensor had no gradient then,
or the window histogram is wanted on its own)."""
import triton
import triton.language as tl

from .tensor_table import IMPORTANCE, column, load_chunk
from .threshold_math import WINDOW_BINS, count_in_window, score_key


@triton.jit
def histogram_kernel(table_ptr, chunk_ptr, origin_ptr, hist_ptr, over_ptr,
                     S_TYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    origin = tl.load(origin_ptr + tid)
    if origin > 0:  # 0: no previous threshold, no window (the repair path computes tau)
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        over = tl.zeros([], tl.int32)
        for i in range(TILES):
            offs = first + i * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            key = score_key(tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32))
            over += count_in_window(key, origin, inb, hist_ptr + tid * WINDOW_BINS)
        tl.atomic_add(over_ptr + tid, over.to(tl.int64), sem="relaxed")
