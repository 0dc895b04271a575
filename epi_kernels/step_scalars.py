"""The per-step scalars of the fused AdamW update, computed once on the host in float64 (the
compiled and Triton steps both take them; the kernels round them to fp32 once), or for a
capturable step on the device, per tensor, by the same float64 formulas."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["as_float", "step_scalars", "device_step_scalars"]


def as_float(x) -> float:
    """A hyperparameter as a Python float (a Tensor lr or beta is read with .item())."""
    return x.item() if isinstance(x, Tensor) else float(x)


def step_scalars(*, lr, beta1, beta2, weight_decay: float, eps: float, importance_beta: float,
                 step: float) -> tuple[float, ...]:
    """(weight-decay factor, step size, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps,
    importance beta, 1 - importance beta) for a tensor at optimizer step `step` (counted from 1),
    as torch's for-loop AdamW computes them. Tensor lr/betas are read with .item()."""
    lr, beta1, beta2 = as_float(lr), as_float(beta1), as_float(beta2)
    return _formulas(lr, beta1, beta2, weight_decay, eps, importance_beta, step)


def _formulas(lr, beta1, beta2, weight_decay, eps, importance_beta, step) -> tuple:
    return (1 - lr * weight_decay, lr / (1 - beta1 ** step), 1 - beta1, beta2, 1 - beta2,
            (1 - beta2 ** step) ** 0.5, eps, importance_beta, 1 - importance_beta)


def device_step_scalars(steps: list[Tensor], *, lr, beta1, beta2, weight_decay: float, eps: float,
                        importance_beta: float) -> Tensor:
    """step_scalars of each tensor as float32 [T, 9] on the steps' device, without a host read:
    steps and Tensor lr/betas are read on the device (so an LR scheduler's tensor lr applies to
    every replay of a captured step)."""
    step = torch.stack(steps).to(torch.float64)

    def f64(x):
        return x.to(device=step.device, dtype=torch.float64) if isinstance(x, Tensor) else x

    cols = _formulas(f64(lr), f64(beta1), f64(beta2), weight_decay, eps, importance_beta, step)
    # Python numbers become fills, not host-to-device copies (which a CUDA graph capture refuses)
    return torch.stack([c.expand(step.shape) if isinstance(c, Tensor) else torch.full_like(step, c)
                        for c in cols], dim=1).to(torch.float32)
