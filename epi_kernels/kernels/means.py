"""scope="global" in the step: each tensor's mean score (:mod:`epi_kernels.normalise` defines it,
bit for bit) and the raw-key form of the group's threshold on mean-normalised keys.

The fused step compares raw keys: since an IEEE division by a positive mean is monotone,
``key(fl(s / mean)) >= tau`` holds exactly when ``key(s) >= lo`` for one raw key `lo` per tensor
(the smallest raw key whose quotient's key reaches tau), found by a binary search that divides as
the selection does. No quotient of a tensor's own scores overflows (a mean is at least the largest
score over the count, so a quotient stays below twice the count), so the search may treat an
overflowing quotient as above every threshold."""
import triton
import triton.language as tl

from .tensor_table import IMPORTANCE, NUMEL, WIDTH, column, load_chunk
from .threshold_math import KEY_NONE, score_key

EXPONENTS = tl.constexpr(256)  # normalise.EXPONENTS: one counter per fp32 exponent field


@triton.jit
def exponent_sums_kernel(table_ptr, chunk_ptr, gate_ptr, sums_ptr,
                         S_TYPE: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr, SPAN: tl.constexpr):
    """normalise.exponent_sums of every tensor: sums int64 [T, 256] += the significand of each
    eligible key at its exponent field. Integer atomics, so any order gives the same sums. Nothing
    where the 0-dim int32 gate is 0 (a capturable step that does not refresh).

    Scores of one tensor share few exponents, so atomics straight from every key would pile onto a
    few addresses. A program instead sums the SPAN fields up to the largest of its first tile in
    registers (int32 per tile: BLOCK * 2**24 must stay below 2**31) and adds them once at its end;
    keys outside that span are added one by one."""
    tid, row, first, n = load_chunk(table_ptr, chunk_ptr, BLOCK * TILES)
    if tl.load(gate_ptr) != 0:
        s_ptr = column(row, IMPORTANCE, S_TYPE)
        sums_row = sums_ptr + tid * EXPONENTS
        offs = first + tl.arange(0, BLOCK)
        top = tl.max(score_key(tl.load(s_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)) >> 23, 0)
        low = tl.maximum(top - (SPAN - 1), 0)  # the span's fields: low .. low + SPAN - 1
        span = tl.arange(0, SPAN)
        total = tl.zeros([SPAN], tl.int64)
        for i in range(TILES):
            offs = first + i * BLOCK + tl.arange(0, BLOCK)
            inb = offs < n
            key = score_key(tl.load(s_ptr + offs, mask=inb, other=0.0).to(tl.float32))
            field = key >> 23
            significand = (key & 0x7FFFFF) | tl.where(field > 0, 0x800000, 0)
            rel = field - low
            inside = (rel >= 0) & (rel < SPAN)
            total += tl.sum(tl.where(rel[:, None] == span[None, :], significand[:, None], 0), 0).to(tl.int64)
            tl.atomic_add(sums_row + field, significand.to(tl.int64), mask=inb & (key > 0) & ~inside, sem="relaxed")
        tl.atomic_add(sums_row + low + span, total, mask=total > 0, sem="relaxed")


@triton.jit
def mean_kernel(table_ptr, sums_ptr, mean_ptr):
    """One program per tensor: mean float32 [T] from its exponent sums by normalise.mean_of_sums'
    fixed sequence (e = 0..254; each product is exact, so the launcher's no-FMA option only keeps
    the sum's roundings where they are), one fp64 division by numel, rounding to fp32."""
    tid = tl.program_id(0).to(tl.int64)
    n = tl.load(table_ptr + tid * WIDTH + NUMEL)
    total = tl.zeros([], tl.float64)
    for e in range(EXPONENTS - 1):  # field 255 (non-finite) is never counted
        unit = ((tl.maximum(e, 1) + (1023 - 150)).to(tl.int64) << 52).to(tl.float64, bitcast=True)
        total += tl.load(sums_ptr + tid * EXPONENTS + e).to(tl.float64) * unit
    mean = (total / tl.maximum(n, 1).to(tl.float64)).to(tl.float32)  # fp64 division is IEEE
    tl.store(mean_ptr + tid, tl.where(n > 0, mean, 0.0))


@triton.jit
def _smallest_raw_key(mean, target):
    """The smallest raw key r >= 1 with bits(fl(r / mean)) >= target; KEY_NONE if none (target at
    or above KEY_NONE, or a mean that makes every quotient ineligible: 0)."""
    lo = tl.full([], 1, tl.int32)
    hi = tl.full([], KEY_NONE, tl.int32)  # the answer lies in [lo, hi]
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        quotient = tl.div_rn(mid.to(tl.float32, bitcast=True), mean)
        reached = (quotient.to(tl.int32, bitcast=True) & 0x7FFFFFFF) >= target
        hi = tl.where(reached, mid, hi)
        lo = tl.where(reached, lo, mid + 1)
    return tl.where((mean > 0) & (target < KEY_NONE), hi, KEY_NONE)


@triton.jit
def raw_threshold_kernel(mean_ptr, tau_ptr, lo_ptr, hi_ptr):
    """One program per tensor: lo[t] and hi[t] (int32 [T]), the raw keys that select normalised
    keys >= tau and > tau (the group threshold, int32 [1]) in tensor t."""
    tid = tl.program_id(0).to(tl.int64)
    mean = tl.load(mean_ptr + tid)
    tau = tl.load(tau_ptr)
    tl.store(lo_ptr + tid, _smallest_raw_key(mean, tau))
    tl.store(hi_ptr + tid, _smallest_raw_key(mean, tau + 1))
