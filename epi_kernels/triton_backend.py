"""backend="triton": the Triton kernel set of the fused flow in :mod:`epi_kernels.fused_driver`,
reached through the custom ops of :mod:`epi_kernels.ops`.

Kernels in :mod:`epi_kernels.kernels`: the fused step, the window histogram of stored scores, the
window select (one program per tensor) and the repair path (radix count + select per digit).
"""
from __future__ import annotations

import triton.language as tl
import torch
from torch import Tensor

from . import fused_driver
from .launch import CHUNK, DeviceInputs, Launch, StepFlags
from .launch import window_thresholds as launch_window_thresholds
from .kernels.fused_step import fused_step_kernel
from .kernels.histogram import histogram_kernel
from .kernels.repair import LEVELS, SCRATCH, radix_count_kernel, radix_select_kernel
from .kernels.select import select_kernel

__all__ = ["TritonKernels", "triton_epi_adamw", "window_thresholds"]

BLOCK = 1024  # elements per tile
TILES = CHUNK // BLOCK  # tiles per program: one histogram flush per chunk
SELECT_TILE = 1024
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


class TritonKernels:
    """:class:`epi_kernels.launch.Kernels` with Triton kernels (CUDA tensors, or CPU tensors
    in Triton's interpreter)."""

    def window_histogram(self, launch: Launch, origin: Tensor, hist: Tensor, over: Tensor) -> None:
        histogram_kernel[(launch.programs,)](launch.table, launch.chunks, origin, hist, over,
                                             S_TYPE=_TL[launch.score_dtype], BLOCK=BLOCK, TILES=TILES)

    def select(self, launch: Launch, hist: Tensor, over: Tensor, origin: Tensor, k: Tensor,
               tau: Tensor, repair: Tensor, gate: Tensor | None = None) -> None:
        select_kernel[(len(launch.idx),)](hist, over, origin, k, tau, repair, TILE=SELECT_TILE)
        if not launch.programs:
            return
        flags = repair.clone() if gate is None else repair * gate  # the repair kernels clear flags as tensors finish
        prefix, need, scratch = launch.zeros(), k.clone(), launch.zeros(SCRATCH)
        for level, (shift, bits) in enumerate(LEVELS):
            radix_count_kernel[(launch.programs,)](launch.table, launch.chunks, flags, prefix, scratch,
                                                   S_TYPE=_TL[launch.score_dtype], SHIFT=shift, BITS=bits,
                                                   BLOCK=BLOCK, TILES=TILES)
            radix_select_kernel[(len(launch.idx),)](scratch, flags, prefix, need, tau, SHIFT=shift, BITS=bits,
                                                    FIRST=level == 0, LAST=level == len(LEVELS) - 1,
                                                    TILE=SELECT_TILE)

    def fused_step(self, launch: Launch, scalars: tuple[float, ...], flags: StepFlags, tau, origin, hist, over,
                   counts, device: DeviceInputs | None = None) -> None:
        dummy = launch.table  # never read: the flags turn the unused arguments off
        buffers = (tau, origin, hist, over, counts) + ((None, None) if device is None else device)
        fused_step_kernel[(launch.programs,)](
            launch.table, launch.chunks, *(dummy if t is None else t for t in buffers),
            *scalars, P_TYPE=_TL[launch.param_dtype], S_TYPE=_TL[launch.score_dtype], SQ=flags.sq,
            MAXIMIZE=flags.maximize, AMSGRAD=flags.amsgrad, REFRESH=flags.refresh, HIST=flags.hist,
            DEVICE=flags.device, BLOCK=BLOCK, TILES=TILES)


KERNELS = TritonKernels()


def triton_epi_adamw(*args, **kwargs) -> None:
    """The EPI-AdamW step of epi_adamw(backend="triton")."""
    fused_driver.fused_epi_adamw("triton", *args, **kwargs)


def window_thresholds(scores: list[Tensor], ks: list[int], anchors: list[int]) -> tuple[Tensor, Tensor]:
    """launch.window_thresholds with the Triton kernels (tests and benchmarks)."""
    return launch_window_thresholds(KERNELS, scores, ks, anchors)
