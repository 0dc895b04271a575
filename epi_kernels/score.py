"""The score EMA, in the one order of operations every backend rounds it in (README, C7).

``s <- s * beta + ((1 - beta) * g) * g`` for importance="sq", ``s * beta + (1 - beta) * |g|`` for "abs",
in fp32, each product and sum rounded on its own (no fused multiply-add), then rounded once to the
score dtype. The Triton kernel (kernels/fused_step.py) and the CUDA kernels (csrc/element.h) spell
the same order; this function is the eager and compiled backends' form of it. Written with separate
in-place operations because fused ATen forms round differently: ``addcmul`` and ``add(alpha=)``
compute with one fused multiply-add on CPU, which moved scores by an ulp against the kernels.
"""
from __future__ import annotations

from torch import Tensor

__all__ = ["score_ema_"]


def score_ema_(s32: Tensor, g32: Tensor, beta: float | Tensor, one_minus_beta: float | Tensor, sq: bool) -> Tensor:
    """In place on the fp32 scores `s32` (the fp32 gradient `g32` is only read); returns `s32`.
    Python-float factors act as their fp32 roundings, as in the kernels."""
    f = g32 * one_minus_beta
    if sq:
        f.mul_(g32)
    else:
        f.abs_()  # (1 - beta) * |g| = |(1 - beta) * g|: the factor is positive, the product rounds alike
    return s32.mul_(beta).add_(f)
