"""backend="triton": the fused one-pass Triton kernels (:mod:`epi_kernels.kernel_sets.triton_kernels`)
run by the kernel backends' host flow (:mod:`epi_kernels.step_driver`), on CUDA tensors, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, the tests). Triton is imported at the first
step that uses it, never by this module."""
from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..step_driver import kernel_step
from .registry import Backend, register

__all__ = ["BACKEND", "triton_interpreted"]


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _device_error(device: torch.device) -> str | None:
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreted()):
        return None
    return (f"backend='triton' needs CUDA tensors, got {device.type} "
            "(CPU tensors run only in Triton's interpreter, TRITON_INTERPRET=1)")


BACKEND = register(Backend("triton", functools.partial(kernel_step, "triton"), refreshes_in_step=True,
                           capturable_on_cpu=True, auto_rank=1, available=_has_triton,
                           install_hint="pip install triton", device_error=_device_error))
