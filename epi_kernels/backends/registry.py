"""The backend registry: each backend is one :class:`Backend` object, registered once by its own
module (``backends/<name>.py``); everything else asks the registry, never names a backend.

A backend answers: is it usable in this installation (:attr:`Backend.available`), can it step
tensors on a device, does it refresh the masks inside its own kernels (then the optimizer hands
its step a :class:`~epi_kernels.step_driver.RefreshPlan`), its step (one signature for all:
``step(tensors, hyper, plan)`` over :mod:`epi_kernels.step_records`), and the elementwise passes
its reference refreshes use.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch

from ..refresh import EAGER_OPS, RefreshOps
from ..step_records import StepHyper, StepTensors

__all__ = ["AUTO", "KERNEL_PARAM_DTYPES", "Backend", "cuda_or_emulated", "env_flag", "register", "unregister", "get", "names", "available_backends", "checked_backend_name",
           "resolve", "resolve_backend"]

AUTO = "auto"  # the name that picks a backend per device (resolve)
KERNEL_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the kernel sets step (abi.py's dtype codes)


def _always() -> bool:
    return True


def _any_device(device: torch.device) -> str | None:
    return None


def env_flag(name: str) -> bool:
    """Whether environment variable `name` is set to something other than "" or "0"."""
    return os.environ.get(name, "0") not in ("", "0")


def cuda_or_emulated(backend: str, env: str, emulation: str) -> Callable[[torch.device], str | None]:
    """The `device_error` of a backend of CUDA kernels that also steps CPU tensors in `emulation`,
    when environment variable `env` is set (the tests, on machines without a GPU)."""
    def device_error(device: torch.device) -> str | None:
        if device.type == "cuda" or (device.type == "cpu" and env_flag(env)):
            return None
        return (f"backend='{backend}' needs CUDA tensors, got {device.type} "
                f"(CPU tensors run only in {emulation}, {env}=1)")

    return device_error


@dataclass(eq=False)
class Backend:
    """One implementation of the EPI-AdamW step.

    `step(tensors, hyper, plan)` steps the tensors in place; `plan` is None unless the backend
    `refreshes_in_step` (then it may refresh the masks itself, DESIGN.md "The refresh protocol").
    `auto_rank`: "auto" picks, for tensors on a device type in `auto_devices` ("*": any), the
    available backend of the highest rank. `device_error(device)`: why it cannot step tensors on
    `device`, or None. `capturable_on_cpu`: capturable=True steps CPU tensors (an emulation of
    device kernels); else capturable needs an accelerator, as in torch's AdamW."""
    name: str
    step: Callable[[StepTensors, StepHyper, object], None]
    refresh_ops: RefreshOps = EAGER_OPS
    refreshes_in_step: bool = False
    wants_isolated_indices: bool = False  # its step takes StepTensors.isolated (a cache the optimizer keeps)
    capturable_on_cpu: bool = False
    auto_rank: int | None = None
    auto_devices: tuple[str, ...] = ("cuda",)
    available: Callable[[], bool] = _always
    install_hint: str = ""  # how to make an unavailable backend available
    device_error: Callable[[torch.device], str | None] = _any_device
    param_dtypes: tuple[torch.dtype, ...] | None = None

    def check_device(self, device: torch.device) -> None:
        """RuntimeError if this backend cannot step tensors on `device`."""
        why = self.device_error(device)
        if why is not None:
            raise RuntimeError(why)

    def refreshes(self, group: dict, sharded: bool) -> bool:
        """Whether a step of `group` refreshes inside this backend's step (the in-step refresh
        serves approximate selection of unsharded tensors: per tensor, and scope="global" over a
        group of one device and dtype; the reference engine the rest)."""
        if not self.refreshes_in_step or group["threshold"] != "approx" or sharded:
            return False
        return group["scope"] == "tensor" or _one_launch_group(group["params"])


def _one_launch_group(params) -> bool:
    """Whether `params` share one device and dtype (so do their scores: one importance dtype per
    group), which the kernels' one selection over a group needs (step_driver.kernel_step)."""
    return len({(p.device, p.dtype) for p in params}) <= 1


_REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    """Add `backend` (its name must be new); returns it."""
    if backend.name == AUTO or backend.name in _REGISTRY:
        raise ValueError(f"backend name {backend.name!r} is taken")
    _REGISTRY[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    """Remove backend `name` (a plugin unloading itself; tests)."""
    del _REGISTRY[name]


def get(name: str) -> Backend:
    """The registered backend `name` (not "auto": resolve it first)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"epi_adamw: unknown backend {name!r}") from None


def names() -> tuple[str, ...]:
    """Every name `backend=` accepts, "auto" first, then the backends in registration order."""
    return (AUTO, *_REGISTRY)


def available_backends() -> tuple[str, ...]:
    """Concrete backends usable in this installation."""
    return tuple(name for name, b in _REGISTRY.items() if b.available())


def checked_backend_name(name: object) -> str:
    """`name` as the plain str it equals, if a backend this installation can run; else ValueError."""
    if name not in names():
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(names())})")
    if name != AUTO and not _REGISTRY[name].available():
        hint = _REGISTRY[name].install_hint
        raise ValueError(f"Invalid backend: {name!r} is not available in this installation"
                         f"{f' ({hint})' if hint else ''} (available: {', '.join((AUTO, *available_backends()))})")
    return next(n for n in names() if n == name)  # (a numpy str would not load with weights_only)


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """The name of the backend `name` stands for on `device` (see :func:`resolve`)."""
    return resolve(name, device).name


def resolve(name: str, device: torch.device | None = None) -> Backend:
    """The backend `name` stands for on `device`: "auto" picks the available backend of the
    highest `auto_rank` for that device type (never one without a rank, e.g. "compiled", whose
    first step compiles for tens of seconds: ask for it by name)."""
    if name != AUTO:
        return get(name)
    kind = "cpu" if device is None else device.type
    ranked = [b for b in _REGISTRY.values() if b.auto_rank is not None
              and (kind in b.auto_devices or "*" in b.auto_devices) and b.available()]
    return max(ranked, key=lambda b: b.auto_rank)
