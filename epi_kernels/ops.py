"""The kernel entry points as ``torch.library`` custom ops (namespace ``epi_kernels``).

Declared once here, each with a fake implementation (shapes only), so torch.compile traces a call
as one opaque node instead of graph-breaking on raw device addresses; the real implementation runs
the kernel set named by ``kernels``: "triton" (:mod:`epi_kernels.triton_backend`) or "cuda"
(:mod:`epi_kernels.cuda_backend`: the extension on CUDA tensors, its host harness on CPU tensors).
Every tensor a kernel writes is declared mutated, and nothing else is written (opcheck verifies it).

* ``fused_step_``: one EPI-AdamW step of a launch group (same device, param and score dtypes):
  step counters += 1, then the fused kernel once per distinct step count. With ``tau`` (and the
  tie cuts ``cut``) it sets the masks from it and counts (isolated, kept-from-before) into ``counts``; with ``hist`` it counts the
  new scores into window histograms around ``origin`` (for the next step's refresh). Capturable
  (``control`` given): one launch, no host read; the caller has advanced the step counters and
  computed ``device_scalars``, and the control words decide refresh, collection and skipping.
* ``window_histogram``: window histograms of stored scores around ``origin``.
* ``select_thresholds``: per tensor k from the isolation ratio (or ``k`` given on the device), tau
  from the window histograms, and the repair path and tie cuts for the tensors the window cannot
  answer (unless ``gate`` is 0).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .launch import (SCALAR_COUNT, DeviceInputs, Launch, StepFlags, kernel_select, kernel_window_histograms,
                     score_launch, to_device)
from .step_scalars import step_scalars
from .threshold import WINDOW_BINS, isolation_k

__all__ = ["fused_step_", "window_histogram", "select_thresholds", "isolation_ks", "kernel_set"]

_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps", "importances", "masks",
            "hist", "over", "counts")


def kernel_set(kernels: str, device: torch.device):
    """(kernel set, context to launch in) for `kernels` on tensors on `device`."""
    if kernels == "triton":
        from .triton_backend import KERNELS  # noqa: PLC0415 - imports Triton, only when used

        return KERNELS, torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    if kernels == "cuda":
        from .cuda_backend import kernels_on  # noqa: PLC0415 - loads the extension, only when used

        return kernels_on(device)
    raise ValueError(f"epi_kernels ops: unknown kernel set {kernels!r} (expected 'triton' or 'cuda')")


def _rows(t: Tensor | None, idx: list[int], whole: bool) -> Tensor | None:
    return t if t is None or whole else t[idx].contiguous()


def _fused_step(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                max_exp_avg_sqs: list[Tensor], state_steps: list[Tensor], importances: list[Tensor],
                masks: list[Tensor], tau: Optional[Tensor], cut: Optional[Tensor], origin: Optional[Tensor],
                hist: Optional[Tensor],
                over: Optional[Tensor], counts: Optional[Tensor], device_scalars: Optional[Tensor],
                control: Optional[Tensor], kernels: str, lr: float, beta1: float, beta2: float,
                weight_decay: float, eps: float, importance_beta: float, sq: bool, maximize: bool,
                amsgrad: bool) -> None:
    ks, context = kernel_set(kernels, params[0].device)
    columns = [[p, grads[i], exp_avgs[i], exp_avg_sqs[i], max_exp_avg_sqs[i] if amsgrad else None,
                importances[i], masks[i]] for i, p in enumerate(params)]
    if control is not None:  # capturable: every decision is on the device
        launch = Launch(list(range(len(params))), columns)
        with context:
            if launch.programs:
                ks.fused_step(launch, (0.0,) * SCALAR_COUNT, StepFlags(sq, maximize, amsgrad, True, True, True),
                              tau, cut, origin, hist, over, counts, DeviceInputs(device_scalars, control))
        launch.finish()
        return
    torch._foreach_add_(state_steps, 1)
    steps = torch.stack(state_steps).tolist()  # CPU tensors unless fused/capturable: then a host sync
    by_step: dict[float, list[int]] = {}
    for i, s in enumerate(steps):
        by_step.setdefault(s, []).append(i)
    flags = StepFlags(sq, maximize, amsgrad, tau is not None, hist is not None)
    with context:
        for step, idx in by_step.items():  # normally one: params that missed steps count fewer
            whole = len(idx) == len(params)
            launch = Launch(idx, columns)
            part = [_rows(t, idx, whole) for t in (tau, cut, origin, hist, over, counts)]
            scalars = step_scalars(lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                                   importance_beta=importance_beta, step=step)
            if launch.programs:
                ks.fused_step(launch, scalars, flags, *part)
            launch.finish()
            if not whole:
                for t, rows in zip((hist, over, counts), part[3:]):
                    if t is not None:
                        t[idx] = rows


_FUSED_STEP = torch.library.custom_op("epi_kernels::fused_step_", _fused_step, mutates_args=_MUTATED)


@_FUSED_STEP.register_fake
def _(*args, **kwargs) -> None:
    return None  # writes its arguments in place, returns nothing


def _window_histogram(scores: list[Tensor], origin: Tensor, kernels: str) -> tuple[Tensor, Tensor]:
    ks, context = kernel_set(kernels, scores[0].device)
    with context:
        return kernel_window_histograms(ks, score_launch(scores), origin)


_WINDOW_HISTOGRAM = torch.library.custom_op("epi_kernels::window_histogram", _window_histogram, mutates_args=())


@_WINDOW_HISTOGRAM.register_fake
def _(scores, origin, kernels):
    return (origin.new_empty(len(scores), WINDOW_BINS, dtype=torch.int64),
            origin.new_empty(len(scores), dtype=torch.int64))


def _select_thresholds(scores: list[Tensor], hist: Tensor, over: Tensor, origin: Tensor, isolation_ratio: float,
                      kernels: str, k: Optional[Tensor] = None,
                      gate: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ks, context = kernel_set(kernels, scores[0].device)
    with context:
        if k is None:
            k = isolation_ks(scores, isolation_ratio)
        else:
            k = k.clone()  # an output may not alias an input
        tau, repaired, cut = kernel_select(ks, score_launch(scores), hist, over, origin, k, gate)
    return tau, repaired, k, cut


def isolation_ks(scores: list[Tensor], isolation_ratio: float) -> Tensor:
    """k of each score tensor, int64 on their device (pinned, asynchronous copy: no host sync)."""
    return to_device([isolation_k(isolation_ratio, s.numel()) for s in scores], torch.int64, scores[0].device)


_SELECT_THRESHOLDS = torch.library.custom_op("epi_kernels::select_thresholds", _select_thresholds, mutates_args=())


@_SELECT_THRESHOLDS.register_fake
def _(scores, hist, over, origin, isolation_ratio, kernels, k=None, gate=None):
    n = len(scores)
    return (origin.new_empty(n), origin.new_empty(n, dtype=torch.bool), origin.new_empty(n, dtype=torch.int64),
            origin.new_empty(n, dtype=torch.int64))


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


def select_thresholds(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor]:
    """``epi_kernels::select_thresholds``: (tau int32 [T], repaired bool [T], k int64 [T], cut int64 [T])."""
    return _call(_SELECT_THRESHOLDS, _select_thresholds, args[0][0], *args, **kwargs)
