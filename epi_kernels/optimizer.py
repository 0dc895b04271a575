"""EPIAdamW: torch.optim.AdamW with Evolving Parameter Isolation (DESIGN.md, "Semantics").

The class owns arguments, state and the step counter; the math lives in
:mod:`epi_kernels.functional` (step), :mod:`epi_kernels.refresh` (masks) and
:mod:`epi_kernels.threshold` (top-k thresholds).
"""
from __future__ import annotations

import math
import operator
from numbers import Integral, Real
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

from .backends import BACKENDS, KERNEL_BACKENDS, check_backend, check_device, resolve_backend
from .functional import epi_adamw, isolated_indices, refresh_ops
from .mask import pack_mask, unpack_mask
from .partitions import Layouts, full_shape, gather_pieces, piece_bits, put_piece_bits, refresh_partition
from .refresh import is_refresh_step, refresh_due, refresh_masks
from .sharding import gather_shards, is_sharded, local, shard_of
from .state import IMPORTANCE_DTYPES, init_epi_state, protect_epi_entries, restore_epi_entries
from .step_driver import RefreshPlan

__all__ = ["EPIAdamW"]

_CHOICES = {"importance": ("sq", "abs", "exp_avg_sq"), "scope": ("tensor", "global"), "threshold": ("approx", "exact")}
# Every group value a step reads. A scheduler or the user may set any of them between steps, so
# step() re-validates a group whenever one of them is no longer the very object last validated.
_SETTINGS = ("lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
             "differentiable", "fused", "isolation_ratio", "refresh_interval", "warmup_steps",
             "importance_beta", "importance", "scope", "threshold", "static", "importance_dtype", "backend")
