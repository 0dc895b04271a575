"""Which implementation runs a step: the names users pass as ``backend=`` and how "auto" resolves.

"torch" is the eager pure-PyTorch reference; "compiled" is the same step fused into one loop by
torch.compile (opt-in: the first step pays the compile time); "triton" is the fused one-pass kernel
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, the interpreter the tests use);
"cuda" is reserved until the CUDA extension lands. Nothing here imports Triton or an extension.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

__all__ = ["BACKENDS", "available_backends", "check_backend", "check_device", "resolve_backend"]

BACKENDS = ("auto", "torch", "compiled", "triton", "cuda")


@lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def available_backends() -> tuple[str, ...]:
    """Concrete backends usable in this installation."""
    return ("torch", "compiled") + (("triton",) if _has_triton() else ())


def check_backend(name: object) -> None:
    """Raise ValueError unless `name` is a backend this installation can run."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(BACKENDS)})")
    if name != "auto" and name not in available_backends():
        hint = " (pip install triton)" if name == "triton" else ""
        raise ValueError(
            f"Invalid backend: {name!r} is not available in this installation{hint} "
            f"(available: auto, {', '.join(available_backends())})"
        )


def check_device(backend: str, device: torch.device) -> None:
    """RuntimeError if the resolved `backend` cannot step tensors on `device`."""
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {device.type} "
                           "(CPU tensors run only in Triton's interpreter, TRITON_INTERPRET=1)")


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """The concrete backend for `name` on `device`: "auto" picks cuda > triton > torch by
    availability (never "compiled", whose first step compiles for tens of seconds: ask for it by
    name). The CUDA extension is not built yet, so on CUDA tensors "auto" is "triton" if installed."""
    if name == "auto":
        return "triton" if device is not None and device.type == "cuda" and _has_triton() else "torch"
    return name
