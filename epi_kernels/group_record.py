"""What the optimizer keeps per param group beside the group itself (the group's dict is the user's
and is saved; this record is neither): one :class:`GroupRecord` per group, in group order."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from .schedule import RefreshSchedule

__all__ = ["GroupRecord"]


@dataclass(eq=False)
class GroupRecord:
    """The runtime record of param group `group`.

    `validated`: the group's setting objects as last validated (settings.settings_of), None to
    validate at the next step. `given`: the parameters the group was given (a wrapper may put
    others in their place: layouts.Layouts). `histograms`: what the group's last step collected
    for its next step's refresh (the kernel backends' window histograms, by launch group), and
    which kind of step collected them (:meth:`kept_histograms`). `isolated`: the flat indices of
    each tensor's isolated elements (the eager backend's cache), dropped whenever a mask may have
    changed (:meth:`forget_masks`)."""
    group: dict
    validated: tuple | None = None
    given: list[Tensor] = field(default_factory=list)
    schedule: RefreshSchedule = field(default_factory=RefreshSchedule)
    histograms: dict = field(default_factory=dict)
    histograms_kind: str | None = None
    isolated: dict[Tensor, Tensor] = field(default_factory=dict)
    layout_checked: tuple[list, int] | None = None  # the params list (and its length) last checked
    pooled_refresh: object = None  # the engine step (schedule.engine_step) whose refresh selected over all sub-groups

    def __post_init__(self) -> None:
        if not self.given:
            self.given = list(self.group["params"])
        self.given_ids = {id(p) for p in self.given}

    def kept_histograms(self, kind: str | None) -> dict:
        """The histograms for this step of the group, to read and then refill (step_driver.RefreshPlan):
        those its previous step collected if that was a kernel step of the same `kind` ("host" or
        "device"-decided), else none. `kind` None: this step collects none. Every step of the group
        calls this once, so histograms live exactly one step: whatever happened since they were
        counted (another backend's step, a settings change, an eager refresh, a device-decided
        step) cannot leave stale ones behind (C5)."""
        if kind is None or kind != self.histograms_kind:
            self.histograms = {}
        self.histograms_kind = kind
        return self.histograms

    def forget_masks(self, params=None) -> None:
        """Drop the cached isolated indices (of `params`, default all): their masks changed."""
        if params is None:
            self.isolated.clear()
        for p in params or ():
            self.isolated.pop(p, None)
