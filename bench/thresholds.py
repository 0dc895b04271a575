"""Thresholds computed one way only, for tests and benchmarks (not part of the package): the kernel
sets' window + select + repair path on its own, and the reference's exact radix select of one tensor."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from epi_kernels import threshold as th
from epi_kernels.kernel_sets import kernel_set
from epi_kernels.launch import kernel_select, kernel_window_histograms, origins, score_launch


def window_thresholds(kernels: str, scores: list[Tensor], ks: list[int],
                      anchors: list[int]) -> tuple[Tensor, Tensor, Tensor]:
    """Thresholds of score tensors (one launch group) by the kernel set `kernels` alone: window
    histograms of the scores around their `anchors` (previous thresholds), select, repair, tie cuts.
    Returns (tau int32 [T], repaired bool [T], cut int64 [T])."""
    kset, context = kernel_set(kernels, scores[0].device)
    with context:
        launch = score_launch(scores)
        origin = origins(torch.tensor(anchors, dtype=torch.int32, device=launch.device))
        hist, over = kernel_window_histograms(kset, launch, origin)
        k = torch.tensor(ks, dtype=torch.int64, device=launch.device)
        return kernel_select(kset, launch, hist, over, origin, k)


def radix_threshold(keys: Sequence[Tensor], k: int, reduce: Callable[[Tensor], Tensor] = th.identity) -> int:
    """The exact k-th largest eligible key of one tensor (given as slices of its keys)."""
    return th.radix_thresholds([keys], [k], reduce)[0]
