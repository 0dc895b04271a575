"""The fused EPI-AdamW step: one pass over memory per element, for all tensors of a launch.

Per element: load p, g, m, v (and the amsgrad max), the score s and the mask bit; on a refresh
step set the bit from the start-of-step score against the tensor's new threshold (and write the
packed mask); update the score EMA, the Adam moments and, where the element is not isolated, the
parameter (isolated elements are not written at all); on a step before a refresh, count the new
score into the tensor's window histogram. Math is fp32 whatever the storage dtypes, in the order of
torch's for-loop AdamW (see :func:`epi_kernels.compiled._tensor_step`, the same math in torch ops).
Capturable launches (DEVICE) read the scalars per tensor and the control words (refresh, collect,
skip: launch.CONTROL) from device memory: REFRESH and HIST are then compiled in and applied when
the control words say so, and a skipped step touches nothing.
"""
import triton
import triton.language as tl

from .tensor_table import (EXP_AVG, EXP_AVG_SQ, GRAD, IMPORTANCE, MASK, MAX_EXP_AVG_SQ, PARAM, column,
                           load_chunk)
from .rounding import to_storage
from .threshold_math import WINDOW_BINS, flush_histogram, score_key, window_counts


@triton.jit
def fused_step_kernel(
    table_ptr, chunk_ptr,
    tau_ptr,  # int32 [T]: REFRESH: the new threshold of each tensor
    origin_ptr, hist_ptr, over_ptr,  # HIST: window origins int32 [T] (0: none), outputs [T, NB], [T]
    count_ptr,  # REFRESH: int32 [T, 2] += (isolated count, |old mask & new mask|)
    scalars_ptr, control_ptr,  # DEVICE: float32 [T, 9] (the arguments below, per tensor), int32 [3]
    decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, ibeta, one_minus_ibeta,
    P_TYPE: tl.constexpr, S_TYPE: tl.constexpr, SQ: tl.constexpr, MAXIMIZE: tl.constexpr,
    AMSGRAD: tl.constexpr, REFRESH: tl.constexpr, HIST: tl.constexpr, DEVICE: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr,
):
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    refresh_word = tl.full([], 1, tl.int32)
    hist_word = tl.full([], 1, tl.int32)
    if DEVICE:
        n = tl.where(tl.load(control_ptr + 2) != 0, 0, n)  # a skipped step: no element is touched
        refresh_word = tl.load(control_ptr)
        hist_word = tl.load(control_ptr + 1)
        sc = scalars_ptr + tid * 9
        decay, step_size, one_minus_beta1 = tl.load(sc), tl.load(sc + 1), tl.load(sc + 2)
        beta2, one_minus_beta2, bc2_sqrt = tl.load(sc + 3), tl.load(sc + 4), tl.load(sc + 5)
        eps, ibeta, one_minus_ibeta = tl.load(sc + 6), tl.load(sc + 7), tl.load(sc + 8)
    n_refresh = tl.where(refresh_word != 0, n, 0)  # elements whose mask bit is set this step
    n_hist = tl.where(hist_word != 0, n, 0)  # elements whose new score is counted
    p_ptr = column(row, PARAM, P_TYPE)
    g_ptr = column(row, GRAD, P_TYPE)
    m_ptr = column(row, EXP_AVG, P_TYPE)
    v_ptr = column(row, EXP_AVG_SQ, P_TYPE)
    s_ptr = column(row, IMPORTANCE, S_TYPE)
    mask_ptr = column(row, MASK, tl.uint8)
    if REFRESH:
        tau = tl.load(tau_ptr + tid)
        n_isolated = tl.zeros([], tl.int32)
        n_kept = tl.zeros([], tl.int32)
    if HIST:
        origin = tl.load(origin_ptr + tid)
        h = tl.zeros([WINDOW_BINS], tl.int32)
        n_over = tl.zeros([], tl.int32)
    for i in range(TILES):
        start = first + i * BLOCK
        offs = start + tl.arange(0, BLOCK)
        inb = offs < n
        s = tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        old_bit = (tl.load(mask_ptr + (offs >> 3), mask=inb, other=0).to(tl.int32) >> (offs & 7).to(tl.int32)) & 1
        if REFRESH:
            bit = ((score_key(s) >= tau) & (offs < n_refresh)).to(tl.int32)
            byte = tl.sum(tl.reshape(bit, (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :], axis=1)
            byte_offs = (start >> 3) + tl.arange(0, BLOCK // 8)
            tl.store(mask_ptr + byte_offs, byte.to(tl.uint8), mask=byte_offs * 8 < n_refresh)
            n_isolated += tl.sum(bit, 0)
            n_kept += tl.sum(bit & old_bit, 0)
            bit = tl.where(refresh_word != 0, bit, old_bit)
        else:
            bit = old_bit
        g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        if SQ:  # the eager reference's order: s * beta + ((1 - beta) * g) * g
            f = one_minus_ibeta * g * g
        else:
            f = one_minus_ibeta * tl.abs(g)
        s = to_storage(s * ibeta + f, S_TYPE)
        tl.store(s_ptr + offs, s, mask=inb)
        if HIST:
            hh, oo = window_counts(score_key(s.to(tl.float32)), origin, offs < n_hist)
            h += hh
            n_over += oo
        if MAXIMIZE:
            g = -g
        m = tl.load(m_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        m = m + (g - m) * one_minus_beta1
        v = tl.load(v_ptr + offs, mask=inb, other=0.0).to(tl.float32) * beta2 + one_minus_beta2 * g * g
        tl.store(m_ptr + offs, to_storage(m, P_TYPE), mask=inb)
        tl.store(v_ptr + offs, to_storage(v, P_TYPE), mask=inb)
        if AMSGRAD:
            vmax_ptr = column(row, MAX_EXP_AVG_SQ, P_TYPE)
            v = tl.maximum(tl.load(vmax_ptr + offs, mask=inb, other=0.0).to(tl.float32), v)
            tl.store(vmax_ptr + offs, to_storage(v, P_TYPE), mask=inb)
        p = tl.load(p_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        p = p * decay - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
        tl.store(p_ptr + offs, to_storage(p, P_TYPE), mask=inb & (bit == 0))  # isolated: never written
    if REFRESH:
        tl.atomic_add(count_ptr + 2 * tid, n_isolated, sem="relaxed")
        tl.atomic_add(count_ptr + 2 * tid + 1, n_kept, sem="relaxed")
    if HIST:
        flush_histogram(hist_ptr + tid * WINDOW_BINS, h, WINDOW_BINS)
        tl.atomic_add(over_ptr + tid, n_over, sem="relaxed")
