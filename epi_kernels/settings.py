"""The settings of a param group: every check step(), add_param_group and load_state_dict run
before anything changes, and the normalised values (plain Python numbers) they store back.

Messages name the setting and the group (torch.optim.AdamW's own messages for its arguments), so
a bad value fails before any state, counter or parameter is written (DESIGN.md, "Semantics").
"""
from __future__ import annotations

import operator
import sys
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


# step counts, intervals and warmups: capturable steps compute the schedule in int64 on the device
# (t + 1, t - warmup), so every count must leave that room
MAX_STEPS = 2 ** 62


class _Refused(ValueError):
    """A check's own refusal: its message names the setting (see :func:`_checked`)."""


def _is_int(x: object) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)  # numpy ints too; True is no count


def _is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool)  # numpy floats too; range checks judge NaN/inf


def _is_bool(x: object) -> bool:
    """A bool, 0 or 1, or a NumPy bool scalar (torch's AdamW takes any of them)."""
    numpy_bool = getattr(sys.modules.get("numpy"), "bool_", None)
    return (isinstance(x, Integral) or (numpy_bool is not None and isinstance(x, numpy_bool))) and x in (0, 1)


def _fraction(x: object, name: str) -> float:
    if not (_is_real(x) and 0.0 <= x < 1.0):
        raise _Refused(f"Invalid {name}: {x!r} (must be a number in [0, 1))")
    return float(x)


def _flag(x: object, name: str) -> bool:
    if not _is_bool(x):
        raise _Refused(f"Invalid {name}: {x!r} (must be a bool)")
    return bool(x)


def _optional_flag(x: object, name: str) -> bool | None:
    return None if x is None else _flag(x, name)


def _choice(x: object, name: str) -> str:
    choices = _CHOICES[name]
    if not (isinstance(x, str) and x in choices):
        raise _Refused(f"Invalid {name}: {x!r} (expected one of {', '.join(choices)})")
    return choices[choices.index(x)]  # the plain str (a numpy str would not load weights_only)


def _count(x: object, name: str, low: int) -> int:
    if not (_is_int(x) and low <= x <= MAX_STEPS):
        raise _Refused(f"Invalid {name}: {x!r} (must be an int in [{low}, 2**62])")
    return int(x)


def _warmup(x: object, name: str) -> int | None:
    return None if x is None else _count(x, name, 0)


def _importance_dtype(x: object, name: str) -> torch.dtype:
    dtype = torch.float32 if x is None else x
    if dtype not in IMPORTANCE_DTYPES:
        raise _Refused(f"Invalid {name}: {dtype!r} (expected torch.float32 or torch.bfloat16)")
    return dtype


def _backend(x: object, name: str) -> str:
    if not isinstance(x, str):
        raise _Refused(f"Invalid {name}: {x!r} (expected the name of a backend, a str)")
    try:
        return checked_backend_name(x)
    except ValueError as e:
        raise _Refused(str(e)) from None


def _non_negative(x: object, name: str, what: str) -> float:
    if not (_is_real(x) and 0.0 <= x):
        raise _Refused(f"Invalid {what}: {x!r} ({name} must be a real number >= 0)")
    return float(x)


def _real_tensor(x: Tensor, name: str, what: str) -> None:
    # (checked before comparing it: a comparison of several elements would fail on its own)
    if x.numel() != 1:
        raise _Refused(f"Invalid {what}: {x!r} (Tensor {name} must be 1-element)")  # (torch's words)
    if not x.is_floating_point():
        raise _Refused(f"Invalid {what}: {x!r} (Tensor {name} must be a floating-point tensor)")


def _lr(lr: object, name: str, foreach_only: bool) -> float | Tensor:
    if not isinstance(lr, Tensor):
        return _non_negative(lr, name, "learning rate")
    if foreach_only:
        raise _Refused("lr as a Tensor is not supported for capturable=False and foreach=True")
    _real_tensor(lr, "lr", "learning rate")
    if not 0.0 <= lr:
        raise _Refused(f"Invalid learning rate: {lr} (lr must be >= 0)")
    return lr


