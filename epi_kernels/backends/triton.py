"""backend="triton": the fused one-pass Triton kernels (:mod:`epi_kernels.kernel_sets.triton_kernels`)
run by the kernel backends' host flow (:mod:`epi_kernels.step_driver`), on CUDA tensors, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, the tests). Triton is imported at the first
step that uses it, never by this module."""
from __future__ import annotations

import functools
import importlib.util

from ..step_driver import kernel_step
from .registry import Backend, cuda_or_emulated, env_flag, register

__all__ = ["BACKEND", "triton_interpreted"]


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its interpreter (on CPU tensors)."""
    return env_flag("TRITON_INTERPRET")


BACKEND = register(Backend("triton", functools.partial(kernel_step, "triton"), refreshes_in_step=True,
                           capturable_on_cpu=True, auto_rank=1, available=_has_triton,
                           install_hint="pip install triton",
                           device_error=cuda_or_emulated("triton", "TRITON_INTERPRET", "Triton's interpreter")))
