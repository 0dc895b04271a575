"""backend="torch": the eager pure-PyTorch reference every other backend is held to.

* scores: ``s <- beta * s + (1 - beta) * f(g)``, ``f(g) = g * g`` ("sq") or ``|g|`` ("abs"), computed
  in fp32 in the kernels' order (:mod:`epi_kernels.score`) and rounded once to the score dtype;
  with importance="exp_avg_sq" the scores are AdamW's ``exp_avg_sqs`` themselves (no score pass);
* moments and non-isolated parameters, fp32 (and fp64) params: exactly ``torch.optim.AdamW`` (its
  own for-loop, foreach or fused implementation is called, so they agree to the bit);
* moments and non-isolated parameters, bf16 and fp16 params: AdamW in fp32 math, in the order of
  DESIGN.md section 6, each stored value rounded once (:func:`low_precision_adamw`), whatever
  `foreach`/`fused` say: the arithmetic of the kernel backends, bit for bit, not torch's for-loop
  and foreach AdamW, which compute in the param dtype (fp16's eps of 1e-8 is 0 there);
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
from ..step_scalars import step_scalars
from .registry import Backend, register

__all__ = ["BACKEND", "eager_step", "update_importance", "low_precision_adamw", "sqrt_rn"]

LOW_PRECISION = (torch.bfloat16, torch.float16)


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


def sqrt_rn(x: Tensor) -> Tensor:
    """The correctly rounded square root of fp32 `x`. torch.sqrt of fp32 CPU tensors is not (torch
    2.13, AVX2: off by an ulp in about one case in six); on the CPU it is taken in float64 and
    rounded once, which is exact: the square root of an fp32 value lies at least 4 float64 ulps
    from any fp32 rounding midpoint, more than float64 sqrt's error. Elsewhere (CUDA's sqrtf is
    IEEE) torch.sqrt itself."""
    if x.device.type == "cpu":
        return x.double().sqrt_().float()
    return x.sqrt()


def low_precision_adamw(tensors: StepTensors, hyper: StepHyper) -> None:
    """AdamW's step of `tensors` (bf16/fp16 params and moments; the step counters are advanced here)
    in fp32 math, in DESIGN.md section 6's order, each product, sum, quotient and square root
    rounded on its own (separate torch ops: no fused multiply-add, no lerp), each stored value
    rounded once to the param dtype (round-to-nearest-even): the kernels' arithmetic. One tensor at
    a time, so the fp32 temporaries are one tensor's. Scalars: :func:`epi_kernels.step_scalars`
    (float64 formulas rounded once to fp32), computed where the step counters live."""
    for i, p in enumerate(tensors.params):
        step = tensors.state_steps[i]
        step += 1
        decay, step_size, omb1, beta2, omb2, bc2_sqrt, eps = step_scalars(
            [step], p.device, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2, weight_decay=hyper.weight_decay,
            eps=hyper.eps, importance_beta=None)[0, :7].unbind(0)
        m, v = tensors.exp_avgs[i], tensors.exp_avg_sqs[i]
        g = tensors.grads[i].float()  # (a copy: the param dtype is not fp32)
        if hyper.maximize:
            g.neg_()
        m32 = m.float()
        m32.add_(g.sub(m32).mul_(omb1))  # m + (g - m)*(1 - beta1)
        v32 = v.float().mul_(beta2)
        v32.add_(g.mul(omb2).mul_(g))  # v*beta2 + ((1 - beta2)*g)*g
        del g
        m.copy_(m32)
        v.copy_(v32)
        if hyper.amsgrad:
            vmax = tensors.max_exp_avg_sqs[i]
            v32 = torch.maximum(vmax.float(), v32)  # NaN wins, as in the kernels
            vmax.copy_(v32)
        denom = sqrt_rn(v32).div_(bc2_sqrt).add_(eps)  # sqrt(v)/bc2_sqrt + eps
        p32 = p.float().mul_(decay)
        p32.sub_(m32.mul_(step_size).div_(denom))  # p*decay - (step_size*m)/denom
        p.copy_(p32)


def eager_step(tensors: StepTensors, hyper: StepHyper, plan: None = None) -> None:
    """The step: the score EMA, AdamW (torch's own for fp32/fp64 params, :func:`low_precision_adamw`
    for bf16/fp16 ones), then the isolated elements written back."""
    if not hyper.v_scores:  # (else the scores are exp_avg_sqs: AdamW updates them)
        update_importance(tensors.scores, tensors.grads, beta=hyper.importance_beta, importance=hyper.importance,
                          foreach=hyper.foreach is not False)
    isolated = tensors.isolated
    if isolated is None:
        isolated = [isolated_indices(m, p.numel()) for p, m in zip(tensors.params, tensors.masks)]
    frozen = [(p, idx, p.take(idx)) for p, idx in zip(tensors.params, isolated) if idx.numel()]
    low = [i for i, p in enumerate(tensors.params) if p.dtype in LOW_PRECISION]
    full = tensors.take([i for i, p in enumerate(tensors.params) if p.dtype not in LOW_PRECISION]) if low else tensors
    if full.params:
        adam(
            full.params, full.grads, full.exp_avgs, full.exp_avg_sqs, full.max_exp_avg_sqs,
            full.state_steps, foreach=hyper.foreach, capturable=hyper.capturable, differentiable=False,
            fused=hyper.fused, has_complex=False, decoupled_weight_decay=True, amsgrad=hyper.amsgrad,
            beta1=hyper.beta1, beta2=hyper.beta2, lr=hyper.lr, weight_decay=hyper.weight_decay, eps=hyper.eps,
            maximize=hyper.maximize,
        )
    if low:
        low_precision_adamw(tensors.take(low), hyper)
    for p, idx, values in frozen:
        p.put_(idx, values)


BACKEND = register(Backend("torch", eager_step, wants_isolated_indices=True, auto_rank=0, auto_devices=("*",)))