def _betas(betas: object, name: str, foreach_only: bool) -> tuple:
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise _Refused(f"Invalid betas: {betas!r} (must be a pair of numbers or of Tensors)")
    for i, b in enumerate(betas):
        if isinstance(b, Tensor):
            _real_tensor(b, f"betas[{i}]", f"beta parameter at index {i}")
        if not ((_is_real(b) or isinstance(b, Tensor)) and 0.0 <= b < 1.0):
            raise _Refused(f"Invalid beta parameter at index {i}: {b} (betas[{i}] must be in [0, 1))")
    if isinstance(betas[0], Tensor) != isinstance(betas[1], Tensor):
        raise _Refused("betas must be either both floats or both Tensors")
    if isinstance(betas[0], Tensor) and foreach_only:
        raise _Refused("betas[0] as a Tensor is not supported for capturable=False and foreach=True")
    return tuple((b.squeeze() if b.dim() else b) if isinstance(b, Tensor) else float(b) for b in betas)


def _checked(g: dict, name: str, check, *args) -> Any:
    """check(g[name], name, *args) under the setting's name: a value the check cannot even
    compare (an array, a complex number, an object that raises) is refused naming it too."""
    x = g[name]
    try:
        return check(x, name, *args)
    except (_Refused, RuntimeError):
        raise
    except Exception as e:
        raise _Refused(f"Invalid {name}: {x!r} (not a value this setting takes: {type(e).__name__}: {e})") from None


def _flags(g: dict) -> dict:
    """The AdamW implementation flags, as plain bools (or None), and the combinations torch refuses."""
    out = {name: _checked(g, name, _flag) for name in ("amsgrad", "maximize", "capturable", "differentiable")}
    out.update((name, _checked(g, name, _optional_flag)) for name in ("foreach", "fused"))
    if out["fused"] and out["differentiable"]:
        raise RuntimeError("`fused` does not support `differentiable`")
    if out["fused"] and out["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")
    if out["differentiable"]:
        raise _Refused("Invalid differentiable: True (EPIAdamW does not support differentiable=True)")
    return out


def _adamw_settings(g: dict, flags: dict) -> dict:
    """torch.optim.AdamW's constructor checks, with its messages, on a group; numbers of any numeric
    type are accepted (as floats)."""
    foreach_only = bool(flags["foreach"]) and not flags["capturable"]
    return dict(lr=_checked(g, "lr", _lr, foreach_only), eps=_checked(g, "eps", _non_negative, "epsilon value"),
                betas=_checked(g, "betas", _betas, foreach_only),
                weight_decay=_checked(g, "weight_decay", _non_negative, "weight_decay value"))


def _epi_settings(g: dict) -> dict:
    """The EPI settings of a group, validated, as plain Python values."""
    out = dict(isolation_ratio=_checked(g, "isolation_ratio", _fraction),
               refresh_interval=_checked(g, "refresh_interval", _count, 1),
               warmup_steps=_checked(g, "warmup_steps", _warmup))
    out.update((name, _checked(g, name, _choice)) for name in _CHOICES)
    out["static"] = _checked(g, "static", _flag)
    out.update(_score_settings(g, out["importance"]))
    out["backend"] = _checked(g, "backend", _backend)
    return out


def _score_settings(g: dict, importance: str) -> dict:
    """importance_beta and importance_dtype: the score EMA's, None (default) meaning 0.99 and
    float32; with importance="exp_avg_sq" the score is AdamW's own exp_avg_sq (EMA factor betas[1],
    the parameter's dtype), so both must be None."""
    if importance == "exp_avg_sq":
        for name in ("importance_beta", "importance_dtype"):
            if g[name] is not None:
                raise _Refused(f"Invalid {name}: {g[name]!r} (with importance='exp_avg_sq' the score is AdamW's "
                               "exp_avg_sq, whose EMA factor is betas[1] and whose dtype is the parameter's: "
                               f"leave {name} None)")
        return dict(importance_beta=None, importance_dtype=None)
    beta = None if g["importance_beta"] is None else _checked(g, "importance_beta", _fraction)
    return dict(importance_beta=0.99 if beta is None else beta,
                importance_dtype=_checked(g, "importance_dtype", _importance_dtype))


