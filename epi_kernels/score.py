"""The score EMA, in the one order of operations every backend rounds it in (README, C7).

``s <- s * beta + ((1 - beta) * g) * g`` for importance="sq", ``s * beta + (1 - beta) * |g|`` for "abs",
in fp32, each product and sum rounded on its own (no fused multiply-add), then rounded once to the
score dtype. The Triton kernel (kernels/fused_step.py) and the CUDA kernels (csrc/element.h) spell
the same order; this function is the eager and compiled backends' form of it. Written with separate
multi-tensor operations because fused ATen forms round differently: ``addcmul`` and ``add(alpha=)``
compute with one fused multiply-add on CPU, which moved scores by an ulp against the kernels.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["score_ema_"]


def score_ema_(s32: list[Tensor], g32: list[Tensor], beta: float | Tensor, one_minus_beta: float | Tensor,
               sq: bool) -> None:
    """In place on the fp32 scores `s32` (the fp32 gradients `g32` are only read). Python-float
    factors act as their fp32 roundings, as in the kernels. The sum adds with alpha 1, exact in
    every form of add (a fused b * 1 + a rounds once, like a + b)."""
    f = torch._foreach_mul(g32, one_minus_beta)
    if sq:
        torch._foreach_mul_(f, g32)
    else:
        torch._foreach_abs_(f)  # (1 - beta) * |g| = |(1 - beta) * g|: the factor is positive
    torch._foreach_mul_(s32, beta)
    torch._foreach_add_(s32, f)
