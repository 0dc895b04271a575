"""The fused EPI-AdamW step: one pass over memory per element, for all tensors of a launch.

Per element: load p, g, m, v (and the amsgrad max), the score s and the mask bit; update the score
EMA, the Adam moments and, where the element is not isolated, the parameter (an isolated element
is stored back with its own bits); on a step before a refresh, count the new score into the
tensor's window histogram. With SCORE off (importance="exp_avg_sq") the score is v itself: no score
is loaded or stored (28 B + 1 bit per fp32 element), and the new v is what the histogram counts. On a refresh step a program first sets its chunk's new mask bits from
the start-of-step scores, the tensor's new threshold and its tie cut (threshold.tie_cuts: from
flat index `cut` on, a key must reach `above`, tau + 1 for a tensor's own selection; scope="global"
passes raw keys, kernels/means.py), then steps with them. Math is fp32 whatever the
storage dtypes, in the order of torch's for-loop AdamW (see :func:`epi_kernels.backends.compiled._tensor_step`,
the same math in torch ops), each operation rounded on its own: the launcher turns FMA contraction
off.

What makes it run at memory speed, each checked on the compiled PTX/SASS by
tests/backends/test_triton_compile.py:
* a program's chunk is cut into tiles; full tiles take the unmasked path, and with ALIGNED (every
  column 16-byte aligned, checked on the host) their accesses are 128-bit; the last, partial tile
  of a tensor and misaligned views take the masked path;
* every load of a tile is issued before its first store: the compiler cannot prove that the
  columns do not alias, so it would not move a load above a store by itself;
* the flags (abi.FLAGS) are read at run time, so they cost no compiled variant, and the histogram
  (global atomics, see threshold_math.count_in_window) is in a loop of its own that a step which
  does not collect never enters.

Every launch reads its scalars (one row per tensor) and its control words from device memory
(abi.SCALARS, abi.CONTROL): the host never turns a step count or a tensor lr into a number, and
a capturable step differs from a host-decided one only in who wrote the control words.
"""
import triton
import triton.language as tl

from .rounding import to_storage
from .tensor_table import (COLLECT, CTRL_COLLECT, CTRL_REFRESH, CTRL_SKIP, EXP_AVG, EXP_AVG_SQ, GRAD, IMPORTANCE,
                           MASK, MAX_EXP_AVG_SQ, MAXIMIZE, PARAM, REFRESH, SCALARS, SQ, column, load_chunk)
from .threshold_math import WINDOW_BINS, count_in_window, score_key


@triton.jit
def _load(ptr, offs, inb, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + offs, mask=inb, other=0)
    else:
        return tl.load(ptr + offs)


@triton.jit
def _store(ptr, offs, x, inb, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, x, mask=inb)
    else:
        tl.store(ptr + offs, x)


