"""The settings of a param group: every check step(), add_param_group and load_state_dict run
before anything changes, and the normalised values (plain Python numbers) they store back.

Messages name the setting and the group (torch.optim.AdamW's own messages for its arguments), so
a bad value fails before any state, counter or parameter is written (DESIGN.md, "Semantics").
"""
from __future__ import annotations

import operator
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

from .backends import checked_backend_name
from .state import IMPORTANCE_DTYPES

__all__ = ["SETTINGS", "settings_of", "unchanged", "checked_settings", "checked_epi_step", "fill_defaults",
           "check_loaded_groups", "check_score_source", "check_stepped_params"]

_CHOICES = {"importance": ("sq", "abs", "exp_avg_sq"), "scope": ("tensor", "global"), "threshold": ("approx", "exact")}
# Every group value a step reads. A scheduler or the user may set any of them between steps, so
# step() re-validates a group whenever one of them is no longer the very object last validated.
SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
             "differentiable", "fused", "isolation_ratio", "refresh_interval", "warmup_steps",
             "importance_beta", "importance", "scope", "threshold", "static", "importance_dtype", "backend")
settings_of = operator.itemgetter(*SETTINGS)
# keys a group saved by an older torch (or by torch.optim.AdamW) may lack, and what they load as
LEGACY_DEFAULTS = (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
                    ("differentiable", False), ("fused", None), ("epi_step", 0))


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)  # numpy ints too; True is no count


def _is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)  # numpy floats too; range checks judge NaN/inf


def _fraction(g: dict, name: str) -> float:
    x = g[name]
    if not (_is_real(x) and 0.0 <= x < 1.0):
        raise ValueError(f"Invalid {name}: {x!r} (must be a number in [0, 1))")
    return float(x)


def _flag(g: dict, name: str) -> bool:
    x = g[name]
    if not (isinstance(x, Integral) and x in (0, 1)):
        raise ValueError(f"Invalid {name}: {x!r} (must be a bool)")
    return bool(x)


def _choice(g: dict, name: str) -> str:
    choices = _CHOICES[name]
    if g[name] not in choices:
        raise ValueError(f"Invalid {name}: {g[name]!r} (expected one of {', '.join(choices)})")
    return choices[choices.index(g[name])]  # the plain str (a numpy str would not load weights_only)


def _epi_settings(g: dict) -> dict:
    """The EPI settings of a group, validated, as plain Python values."""
    if not (_is_int(g["refresh_interval"]) and g["refresh_interval"] >= 1):
        raise ValueError(f"Invalid refresh_interval: {g['refresh_interval']!r} (must be an int >= 1)")
    warmup = g["warmup_steps"]
    if warmup is not None and not (_is_int(warmup) and warmup >= 0):
        raise ValueError(f"Invalid warmup_steps: {warmup!r} (must be None or an int >= 0)")
    out = dict(isolation_ratio=_fraction(g, "isolation_ratio"), refresh_interval=int(g["refresh_interval"]),
               warmup_steps=None if warmup is None else int(warmup))
    out.update((name, _choice(g, name)) for name in _CHOICES)
    out["static"] = _flag(g, "static")
    out.update(_score_settings(g, out["importance"]))
    out["backend"] = checked_backend_name(g["backend"])
    return out


def _score_settings(g: dict, importance: str) -> dict:
    """importance_beta and importance_dtype: the score EMA's, None (default) meaning 0.99 and
    float32; with importance="exp_avg_sq" the score is AdamW's own exp_avg_sq (EMA factor betas[1],
    the parameter's dtype), so both must be None."""
    if importance == "exp_avg_sq":
        for name in ("importance_beta", "importance_dtype"):
            if g[name] is not None:
                raise ValueError(f"Invalid {name}: {g[name]!r} (with importance='exp_avg_sq' the score is AdamW's "
                                 "exp_avg_sq, whose EMA factor is betas[1] and whose dtype is the parameter's: "
                                 f"leave {name} None)")
        return dict(importance_beta=None, importance_dtype=None)
    out = dict(importance_beta=0.99 if g["importance_beta"] is None else _fraction(g, "importance_beta"))
    dtype = torch.float32 if g["importance_dtype"] is None else g["importance_dtype"]
    if dtype not in IMPORTANCE_DTYPES:
        raise ValueError(f"Invalid importance_dtype: {dtype!r} (expected torch.float32 or torch.bfloat16)")
    out["importance_dtype"] = dtype
    return out


def _non_negative(x: object, what: str) -> float:
    if not (_is_real(x) and 0.0 <= x):
        raise ValueError(f"Invalid {what}: {x}")
    return float(x)


def _lr(lr: object, foreach_only: bool) -> float | Tensor:
    if not isinstance(lr, Tensor):
        return _non_negative(lr, "learning rate")
    if foreach_only:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    if lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    if not 0.0 <= lr:
        raise ValueError(f"Invalid learning rate: {lr}")
    return lr


