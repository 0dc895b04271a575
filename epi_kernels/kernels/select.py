"""Window select: one program per tensor turns its window histogram into a threshold
(threshold.window_threshold, the same integers) or flags it for the repair path."""
import triton
import triton.language as tl

from .threshold_math import BIN_WIDTH, KEY_NONE, WINDOW_BINS, select_bin, tolerance


@triton.jit
def select_kernel(hist_ptr, over_ptr, origin_ptr, k_ptr, tau_ptr, repair_ptr, TILE: tl.constexpr):
    """tau[t] = the interpolated threshold, repair[t] = 0 if the window answers; repair[t] = 1 when
    the k-th largest is outside the window, its bin is too coarse, or there was no window.
    hist int64 [T, WINDOW_BINS], over and k int64 [T]; origin, tau, repair int32 [T]."""
    tid = tl.program_id(0).to(tl.int64)
    k = tl.load(k_ptr + tid)
    origin = tl.load(origin_ptr + tid)
    b, need, count = select_bin(hist_ptr + tid * WINDOW_BINS, tl.load(over_ptr + tid), k, WINDOW_BINS, TILE)
    accept = (origin > 0) & (b >= 0) & (count - 1 <= tolerance(k))
    step_down = (need * BIN_WIDTH + tl.maximum(count, 1) - 1) // tl.maximum(count, 1)  # ceil
    tau = (origin + (b + 1) * BIN_WIDTH).to(tl.int64) - step_down
    tl.store(tau_ptr + tid, tl.where(accept, tau, KEY_NONE).to(tl.int32))
    tl.store(repair_ptr + tid, ((k >= 1) & ~accept).to(tl.int32))
