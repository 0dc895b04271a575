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
    others in their place: layouts.Layouts). `histograms`: the kernel backends' histograms kept
    for the next step, host-decided (`host`) and device-decided (`device`) steps apart: a step of
    one kind drops the other's (they would be stale). `isolated`: the flat indices of each
    tensor's isolated elements (the eager backend's cache), dropped when a mask changes."""
    group: dict
    validated: tuple | None = None
    given: list[Tensor] = field(default_factory=list)
    schedule: RefreshSchedule = field(default_factory=RefreshSchedule)
    histograms: dict[str, dict] = field(default_factory=lambda: {"host": {}, "device": {}})
    isolated: dict[Tensor, Tensor] = field(default_factory=dict)
    layout_checked: tuple[list, int] | None = None  # the params list (and its length) last checked

    def __post_init__(self) -> None:
        if not self.given:
            self.given = list(self.group["params"])
        self.given_ids = {id(p) for p in self.given}

    def forget_masks(self, params=None) -> None:
        """Drop the cached isolated indices (of `params`, default all): their masks changed."""
        if params is None:
            self.isolated.clear()
        for p in params or ():
            self.isolated.pop(p, None)
