"""backend="triton": the fused one-pass Triton kernels (:mod:`epi_kernels.kernel_sets.triton_kernels`)
run by the kernel backends' host flow (:mod:`epi_kernels.step_driver`), on CUDA tensors, or on CPU
tensors in Triton's interpreter (``TRITON_INTERPRET=1``, the tests). Triton is imported at the first
step that uses it, never by this module.

Supported versions: Triton 3.6 to 3.9 (setup.py's extra "triton"). Triton's interpreter before 3.7
does not run with NumPy >= 2.4: it turns a loop bound read from memory (the fused step's loops over
a chunk's tiles) into an int with ``int()`` of a 1-element array, which NumPy 2.4 made a TypeError
(deprecated since 1.25; Triton 3.7 converts with ``.squeeze()``, triton-lang/triton#9172). The
compiled kernels do not use NumPy; the interpreter combination is refused with the fix named
(:func:`interpreter_version_error`) rather than failing inside every step."""
from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import re

import torch

from ..step_driver import kernel_step
from .registry import KERNEL_PARAM_DTYPES, Backend, cuda_or_emulated, env_flag, register

__all__ = ["BACKEND", "interpreter_version_error", "triton_interpreted"]

INTERPRETER_FIXED = (3, 7)  # first Triton whose interpreter runs with NumPy >= 2.4
NUMPY_STRICT = (2, 4)  # first NumPy whose int() refuses an array with ndim > 0


@functools.lru_cache(maxsize=None)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run in its interpreter (on CPU tensors)."""
    return env_flag("TRITON_INTERPRET")


def _release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as "3.6.0", "2.4.0rc1" or "3.6.0+git1234"."""
    found = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def interpreter_version_error(triton_version: str, numpy_version: str) -> str | None:
    """Why Triton `triton_version`'s interpreter cannot run the kernels with NumPy `numpy_version`,
    or None where it can."""
    if _release(triton_version) >= INTERPRETER_FIXED or _release(numpy_version) < NUMPY_STRICT:
        return None
    return (f"backend='triton' cannot run in Triton's interpreter (TRITON_INTERPRET=1) with Triton "
            f"{triton_version} and NumPy {numpy_version}: the interpreter of Triton < 3.7 converts a loop "
            "bound with int() of a 1-element array, which NumPy >= 2.4 refuses. Install NumPy < 2.4 "
            '(pip install "numpy<2.4") or Triton >= 3.7 (pip install "triton>=3.7,<3.10"); the compiled '
            "kernels (CUDA tensors, TRITON_INTERPRET unset) run with Triton 3.6 and any NumPy")


@functools.lru_cache(maxsize=None)
def _installed_interpreter_error() -> str | None:
    """interpreter_version_error of the installed Triton and NumPy (read from their metadata, as
    python -m epi_kernels does: neither is imported here); None when either is not found."""
    try:
        versions = importlib.metadata.version("triton"), importlib.metadata.version("numpy")
    except importlib.metadata.PackageNotFoundError:
        return None
    return interpreter_version_error(*versions)


_device_error = cuda_or_emulated("triton", "TRITON_INTERPRET", "Triton's interpreter")


def device_error(device: torch.device) -> str | None:
    """As for the other emulated backends, and under the interpreter (whatever the device: it runs
    every launch on the host) also the versions it cannot run with."""
    return (triton_interpreted() and _installed_interpreter_error()) or _device_error(device)


BACKEND = register(Backend("triton", functools.partial(kernel_step, "triton"), refreshes_in_step=True,
                           param_dtypes=KERNEL_PARAM_DTYPES, capturable_on_cpu=True, auto_rank=1, available=_has_triton,
                           install_hint="pip install triton", device_error=device_error))
