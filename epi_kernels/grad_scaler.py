"""GradScaler support (DESIGN.md, "GradScaler"): EPIAdamW sets ``_step_supports_amp_scaling``, so
``torch.amp.GradScaler.step`` hands it the scale and the overflow flag (as the ``grad_scale`` and
``found_inf`` attributes of the optimizer, as for torch's fused Adam) instead of unscaling the
gradients and checking them itself. The gradients are then divided by the scale in fp32, as torch's
fused Adam kernels do (``grad / scale``, not GradScaler.unscale_'s ``grad * fp32(1/scale)``)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["unscale_or_skip"]


def _by_device_and_dtype(tensors: list[Tensor]) -> dict[tuple[torch.device, torch.dtype], list[Tensor]]:
    out: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out


def unscale_or_skip(found_inf: Tensor | None, grad_scale: Tensor | None, params: list[Tensor],
                    on_device: bool = False) -> bool | Tensor | None:
    """With a GradScaler (`found_inf`, `grad_scale` not None): True if this step must be skipped
    (inf/NaN gradients), else unscale the gradients of `params` in place: each divided by the fp32
    scale (one correctly rounded fp32 quotient, rounded once to a bf16/fp16 gradient's dtype), as
    torch's fused AdamW does. `on_device`: return the skip flag as a 0-dim int32 tensor instead of
    reading it (None without a GradScaler); the step's kernels then skip themselves."""
    skip = None
    if found_inf is not None:
        if on_device:
            skip = (found_inf.sum() > 0).to(torch.int32)
        elif bool(found_inf.sum() > 0):  # a host sync, as GradScaler's own path
            return True
    if grad_scale is not None and params:
        scale = torch.as_tensor(grad_scale).to(torch.float32).reshape(())  # GradScaler's: fp32, one element
        for (device, dtype), grads in _by_device_and_dtype([p.grad for p in params]).items():
            # the scale as a tensor on the gradients' device: a true division there (CUDA turns a
            # division by a CPU scalar into a multiplication by its reciprocal)
            on = scale.to(device)
            if dtype in (torch.bfloat16, torch.float16):
                # in fp32, rounded once (a bf16/fp16 division could read the scale in the gradient's
                # dtype on CUDA: 65536, GradScaler's default, is inf in fp16)
                for g in grads:
                    g.copy_(g.float().div_(on))
            else:
                torch._foreach_div_(grads, on.to(dtype))  # fp32 (fp64 holds the fp32 scale exactly)
    return skip if on_device else False
