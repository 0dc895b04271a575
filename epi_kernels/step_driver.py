"""Host side of the kernel backends ("triton" and "cuda"): one step path, two kernel sets.

A step runs the fused kernel once per *launch group*: the tensors sharing device, param dtype and
score dtype (normally one group per param group and dtype). Every launch reads its per-tensor
scalars (computed on the device from the step counters: :mod:`epi_kernels.step_scalars`) and its
control words (refresh, collect, skip: :mod:`epi_kernels.abi`) from device memory. Who writes
the control words is the only difference between a host-decided step and a capturable one: the
optimizer's schedule on the host (a constant word set that agrees with the flags passed), or the
optimizer's device-side schedule (``RefreshPlan.control``), which makes the step's launches the
same every time, so a CUDA graph can capture it.

A refresh at step t needs the window histograms of the start-of-step scores; the fused kernel of
step t - 1 counts exactly those (its new scores) when it collects, and they are kept in
``RefreshPlan.histograms`` for step t only. At step t the select kernels turn them into thresholds
(the repair kernels run for the tensors the window cannot answer: launched whatever the flags say,
so the host never reads them), and the fused kernel sets the new mask bits as it steps. Thresholds
are the reference engine's integers (:mod:`epi_kernels.threshold`) for the same scores
(DESIGN.md, "The refresh protocol"). scope="global" (a param group in one launch group) collects
nothing: its refresh step computes the means, the group's window histogram and threshold from the
stored scores (``ops.select_global``), and the fused kernel applies each tensor's raw-key form of it.

This flow reads no tensor value, so torch.compile traces it without a graph break. Host work per
step: group tensors, build small address and chunk tables (cached; copied to the device from
pinned memory, asynchronously), a few small tensor ops for the scalars.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

from . import ops
from .abi import CONTROL, WINDOW_BINS
from .launch import StepFlags, origins, to_device
from .mask import jaccard_counts
from .step_records import StepHyper, StepTensors
from .step_scalars import step_scalars
from .threshold import isolation_k

__all__ = ["RefreshPlan", "Histograms", "kernel_step"]

_REFRESH, _COLLECT, _SKIP = (CONTROL.index(w) for w in ("refresh", "collect", "skip"))


class Histograms(NamedTuple):
    """A launch group's window histograms of `scores` (the very tensors counted), kept for the next step."""
    scores: list[Tensor]
    hist: Tensor  # int64 [T, WINDOW_BINS]
    over: Tensor  # int64 [T]


@dataclass
class RefreshPlan:
    """What a kernel step needs to refresh the masks itself (threshold="approx"; `scope` "tensor",
    or "global" when the group is one launch group).

    `states`: the optimizer states of the stepped params. `refresh` / `collect`: this step may
    recompute the masks / count its new scores for the next step's refresh. `histograms`: per
    launch group, the histograms the previous step collected (owned by the optimizer, one dict per
    param group); replaced by the ones this step collects. `control` (int32 [3] on the device):
    a capturable step's control words, decided on the device; refresh and collect are then True
    (the words decide). No step number: a traced step must read no counter that changes every step
    (torch.compile would recompile for each value)."""
    states: list[dict]
    isolation_ratio: float
    refresh: bool
    collect: bool
    histograms: dict = field(default_factory=dict)
    control: Tensor | None = None
    scope: str = "tensor"


@lru_cache(maxsize=None)
def _agreeing_control(device: torch.device, refresh: bool, collect: bool) -> Tensor:
    """The control words of a host-decided step: they agree with its flags (made once per device)."""
    words = [0] * len(CONTROL)
    words[_REFRESH], words[_COLLECT] = int(refresh), int(collect)
    return to_device(words, torch.int32, device)


@lru_cache(maxsize=256)
def _isolation_ks(device: torch.device, ratio: float, numels: tuple[int, ...]) -> Tensor:
    """k of each tensor, int64 on `device` (made once per ratio and sizes; never written)."""
    return to_device([isolation_k(ratio, n) for n in numels], torch.int64, device)


def _constant(table, *key) -> Tensor:
    # traced (torch.compile), the constant is built in the graph instead: the cache is host state
    return table.__wrapped__(*key) if torch.compiler.is_compiling() else table(*key)


def _stack(states: list[dict], idx: list[int], key: str) -> Tensor:
    return torch.stack([states[i][key] for i in idx])


def _launch_groups(params: list[Tensor], scores: list[Tensor]) -> dict[tuple, list[int]]:
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(params):
        groups.setdefault((p.device, p.dtype, scores[i].dtype), []).append(i)
    return groups


def _store_refresh(states: list[dict], idx: list[int], refreshed: Tensor, counts: Tensor, tau: Tensor, k: Tensor,
                   repaired: Tensor, old_count: Tensor, anchor: Tensor) -> None:
    """Write a refresh's per-tensor state entries where `refreshed` (0-dim bool on the device) is set."""
    count = counts[:, 0]
    new = {"isolation_overlap": jaccard_counts(counts[:, 1], old_count, count), "threshold_bits": tau,
           "isolation_k": k, "isolated_count": count, "threshold_exact": repaired}
    old = {"threshold_bits": anchor, "isolated_count": old_count}  # stacked already
    for key, value in new.items():
        target = [states[i][key] for i in idx]
        kept = old[key] if key in old else torch.stack(target)
        torch._foreach_copy_(target, list(torch.where(refreshed, value.to(kept.dtype), kept).unbind(0)))


