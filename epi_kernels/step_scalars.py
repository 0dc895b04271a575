"""The per-step scalars of the fused AdamW update (abi.SCALARS), per tensor, computed from each
tensor's step counter where the counters live, in float64 by the formulas of torch's for-loop
AdamW, and rounded to fp32 once: no step count, tensor lr or beta is ever read on the host."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["step_scalars"]


def _formulas(lr, beta1, beta2, weight_decay, eps, importance_beta, step) -> tuple:
    # abi.SCALARS, in order
    return (1 - lr * weight_decay, lr / (1 - beta1 ** step), 1 - beta1, beta2, 1 - beta2,
            (1 - beta2 ** step) ** 0.5, eps, importance_beta, 1 - importance_beta)


def step_scalars(steps: list[Tensor], device: torch.device, *, lr, beta1, beta2, weight_decay: float, eps: float,
                 importance_beta: float | None) -> Tensor:
    """float32 [len(steps), len(abi.SCALARS)] on `device`: row t holds the scalars of the tensor whose
    step counter (counted from 1, already advanced) is steps[t]. Computed where a tensor lr or beta
    lives (so an LR scheduler's tensor lr applies to every replay of a captured step), else where
    the counters live (on the CPU, as torch's AdamW keeps them unless fused or capturable); the
    result reaches `device` by an asynchronous copy when that is elsewhere."""
    step = torch.stack(steps)
    # where a tensor hyperparameter lives, if one does (bringing it to the counters would be a host read)
    where = next((x.device for x in (lr, beta1, beta2) if isinstance(x, Tensor)), step.device)
    step = step.to(where, torch.float64, non_blocking=True)

    def f64(x):
        return x.to(device=step.device, dtype=torch.float64) if isinstance(x, Tensor) else x

    ibeta = 0.0 if importance_beta is None else importance_beta  # None: no score EMA (read by no one)
    cols = _formulas(f64(lr), f64(beta1), f64(beta2), weight_decay, eps, ibeta, step)
    # Python numbers become fills, not host-to-device copies (which a CUDA graph capture refuses)
    out = torch.stack([c.expand(step.shape) if isinstance(c, Tensor) else torch.full_like(step, c)
                       for c in cols], dim=1).to(torch.float32)
    if out.device == device:
        return out
    if out.device.type == "cpu" and device.type == "cuda":
        out = out.pin_memory()  # an asynchronous copy, the buffer kept alive by the caching host allocator
    return out.to(device, non_blocking=True)
