"""Per-parameter optimizer state: its keys, lazy creation, and loading EPI entries without dtype casts.

torch's ``Optimizer.load_state_dict`` casts every state tensor except ``step`` to the parameter's
dtype: fp32 scores of bf16 parameters would silently become bf16 and the int32 thresholds would
lose bits. EPIAdamW therefore wraps its entries in :class:`_Verbatim` (which torch's loader passes
through untouched) in a load pre-hook that runs after the user's pre-hooks, and unwraps them in a
post-hook that runs before the user's post-hooks.
"""
from __future__ import annotations

from itertools import chain
from typing import Any, Callable

import torch
from torch import Tensor

from .mask import packed_numel
from .sharding import local
from .threshold import KEY_NONE

__all__ = ["EPI_STATE_KEYS", "IMPORTANCE_DTYPES", "SCALAR_ENTRIES", "init_epi_state", "init_state", "step_dtype",
           "tensor_step", "protect_epi_entries", "restore_epi_entries"]

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


class _Verbatim:
    """Opaque holder: torch's state loader copies objects that are not tensors or containers as-is."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value


def _check_entries(entries: dict, p: Tensor, pid: object, importance: str, flat: bool) -> None:
    """ValueError if the saved EPI entries of parameter `pid` do not fit parameter `p` and its
    group's `importance` mode (raised before anything loads: a wrong shape or dtype would otherwise
    fail, or compute garbage, mid-step). `flat`: `p` is a flat partition (its per-tensor entries are
    vectors; their length is checked against the layout at the first step)."""
    where = f"loaded state dict, parameter {pid}"
    own_scores = importance != "exp_avg_sq"
    if own_scores != ("importance" in entries) and "isolation_mask" in entries:
        raise ValueError(f"{where}: its group has importance={importance!r} but the state was saved "
                         f"{'without' if own_scores else 'with'} scores of its own (importance="
                         f"{'exp_avg_sq' if own_scores else 'sq or abs'}): the score source cannot change on load")
    keys = EPI_STATE_KEYS if own_scores else EPI_STATE_KEYS[1:]
    missing = [k for k in keys if k not in entries]
    if missing:
        raise ValueError(f"{where}: incomplete EPI state, missing {missing}")
    bad = [k for k in keys if not torch.is_tensor(entries[k])]
    if bad:
        raise ValueError(f"{where}: non-tensor EPI entries {bad}")
    imp, mask = entries.get("importance"), entries["isolation_mask"]
    if imp is not None and (imp.shape != p.shape or imp.dtype not in IMPORTANCE_DTYPES):
        raise ValueError(f"{where}: 'importance' must be float32 or bfloat16 of shape {tuple(p.shape)} "
                         f"(the parameter's), found {imp.dtype} {tuple(imp.shape)}")
    if mask.dtype != torch.uint8 or mask.numel() != packed_numel(p.numel()):
        raise ValueError(f"{where}: 'isolation_mask' must be uint8[{packed_numel(p.numel())}] for a parameter "
                         f"of {p.numel()} elements, found {mask.dtype} {tuple(mask.shape)}")
    shape = torch.Size([])
    if flat:  # vectors of one common length (threshold_bits' if it is a vector; none fits otherwise)
        shape = entries["threshold_bits"].shape if entries["threshold_bits"].dim() == 1 else None
    for key, (_, dtypes) in SCALAR_ENTRIES.items():
        value = entries[key]
        if value.shape != shape or value.dtype not in dtypes:
            what = "a vector (one per model parameter of the flat partition)" if flat else "a 0-dim"
            raise ValueError(f"{where}: '{key}' must be {what} {dtypes[0]} tensor, "
                             f"found {value.dtype} of shape {tuple(value.shape)}")


def protect_epi_entries(state_dict: dict[str, Any], groups: list[dict], is_given: Callable[[Tensor], bool]
                        ) -> dict[str, Any] | None:
    """Load pre-hook (of an optimizer whose param groups are `groups`): validate EPI entries and
    wrap them so they escape torch's dtype cast. `is_given(p)`: whether `p` is a parameter the
    optimizer was given (else a flat partition a wrapper put in its place)."""
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        return None  # torch's loader raises its own error
    by_id = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                     chain.from_iterable(g["params"] for g in groups)))
    mode = {pid: g["importance"] for g in saved_groups for pid in g["params"]}
    state = {}
    for pid, entries in state_dict["state"].items():
        p = by_id.get(pid)
        if p is not None and any(k in entries for k in EPI_STATE_KEYS):
            _check_entries(entries, p, pid, mode[pid], not is_given(p))
            entries = {k: _Verbatim(v) if k in EPI_STATE_KEYS else v for k, v in entries.items()}
        state[pid] = entries
    return {**state_dict, "state": state}


def restore_epi_entries(optimizer: torch.optim.Optimizer) -> None:
    """Load post-hook: unwrap EPI entries, on the parameter's device, in their saved dtype."""
    for p, entries in optimizer.state.items():
        for k, v in entries.items():
            if isinstance(v, _Verbatim):
                entries[k] = v.value.to(device=p.device)
