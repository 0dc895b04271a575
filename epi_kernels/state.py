"""Per-parameter optimizer state: its keys and lazy creation (what a loaded state must hold:
:mod:`epi_kernels.loading`)."""
from __future__ import annotations

import torch
from torch import Tensor

from .mask import packed_numel
from .sharding import local
from .threshold import KEY_NONE

__all__ = ["EPI_STATE_KEYS", "IMPORTANCE_DTYPES", "SCALAR_ENTRIES", "init_epi_state", "init_state", "step_dtype",
           "tensor_step"]

IMPORTANCE_DTYPES = (torch.float32, torch.bfloat16)
# the 0-dim entries: initial value, and the dtypes they load in, the first being the one they are
# created in (a float64 overlap was saved by a version that created it in torch's default dtype)
SCALAR_ENTRIES = {"threshold_bits": (KEY_NONE, (torch.int32,)), "isolation_k": (0, (torch.int64,)),
                  "isolated_count": (0, (torch.int64,)),
                  "isolation_overlap": (float("nan"), (torch.float32, torch.float64)),
                  "threshold_exact": (False, (torch.bool,)), "refresh_step": (0, (torch.int64,))}
EPI_STATE_KEYS = ("importance", "isolation_mask", *SCALAR_ENTRIES)


def init_epi_state(state: dict, p: Tensor, importance_dtype: torch.dtype | None, pieces: int | None = None) -> None:
    """Create the EPI entries of a parameter's state (scores zero, nothing isolated); no scores of
    its own with `importance_dtype` None (importance="exp_avg_sq": AdamW's exp_avg_sq is the score).
    `pieces`: `p` is a flat partition of that many model parameters (partitions.py), whose per-tensor
    entries are vectors with one element per parameter instead of 0-dim tensors."""
    if importance_dtype is not None:
        state["importance"] = torch.zeros(p.shape, dtype=importance_dtype, device=p.device)
    state["isolation_mask"] = torch.zeros(packed_numel(p.numel()), dtype=torch.uint8, device=p.device)
    # 0-dim entries live on the param's device too: kernels update them without a host sync
    for key, (value, dtypes) in SCALAR_ENTRIES.items():
        state[key] = torch.full(() if pieces is None else (pieces,), value, dtype=dtypes[0], device=p.device)


def step_dtype(fused_or_capturable: bool) -> torch.dtype:
    """The dtype of AdamW's `step` tensor: float32 for fused/capturable, else the default float type."""
    if not fused_or_capturable and torch.get_default_dtype() == torch.float64:
        return torch.float64
    return torch.float32


def _step_tensor(value: float, p: Tensor, group: dict) -> Tensor:
    """AdamW's `step` entry of `p` holding `value`: on p's device for fused/capturable steps, else on the CPU."""
    on_device = group["capturable"] or group["fused"]
    return torch.tensor(value, dtype=step_dtype(on_device), device=p.device if on_device else "cpu")


def init_state(state: dict, p: Tensor, group: dict, pieces: int | None = None) -> dict:
    """Complete parameter `p`'s optimizer `state` for a step of `group`: AdamW's entries (as
    torch.optim.AdamW makes them) and the EPI entries (:func:`init_epi_state` of `p`'s local
    shard); `pieces` as there. Returns `state`."""
    if "step" not in state:
        state["step"] = _step_tensor(0.0, p, group)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if group["amsgrad"] and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    if "isolation_mask" not in state:
        init_epi_state(state, local(p), group["importance_dtype"], pieces=pieces)
    return state


def tensor_step(state: dict, p: Tensor, group: dict) -> None:
    """A `step` entry saved as a number (older torch) as the tensor AdamW keeps now."""
    if "step" in state and not torch.is_tensor(state["step"]):
        state["step"] = _step_tensor(float(state["step"]), p, group)