def checked_settings(g: dict, where: str = "") -> dict:
    """The settings of group `g` (or the defaults), validated and as plain Python values, to store
    back into it; changes nothing. Raises ValueError("Invalid <name>: ...") (AdamW's own messages,
    and RuntimeErrors, for its arguments), `where` appended: the one check of __init__,
    add_param_group, step and load_state_dict."""
    try:
        flags = _flags(g)
        return {**_adamw_settings(g, flags), **flags, **_epi_settings(g)}
    except (ValueError, RuntimeError) as e:
        if not where:
            raise
        raise type(e)(f"{e}{where}") from None


def checked_epi_step(t: object, where: str) -> int | Tensor:
    """A loaded group's step counter: an int, or (capturable steps) a 0-dim int64 tensor, >= 0."""
    if isinstance(t, Tensor):
        ok = t.dim() == 0 and t.dtype == torch.int64 and t.layout == torch.strided and bool(0 <= t <= MAX_STEPS)
    else:
        ok = _is_int(t) and 0 <= t <= MAX_STEPS
    if not ok:
        raise ValueError(f"Invalid epi_step: {t!r} (must be an int in [0, 2**62]){where}")
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


_STEPPABLE = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _tensor_error(p: Tensor, grad: Tensor, backend) -> str | None:
    """Why `backend` cannot step parameter `p` with gradient `grad` (None if it can)."""
    dtype = p.dtype
    # the usual case in one expression (this runs for every parameter of every step): a dense
    # real floating-point parameter the backend steps, off the meta device, and a gradient like it
    if (dtype in _STEPPABLE and (backend.param_dtypes is None or dtype in backend.param_dtypes)
            and p.layout == torch.strided and grad.layout == torch.strided and grad.dtype == dtype
            and grad.shape == p.shape and grad.device == p.device and p.device.type != "meta"):
        return None
    if grad.is_sparse:
        return "EPIAdamW does not support sparse gradients"
    if torch.is_complex(p):
        return "EPIAdamW does not support complex parameters"
    if not p.is_floating_point():
        return f"EPIAdamW steps floating-point parameters only, got {p.dtype}"
    if backend.param_dtypes is not None and p.dtype not in backend.param_dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in backend.param_dtypes)
        return f"backend={backend.name!r} steps {names} parameters, got {p.dtype} (backend='torch' steps any float dtype)"
    if p.layout != torch.strided or grad.layout != torch.strided:
        return f"EPIAdamW steps dense (strided) tensors only, got a {p.layout} parameter with a {grad.layout} gradient"
    if p.device.type == "meta":
        return "EPIAdamW cannot step parameters on the meta device (they hold no values)"
    if (grad.shape, grad.dtype, grad.device) != (p.shape, p.dtype, p.device):
        return (f"its gradient must match it, got a {grad.dtype} gradient of shape {tuple(grad.shape)} on "
                f"{grad.device} for a {p.dtype} parameter of shape {tuple(p.shape)} on {p.device}")
    return None


def check_stepped_params(group: dict, params: list[Tensor], backend, states: dict, where: str = "") -> None:
    """RuntimeError if the params of `group` that take part in this step cannot be stepped as its
    settings say by `backend` (the group's resolved :class:`~epi_kernels.backends.Backend`), or
    their optimizer `states` (the optimizer's state dict) live elsewhere than they do. Runs for
    every group before a step writes anything, so whatever it refuses changes nothing."""
    for p in params:
        why = _tensor_error(p, p.grad, backend)
        held = states.get(p, {}).get("exp_avg")  # (one entry stands for all: they are made and moved together)
        if why is None and held is not None and held.device != p.device:
            why = (f"its optimizer state is on {held.device}, the parameter on {p.device} (moved after the "
                   "state was made? load_state_dict puts the state on the parameters' devices)")
        if why is None and group["fused"] and p.device.type not in ("cpu", "cuda", "mps", "xpu"):
            why = f"`fused=True` requires all the params to be floating point Tensors of supported devices, got {p.device.type}"
        if why is not None:
            index = next((i for i, q in enumerate(group["params"]) if q is p), "?")
            raise RuntimeError(f"{why} (parameter {index}{where})")
    devices = {p.device for p in params}
    if (group["capturable"] and not backend.capturable_on_cpu and not torch.compiler.is_compiling()
            and any(d.type == "cpu" for d in devices)):
        raise RuntimeError(f"capturable=True requires parameters on an accelerator, got cpu{where}")
    for device in devices:
        backend.check_device(device)
