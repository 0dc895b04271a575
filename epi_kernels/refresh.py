"""Mask refresh: when it happens, and the reference computation of new isolation masks.

At a refresh step t the new mask of each tensor is ``key(S) >= tau`` where S are the scores at the
*start* of step t (before this step's EMA update) and tau comes from :mod:`epi_kernels.threshold`.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .mask import jaccard, pack_mask, unpack_mask
from .threshold import KEY_NONE, approx_threshold, exact_threshold, isolation_k, score_keys

__all__ = ["is_refresh_step", "refresh_masks"]


def is_refresh_step(step: int, refresh_interval: int, warmup_steps: int | None, static: bool) -> bool:
    """refresh(t): t >= warmup and (t - warmup) % interval == 0; static: only the first one.

    `step` counts optimizer steps from 1; warmup_steps=None means warmup = refresh_interval.
    """
    warmup = refresh_interval if warmup_steps is None else warmup_steps
    since = step - warmup
    if since < 0 or since % refresh_interval:
        return False
    return not static or since == 0


def _global_keys(scores: Tensor) -> Tensor:
    """Keys of scores divided by their tensor's mean finite score (scope="global").

    The mean is accumulated in float64; non-finite scores count as 0 and stay ineligible.
    """
    s = scores.detach().to(torch.float32)
    if s.numel() == 0:
        return score_keys(s)
    mean = torch.where(s.isfinite(), s, 0.0).sum(dtype=torch.float64) / s.numel()
    return score_keys(s / mean.to(torch.float32))


def _threshold(keys: Sequence[Tensor], k: int, anchor: int, mode: str) -> tuple[int, bool]:
    if mode == "exact":
        return exact_threshold(keys, k), True
    return approx_threshold(keys, k, anchor)


def _store(state: dict, mask: Tensor, tau: int, k: int, exact: bool, step: int) -> None:
    previous = unpack_mask(state["isolation_mask"], mask.numel())
    state["isolation_overlap"].copy_(jaccard(previous, mask))
    state["isolation_mask"].copy_(pack_mask(mask))
    state["threshold_bits"].fill_(tau)
    state["isolation_k"].fill_(k)
    state["isolated_count"].copy_(mask.sum())
    state["threshold_exact"].fill_(exact)
    state["refresh_step"].fill_(step)


def refresh_masks(states: Sequence[dict], *, isolation_ratio: float, scope: str, threshold: str,
                  step: int) -> list[Tensor]:
    """Recompute the isolation masks of one param group's stepped tensors from their scores.

    Writes each state's packed mask, threshold and refresh statistics; returns the new masks as
    flat bool tensors (logical order). scope="tensor": one top-k per tensor; scope="global": one
    top-k over all tensors' mean-normalised scores, sharing one threshold.
    """
    masks = []
    if scope == "tensor":
        for state in states:
            keys = score_keys(state["importance"])
            k = isolation_k(isolation_ratio, keys.numel())
            tau, exact = _threshold([keys], k, int(state["threshold_bits"]), threshold)
            masks.append(keys >= tau)
            _store(state, masks[-1], tau, k, exact, step)
        return masks
    keys = [_global_keys(state["importance"]) for state in states]
    k = isolation_k(isolation_ratio, sum(key.numel() for key in keys))
    anchor = int(states[0]["threshold_bits"]) if states else KEY_NONE
    tau, exact = _threshold(keys, k, anchor, threshold)
    for state, key in zip(states, keys):
        masks.append(key >= tau)
        _store(state, masks[-1], tau, k, exact, step)
    return masks
