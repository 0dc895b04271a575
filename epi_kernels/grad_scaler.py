"""GradScaler support (DESIGN.md, "GradScaler"): EPIAdamW sets ``_step_supports_amp_scaling``, so
``torch.amp.GradScaler.step`` hands it the scale and the overflow flag (as the ``grad_scale`` and
``found_inf`` attributes of the optimizer, as for torch's fused Adam) instead of unscaling the
gradients and checking them itself."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unscale_or_skip"]


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


def unscale_or_skip(found_inf: Tensor | None, grad_scale: Tensor | None, params: list[Tensor],
                    on_device: bool = False) -> bool | Tensor | None:
    """With a GradScaler (`found_inf`, `grad_scale` not None): True if this step must be skipped
    (inf/NaN gradients), else unscale the gradients of `params` in place by the scaler's scale,
    exactly as GradScaler.unscale_ would. `on_device`: return the skip flag as a 0-dim int32 tensor
    instead of reading it (None without a GradScaler); the step's kernels then skip themselves."""
    skip = None
    if found_inf is not None:
        if on_device:
            skip = (found_inf.sum() > 0).to(torch.int32)
        elif bool(found_inf.sum() > 0):  # a host sync, as GradScaler's own path
            return True
    if grad_scale is not None and params:
        inv = torch.as_tensor(grad_scale).double().reciprocal().float()
        for device, grads in _by_device([p.grad for p in params]).items():
            torch._foreach_mul_(grads, inv.to(device))
    return skip if on_device else False
