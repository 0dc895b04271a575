"""scope="global"'s per-tensor divisor: the mean of a tensor's finite scores, defined so that every
split of the tensor (slices, FSDP2 shards, ZeRO pieces) and every summation order gives the same
fp32 divisor, bit for bit (DESIGN.md section 1, "scope='global'").

1. **An exact integer sum.** Each score's key (threshold.score_keys: the fp32 bit pattern of |s|,
   0 for zero and non-finite scores) is split into its exponent field e (bits 23-30) and its
   significand m (the 23 fraction bits, plus the implicit 2**23 when e >= 1), so the score is
   exactly m * 2**(max(e, 1) - 150). m is added to counter e of an int64 [256]: the
   *exponent sums*. Integer addition commutes, so slices and shards add their counters (one
   all_reduce for a whole group's tensors). A counter overflows only past 2**39 elements of one
   exponent in one tensor.
2. **One fp64 in a fixed order.** ``total = 0.0``; for e = 0, 1, ..., 254 with a nonzero counter:
   ``total += fp64(sums[e]) * 2.0**(max(e, 1) - 150)`` (the conversion rounds to nearest even, the
   product is exact, so a fused multiply-add gives the same sum). The mean is
   ``fp32(total / fp64(numel))``: one fp64 division, then rounding to fp32, both to nearest even.
   numel counts every element of the whole tensor (non-finite scores as 0). A tensor with no
   positive finite score has mean 0, and its quotients (0/0, s/0) are then ineligible.
3. The normalised score is ``fp32(s / mean)``, one IEEE division rounded to nearest even
   (refresh.Scaled); its key is the key the selection compares.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .threshold import Scratch, slices

__all__ = ["EXPONENTS", "slice_exponent_sums", "exponent_sums", "mean_of_sums"]

EXPONENTS = 256  # one counter per value of the fp32 exponent field (255, non-finite, stays 0)
_WEIGHTS = [2.0 ** (max(e, 1) - 150) for e in range(EXPONENTS)]  # 2**-149 .. 2**105, exact in fp64
_UNITS = torch.tensor([1.0 / w for w in _WEIGHTS], dtype=torch.float64)


def slice_exponent_sums(scores: Tensor, scratch: Scratch) -> Tensor:
    """The fp64 sum of the |scores| of each exponent field (fp64 [256]; 0 for ineligible scores) of
    one slice of scores, in buffers reused from slice to slice (`scratch`): on the CPU, fresh
    blocks for every slice cost more in page faults than the pass itself (4.9x here). Non-finite
    scores land in field 255, which is then cleared: no separate key pass."""
    x = scores if scores.dtype == torch.float32 else scratch(scores, torch.float32).copy_(scores)
    field = torch.bitwise_right_shift(x.view(torch.int32), 23, out=scratch(x, torch.int32)).bitwise_and_(0xFF)
    value = scratch(x, torch.float64).copy_(x).abs_()
    sums = torch.zeros(EXPONENTS, dtype=torch.float64, device=x.device).index_add_(0, field, value)
    sums[EXPONENTS - 1] = 0.0
    return sums


def exponent_sums(values: Tensor) -> Tensor:
    """The exponent sums (int64 [256], on the CPU) of `values`, slice by slice (at most 12 B per
    element of one slice, 16 for scores that are not fp32: the field indices, the fp64 values).

    Within a slice the scores of one exponent are added as fp64 values: each is a multiple of its
    exponent's unit 2**(max(e, 1) - 150) below 2**24 units, so every partial sum of fewer than
    2**29 of them is exact in any order; divided by the unit, it is the integer sum of their
    significands. Slices (threshold.SLICE = 2**18 elements) add those integers."""
    sums = torch.zeros(EXPONENTS, dtype=torch.int64, device=values.device)
    units, scratch = _UNITS.to(values.device), Scratch()
    for _, part in slices(values):
        sums += slice_exponent_sums(part, scratch).mul_(units).to(torch.int64)
    return sums.cpu()


def mean_of_sums(sums: Tensor, numel: int) -> float:
    """The mean (a Python float holding an fp32 value) from a tensor's exponent sums and its whole
    numel, by step 2's fixed sequence of fp64 operations (Python floats are IEEE fp64)."""
    total = 0.0
    for e, m in enumerate(sums.tolist()):
        if m:
            total += float(m) * _WEIGHTS[e]
    if numel == 0:
        return 0.0
    return torch.tensor(total / float(numel), dtype=torch.float64).to(torch.float32).item()
