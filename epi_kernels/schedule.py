"""When a param group's masks refresh (DESIGN.md, "The schedule"): one :class:`RefreshSchedule`
per group decides it, on the host (from the group's step counter) or on the device (capturable
steps: from a device counter, as control words the kernels read), counts the engine steps of
partitioned groups (DeepSpeed ZeRO 3 steps a group's sub-groups in several calls) and takes
requests for an extra refresh (:meth:`RefreshSchedule.request`).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RefreshSchedule", "is_refresh_step", "refresh_due"]


def is_refresh_step(step: int, refresh_interval: int, warmup_steps: int | None, static: bool) -> bool:
    """refresh(t): t >= warmup and (t - warmup) % interval == 0; static: only the first such t.

    `step` counts optimizer steps from 1; warmup_steps=None means warmup = refresh_interval.
    """
    warmup = refresh_interval if warmup_steps is None else warmup_steps
    since = step - warmup
    if since < 0 or since % refresh_interval:
        return False
    return not static or since == _first_since(refresh_interval, warmup)


def _first_since(refresh_interval: int, warmup: int) -> int:
    """t - warmup at the first refresh: 0, or one interval when warmup is 0 (steps count from 1)."""
    return 0 if warmup >= 1 else refresh_interval


def refresh_due(step: Tensor, refresh_interval: int, warmup_steps: int | None, static: bool) -> Tensor:
    """is_refresh_step on a device step counter (a bool tensor, no host read): capturable steps."""
    warmup = refresh_interval if warmup_steps is None else warmup_steps
    since = step - warmup
    due = (since >= 0) & (since % refresh_interval == 0)
    return due & (since == _first_since(refresh_interval, warmup)) if static else due


def _when(group: dict) -> tuple:
    return group["refresh_interval"], group["warmup_steps"], group["static"]


def _mark(states: list[dict], t: int) -> None:
    for st in states:
        st["refresh_step"].fill_(t)


class RefreshSchedule:
    """The refresh decisions of one param group. The step counter (`epi_step`) and a pending
    request (`refresh_requested`) live in the group itself, so they are saved with it; this object
    holds what does not outlive the process: the device-side requests of capturable steps and the
    engine step in progress of a partitioned group."""

    def __init__(self) -> None:
        self.requests: Tensor | None = None  # capturable steps: int32 [2] on the device (see device_step)
        self.engine_step: tuple[set, bool, bool] | None = None  # partitions stepped, refresh, collect

    def request(self, group: dict) -> None:
        """Make the next step a refresh step, whatever the schedule says (host-decided steps); a
        capturable step's next step collects and the one after refreshes."""
        group["refresh_requested"] = True
        if self.requests is not None:  # capturable steps (also replays of a captured one)
            self.requests[0].fill_(1)

    @staticmethod
    @torch.compiler.disable  # changes every step: traced, it would recompile the step for each value
    def _advance(group: dict, states: list[dict]) -> tuple[bool, bool]:
        group["epi_step"] += 1
        t = group["epi_step"]
        refresh = is_refresh_step(t, *_when(group)) or bool(group.pop("refresh_requested", False))
        if refresh:
            _mark(states, t)
        return refresh, is_refresh_step(t + 1, *_when(group))

    def host_step(self, group: dict, states: list[dict], partitions: list[Tensor] | None = None) -> tuple[bool, bool]:
        """Count the step; (whether it refreshes the masks, whether the next one will); records
        the refresh step in the states. `partitions`: the group holds flat partitions (DeepSpeed
        ZeRO), stepped now. ZeRO 3 steps the sub-groups of a group with one step() call each, so a
        call that steps none of the partitions the step in progress stepped belongs to it (same
        step count, same decision); one that repeats one starts the next."""
        if partitions is None:
            return self._advance(group, states)
        ids = {id(f) for f in partitions}
        current = self.engine_step
        if current is not None and not ids & current[0]:
            current[0].update(ids)
            if current[1]:
                _mark(states, group["epi_step"])
            return current[1], current[2]
        refresh, collect = self._advance(group, states)
        self.engine_step = (ids, refresh, collect)
        return refresh, collect

    def device_step(self, group: dict, states: list[dict], skip: Tensor | None) -> Tensor:
        """The control words (refresh, collect, skip) of a capturable step, computed on the device
        from the group's device step counter; records refresh steps. A requested refresh (stage
        boundary) needs the histograms the step before it collects: the next step collects, the one
        after refreshes."""
        device = states[0]["isolation_mask"].device
        t = group["epi_step"]
        if not torch.is_tensor(t) or t.device != device:
            t = group["epi_step"] = torch.as_tensor(t, dtype=torch.int64).to(device)
        if self.requests is None:
            self.requests = torch.zeros(2, dtype=torch.int32, device=device)
        requests = self.requests
        if group.pop("refresh_requested", False):
            requests[0].fill_(1)
        skip = torch.zeros((), dtype=torch.int32, device=device) if skip is None else skip.to(device)
        live = skip == 0
        t.add_(live.to(t.dtype))
        refresh = (refresh_due(t, *_when(group)) | (requests[1] != 0)) & live
        collect = (refresh_due(t + 1, *_when(group)) | (requests[0] != 0)) & live
        requests.copy_(torch.where(live, torch.stack([torch.zeros_like(requests[0]), requests[0]]), requests))
        marks = [st["refresh_step"] for st in states]
        torch._foreach_copy_(marks, list(torch.where(refresh, t, torch.stack(marks)).unbind(0)))
        return torch.stack([refresh, collect, ~live]).to(torch.int32)
