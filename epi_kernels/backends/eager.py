"""backend="torch": the eager pure-PyTorch reference every other backend is held to.

* scores: ``s <- beta * s + (1 - beta) * f(g)``, ``f(g) = g * g`` ("sq") or ``|g|`` ("abs"), computed
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

from ..mask import isolated_indices
from ..score import score_ema_
from ..step_records import StepHyper, StepTensors
from .registry import Backend, register

__all__ = ["BACKEND", "eager_step", "update_importance"]


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


def eager_step(tensors: StepTensors, hyper: StepHyper, plan: None = None) -> None:
    """The step: the score EMA, torch's AdamW, then the isolated elements written back."""
    if not hyper.v_scores:  # (else the scores are exp_avg_sqs: AdamW updates them)
        update_importance(tensors.scores, tensors.grads, beta=hyper.importance_beta, importance=hyper.importance,
                          foreach=hyper.foreach is not False)
    isolated = tensors.isolated
    if isolated is None:
        isolated = [isolated_indices(m, p.numel()) for p, m in zip(tensors.params, tensors.masks)]
    frozen = [(p, idx, p.take(idx)) for p, idx in zip(tensors.params, isolated) if idx.numel()]
    adam(
        tensors.params, tensors.grads, tensors.exp_avgs, tensors.exp_avg_sqs, tensors.max_exp_avg_sqs,
        tensors.state_steps, foreach=hyper.foreach, capturable=hyper.capturable, differentiable=False,
        fused=hyper.fused, has_complex=False, decoupled_weight_decay=True, amsgrad=hyper.amsgrad, beta1=hyper.beta1,
        beta2=hyper.beta2, lr=hyper.lr, weight_decay=hyper.weight_decay, eps=hyper.eps, maximize=hyper.maximize,
    )
    for p, idx, values in frozen:
        p.put_(idx, values)


BACKEND = register(Backend("torch", eager_step, wants_isolated_indices=True, auto_rank=0, auto_devices=("*",)))
