"""The "triton" kernel set (backend="triton"): :class:`epi_kernels.launch.Kernels` with the Triton
kernels, run by the custom ops of :mod:`epi_kernels.ops` on CUDA tensors (or CPU tensors in
Triton's interpreter, ``TRITON_INTERPRET=1``).

Kernels in :mod:`epi_kernels.kernels`: the fused step, the window histogram of stored scores, the
window select (one program per tensor) and the repair path (radix count + select per digit).
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
from ..kernels.repair import LEVELS, SCRATCH, radix_count_kernel, radix_select_kernel, tie_cut_kernel
from ..kernels.select import select_kernel
from ..launch import Launch, StepFlags

__all__ = ["TritonKernels", "KERNELS", "kernels_for", "STORAGE_TYPES", "OPTIONS"]

BLOCK = 512  # elements per tile: 4 per thread at 4 warps (one 128-bit access per fp32 column)
TILES = CHUNK // BLOCK  # tiles per program
SELECT_TILE = 1024
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
# tau, cut, origin, hist, over, counts
_STEP_BUFFER_TYPES = (torch.int32, torch.int64, torch.int32, torch.int64, torch.int64, torch.int64)


class TritonKernels:
    """:class:`epi_kernels.launch.Kernels` with Triton kernels (CUDA tensors, or CPU tensors
    in Triton's interpreter)."""

    def run(self, kernel, programs: int, *args, **constexprs) -> None:
        """Launch `kernel` on `programs` programs (the one place kernels are launched)."""
        kernel[(programs,)](*args, **constexprs, **OPTIONS)

    def window_histogram(self, launch: Launch, origin: Tensor, hist: Tensor, over: Tensor) -> None:
        self.run(histogram_kernel, launch.programs, launch.table, launch.chunks, origin, hist, over,
                 S_TYPE=STORAGE_TYPES[launch.score_dtype], BLOCK=BLOCK, TILES=TILES)

    def select(self, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor,
               tau: Tensor, repair: Tensor, cut: Tensor, gate: Tensor | None = None) -> None:
        self.run(select_kernel, launch.tensors, hist, over, origin, k, tau, repair, TILE=SELECT_TILE)
        if not launch.programs:
            return
        flags = repair.clone() if gate is None else repair * gate  # the repair kernels clear flags as tensors finish
        prefix, need, scratch = launch.zeros(), k.clone(), launch.zeros(SCRATCH, dtype=torch.int64)
        tie = launch.zeros(dtype=torch.int64)
        for level, (shift, bits) in enumerate(LEVELS):
            self.run(radix_count_kernel, launch.programs, launch.table, launch.chunks, flags, prefix, scratch,
                     S_TYPE=STORAGE_TYPES[launch.score_dtype], SHIFT=shift, BITS=bits, BLOCK=BLOCK, TILES=TILES)
            self.run(radix_select_kernel, launch.tensors, scratch, flags, prefix, need, tau, k, tie, SHIFT=shift,
                     BITS=bits, FIRST=level == 0, LAST=level == len(LEVELS) - 1)
        self.run(tie_cut_kernel, launch.tensors, launch.table, tie, tau, cut,
                 S_TYPE=STORAGE_TYPES[launch.score_dtype], TILE=TIE_TILE)

    def fused_step(self, launch: Launch, flags: StepFlags, scalars: Tensor, control: Tensor, tau, cut, origin,
                   hist, over, counts) -> None:
        buffers = (tau, cut, origin, hist, over, counts)
        # unused buffers are never read (the flags turn them off) but must have the right element
        # type, as one compiled kernel serves every flag combination: the launch's own tables
        # (int32 chunks, int64 addresses) stand in, no allocation
        stand_in = {torch.int32: launch.chunks, torch.int64: launch.table}
        buffers = [stand_in[dtype] if t is None else t for t, dtype in zip(buffers, _STEP_BUFFER_TYPES)]
        self.run(fused_step_kernel, launch.programs, launch.table, launch.chunks, *buffers, scalars, control,
                 flags.bits(), P_TYPE=STORAGE_TYPES[launch.param_dtype], S_TYPE=STORAGE_TYPES[launch.score_dtype],
                 AMSGRAD=flags.amsgrad, ALIGNED=launch.aligned, BLOCK=BLOCK, TILES=TILES, SCORE=not flags.v_scores,
                 **(V_SCORES_ALIGNED_OPTIONS if flags.v_scores and launch.aligned else {}))


KERNELS = TritonKernels()


def kernels_for(device: torch.device) -> TritonKernels:
    """The kernel set for tensors on `device` (one for all: Triton launches on the current device)."""
    return KERNELS
