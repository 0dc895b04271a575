"""The "triton" kernel set (backend="triton"): :class:`epi_kernels.launch.Kernels` with the Triton
kernels, run by the custom ops of :mod:`epi_kernels.ops` on CUDA tensors (or CPU tensors in
Triton's interpreter, ``TRITON_INTERPRET=1``).

Kernels in :mod:`epi_kernels.kernels`: the fused step, the window histogram of stored scores, the
window select (one program per tensor), the repair path (radix count + select per digit), and for
scope="global" the means and raw thresholds (kernels/means.py).
Every launch goes through :meth:`TritonKernels.run` with the compile options of :data:`OPTIONS`;
tests/backends/test_triton_compile.py drives these launchers over every input they accept and compiles
what they launch for sm_80 and sm_90, so no variant reaches a GPU uncompiled.
"""
from __future__ import annotations

import triton.language as tl
import torch
from torch import Tensor

from ..abi import CHUNK
from ..kernels.fused_step import fused_step_kernel
from ..kernels.histogram import histogram_kernel
from ..kernels.means import exponent_sums_kernel, mean_kernel, raw_threshold_kernel
from ..kernels.repair import LEVELS, SCRATCH, radix_count_kernel, radix_select_kernel, tie_cut_kernel
from ..kernels.select import select_kernel
from ..launch import Launch, StepFlags

__all__ = ["TritonKernels", "KERNELS", "kernels_for", "STORAGE_TYPES", "OPTIONS"]

