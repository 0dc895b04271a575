"""Functional EPI-AdamW step: score EMA + AdamW in which isolated elements do not change.

``epi_adamw`` is the entry point (like ``torch.optim.adamw.adamw``); it dispatches once on the
backend to one function per implementation: the eager reference here, the torch.compile'd loop
(:mod:`epi_kernels.compiled`), or the kernel backends' step path (:mod:`epi_kernels.step_driver`).
The pure-PyTorch backend is the reference the kernels are held to:

* scores:  ``s <- beta * s + (1 - beta) * f(g)``, ``f(g) = g * g`` ("sq") or ``|g|`` ("abs"), computed
  in fp32 in the kernels' order (:mod:`epi_kernels.score`) and rounded once to the score dtype;
  with importance="exp_avg_sq" the scores are AdamW's ``exp_avg_sqs`` themselves (no score pass);
* moments and non-isolated parameters: exactly ``torch.optim.AdamW`` (its own for-loop, foreach or
  fused implementation is called, so they agree to the bit);
* isolated parameters: bit-identical to before the step (no Adam update, no weight decay); their
  values are saved before the AdamW update and written back after it.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.adam import adam

from .compiled import COMPILED_REFRESH_OPS, compiled_epi_adamw
from .mask import unpack_mask
from .refresh import EAGER_OPS, RefreshOps
from .score import score_ema_
from .step_driver import RefreshPlan, kernel_epi_adamw

__all__ = ["epi_adamw", "refresh_ops", "update_importance", "isolated_indices"]


def refresh_ops(backend: str) -> RefreshOps:
    """The elementwise passes a backend's refreshes use (same integers out for every backend; the
    kernel backends refresh inside their step and use the eager passes only for scope="global"
    or threshold="exact")."""
    return COMPILED_REFRESH_OPS if backend == "compiled" else EAGER_OPS


@torch.compiler.disable  # a data-dependent size: traced, it breaks the graph and recompiles as counts change
def isolated_indices(packed_mask: Tensor, numel: int) -> Tensor:
    """Flat (logical-order) int64 indices of the isolated elements of a packed mask."""
    return unpack_mask(packed_mask, numel).nonzero().squeeze(1)


def update_importance(importances: list[Tensor], grads: list[Tensor], *, beta: float, importance: str,
                      foreach: bool) -> None:
    """In place: the score EMA of every element (:func:`epi_kernels.score.score_ema_`, the kernels'
    order of operations): over all fp32 scores at once with `foreach`, else one tensor at a time
    (its transient memory is then one gradient's size)."""
    s32 = [s if s.dtype == torch.float32 else s.float() for s in importances]
    g32 = [g.float() for g in grads]
    if foreach:
        score_ema_(s32, g32, beta, 1 - beta, importance == "sq")
    else:
        for s, g in zip(s32, g32):
            score_ema_([s], [g], beta, 1 - beta, importance == "sq")
    for s, s_new in zip(importances, s32):
        if s_new is not s:
            s.copy_(s_new)


def epi_adamw(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    importances: list[Tensor],
    masks: list[Tensor],
    isolated: list[Tensor] | None = None,
    *,
    backend: str = "torch",
    importance_beta: float | None,
    importance: str,
    amsgrad: bool,
    beta1: float | Tensor,
    beta2: float | Tensor,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    foreach: bool | None = None,
    capturable: bool = False,
    fused: bool | None = None,
    plan: RefreshPlan | None = None,
) -> None:
    """One EPI-AdamW step over lists of tensors (the optimizer's state, updated in place).

    `masks` are the packed isolation masks in force (refreshes happen before this call);
    `isolated` optionally gives their flat isolated indices (a cache the eager backend uses),
    else they are unpacked. backend: "torch" (eager; AdamW itself is torch's), "compiled", "triton" or
    "cuda" (the kernel backends, which alone take a `plan`, a
    :class:`~epi_kernels.step_driver.RefreshPlan`: they then refresh the masks inside the step
    instead of being handed refreshed ones).
    """
    kwargs = dict(importance_beta=importance_beta, importance=importance, amsgrad=amsgrad, beta1=beta1,
                  beta2=beta2, lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize)
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, importances, masks)
    if backend == "torch":
        _torch_epi_adamw(*lists, isolated, foreach=foreach, capturable=capturable, fused=fused, **kwargs)
    elif backend == "compiled":
        compiled_epi_adamw(*lists, **kwargs)
    elif backend in ("triton", "cuda"):
        kernel_epi_adamw(backend, *lists, **kwargs, plan=plan)
    else:
        raise ValueError(f"epi_adamw: unknown backend {backend!r}")


def _torch_epi_adamw(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, importances,
                     masks, isolated, *, importance_beta, importance, amsgrad, beta1, beta2, lr,
                     weight_decay, eps, maximize, foreach, capturable, fused) -> None:
    if importance != "exp_avg_sq":  # (else the scores are exp_avg_sqs: AdamW updates them)
        update_importance(importances, grads, beta=importance_beta, importance=importance,
                          foreach=foreach is not False)
    if isolated is None:
        isolated = [isolated_indices(m, p.numel()) for p, m in zip(params, masks)]
    frozen = [(p, idx, p.take(idx)) for p, idx in zip(params, isolated) if idx.numel()]
    adam(
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
        foreach=foreach, capturable=capturable, differentiable=False, fused=fused,
        has_complex=False, decoupled_weight_decay=True, amsgrad=amsgrad, beta1=beta1, beta2=beta2,
        lr=lr, weight_decay=weight_decay, eps=eps, maximize=maximize,
    )
    for p, idx, values in frozen:
        p.put_(idx, values)