_settings_of = operator.itemgetter(*_SETTINGS)
# keys a group saved by an older torch (or by torch.optim.AdamW) may lack, and what they load as
_LEGACY_DEFAULTS = (("amsgrad", False), ("maximize", False), ("foreach", None), ("capturable", False),
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
    check_backend(g["backend"])
    out["backend"] = BACKENDS[BACKENDS.index(g["backend"])]
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


def _checked_settings(g: dict, where: str = "") -> dict:
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


def _checked_epi_step(t: object, where: str) -> int | Tensor:
    """A loaded group's step counter: an int, or (capturable steps) a 0-dim int64 tensor, >= 0."""
    if isinstance(t, Tensor):
        ok = t.dim() == 0 and t.dtype == torch.int64 and bool(t >= 0)
    else:
        ok = _is_int(t) and t >= 0
    if not ok:
        raise ValueError(f"Invalid epi_step: {t!r} (must be an int >= 0){where}")
    return t if isinstance(t, Tensor) else int(t)


def _unchanged(validated: tuple | None, group: dict) -> bool:
    """Whether `group` still holds the very objects last validated. Identity, not equality: no
    tensor is compared (a host sync), and 100.0 or np.int64(100) in place of 100 is a change."""
    return validated is not None and all(map(operator.is_, validated, _settings_of(group)))


def _fill_defaults(group: dict, defaults: dict) -> None:
    """Complete a loaded group: keys older state dicts lack, then this optimizer's defaults (so an
    AdamW state dict loads with this optimizer's EPI settings)."""
    for key, value in _LEGACY_DEFAULTS:
        group.setdefault(key, value)
    for key, value in defaults.items():
        group.setdefault(key, value)


def _check_loaded_groups(optimizer: EPIAdamW, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Load pre-hook (after the user's): the saved groups as they will load, validated like live
    ones and normalised, so an invalid checkpoint raises before anything loads."""
    groups = []
    for i, saved in enumerate(state_dict["param_groups"]):
        group = dict(saved)
        _fill_defaults(group, optimizer.defaults)
        where = f" in loaded param group {i}"
        group.update(_checked_settings(group, where), epi_step=_checked_epi_step(group["epi_step"], where))
        groups.append(group)
    return {**state_dict, "param_groups": groups}


def _step_dtype(fused_or_capturable: bool) -> torch.dtype:
    # AdamW keeps `step` as a float tensor: float32 for fused/capturable, else the default float type
    if not fused_or_capturable and torch.get_default_dtype() == torch.float64:
        return torch.float64
    return torch.float32


def _by_device(tensors: list[Tensor]) -> dict[torch.device, list[Tensor]]:
    out: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        out.setdefault(t.device, []).append(t)
    return out


class EPIAdamW(Optimizer):
    """AdamW that freezes, per tensor, the top `isolation_ratio` fraction of elements by importance.

    Importance is an EMA of g^2 (or |g|) updated every step for every element with a gradient.
    Every `refresh_interval` optimizer steps (after `warmup_steps`, default = `refresh_interval`)
    the isolation mask is recomputed from the scores at the start of the step; isolated elements
    get no Adam update and no weight decay (bit-identical), while their moments and scores keep
    updating. With ``isolation_ratio=0`` this is ``torch.optim.AdamW``.

    AdamW arguments and defaults are torch's. EPI arguments (each also a param-group key):
    isolation_ratio (0.01), refresh_interval (100), warmup_steps (None), importance_beta (None: 0.99),
    importance ("sq" | "abs" | "exp_avg_sq": AdamW's own second moment, no score state),
    scope ("tensor" | "global"), threshold ("approx" | "exact"), static (False: refresh once,
    CPI-FT style), importance_dtype (None: torch.float32 | torch.bfloat16),
    backend ("auto" | "torch" | "compiled" | "triton" | "cuda").
    """

    def __init__(
        self,
        params,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        isolation_ratio: float = 0.01,
        refresh_interval: int = 100,
        warmup_steps: int | None = None,
        importance_beta: float | None = None,
        importance: str = "sq",
        scope: str = "tensor",
        threshold: str = "approx",
        static: bool = False,
        importance_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
            foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
            isolation_ratio=isolation_ratio, refresh_interval=refresh_interval,
            warmup_steps=warmup_steps, importance_beta=importance_beta, importance=importance,
            scope=scope, threshold=threshold, static=static, importance_dtype=importance_dtype,
            backend=backend,
        )
        defaults.update(_checked_settings(defaults))
        self._isolated: dict[Tensor, Tensor] = {}  # cache: flat indices of each mask's isolated elements
        self._histograms: dict[int, dict] = {}  # kernel backends: per group (by id), histograms for the next step
        self._requests: dict[int, Tensor] = {}  # capturable kernel steps: per group, pending refresh requests
        self._validated: dict[int, tuple] = {}  # per group (by id), its settings as last validated
        self._layouts = Layouts()  # what each group was given, and what a wrapper put in its place (ZeRO)
        self._engine_steps: dict[int, tuple[set, bool, bool]] = {}  # partitioned groups: the step in progress
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        where = f" in param group {len(self.param_groups)}"
        merged = {**self.defaults, **param_group}
        if merged["importance"] == "exp_avg_sq":  # the defaults' score settings do not apply to it
            merged.update((k, param_group.get(k)) for k in ("importance_beta", "importance_dtype"))
        param_group.update(_checked_settings(merged, where))
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        group.setdefault("epi_step", 0)
        self._validated[id(group)] = _settings_of(group)
        self._layouts.add(group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._isolated = {}
        self._histograms = {}
        self._requests = {}
        self._validated = {}  # the first step validates the groups (load_state_dict already did)
        self._layouts = getattr(self, "_layouts", Layouts())  # (load_state_dict re-keys it to the new groups)
        self._layouts.forget()
        self._engine_steps = {}
        for group in self.param_groups:
            _fill_defaults(group, self.defaults)
            for p in group["params"]:
                st = self.state.get(p, {})
                if "step" in st and not torch.is_tensor(st["step"]):
                    on_device = group["capturable"] or group["fused"]
                    st["step"] = torch.tensor(float(st["step"]), dtype=_step_dtype(on_device),
                                              device=p.device if on_device else "cpu")

    # ------------------------------------------------------------------ state

    def _init_state(self, p: Tensor, group: dict) -> dict:
        st = self.state[p]
        if "step" not in st:
            on_device = group["capturable"] or group["fused"]
            st["step"] = torch.zeros((), dtype=_step_dtype(on_device), device=p.device if on_device else "cpu")
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if group["amsgrad"] and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if "isolation_mask" not in st:
            part = self._layouts.partitions.get(p)
            init_epi_state(st, local(p), group["importance_dtype"],  # a shard's own elements
                           pieces=len(part[1].pieces) if part else None)
        return st

    def _stepped_params(self, group: dict) -> list[Tensor]:
        """Params of `group` that take part in this step; raises before any state changes."""
        params = [p for p in group["params"] if p.grad is not None]
        for p in params:
            if p.grad.is_sparse:
                raise RuntimeError("EPIAdamW does not support sparse gradients")
            if torch.is_complex(p):
                raise RuntimeError("EPIAdamW does not support complex parameters")
            if group["fused"] and not (p.is_floating_point() and p.device.type in ("cpu", "cuda", "mps", "xpu")):
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors "
                                   f"of supported devices, got {p.dtype} on {p.device.type}")
        devices = {p.device for p in params}
        backend = resolve_backend(group["backend"], params[0].device) if params else None
        if (group["capturable"] and backend not in KERNEL_BACKENDS and not torch.compiler.is_compiling()
                and any(d.type == "cpu" for d in devices)):  # (kernel backends: their CPU emulations)
            raise RuntimeError("capturable=True requires parameters on an accelerator, got cpu")
        for device in devices:
            check_device(backend, device)
        return params

    def _isolated_index(self, p: Tensor, st: dict) -> Tensor:
        index = self._isolated.get(p)
        if index is None:
            index = self._isolated[p] = isolated_indices(st["isolation_mask"], local(p).numel())
        return index

    # ------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Perform one optimization step; `closure` is evaluated first, with grad enabled."""
        check = getattr(self, "_accelerator_graph_capture_health_check", None)
        if check is not None:
            check()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_settings()
        stepped = [self._stepped_params(group) for group in self.param_groups]  # validate all first
        decides = [bool(ps) and self._decides_on_device(g, ps) for g, ps in zip(self.param_groups, stepped)]
        on_device = [d for d, ps in zip(decides, stepped) if ps]
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() and not all(on_device):
            # the refresh schedule and the step counts live on the host: a replayed graph would
            # repeat one step's decisions (no refresh, ever), so refuse instead of going wrong quietly
            raise RuntimeError("EPIAdamW.step can be captured in a CUDA graph only with capturable=True, "
                               "backend='triton' or 'cuda', scope='tensor', threshold='approx' and unsharded "
                               "params in every param group (the others decide refreshes on the host)")
        device_skip = on_device and all(on_device)  # no host read of the GradScaler's flag either
        skip = self._amp_overflow([p for params in stepped for p in params], device_skip)
        if skip is True:
            return loss  # GradScaler found inf/NaN gradients: the whole step is skipped
        for group, params, on_dev in zip(self.param_groups, stepped, decides):
            if params:
                self._step_group(group, params, on_dev, skip if device_skip else None)
        return loss

    @torch.compiler.disable  # host-side bookkeeping: traced, it would guard on every setting's value
    def _check_settings(self) -> None:
        """Re-validate the groups whose settings changed since last validated (set by a scheduler or
        the user between steps), all of them before any normalised value is stored back."""
        changed = [(i, group) for i, group in enumerate(self.param_groups)
                   if not _unchanged(self._validated.get(id(group)), group)]
        checked = [_checked_settings(group, f" in param group {i}") for i, group in changed]
        for (i, group), values in zip(changed, checked):  # (a changed `importance` is a changed group)
            self._check_score_source(group, values["importance"], i)
            self._layouts.recheck(group)  # its partitions are checked against the new settings
        new = {id(group): values for (_, group), values in zip(changed, checked)}
        for i, group in enumerate(self.param_groups):
            self._layouts.check(group, f"param group {i}", new.get(id(group), group), self.state, self)
        for (_, group), values in zip(changed, checked):
            group.update(values)
            self._validated[id(group)] = _settings_of(group)

    def _check_score_source(self, group: dict, importance: str, index: int) -> None:
        """RuntimeError if the group's parameters have state made with the other score source."""
        for p in group["params"]:
            st = self.state.get(p, {})
            if "isolation_mask" in st and ("importance" in st) == (importance == "exp_avg_sq"):
                made = "importance='exp_avg_sq'" if "importance" not in st else "its own scores ('sq' or 'abs')"
                raise RuntimeError(f"EPIAdamW: importance={importance!r} in param group {index}, but its parameters' "
                                   f"state was made with {made}: the score source cannot change mid-run")

    def _decides_on_device(self, group: dict, params: list[Tensor]) -> bool:
        """Whether this group's step decides refreshes (and GradScaler skips) on the device: a
        capturable step of a kernel backend that refreshes inside its kernels."""
        return (group["capturable"] and resolve_backend(group["backend"], params[0].device) in KERNEL_BACKENDS
                and group["scope"] == "tensor" and group["threshold"] == "approx"
                and not any(is_sharded(p) or p in self._layouts.partitions for p in params))

    # GradScaler hands this optimizer its scale and overflow flag (as it does torch's fused Adam)
    # instead of unscaling the gradients itself and skipping step() on overflow.
    _step_supports_amp_scaling = True

    def _amp_overflow(self, params: list[Tensor], on_device: bool = False) -> bool | Tensor | None:
        """With a GradScaler: True if this step must be skipped (inf/NaN gradients), else unscale
        the gradients in place by the scaler's scale, exactly as GradScaler.unscale_ would.
        `on_device`: return the skip flag as a 0-dim int32 tensor instead of reading it (None
        without a GradScaler); the step's kernels then skip themselves."""
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
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

    @staticmethod
    @torch.compiler.disable  # changes every step: traced, it would recompile the step for each value
    def _advance(group: dict, states: list[dict]) -> tuple[bool, bool]:
        """Count the step; (whether it refreshes the masks, whether the next one will)."""
        group["epi_step"] += 1
        t = group["epi_step"]
        when = (group["refresh_interval"], group["warmup_steps"], group["static"])
        refresh = is_refresh_step(t, *when) or bool(group.pop("refresh_requested", False))
        if refresh:
            for st in states:
                st["refresh_step"].fill_(t)
        return refresh, is_refresh_step(t + 1, *when)

    def _count_engine_step(self, group: dict, states: list[dict], flats: list[Tensor]) -> tuple[bool, bool]:
        """_advance for a group of flat partitions. ZeRO 3 steps the sub-groups of a group with one
        step() call each, so a call that steps none of the partitions the step in progress stepped
        belongs to it (same step count, same refresh decision); one that repeats one starts the next."""
        ids = {id(f) for f in flats}
        current = self._engine_steps.get(id(group))
        if current is not None and not ids & current[0]:
            current[0].update(ids)
            if current[1]:
                for st in states:
                    st["refresh_step"].fill_(group["epi_step"])
            return current[1], current[2]
        refresh, collect = self._advance(group, states)
        self._engine_steps[id(group)] = (ids, refresh, collect)
        return refresh, collect

    @torch.compiler.disable  # integer threshold engine with host reads: one graph break, not dozens
    def _refresh_masks(self, group: dict, states: list[dict], scores: list[Tensor], params: list[Tensor],
                       backend: str, sharded: bool) -> None:
        ops = refresh_ops(backend)
        whole = [i for i, p in enumerate(params) if p not in self._layouts.partitions]
        if whole:
            refresh_masks([states[i] for i in whole], scores=[scores[i] for i in whole],
                          isolation_ratio=group["isolation_ratio"], scope=group["scope"], threshold=group["threshold"],
                          ops=ops, shards=[shard_of(params[i]) for i in whole] if sharded else None)
        for p, st, s in zip(params, states, scores):
            part = self._layouts.partitions.get(p)
            if part is not None:  # each flat partition: its pieces in one batch (one collective per phase)
                refresh_partition(st, s, part[1], isolation_ratio=group["isolation_ratio"], ops=ops)

    def _device_control(self, group: dict, states: list[dict], skip: Tensor | None) -> Tensor:
        """The control words (refresh, collect, skip) of a capturable step, computed on the device
        from the group's device step counter; records refresh steps. A requested refresh (stage
        boundary) needs the histograms the step before it collects: the next step collects, the one
        after refreshes."""
        device = states[0]["isolation_mask"].device
        t = group["epi_step"]
        if not torch.is_tensor(t) or t.device != device:
            t = group["epi_step"] = torch.as_tensor(t, dtype=torch.int64).to(device)
        requests = self._requests.get(id(group))
        if requests is None:
            requests = self._requests[id(group)] = torch.zeros(2, dtype=torch.int32, device=device)
        if group.pop("refresh_requested", False):
            requests[0].fill_(1)
        skip = torch.zeros((), dtype=torch.int32, device=device) if skip is None else skip.to(device)
        live = skip == 0
        t.add_(live.to(t.dtype))
        when = (group["refresh_interval"], group["warmup_steps"], group["static"])
        refresh = (refresh_due(t, *when) | (requests[1] != 0)) & live
        collect = (refresh_due(t + 1, *when) | (requests[0] != 0)) & live
        requests.copy_(torch.where(live, torch.stack([torch.zeros_like(requests[0]), requests[0]]), requests))
        marks = [st["refresh_step"] for st in states]
        torch._foreach_copy_(marks, list(torch.where(refresh, t, torch.stack(marks)).unbind(0)))
        return torch.stack([refresh, collect, ~live]).to(torch.int32)

    def _step_group(self, group: dict, params: list[Tensor], on_device: bool, skip: Tensor | None) -> None:
        states = [self._init_state(p, group) for p in params]
        backend = resolve_backend(group["backend"], params[0].device)
        partitioned = any(p in self._layouts.partitions for p in params)
        sharded = partitioned or any(is_sharded(p) for p in params)
        shard = local if sharded else (lambda t: t)  # FSDP2 DTensors: each rank steps its local shard
        # the scores: the EPI state's own, or (importance="exp_avg_sq") AdamW's second moment
        scores = [shard(st["exp_avg_sq"]) if group["importance"] == "exp_avg_sq" else st["importance"]
                  for st in states]
        # histograms kept between steps: host-decided steps keep those the next step needs, device-
        # decided ones reusable buffers; a step of one kind drops the other's (they would be stale)
        pending = self._histograms.setdefault(id(group), {"host": {}, "device": {}})
        refresh, plan = False, None
        if on_device:  # capturable: the kernels refresh when the device says
            pending["host"].clear()
            plan = RefreshPlan(states, group["isolation_ratio"], True, True, pending["device"],
                               self._device_control(group, states, skip))
        else:
            pending["device"].clear()
            refresh, collect = (self._count_engine_step(group, states, params) if partitioned
                                else self._advance(group, states))
            if backend in KERNEL_BACKENDS and group["scope"] == "tensor" and group["threshold"] == "approx" and not sharded:
                plan = RefreshPlan(states, group["isolation_ratio"], refresh, collect, pending["host"])
            elif refresh:
                self._refresh_masks(group, states, scores, params, backend, sharded)
        if refresh:
            for p in params:
                self._isolated.pop(p, None)
        beta1, beta2 = group["betas"]
        isolated = [self._isolated_index(p, st) for p, st in zip(params, states)] if backend == "torch" else None
        epi_adamw(
            [shard(p) for p in params], [shard(p.grad) for p in params], [shard(st["exp_avg"]) for st in states],
            [shard(st["exp_avg_sq"]) for st in states],
            [shard(st["max_exp_avg_sq"]) for st in states] if group["amsgrad"] else [],
            [st["step"] for st in states], scores,
            [st["isolation_mask"] for st in states], isolated,
            backend=backend, importance_beta=group["importance_beta"],
            importance=group["importance"], amsgrad=group["amsgrad"], beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"],
            maximize=group["maximize"], foreach=group["foreach"], capturable=group["capturable"],
            fused=group["fused"], plan=plan,
        )

    # ------------------------------------------------------------------ introspection

    def isolation_mask(self, p: Tensor, gather: bool = False) -> Tensor:
        """Bool tensor shaped like `p`: the elements isolated in the most recent step (and until the
        next refresh). All False before the first refresh.

        Sharded `p`: this rank's part, shaped like the local shard (FSDP2), or 1-D over the elements
        of `p` (in its flat order) that this rank's flat partition holds (DeepSpeed ZeRO; empty if
        none). `gather=True`: the whole tensor's mask, shaped like the whole `p`, on every rank (a
        collective over the shard group: every rank of it must call it). A model parameter that a
        wrapper replaced by a copy (fp32 master weights): the copy's mask."""
        p = self._layouts.copies.get(p, p)
        if p in self._layouts.pieces:
            flat, _, piece = self._layouts.piece(p)
            bits = piece_bits(self.state[flat]["isolation_mask"], piece.start, piece.numel) \
                if "isolation_mask" in self.state.get(flat, {}) else torch.zeros(piece.numel, dtype=torch.bool)
            return gather_pieces(bits, piece) if gather else bits
        st, shard = self.state.get(p, {}), local(p)  # FSDP2: the mask of this rank's shard
        if "isolation_mask" not in st:
            mask = torch.zeros(shard.shape, dtype=torch.bool, device=shard.device)
        else:
            mask = unpack_mask(st["isolation_mask"], shard.numel()).view(shard.shape)
        return gather_shards(mask, p) if gather and is_sharded(p) else mask

    def request_refresh(self) -> None:
        """Make the next step of every param group a refresh step, whatever the schedule says (for
        stage boundaries: protect what mattered for the stage that just ended). The regular
        schedule continues unchanged; with `static=True` the schedule's one refresh still comes."""
        for group in self.param_groups:
            group["refresh_requested"] = True
            if id(group) in self._requests:  # capturable steps (also replays of a captured one)
                self._requests[id(group)][0].fill_(1)

    @torch.no_grad()
    def set_isolation_mask(self, p: Tensor, mask: Tensor) -> None:
        """Put your own mask in force for `p` (bool, shaped like `p`) until its next refresh, e.g.
        a random control mask or one computed elsewhere; `static=True` with a `warmup_steps`
        beyond the run keeps it for good. Creates `p`'s state if it has none yet. Under DeepSpeed
        ZeRO (after the first step), every rank passes the whole mask and keeps its own part."""
        p = self._layouts.copies.get(p, p)
        group = next((g for g in self.param_groups if any(q is p for q in g["params"])), None)
        if group is None and p not in self._layouts.pieces:
            raise ValueError("set_isolation_mask: p is not a parameter of this optimizer (under DeepSpeed ZeRO: "
                             "not until the first step has mapped the partitions)")
        if not torch.is_tensor(mask) or mask.dtype != torch.bool or tuple(mask.shape) != full_shape(p):
            raise ValueError(f"set_isolation_mask: mask must be a bool tensor of shape {full_shape(p)}, got "
                             f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
        if group is None:  # a model parameter of a flat partition: this rank's piece of the mask
            flat, j, piece = self._layouts.piece(p)
            gid = self._layouts.partitions[flat][0]
            st = self._init_state(flat, next(g for g in self.param_groups if id(g) == gid))
            put_piece_bits(st["isolation_mask"], piece.start,
                           mask.reshape(-1)[piece.offset:piece.offset + piece.numel].to(flat.device))
            st["isolated_count"][j].fill_(int(mask.sum()))
            self._isolated.pop(flat, None)
            return
        st = self._init_state(p, group)
        st["isolation_mask"].copy_(pack_mask(mask.to(p.device)))
        st["isolated_count"].fill_(int(mask.sum()))
        self._isolated.pop(p, None)

    def isolation_stats(self) -> list[dict[str, Any]]:
        """Per tensor, as of its last refresh: k, selected count, threshold, overlap with the
        previous mask (Jaccard), whether the exact path set the threshold, and the refresh step.
        Under DeepSpeed ZeRO: one entry per model parameter, with whole-tensor figures (the same on
        every rank)."""
        stats = []
        for gi, group in enumerate(self.param_groups):
            names = group.get("param_names")
            owned = self._layouts.given.get(id(group), (group["params"], None))[0]
            # (tensor, its state, which entry of the state's per-tensor entries, index in the group)
            entries = [(p, self.state.get(p, {}), (), pi) for pi, p in enumerate(group["params"])
                       if p not in self._layouts.partitions]
            index = {id(q): qi for qi, q in enumerate(owned)}
            entries += [(pc.param, self.state.get(flat, {}), (j,), index.get(id(pc.param)))
                        for flat, (gid, part) in self._layouts.partitions.items() if gid == id(group)
                        for j, pc in enumerate(part.pieces)]
            for p, st, at, pi in entries:
                if "isolation_mask" not in st:
                    continue
                tau = int(st["threshold_bits"][at])
                stats.append({
                    "group": gi, "index": pi, "name": names[pi] if names and pi is not None else None,
                    "shape": full_shape(p), "numel": math.prod(full_shape(p)), "scope": group["scope"],
                    "k": int(st["isolation_k"][at]), "selected": int(st["isolated_count"][at]),
                    "threshold": torch.tensor(tau, dtype=torch.int32).view(torch.float32).item(),
                    "threshold_bits": tau, "overlap": float(st["isolation_overlap"][at]),
                    "exact": bool(st["threshold_exact"][at]), "refresh_step": int(st["refresh_step"][at]),
                })
        return stats

    # ------------------------------------------------------------------ checkpoints

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, except that the saved groups' settings (as step() checks them) and the EPI
        entries (shapes, dtypes) are validated before anything loads, and EPI entries keep their
        saved dtypes.

        User load hooks see the full state: EPI entries are protected after the last pre-hook and
        restored before the first post-hook.
        """
        pre = [self.register_load_state_dict_pre_hook(_check_loaded_groups),
               self.register_load_state_dict_pre_hook(protect_epi_entries)]
        post = self.register_load_state_dict_post_hook(restore_epi_entries, prepend=True)
        old = list(self.param_groups)
        try:
            super().load_state_dict(state_dict)  # (its __setstate__ drops the caches of the old state)
            self._layouts.regroup(old, self.param_groups)
        finally:
            for hook in pre:
                hook.remove()
            post.remove()
