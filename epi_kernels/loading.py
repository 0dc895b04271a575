"""What a loaded state dict must hold (DESIGN.md, "Checkpoints"): every entry of every parameter's
state is checked against the parameter and its loaded group before anything loads, so a load
either succeeds whole and the next step runs, or raises and leaves the optimizer as it was.

torch's ``Optimizer.load_state_dict`` also casts every state tensor except ``step`` to the
parameter's dtype: fp32 scores of bf16 parameters would silently become bf16 and the int32
thresholds would lose bits. The EPI entries therefore travel through torch's loader wrapped in
:class:`_Verbatim` (which it passes through untouched), by a load pre-hook that runs after the
user's pre-hooks, and are unwrapped by a post-hook that runs before the user's post-hooks.
"""
from __future__ import annotations

import math
from itertools import chain
from numbers import Real
from typing import Any, Callable

import torch
from torch import Tensor

from .mask import packed_numel
from .sharding import local
from .state import EPI_STATE_KEYS, IMPORTANCE_DTYPES, SCALAR_ENTRIES

__all__ = ["protect_epi_entries", "restore_epi_entries"]

MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
NON_NEGATIVE = ("exp_avg_sq", "max_exp_avg_sq", "importance", "isolation_k", "isolated_count", "refresh_step")


class _Verbatim:
    """Opaque holder: torch's state loader copies objects that are not tensors or containers as-is."""

    __slots__ = ("value",)

    def __init__(self, value: Tensor) -> None:
        self.value = value


def _dense(value: Tensor, key: str) -> str | None:
    if value.layout != torch.strided:
        return f"'{key}' must be a dense (strided) tensor, found layout {value.layout}"
    if value.device.type == "meta":
        return f"'{key}' is on the meta device (it holds no values)"
    return None


def _step_error(step: object) -> str | None:
    """Why a saved `step` is not a count of steps taken (a number, or a 0-dim real tensor, >= 0 and finite)."""
    if isinstance(step, Tensor):
        if _dense(step, "step") or step.dim() or step.is_complex() or step.dtype == torch.bool:
            return f"'step' must be a 0-dim real tensor or a number, found {step.dtype} of shape {tuple(step.shape)}"
        step = step.item()
    if isinstance(step, bool) or not isinstance(step, Real) or not (math.isfinite(step) and step >= 0):
        return f"'step' must be a finite number >= 0, found {step!r}"
    return None


def _adamw_error(entries: dict, p: Tensor) -> str | None:
    """Why AdamW's entries of a saved state do not fit parameter `p`. A state holds all or none of
    them: without `step` the moments could not be used (torch's AdamW raises too)."""
    present = [k for k in ("step", *MOMENTS) if k in entries]
    if not present:
        return None
    missing = [k for k in ("step", "exp_avg", "exp_avg_sq") if k not in entries]
    if missing:
        return f"AdamW's state is incomplete: it has {present} but not {missing}"
    why = _step_error(entries["step"])
    if why:
        return why
    for key in MOMENTS:
        if key not in entries:  # (max_exp_avg_sq: made at the first step with amsgrad, if missing)
            continue
        value = entries[key]
        if not isinstance(value, Tensor):
            return f"'{key}' must be a tensor, found {type(value).__name__}"
        why = _dense(value, key)
        if why:
            return why
        if not value.is_floating_point() or value.shape != p.shape:
            return (f"'{key}' must be a real floating-point tensor of shape {tuple(p.shape)} (the parameter's), "
                    f"found {value.dtype} {tuple(value.shape)}")
    return None


