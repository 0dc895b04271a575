"""Host side of the fused kernel backends ("triton" and "cuda"): one flow, two kernel sets.

A step runs the fused kernel over each *launch group*: the tensors sharing device, param dtype and
score dtype (normally one group per param group and dtype). A refresh at step t needs the window
histogram of the start-of-step scores; the fused kernel of step t - 1 counts exactly those (its new
scores) when the host knows t refreshes. At step t, one program per tensor selects the threshold
from that histogram, the repair kernels compute exact thresholds for the tensors it flags
(launched whatever the flags say, so the host never reads them), and the fused kernel sets the new
mask bits as it steps. Thresholds are the reference engine's integers
(:mod:`epi_kernels.threshold`) for the same scores.

The kernels are reached only through the custom ops of :mod:`epi_kernels.ops` (tables of raw
addresses are built inside them), and this flow reads no tensor value, so torch.compile traces it
without a graph break. Host-side work per step: group tensors, build small address and chunk
tables (cached; copied to the device from pinned memory, asynchronously), compute the AdamW scalars
from the CPU step counters (a host read when they live on the GPU: fused=True). Capturable steps
(``FusedRefresh.control``) decide on the device: see :func:`_device_group_step`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from . import ops
from .fused_refresh import FusedRefresh
from .launch import origins
from .mask import jaccard_counts
from .step_scalars import as_float, device_step_scalars
from .threshold import WINDOW_BINS

__all__ = ["fused_epi_adamw"]


def _stack(states: list[dict], idx: list[int], key: str) -> Tensor:
    return torch.stack([states[i][key] for i in idx])


def _store(states: list[dict], idx: list[int], values: dict[str, Tensor]) -> None:
    """Copy per-tensor results into the optimizer states, one multi-tensor copy per entry."""
    for key, value in values.items():
        torch._foreach_copy_([states[i][key] for i in idx], list(value.to(states[idx[0]][key].dtype).unbind(0)))


def _take(lists: tuple, idx: list[int], amsgrad: bool) -> list[list[Tensor]]:
    """A launch group's entries of the eight tensor lists of a step (max_exp_avg_sqs empty without
    amsgrad), in fused_step_'s order."""
    return [[xs[i] for i in idx] if j != 4 or amsgrad else [] for j, xs in enumerate(lists)]


def _refresh_stats(counts: Tensor, old_count: Tensor, tau: Tensor, k: Tensor, repaired: Tensor) -> dict[str, Tensor]:
    """The per-tensor state entries a refresh writes, from the fused step's (isolated, kept) counts."""
    count = counts[:, 0].to(torch.int64)
    return {"isolation_overlap": jaccard_counts(counts[:, 1].to(torch.int64), old_count, count),
            "threshold_bits": tau, "isolation_k": k, "isolated_count": count, "threshold_exact": repaired}


def _thresholds(kernels: str, scores: list[Tensor], fr: FusedRefresh, idx: list[int], pending: tuple | None):
    """New thresholds of a launch group: (tau, repaired, k, cut). `pending`: the histograms the previous
    step collected for these indices, used if they are of these very score tensors."""
    origin = origins(_stack(fr.states, idx, "threshold_bits"))
    if pending is not None and all(a is b for a, b in zip(pending[0], scores)):
        hist, over = pending[1], pending[2]
    else:
        hist, over = ops.window_histogram(scores, origin, kernels)
    return ops.select_thresholds(scores, hist, over, origin, fr.isolation_ratio, kernels)


def _launch_groups(params: list[Tensor], importances: list[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, importances[i].dtype), []).append(i)
    return groups