@triton.jit
def _refresh_chunk(s_ptr, mask_ptr, first, count, tau, above, cut, BLOCK: tl.constexpr):
    """Set the new mask bits of the `count` elements of a chunk from `first`: key(start-of-step
    score) >= tau, and >= above from the chunk's element `cut` on (the tie cut, relative to `first`).
    Returns (isolated, kept from the old mask) of the chunk.

    A pass of its own before the step's loop: it reads the scores (4 B per element, on refresh
    steps only) and writes the packed mask, which the step's loop then reads as on any step, so
    the vector loop carries no refresh logic (the registers it would take cost occupancy)."""
    rows = tl.arange(0, BLOCK // 8)[:, None]
    lanes = tl.arange(0, 8)[None, :]
    offs = rows * 8 + lanes
    isolated = tl.zeros([], tl.int32)
    kept = tl.zeros([], tl.int32)
    for i in range(tl.cdiv(tl.maximum(count, 0), BLOCK)):
        start = first + i * BLOCK
        left = tl.minimum(count - i * BLOCK, BLOCK)
        inb = offs < left
        byte_inb = rows * 8 < left
        key = score_key(tl.load(s_ptr + start + offs, mask=inb, other=0).to(tl.float32))
        old = (tl.load(mask_ptr + (start >> 3) + rows, mask=byte_inb, other=0).to(tl.int32) >> lanes) & 1
        bit = ((key >= tl.where(offs >= cut - i * BLOCK, above, tau)) & inb).to(tl.int32)
        isolated += tl.sum(tl.sum(bit, 1), 0)
        kept += tl.sum(tl.sum(bit & old, 1), 0)
        tl.store(mask_ptr + (start >> 3) + rows, tl.sum(bit << lanes, 1, keep_dims=True).to(tl.uint8), mask=byte_inb)
    return isolated, kept


@triton.jit
def _step_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, s_ptr, mask_ptr, start, n, sq, maximize,
               origin, hist_row, decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, ibeta,
               one_minus_ibeta, P_TYPE: tl.constexpr, S_TYPE: tl.constexpr, AMSGRAD: tl.constexpr,
               HIST: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr, SCORE: tl.constexpr):
    """One tile of BLOCK elements from `start` (of a tensor of `n`), as [BLOCK // 8, 8]: a row is
    one mask byte. Returns the count of new scores above the window."""
    # int32 offsets from per-tile base pointers: int64 offsets would cost two registers per element
    # and column, and an address computation each
    rows = tl.arange(0, BLOCK // 8)[:, None]
    lanes = tl.arange(0, 8)[None, :]
    offs = rows * 8 + lanes
    left = tl.minimum(n - start, BLOCK).to(tl.int32)  # elements of the tile that exist
    inb = offs < left
    byte_inb = rows * 8 < left  # [BLOCK // 8, 1]: broadcasts against the elements
    # loads, all of them first
    if SCORE:
        s_raw = _load(s_ptr + start, offs, inb, MASKED)
    byte = _load(mask_ptr + (start >> 3), rows, byte_inb, MASKED).to(tl.int32)
    g = _load(g_ptr + start, offs, inb, MASKED).to(tl.float32)
    m = _load(m_ptr + start, offs, inb, MASKED).to(tl.float32)
    v = _load(v_ptr + start, offs, inb, MASKED).to(tl.float32)
    if AMSGRAD:
        vmax = _load(vmax_ptr + start, offs, inb, MASKED).to(tl.float32)
    p_raw = _load(p_ptr + start, offs, inb, MASKED)
    bit = (byte >> lanes) & 1  # the mask in force (on a refresh step, just written by _refresh_chunk)
    # score EMA in the eager reference's order (epi_kernels.score): s * beta + ((1 - beta) * f) * f',
    # with f' = g for g*g and 1.0 (exact) for |g|
    if SCORE:
        s = s_raw.to(tl.float32)
        f = one_minus_ibeta * tl.where(sq, g, tl.abs(g)) * tl.where(sq, g, 1.0)
        s_new = to_storage(s * ibeta + f, S_TYPE)
    # AdamW, as torch's for-loop implementation
    g = tl.where(maximize, -g, g)
    m = m + (g - m) * one_minus_beta1
    v = v * beta2 + one_minus_beta2 * g * g
    m_new = to_storage(m, P_TYPE)
    v_new = to_storage(v, P_TYPE)
    if not SCORE:
        s_new = v_new  # the score is v (before the amsgrad maximum): the EMA, which can decay
    if AMSGRAD:
        v = tl.maximum(vmax, v)
    p = p_raw.to(tl.float32) * decay - tl.div_rn(step_size * m, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps)
    p_new = tl.where(bit != 0, p_raw, to_storage(p, P_TYPE))  # isolated: its own bits
    # stores
    if SCORE:
        _store(s_ptr + start, offs, s_new, inb, MASKED)
    _store(m_ptr + start, offs, m_new, inb, MASKED)
    _store(v_ptr + start, offs, v_new, inb, MASKED)
    if AMSGRAD:
        _store(vmax_ptr + start, offs, to_storage(v, P_TYPE), inb, MASKED)
    _store(p_ptr + start, offs, p_new, inb, MASKED)
    over = tl.zeros([], tl.int32)
    if HIST:
        over = count_in_window(score_key(s_new.to(tl.float32)), origin, inb, hist_row)
    return over


@triton.jit
def _step_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, s_ptr, mask_ptr, first, count, n, sq, maximize, origin,
                hist_row, decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, ibeta,
                one_minus_ibeta, P_TYPE: tl.constexpr, S_TYPE: tl.constexpr, AMSGRAD: tl.constexpr,
                HIST: tl.constexpr, BLOCK: tl.constexpr, SCORE: tl.constexpr):
    """The `count` elements of a chunk from `first`: full tiles unmasked, then the partial one.
    Returns the count of new scores above the window."""
    over = tl.zeros([], tl.int32)
    full = tl.maximum(count, 0) // BLOCK
    for i in range(full):
        over += _step_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, s_ptr, mask_ptr, first + i * BLOCK, n, sq, maximize,
                           origin, hist_row, decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps,
                           ibeta, one_minus_ibeta, P_TYPE, S_TYPE, AMSGRAD, HIST, False, BLOCK, SCORE)
    if full * BLOCK < count:
        over += _step_tile(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, s_ptr, mask_ptr, first + full * BLOCK, n, sq,
                           maximize, origin, hist_row, decay, step_size, one_minus_beta1, beta2, one_minus_beta2,
                           bc2_sqrt, eps, ibeta, one_minus_ibeta, P_TYPE, S_TYPE, AMSGRAD, HIST, True, BLOCK, SCORE)
    return over


