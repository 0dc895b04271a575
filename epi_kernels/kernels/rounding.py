"""fp32 -> storage dtype conversion with round-to-nearest-even for every dtype.

For bf16 the rounding is spelled out in integer ops (as c10::BFloat16 does it): the GPU's own
conversion rounds the same way, but Triton's interpreter truncates, which would make the CPU tests
drift by up to an ulp per step. Spelled out, both agree with torch to the bit; the few integer ops
are free in a memory-bound kernel.
"""
import triton
import triton.language as tl


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
