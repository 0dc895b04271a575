"""The kernel entry points as ``torch.library`` custom ops (namespace ``epi_kernels``), declared once.

Each has a fake implementation (shapes only), so torch.compile traces a call as one opaque node
instead of graph-breaking on raw device addresses; the real implementation runs the kernel set
named by ``kernels`` (:mod:`epi_kernels.kernel_sets`: "triton" or "cuda"). Every tensor a kernel
writes is declared mutated, and nothing else is written (opcheck verifies it).

* ``fused_step_``: one EPI-AdamW step of a launch group (same device, param and score dtypes), one
  launch. Each tensor's scalars come from ``scalars`` (float32 [T, len(abi.SCALARS)]) and the
  control words from ``control`` (int32 [len(abi.CONTROL)]), both in device memory; the caller has
  advanced the step counters. ``refresh`` (with ``tau``, the tie cuts ``cut`` and ``counts``) lets
  the step set the masks and count (isolated, kept-from-before); ``collect`` (with ``origin``,
  ``hist``, ``over``) lets it count the new scores into window histograms for the next step's
  refresh; each happens where its control word is set too. ``flags`` is the int32 bit set of
  abi.FLAGS (:class:`~epi_kernels.launch.StepFlags`: refresh and collect are two of them); with
  ``v_scores`` the scores are the ``exp_avg_sqs`` (importance="exp_avg_sq"; ``importances`` is then
  empty, so no tensor is passed twice), which the step updates as moments only.
* ``window_histogram``: window histograms of stored scores around ``origin``.
* ``select_thresholds``: tau of each tensor from the window histograms and its ``k``, then the
  repair path and tie cuts for the tensors the window cannot answer (where ``gate`` is not 0).
* ``select_global``: scope="global"'s one selection over the scores divided by their tensors'
  means (:func:`epi_kernels.launch.kernel_global_select`), with the raw thresholds (``above``
  from the tie cut on) that ``fused_step_`` applies.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .abi import WINDOW_BINS
from .kernel_sets import kernel_set
from .launch import Launch, StepFlags, kernel_global_select, kernel_select, kernel_window_histograms, score_launch

__all__ = ["fused_step_", "window_histogram", "select_thresholds", "select_global"]

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "importances", "masks", "hist", "over", "counts")


def _fused_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], importances: list[Tensor], masks: list[Tensor], scalars: Tensor,
                control: Tensor, tau: Optional[Tensor], cut: Optional[Tensor], origin: Optional[Tensor],
                hist: Optional[Tensor], over: Optional[Tensor], counts: Optional[Tensor], kernels: str,
                flags: int, above: Optional[Tensor] = None) -> None:
    kset, context = kernel_set(kernels, params[0].device)
    step_flags = StepFlags.from_bits(flags)
    scores = exp_avg_sqs if step_flags.v_scores else importances
    launch = Launch([[p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if step_flags.amsgrad else None,
                      scores[i], masks[i]] for i, p in enumerate(params)])
    with context:
        if launch.programs:
            kset.fused_step(launch, step_flags, scalars, control, tau, cut, origin, hist, over, counts, above)
    launch.finish()


_FUSED_STEP = torch.library.custom_op("epi_kernels::fused_step_", _fused_step, mutates_args=_MUTATED)


@_FUSED_STEP.register_fake
def _(*args, **kwargs) -> None:
    return None  # writes its arguments in place, returns nothing


def _window_histogram(scores: list[Tensor], origin: Tensor, kernels: str) -> tuple[Tensor, Tensor]:
    kset, context = kernel_set(kernels, scores[0].device)
    with context:
        return kernel_window_histograms(kset, score_launch(scores), origin)


_WINDOW_HISTOGRAM = torch.library.custom_op("epi_kernels::window_histogram", _window_histogram, mutates_args=())


@_WINDOW_HISTOGRAM.register_fake
def _(scores, origin, kernels):
    return (origin.new_empty(len(scores), WINDOW_BINS, dtype=torch.int64),
            origin.new_empty(len(scores), dtype=torch.int64))


def _select_thresholds(scores: list[Tensor], hist: Tensor, over: Tensor, origin: Tensor, k: Tensor, gate: Tensor,
                       kernels: str) -> tuple[Tensor, Tensor, Tensor]:
    kset, context = kernel_set(kernels, scores[0].device)
    with context:
        return kernel_select(kset, score_launch(scores), hist, over, origin, k, gate)


_SELECT_THRESHOLDS = torch.library.custom_op("epi_kernels::select_thresholds", _select_thresholds, mutates_args=())


@_SELECT_THRESHOLDS.register_fake
def _(scores, hist, over, origin, k, gate, kernels):
    n = len(scores)
    return origin.new_empty(n), origin.new_empty(n, dtype=torch.bool), origin.new_empty(n, dtype=torch.int64)


def _select_global(scores: list[Tensor], anchor: Tensor, k: Tensor, gate: Tensor,
                   kernels: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    kset, context = kernel_set(kernels, scores[0].device)
    with context:
        return kernel_global_select(kset, score_launch(scores), anchor, k, gate)


_SELECT_GLOBAL = torch.library.custom_op("epi_kernels::select_global", _select_global, mutates_args=())


@_SELECT_GLOBAL.register_fake
def _(scores, anchor, k, gate, kernels):
    n = len(scores)
    return (anchor.new_empty(1), anchor.new_empty(1, dtype=torch.bool), anchor.new_empty(n), anchor.new_empty(n),
            anchor.new_empty(n, dtype=torch.int64))


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _call(op, impl, probe: Tensor, *args, **kwargs):
    # Eager calls on plain tensors run the implementation directly: the dispatcher's autograd and
    # version-counter wrappers cost about 40 % of the host time of a 300-tensor step (profiled on
    # CPU). Traced calls (torch.compile) and tensor subclasses (fake tensors, ...) go through the op.
    if torch.compiler.is_compiling() or type(probe) not in _PLAIN:
        return op(*args, **kwargs)
    return impl(*args, **kwargs)


def fused_step_(*args, **kwargs) -> None:
    """``epi_kernels::fused_step_`` (arguments as in the module docstring)."""
    return _call(_FUSED_STEP, _fused_step, args[0][0], *args, **kwargs)


def window_histogram(scores: list[Tensor], origin: Tensor, kernels: str) -> tuple[Tensor, Tensor]:
    """``epi_kernels::window_histogram``: (hist int64 [T, WINDOW_BINS], over int64 [T])."""
    return _call(_WINDOW_HISTOGRAM, _window_histogram, scores[0], scores, origin, kernels)


def select_thresholds(scores: list[Tensor], hist: Tensor, over: Tensor, origin: Tensor, k: Tensor, gate: Tensor,
                      kernels: str) -> tuple[Tensor, Tensor, Tensor]:
    """``epi_kernels::select_thresholds``: (tau int32 [T], repaired bool [T], cut int64 [T]) for int64
    `k` [T]; the repair path runs where the 0-dim int32 `gate` is not 0."""
    return _call(_SELECT_THRESHOLDS, _select_thresholds, scores[0], scores, hist, over, origin, k, gate, kernels)


def select_global(scores: list[Tensor], anchor: Tensor, k: Tensor, gate: Tensor,
                  kernels: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``epi_kernels::select_global``: (tau int32 [1], repaired bool [1], lo int32 [T], hi int32 [T],
    cut int64 [T]) for the group's previous threshold `anchor` (int32 [1]) and int64 `k` [1]; the
    passes over the scores run where the 0-dim int32 `gate` is not 0."""
    return _call(_SELECT_GLOBAL, _select_global, scores[0], scores, anchor, k, gate, kernels)