def _betas(betas: object, foreach_only: bool) -> tuple:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"Invalid betas: {betas!r} (must be a pair of numbers or of Tensors)")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor) and b.numel() != 1:  # (before comparing it: torch's check would crash)
            raise ValueError(f"Tensor betas[{i}] must be 1-element")
        if not ((_is_real(b) or isinstance(b, Tensor)) and 0.0 <= b < 1.0):
            raise ValueError(f"Invalid beta parameter at index {i}: {b}")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise ValueError("betas must be either both floats or both Tensors")
    if isinstance(betas[0], Tensor) and foreach_only:
        raise ValueError("betas[0] as a Tensor is not supported for capturable=False and foreach=True")
    return tuple((b.squeeze() if b.dim() else b) if isinstance(b, Tensor) else float(b) for b in betas)


def _adamw_settings(g: dict) -> dict:
    """torch.optim.AdamW's constructor checks, with its messages, on a group; numbers of any numeric
    type are accepted (as floats)."""
    foreach_only = bool(g["foreach"]) and not g["capturable"]
    out = dict(lr=_lr(g["lr"], foreach_only), eps=_non_negative(g["eps"], "epsilon value"),
               betas=_betas(g["betas"], foreach_only),
               weight_decay=_non_negative(g["weight_decay"], "weight_decay value"),
               amsgrad=_flag(g, "amsgrad"), maximize=_flag(g, "maximize"))
    if g["fused"] and g["differentiable"]:
        raise RuntimeError("`fused` does not support `differentiable`")
    if g["fused"] and g["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if g["differentiable"]:
        raise ValueError("Invalid differentiable: True (EPIAdamW does not support differentiable=True)")
    return out


def checked_settings(g: dict, where: str = "") -> dict:
    """The settings of group `g` (or the defaults), validated and as plain Python numbers, to store
    back into it; changes nothing. Raises ValueError("Invalid <name>: ...") (AdamW's own messages,
    and RuntimeErrors, for its arguments), `where` appended: the one check of __init__,
    add_param_group, step and load_state_dict."""
    try:
        return {**_adamw_settings(g), **_epi_settings(g)}
    except (ValueError, RuntimeError) as e:
        if not where:
            raise
        raise type(e)(f"{e}{where}") from None


def checked_epi_step(t: object, where: str) -> int | Tensor:
    """A loaded group's step counter: an int, or (capturable steps) a 0-dim int64 tensor, >= 0."""
    if isinstance(t, Tensor):
        ok = t.dim() == 0 and t.dtype == torch.int64 and bool(t >= 0)
    else:
        ok = _is_int(t) and t >= 0
    if not ok:
        raise ValueError(f"Invalid epi_step: {t!r} (must be an int >= 0){where}")
    return t if isinstance(t, Tensor) else int(t)


def unchanged(validated: tuple | None, group: dict) -> bool:
    """Whether `group` still holds the very objects last validated. Identity, not equality: no
    tensor is compared (a host sync), and 100.0 or np.int64(100) in place of 100 is a change."""
    return validated is not None and all(map(operator.is_, validated, settings_of(group)))


def fill_defaults(group: dict, defaults: dict) -> None:
    """Complete a loaded group: keys older state dicts lack, then this optimizer's defaults (so an
    AdamW state dict loads with this optimizer's EPI settings)."""
    for key, value in LEGACY_DEFAULTS:
        group.setdefault(key, value)
    for key, value in defaults.items():
        group.setdefault(key, value)


def check_loaded_groups(defaults: dict, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The saved groups of `state_dict` as they will load (completed with `defaults`), validated like
    live ones and normalised, so an invalid checkpoint raises before anything loads."""
    groups = []
    for i, saved in enumerate(state_dict["param_groups"]):
        group = dict(saved)
        fill_defaults(group, defaults)
        where = f" in loaded param group {i}"
        group.update(checked_settings(group, where), epi_step=checked_epi_step(group["epi_step"], where))
        groups.append(group)
    return {**state_dict, "param_groups": groups}


def check_score_source(group: dict, importance: str, index: int, state: dict) -> None:
    """RuntimeError if the group's parameters have state made with the other score source."""
    for p in group["params"]:
        st = state.get(p, {})
        if "isolation_mask" in st and ("importance" in st) == (importance == "exp_avg_sq"):
            made = "importance='exp_avg_sq'" if "importance" not in st else "its own scores ('sq' or 'abs')"
            raise RuntimeError(f"EPIAdamW: importance={importance!r} in param group {index}, but its parameters' "
                               f"state was made with {made}: the score source cannot change mid-run")


def check_stepped_params(group: dict, params: list[Tensor], backend) -> None:
    """RuntimeError if the params of `group` that take part in this step cannot be stepped as its
    settings say by `backend` (the group's resolved :class:`~epi_kernels.backends.Backend`)."""
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("EPIAdamW does not support sparse gradients")
        if torch.is_complex(p):
            raise RuntimeError("EPIAdamW does not support complex parameters")
        if group["fused"] and not (p.is_floating_point() and p.device.type in ("cpu", "cuda", "mps", "xpu")):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                               f"of supported devices, got {p.dtype} on {p.device.type}")
    devices = {p.device for p in params}
    if (group["capturable"] and not backend.capturable_on_cpu and not torch.compiler.is_compiling()
            and any(d.type == "cpu" for d in devices)):
        raise RuntimeError("capturable=True requires parameters on an accelerator, got cpu")
    for device in devices:
        backend.check_device(device)
