"""The two records one EPI-AdamW step travels as, from the optimizer to every backend's step: the
tensor lists (:class:`StepTensors`) and the hyper-parameters (:class:`StepHyper`). Every backend
implements ``step(tensors, hyper, plan)`` over them (:mod:`epi_kernels.backends`), as torch's
``_single_tensor_adam``/``_multi_tensor_adam``/``_fused_adam`` share one signature.

A setting the step needs is one field of :class:`StepHyper`, filled from the param group by name;
nothing between the optimizer and a backend spells the fields out again.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

from torch import Tensor

__all__ = ["StepTensors", "StepHyper"]


class StepTensors(NamedTuple):
    """One step's tensors, in place; list i of every field belongs to tensor i (the local shard of a
    sharded parameter). `max_exp_avg_sqs` is empty without amsgrad; `scores` are the EPI scores
    (the `exp_avg_sqs` themselves with importance="exp_avg_sq"); `masks` the packed isolation
    masks in force; `isolated` optionally their flat isolated indices (a cache of the eager
    backend, which else unpacks the masks)."""
    params: list[Tensor]
    grads: list[Tensor]
    exp_avgs: list[Tensor]
    exp_avg_sqs: list[Tensor]
    max_exp_avg_sqs: list[Tensor]
    state_steps: list[Tensor]
    scores: list[Tensor]
    masks: list[Tensor]
    isolated: list[Tensor] | None = None

    @classmethod
    def of(cls, params: Sequence[Tensor], states: Sequence[dict], hyper: StepHyper,
           local: Callable[[Tensor], Tensor], isolated: list[Tensor] | None = None) -> StepTensors:
        """The lists of `params` and their optimizer `states`, each tensor through `local` (the
        local shard of a DTensor, else the tensor itself)."""
        exp_avg_sqs = [local(st["exp_avg_sq"]) for st in states]
        return cls([local(p) for p in params], [local(p.grad) for p in params],
                   [local(st["exp_avg"]) for st in states], exp_avg_sqs,
                   [local(st["max_exp_avg_sq"]) for st in states] if hyper.amsgrad else [],
                   [st["step"] for st in states],
                   exp_avg_sqs if hyper.v_scores else [hyper.scores_of(st) for st in states],
                   [st["isolation_mask"] for st in states], isolated)

    def take(self, idx: Sequence[int]) -> StepTensors:
        """The record of tensors `idx` (ascending, distinct) only: a launch group."""
        if len(idx) == len(self.params):  # all of them (the usual single launch group)
            return self
        return StepTensors(*([lst[i] for i in idx] if lst else lst for lst in self))


class StepHyper(NamedTuple):
    """One step's hyper-parameters, as validated (:mod:`epi_kernels.settings`); `importance_beta`
    is None with importance="exp_avg_sq" (no score EMA)."""
    lr: float | Tensor
    beta1: float | Tensor
    beta2: float | Tensor
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    importance: str
    importance_beta: float | None
    foreach: bool | None
    capturable: bool
    fused: bool | None

    @classmethod
    def of(cls, group: dict) -> StepHyper:
        """The hyper-parameters of param group `group` (its keys by field name; betas split)."""
        beta1, beta2 = group["betas"]
        return cls(beta1=beta1, beta2=beta2, **{f: group[f] for f in cls._fields if f not in ("beta1", "beta2")})

    @property
    def sq(self) -> bool:
        """The score signal is g*g (else |g|)."""
        return self.importance == "sq"

    @property
    def v_scores(self) -> bool:
        """The scores are AdamW's exp_avg_sq (no score EMA of their own)."""
        return self.importance == "exp_avg_sq"

    def scores_of(self, state: dict) -> Tensor:
        """The scores in a tensor's optimizer `state`: its exp_avg_sq, or its importance EMA."""
        return state["exp_avg_sq"] if self.v_scores else state["importance"]