def _epi_error(entries: dict, p: Tensor, importance: str, flat: bool) -> str | None:
    """Why the saved EPI entries do not fit parameter `p` (its local shard under FSDP2) and its
    group's `importance` mode. `flat`: `p` is a flat partition (its per-tensor entries are vectors;
    their length is checked against the layout at the first step)."""
    own_scores = importance != "exp_avg_sq"
    if not any(k in entries for k in EPI_STATE_KEYS):
        return None
    if own_scores != ("importance" in entries) and "isolation_mask" in entries:
        return (f"its group has importance={importance!r} but the state was saved "
                f"{'without' if own_scores else 'with'} scores of its own (importance="
                f"{'exp_avg_sq' if own_scores else 'sq or abs'}): the score source cannot change on load")
    keys = EPI_STATE_KEYS if own_scores else EPI_STATE_KEYS[1:]
    missing = [k for k in keys if k not in entries]
    if missing:
        return f"incomplete EPI state, missing {missing}"
    bad = [k for k in keys if not isinstance(entries[k], Tensor)]
    if bad:
        return f"non-tensor EPI entries {bad}"
    for key in keys:
        why = _dense(entries[key], key)
        if why:
            return why
    shard = local(p)
    imp, mask = entries.get("importance"), entries["isolation_mask"]
    if imp is not None and (imp.shape != shard.shape or imp.dtype not in IMPORTANCE_DTYPES):
        return (f"'importance' must be float32 or bfloat16 of shape {tuple(shard.shape)} (the parameter's), "
                f"found {imp.dtype} {tuple(imp.shape)}")
    if mask.dtype != torch.uint8 or tuple(mask.shape) != (packed_numel(shard.numel()),):
        return (f"'isolation_mask' must be uint8[{packed_numel(shard.numel())}] for a parameter "
                f"of {shard.numel()} elements, found {mask.dtype} {tuple(mask.shape)}")
    shape = torch.Size([])
    if flat:  # vectors of one common length (threshold_bits' if it is a vector; none fits otherwise)
        shape = entries["threshold_bits"].shape if entries["threshold_bits"].dim() == 1 else None
    for key, (_, dtypes) in SCALAR_ENTRIES.items():
        value = entries[key]
        if value.shape != shape or value.dtype not in dtypes:
            what = "a vector (one per model parameter of the flat partition)" if flat else "a 0-dim"
            return f"'{key}' must be {what} {dtypes[0]} tensor, found {value.dtype} of shape {tuple(value.shape)}"
    return None


def _range_error(entries: dict) -> str | None:
    """Why a value is out of its range: counts, steps and second moments are never negative (NaN,
    the mark of a run that diverged, is kept as it was saved)."""
    for key in NON_NEGATIVE:
        value = entries.get(key)
        if isinstance(value, Tensor) and value.numel() and bool((value < 0).any()):
            return f"'{key}' holds negative values"
    return None


def protect_epi_entries(state_dict: dict[str, Any], groups: list[dict], is_given: Callable[[Tensor], bool]
                        ) -> dict[str, Any] | None:
    """Load pre-hook (of an optimizer whose param groups are `groups`), run after the loaded groups'
    settings were checked: ValueError naming the parameter and the entry if any parameter's saved
    state does not fit it and its loaded group; else the state dict with the EPI entries wrapped
    so they escape torch's dtype cast. `is_given(p)`: whether `p` is a parameter the optimizer was
    given (else a flat partition a wrapper put in its place)."""
    saved_groups = state_dict["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in groups]:
        return None  # torch's loader raises its own error, before it changes anything
    by_id = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                     chain.from_iterable(g["params"] for g in groups)))
    saved_group = {pid: g for g in saved_groups for pid in g["params"]}
    state = {}
    for pid, entries in state_dict["state"].items():
        p = by_id.get(pid)
        if p is not None:
            if not isinstance(entries, dict):
                raise ValueError(f"loaded state dict, parameter {pid}: its state must be a dict, found "
                                 f"{type(entries).__name__}")
            group = saved_group[pid]
            why = (_adamw_error(entries, p) or _epi_error(entries, p, group["importance"], not is_given(p))
                   or _range_error(entries))
            if why:
                raise ValueError(f"loaded state dict, parameter {pid}: {why}")
            entries = {k: _Verbatim(v) if k in EPI_STATE_KEYS else v for k, v in entries.items()}
        state[pid] = entries
    return {**state_dict, "state": state}


def restore_epi_entries(optimizer: torch.optim.Optimizer) -> None:
    """Load post-hook: unwrap EPI entries, on the parameter's device, in their saved dtype."""
    for p, entries in optimizer.state.items():
        for k, v in entries.items():
            if isinstance(v, _Verbatim):
                entries[k] = v.value.to(device=p.device)