def kernel_step(kernels: str, tensors: StepTensors, hyper: StepHyper, plan: RefreshPlan | None = None) -> None:
    """The EPI-AdamW step with the kernel set `kernels` ("triton" or "cuda"); with a `plan`, also
    the refresh of the masks and the histograms for the next step's refresh."""
    on_device = plan is not None and plan.control is not None
    refresh = plan is not None and plan.refresh
    pooled = plan is not None and plan.scope == "global"  # one selection over the group: nothing to collect
    collect = plan is not None and plan.collect and not pooled
    launch_groups = _launch_groups(tensors.params, tensors.scores)
    if pooled and refresh and len(launch_groups) > 1:  # (checked before anything is written)
        raise ValueError("kernel_step: scope='global' selects within one launch group (one device, param and "
                         "score dtype); the reference engine refreshes other groups")
    state_steps = tensors.state_steps
    if on_device:  # a skipped step (GradScaler found inf/NaN) does not count
        live = (1 - plan.control[_SKIP]).to(state_steps[0].dtype)
        # a list of the one tensor, not the tensor itself: torch 2.11's _foreach_add_(tensors, tensor)
        # cannot be captured in a CUDA graph (it invalidates the capture; seen on an H200)
        torch._foreach_add_(state_steps, [live] * len(state_steps))
    else:
        torch._foreach_add_(state_steps, 1)
    previous = {}
    if plan is not None:  # histograms are only ever used by the very next step
        previous = dict(plan.histograms)
        plan.histograms.clear()
    flags = StepFlags.of(hyper, refresh=refresh, collect=collect).bits()
    for (device, _, _), idx in launch_groups.items():
        control = plan.control if on_device else _constant(_agreeing_control, device, refresh, collect)
        part = tensors.take(idx)
        scalars = step_scalars(part.state_steps, device, lr=hyper.lr, beta1=hyper.beta1, beta2=hyper.beta2,
                               weight_decay=hyper.weight_decay, eps=hyper.eps, importance_beta=hyper.importance_beta)
        scores = part.scores
        tau = above = cut = counts = origin = held = None
        if refresh or collect:
            anchor = _stack(plan.states, idx, "threshold_bits")
            held = previous.get(tuple(idx))
            if held is not None and not all(a is b for a, b in zip(held.scores, scores)):
                held = None  # counted for other tensors (the group's params changed)
        if refresh:
            if pooled:  # group_tau on the normalised keys; tau and above: each tensor's raw keys
                k = _constant(_isolation_ks, device, plan.isolation_ratio, (sum(s.numel() for s in scores),))
                group_tau, repaired, tau, above, cut = ops.select_global(scores, anchor[:1], k, control[_REFRESH],
                                                                         kernels)
            else:
                if held is None:  # the previous step did not collect (first step, requested refresh, ...)
                    held = Histograms(scores, *ops.window_histogram(scores, origins(anchor), kernels))
                k = _constant(_isolation_ks, device, plan.isolation_ratio, tuple(s.numel() for s in scores))
                tau, repaired, cut = ops.select_thresholds(scores, held.hist, held.over, origins(anchor), k,
                                                           control[_REFRESH], kernels)
            old_count = _stack(plan.states, idx, "isolated_count")
            counts = torch.zeros(len(idx), 2, dtype=torch.int64, device=device)
        if collect:
            refreshed = control[_REFRESH] != 0
            origin = origins(torch.where(refreshed, tau, anchor) if refresh else anchor)
            if held is None:
                held = Histograms(scores, torch.zeros(len(idx), WINDOW_BINS, dtype=torch.int64, device=device),
                                  torch.zeros(len(idx), dtype=torch.int64, device=device))
            else:  # reuse the buffers (after the select above has read them, in stream order)
                held.hist.masked_fill_(control[_COLLECT] != 0, 0)
                held.over.masked_fill_(control[_COLLECT] != 0, 0)
            plan.histograms[tuple(idx)] = held
        ops.fused_step_(part.params, part.grads, part.exp_avgs, part.exp_avg_sqs, part.max_exp_avg_sqs,
                        [] if hyper.v_scores else scores, part.masks, scalars, control, tau, cut, origin,
                        held.hist if collect else None, held.over if collect else None, counts, kernels, flags, above)
        if refresh:
            if pooled:  # every tensor keeps the group's threshold (on normalised keys), k and repair flag
                tau, k, repaired = (t.expand(len(idx)) for t in (group_tau, k, repaired))
            _store_refresh(plan.states, idx, control[_REFRESH] != 0, counts, tau, k, repaired, old_count, anchor)
