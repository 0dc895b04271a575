"""Functional EPI-AdamW step: score EMA + AdamW in which isolated elements do not change.

``epi_adamw`` is the entry point (like ``torch.optim.adamw.adamw``): it dispatches once, through the
backend registry (:mod:`epi_kernels.backends`), to the backend's step. Every backend's step has the
one signature ``step(tensors, hyper, plan)`` over the records of :mod:`epi_kernels.step_records`;
the eager ``"torch"`` backend is the reference the others are held to (DESIGN.md, "Semantics").
"""
from __future__ import annotations

from . import backends
from .step_driver import RefreshPlan
from .step_records import StepHyper, StepTensors

__all__ = ["epi_adamw"]


def epi_adamw(tensors: StepTensors, hyper: StepHyper, *, backend: str = "torch",
              plan: RefreshPlan | None = None) -> None:
    """One EPI-AdamW step over lists of tensors (the optimizer's state, updated in place).

    `tensors.masks` are the packed isolation masks in force (refreshes happen before this call),
    unless the backend refreshes inside its step and is handed a `plan`
    (:class:`~epi_kernels.step_driver.RefreshPlan`): it then refreshes the masks itself. `backend`
    is a registered backend's name ("auto" resolves on the params' device)."""
    device = tensors.params[0].device if tensors.params else None
    backends.resolve(backend, device).step(tensors, hyper, plan)
