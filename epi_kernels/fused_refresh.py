"""The request a kernel backend gets to refresh isolation masks inside its fused step."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["FusedRefresh"]


@dataclass
class FusedRefresh:
    """What the fused step needs to refresh masks itself (scope="tensor", threshold="approx").

    `states` are the optimizer states of the stepped params; `refresh`: this step recomputes the
    masks; `collect`: the next step will, so this one counts its new scores into histograms, kept
    in `pending` (owned by the optimizer, one dict per param group) until then. No step number:
    the optimizer records refresh steps itself, and a traced step must read no counter that changes
    every step (torch.compile would recompile for each value).

    Capturable steps pass `control` (int32 [3] on the device: refresh, collect, skip; see
    launch.CONTROL) instead of deciding on the host; `pending` then holds per launch group the
    histogram buffers reused every step, and k."""
    states: list[dict]
    isolation_ratio: float
    refresh: bool
    collect: bool
    pending: dict = field(default_factory=dict)
    control: Tensor | None = None