BLOCK = 512  # elements per tile: 4 per thread at 4 warps (one 128-bit access per fp32 column)
TILES = CHUNK // BLOCK  # tiles per program
SELECT_TILE = 1024
# exponent sums: int32 per-tile sums of 128 significands (each below 2**24) cannot overflow; the
# fields summed in registers per program (the rest go to global atomics one key at a time)
SUMS_TILE, SUMS_SPAN = 128, 16
TIE_TILE = 1024
STORAGE_TYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Every launch: 4 warps, and no FMA contraction (a*b + c rounded twice, as the reference and the
# CUDA kernels compute it: a contracted score EMA differs by an ulp and can move a mask bit).
OPTIONS = {"num_warps": 4, "enable_fp_fusion": False}
# The aligned fused step with scores from exp_avg_sq: left to itself, ptxas (Triton 3.9, sm_90)
# settles on 96 registers for its amsgrad variant and spills one value of the set-up code; a cap of
# 112 gives 94 and no spill. (The masked, misaligned variants need more: they get no cap.)
# tests/backends/test_triton_compile.py checks every variant for spills.
V_SCORES_ALIGNED_OPTIONS = {"maxnreg": 112}
# tau, above, cut, origin, hist, over, counts
_STEP_BUFFER_TYPES = (torch.int32, torch.int32, torch.int64, torch.int32, torch.int64, torch.int64, torch.int64)


class TritonKernels:
    """:class:`epi_kernels.launch.Kernels` with Triton kernels (CUDA tensors, or CPU tensors
    in Triton's interpreter)."""

    def run(self, kernel, programs: int, *args, **constexprs) -> None:
        """Launch `kernel` on `programs` programs (the one place kernels are launched)."""
        kernel[(programs,)](*args, **constexprs, **OPTIONS)

    def window_histogram(self, launch: Launch, origin: Tensor, hist: Tensor, over: Tensor,
                         means: Tensor | None = None) -> None:
        self.run(histogram_kernel, launch.programs, launch.table, launch.chunks, origin, hist, over,
                 launch.table if means is None else means, S_TYPE=STORAGE_TYPES[launch.score_dtype], BLOCK=BLOCK,
                 TILES=TILES, MEAN=means is not None)

    def means(self, launch: Launch, gate: Tensor, sums: Tensor, means: Tensor) -> None:
        self.run(exponent_sums_kernel, launch.programs, launch.table, launch.chunks, gate, sums,
                 S_TYPE=STORAGE_TYPES[launch.score_dtype], BLOCK=SUMS_TILE, TILES=CHUNK // SUMS_TILE, SPAN=SUMS_SPAN)
        self.run(mean_kernel, launch.tensors, launch.table, sums, means)

    def raw_thresholds(self, launch: Launch, means: Tensor, tau: Tensor, lo: Tensor, hi: Tensor) -> None:
        self.run(raw_threshold_kernel, launch.tensors, means, tau, lo, hi)

    def select(self, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor,
               tau: Tensor, repair: Tensor, cut: Tensor, gate: Tensor | None = None,
               means: Tensor | None = None) -> None:
        self.run(select_kernel, 1 if means is not None else launch.tensors, hist, over, origin, k, tau, repair,
                 TILE=SELECT_TILE)
        if not launch.programs:
            return
        flags = repair.clone() if gate is None else repair * gate  # the repair kernels clear flags as tensors finish
        pooled = means is not None  # scope="global": one selection; counts per tensor, summed per level
        prefix, need, scratch = torch.zeros_like(flags), k.clone(), launch.zeros(SCRATCH, dtype=torch.int64)
        tie = torch.zeros_like(need)
        total = scratch[:1].clone() if pooled else scratch
        mean_ptr = means if pooled else launch.table
        for level, (shift, bits) in enumerate(LEVELS):
            self.run(radix_count_kernel, launch.programs, launch.table, launch.chunks, flags, prefix, scratch, mean_ptr,
                     S_TYPE=STORAGE_TYPES[launch.score_dtype], SHIFT=shift, BITS=bits, BLOCK=BLOCK, TILES=TILES, MEAN=pooled)
            last = level == len(LEVELS) - 1
            if pooled:
                torch.sum(scratch, 0, keepdim=True, out=total)
                if not last:
                    scratch.zero_()
            self.run(radix_select_kernel, flags.numel(), total, flags, prefix, need, tau, k, tie, SHIFT=shift,
                     BITS=bits, FIRST=level == 0, LAST=last)
        if pooled:  # the last level's counts per tensor, at tau's digit: each tensor's keys equal to tau
            tie = _group_ties(scratch, tau, tie, cut, LEVELS[-1])
        self.run(tie_cut_kernel, launch.tensors, launch.table, tie, tau, cut, mean_ptr,
                 S_TYPE=STORAGE_TYPES[launch.score_dtype], TILE=TIE_TILE, MEAN=pooled)

    def fused_step(self, launch: Launch, flags: StepFlags, scalars: Tensor, control: Tensor, tau, cut, origin,
                   hist, over, counts, above=None) -> None:
        if above is None and tau is not None:  # a tensor's own selection: from the tie cut on, key > tau
            above = tau + 1
        buffers = (tau, above, cut, origin, hist, over, counts)
        # unused buffers are never read (the flags turn them off) but must have the right element
        # type, as one compiled kernel serves every flag combination: the launch's own tables
        # (int32 chunks, int64 addresses) stand in, no allocation
        stand_in = {torch.int32: launch.chunks, torch.int64: launch.table}
        buffers = [stand_in[dtype] if t is None else t for t, dtype in zip(buffers, _STEP_BUFFER_TYPES)]
        self.run(fused_step_kernel, launch.programs, launch.table, launch.chunks, *buffers, scalars, control,
                 flags.bits(), P_TYPE=STORAGE_TYPES[launch.param_dtype], S_TYPE=STORAGE_TYPES[launch.score_dtype],
                 AMSGRAD=flags.amsgrad, ALIGNED=launch.aligned, BLOCK=BLOCK, TILES=TILES, SCORE=not flags.v_scores,
                 **(V_SCORES_ALIGNED_OPTIONS if flags.v_scores and launch.aligned else {}))


def _group_ties(scratch: Tensor, tau: Tensor, tie: Tensor, cut: Tensor, level: tuple[int, int]) -> Tensor:
    """scope="global"'s tie rule (threshold.tie_cuts) from the last radix level's per-tensor counts
    (scratch int64 [T, SCRATCH]) and the group's tie[0] (the tied keys to isolate, 0 for no cut):
    in tensor order, a tensor isolates all its tied keys (cut stays TIE_NONE), none (cut 0), or the
    first `need` of them (returned: the need of each tensor for tie_cut_kernel, 0 elsewhere)."""
    shift, bits = level
    digit = ((tau.to(torch.int64) >> shift) & ((1 << bits) - 1)).expand(scratch.shape[0], 1)
    tied = scratch.gather(1, digit).squeeze(1)
    left = tie - (torch.cumsum(tied, 0) - tied)  # the group's tied keys still to isolate at each tensor
    cut.masked_fill_((tie > 0) & (left <= 0), 0)
    return torch.where((tie > 0) & (left > 0) & (left < tied), left, 0)


KERNELS = TritonKernels()


def kernels_for(device: torch.device) -> TritonKernels:
    """The kernel set for tensors on `device` (one for all: Triton launches on the current device)."""
    return KERNELS
