"""Which implementation runs a step: the names users pass as ``backend=`` and how "auto" resolves.

"torch" is the eager pure-PyTorch reference; "compiled" is the same step fused into one loop by
torch.compile (opt-in: the first step pays the compile time); "triton" is the fused one-pass kernel
(CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``, the interpreter the tests use);
"cuda" is the same flow with the CUDA C++ kernels of the compiled extension ``epi_kernels._C``
(CUDA tensors, or CPU tensors under ``EPI_CUDA_HOST=1``, which runs the kernels' host harness:
see :mod:`epi_kernels.kernel_sets.cuda_kernels`). Nothing here imports Triton; the extension is
loaded when a backend is first resolved.
"""
from __future__ import annotations

import importlib.util
import os
import warnings
from functools import lru_cache

import torch

__all__ = ["BACKENDS", "KERNEL_BACKENDS", "available_backends", "check_backend", "check_device", "resolve_backend"]

BACKENDS = ("auto", "torch", "compiled", "triton", "cuda")
KERNEL_BACKENDS = ("triton", "cuda")  # one fused pass per step, refreshes inside it (step_driver.py)


@lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=None)
def _has_extension() -> bool:
    """Whether the CUDA extension was built into this installation and loads (not whether a GPU
    exists: the module links cudart statically and loads without a driver). Loaded only when a
    backend is resolved, never at package import. One that is present but does not load (built for
    another Python, a newer glibc, a stale build) is reported once and treated as absent."""
    if importlib.util.find_spec("epi_kernels._C") is None:
        return False
    try:
        importlib.import_module("epi_kernels.kernel_sets.cuda_kernels")
    except ImportError as e:
        warnings.warn(f"epi_kernels._C is installed but does not load ({e}); backend='cuda' is unavailable",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def triton_interpreted() -> bool:
    """True when Triton kernels run in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_host_harness() -> bool:
    """True when backend="cuda" steps CPU tensors in the extension's host harness (tests)."""
    return os.environ.get("EPI_CUDA_HOST", "0") not in ("", "0")


def available_backends() -> tuple[str, ...]:
    """Concrete backends usable in this installation."""
    return ("torch", "compiled") + (("triton",) if _has_triton() else ()) + (("cuda",) if _has_extension() else ())


def check_backend(name: object) -> None:
    """Raise ValueError unless `name` is a backend this installation can run."""
    if name not in BACKENDS:
        raise ValueError(f"Invalid backend: {name!r} (expected one of {', '.join(BACKENDS)})")
    if name != "auto" and name not in available_backends():
        hint = {"triton": " (pip install triton)",
                "cuda": " (the CUDA extension was not built: reinstall with a CUDA toolchain, EPI_BUILD_CUDA=1)"}.get(name, "")
        raise ValueError(
            f"Invalid backend: {name!r} is not available in this installation{hint} "
            f"(available: auto, {', '.join(available_backends())})"
        )


def check_device(backend: str, device: torch.device) -> None:
    """RuntimeError if the resolved `backend` cannot step tensors on `device`."""
    if backend == "triton" and device.type != "cuda" and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(f"backend='triton' needs CUDA tensors, got {device.type} "
                           "(CPU tensors run only in Triton's interpreter, TRITON_INTERPRET=1)")
    if backend == "cuda" and device.type != "cuda" and not (device.type == "cpu" and cuda_host_harness()):
        raise RuntimeError(f"backend='cuda' needs CUDA tensors, got {device.type} "
                           "(CPU tensors run only in the extension's host harness, EPI_CUDA_HOST=1)")


def resolve_backend(name: str, device: torch.device | None = None) -> str:
    """The concrete backend for `name` on `device`: "auto" picks cuda > triton > torch by
    availability on CUDA tensors, "torch" elsewhere (never "compiled", whose first step compiles for
    tens of seconds: ask for it by name)."""
    if name == "auto":
        if device is None or device.type != "cuda":
            return "torch"
        return "cuda" if _has_extension() else "triton" if _has_triton() else "torch"
    return name