def fused_epi_adamw(kernels: str, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
                    importances, masks, *, importance_beta, importance, amsgrad, beta1, beta2, lr, weight_decay,
                    eps, maximize, fused_refresh: FusedRefresh | None = None) -> None:
    """The EPI-AdamW step with the kernel set `kernels` ("triton" or "cuda"); with `fused_refresh`,
    also the refresh of the masks (or the histograms for the next step's refresh)."""
    fr = fused_refresh
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, importances, masks)
    if fr is not None and fr.control is not None:
        _device_step(kernels, lists, fr, lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, eps=eps,
                     importance_beta=importance_beta, sq=importance == "sq", maximize=maximize, amsgrad=amsgrad)
        return
    previous = {}
    if fr is not None:  # histograms are only ever used by the very next step
        previous = dict(fr.pending)
        fr.pending.clear()
    hyper = dict(lr=as_float(lr), beta1=as_float(beta1), beta2=as_float(beta2), weight_decay=weight_decay,
                 eps=eps, importance_beta=importance_beta, sq=importance == "sq", maximize=maximize,
                 amsgrad=amsgrad)
    for (device, _, _), idx in _launch_groups(params, importances).items():
        scores = [importances[i] for i in idx]
        refresh = fr is not None and fr.refresh
        collect = fr is not None and fr.collect
        tau = cut = counts = hist = over = origin = None
        if refresh:
            tau, repaired, k, cut = _thresholds(kernels, scores, fr, idx, previous.get(tuple(idx)))
            old_count = _stack(fr.states, idx, "isolated_count")
            counts = torch.zeros(len(idx), 2, dtype=torch.int64, device=device)
        if collect:
            origin = origins(tau if refresh else _stack(fr.states, idx, "threshold_bits"))
            hist = torch.zeros(len(idx), WINDOW_BINS, dtype=torch.int64, device=device)
            over = torch.zeros(len(idx), dtype=torch.int64, device=device)
        ops.fused_step_(*_take(lists, idx, amsgrad), tau, cut, origin, hist, over, counts, None, None, kernels,
                        **hyper)
        if collect:
            fr.pending[tuple(idx)] = (scores, hist, over)
        if refresh:
            _store(fr.states, idx, _refresh_stats(counts, old_count, tau, k, repaired))


def _device_step(kernels: str, lists: tuple, fr: FusedRefresh, *, lr, beta1, beta2, weight_decay, eps, importance_beta, sq, maximize,
                 amsgrad) -> None:
    """A capturable step: the same launches every step, decided by fr.control on the device.

    Per launch group, every step: select thresholds from the histogram buffers (the repair path
    gated by the refresh word), clear the buffers if this step collects, the fused step, and the
    refresh statistics stored where the refresh word is set. The histogram buffers live in
    fr.pending; when they are new (the first step, or after a checkpoint load) they are filled
    from the stored scores, once, so a refresh on that step sees the right histograms."""
    params, state_steps, importances = lists[0], lists[5], lists[6]
    control = fr.control
    refresh, collect = control[0] != 0, control[1] != 0
    live = (1 - control[2]).to(state_steps[0].dtype) if state_steps else None
    if state_steps:
        # a list of the one tensor, not the tensor itself: torch 2.11's _foreach_add_(tensors, tensor)
        # cannot be captured in a CUDA graph (it invalidates the capture; seen on an H200)
        torch._foreach_add_(state_steps, [live] * len(state_steps))
    for (device, _, _), idx in _launch_groups(params, importances).items():
        scalars = device_step_scalars([state_steps[i] for i in idx], lr=lr, beta1=beta1, beta2=beta2,
                                      weight_decay=weight_decay, eps=eps, importance_beta=importance_beta)
        scores = [importances[i] for i in idx]
        anchor = _stack(fr.states, idx, "threshold_bits")
        buffers = fr.pending.get(tuple(idx))
        if buffers is None or not all(a is b for a, b in zip(buffers[0], scores)):
            hist, over = ops.window_histogram(scores, origins(anchor), kernels)
            buffers = fr.pending[tuple(idx)] = (scores, hist, over, ops.isolation_ks(scores, fr.isolation_ratio))
        _, hist, over, k = buffers
        tau, repaired, k, cut = ops.select_thresholds(scores, hist, over, origins(anchor), fr.isolation_ratio,
                                                      kernels, k, control[0])
        old_count = _stack(fr.states, idx, "isolated_count")
        origin = origins(torch.where(refresh, tau, anchor))
        hist.masked_fill_(collect, 0)
        over.masked_fill_(collect, 0)
        counts = torch.zeros(len(idx), 2, dtype=torch.int64, device=device)
        ops.fused_step_(*_take(lists, idx, amsgrad), tau, cut, origin, hist, over, counts, scalars, control, kernels,
                        lr=0.0, beta1=0.0, beta2=0.0, weight_decay=0.0, eps=0.0, importance_beta=0.0,  # unread
                        sq=sq, maximize=maximize, amsgrad=amsgrad)
        new = _refresh_stats(counts, old_count, tau, k, repaired)
        old = {"threshold_bits": anchor, "isolated_count": old_count}  # stacked above already
        _store(fr.states, idx, {key: torch.where(refresh, value.to(fr.states[idx[0]][key].dtype),
                                                 old[key] if key in old else _stack(fr.states, idx, key))
                                for key, value in new.items()})
