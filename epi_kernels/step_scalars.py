"""The per-step scalars of the fused AdamW update, computed once on the host in float64 (the
compiled and Triton steps both take them; the kernels round them to fp32 once)."""
from __future__ import annotations

from torch import Tensor

__all__ = ["as_float", "step_scalars"]


def as_float(x) -> float:
    """A hyperparameter as a Python float (a Tensor lr or beta is read with .item())."""
    return x.item() if isinstance(x, Tensor) else float(x)


def step_scalars(*, lr, beta1, beta2, weight_decay: float, eps: float, importance_beta: float,
                 step: float) -> tuple[float, ...]:
    """(weight-decay factor, step size, 1 - beta1, beta2, 1 - beta2, sqrt(bias correction 2), eps,
    importance beta, 1 - importance beta) for a tensor at optimizer step `step` (counted from 1),
    as torch's for-loop AdamW computes them. Tensor lr/betas are read with .item()."""
    lr, beta1, beta2 = as_float(lr), as_float(beta1), as_float(beta2)
    return (1 - lr * weight_decay, lr / (1 - beta1 ** step), 1 - beta1, beta2, 1 - beta2,
            (1 - beta2 ** step) ** 0.5, eps, importance_beta, 1 - importance_beta)