@triton.jit(do_not_specialize=["flags"])
def fused_step_kernel(
    table_ptr, chunk_ptr,
    tau_ptr, above_ptr, cut_ptr,  # refresh: thresholds before / from the tie cut (int32 [T]), tie cut (int64 [T])
    origin_ptr, hist_ptr, over_ptr,  # hist: window origins int32 [T] (0: none), outputs int64 [T, NB], [T]
    count_ptr,  # refresh: int64 [T, 2] += (isolated count, |old mask & new mask|)
    scalars_ptr, control_ptr,  # float32 [T, SCALARS] (abi.SCALARS, per tensor), int32 [3] (abi.CONTROL)
    flags,  # int32: abi.FLAGS bits (not specialised: one compiled kernel for every value)
    P_TYPE: tl.constexpr, S_TYPE: tl.constexpr, AMSGRAD: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr, TILES: tl.constexpr, SCORE: tl.constexpr,
):
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    count = tl.minimum(n - first, BLOCK * TILES)  # elements of this chunk
    count = tl.where(tl.load(control_ptr + CTRL_SKIP) != 0, 0, count)  # skipped: nothing is touched
    refresh = ((flags & REFRESH) != 0) & (tl.load(control_ptr + CTRL_REFRESH) != 0)
    collect = ((flags & COLLECT) != 0) & (tl.load(control_ptr + CTRL_COLLECT) != 0)
    sc = scalars_ptr + tid * SCALARS
    decay, step_size, one_minus_beta1 = tl.load(sc), tl.load(sc + 1), tl.load(sc + 2)
    beta2, one_minus_beta2, bc2_sqrt = tl.load(sc + 3), tl.load(sc + 4), tl.load(sc + 5)
    eps, ibeta, one_minus_ibeta = tl.load(sc + 6), tl.load(sc + 7), tl.load(sc + 8)
    sq = (flags & SQ) != 0
    maximize = (flags & MAXIMIZE) != 0
    p_ptr = column(row, PARAM, P_TYPE, ALIGNED)
    g_ptr = column(row, GRAD, P_TYPE, ALIGNED)
    m_ptr = column(row, EXP_AVG, P_TYPE, ALIGNED)
    v_ptr = column(row, EXP_AVG_SQ, P_TYPE, ALIGNED)
    vmax_ptr = p_ptr
    if AMSGRAD:
        vmax_ptr = column(row, MAX_EXP_AVG_SQ, P_TYPE, ALIGNED)
    s_ptr = column(row, IMPORTANCE, S_TYPE, ALIGNED)
    mask_ptr = column(row, MASK, tl.uint8)
    hist_row = hist_ptr + tid * WINDOW_BINS
    if refresh:  # the new mask bits first, from the start-of-step scores, then the step reads them
        tau, above = tl.load(tau_ptr + tid), tl.load(above_ptr + tid)
        cut = tl.minimum(tl.maximum(tl.load(cut_ptr + tid) - first, 0), BLOCK * TILES).to(tl.int32)
        isolated, kept = _refresh_chunk(s_ptr, mask_ptr, first, count, tau, above, cut, BLOCK)
        tl.atomic_add(count_ptr + 2 * tid, isolated.to(tl.int64), sem="relaxed")
        tl.atomic_add(count_ptr + 2 * tid + 1, kept.to(tl.int64), sem="relaxed")
        tl.debug_barrier()  # every thread's mask bytes written before any thread reads them
    if collect:
        origin = tl.load(origin_ptr + tid)
        over = _step_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, s_ptr, mask_ptr, first, count, n, sq, maximize,
                           origin, hist_row, decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps,
                           ibeta, one_minus_ibeta, P_TYPE, S_TYPE, AMSGRAD, True, BLOCK, SCORE)
        tl.atomic_add(over_ptr + tid, over.to(tl.int64), sem="relaxed")
    else:  # the same loop without the histogram: a step that does not collect does not pay for it
        _step_chunk(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, s_ptr, mask_ptr, first, count, n, sq, maximize, 0,
                    hist_row, decay, step_size, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, ibeta,
                    one_minus_ibeta, P_TYPE, S_TYPE, AMSGRAD, False, BLOCK, SCORE)
