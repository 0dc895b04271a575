"""backend="cuda": the CUDA C++ kernels of the compiled extension ``epi_kernels._C``
(:mod:`epi_kernels.kernel_sets.cuda_kernels`) run by the kernel backends' host flow
(:mod:`epi_kernels.step_driver`), on CUDA tensors, or on CPU tensors in the extension's host
harness (``EPI_CUDA_HOST=1``, the tests). The extension is loaded when availability is first asked
(when a backend is resolved), never at package import."""
from __future__ import annotations

import functools
import importlib
import importlib.util
import warnings

import torch

from ..step_driver import kernel_step
from .registry import KERNEL_PARAM_DTYPES, Backend, cuda_or_emulated, env_flag, register

__all__ = ["BACKEND", "cuda_host_harness", "cuda_version_text", "driver_problem"]


@functools.lru_cache(maxsize=None)
def _has_extension() -> bool:
    """Whether the CUDA extension was built into this installation and loads (not whether a GPU
    exists: the module links cudart statically and loads without a driver). One that is present
    but does not load (built for another Python, a newer glibc, a stale build) is reported once and
    treated as absent."""
    if importlib.util.find_spec("epi_kernels._C") is None:
        return False
    try:
        importlib.import_module("epi_kernels.kernel_sets.cuda_kernels")
    except ImportError as e:
        warnings.warn(f"epi_kernels._C is installed but does not load ({e}); backend='cuda' is unavailable",
                      RuntimeWarning, stacklevel=2)
        return False
    problem = driver_problem()
    if problem:
        warnings.warn(f"epi_kernels._C cannot run on this machine's GPUs: {problem}; backend='cuda' is unavailable",
                      RuntimeWarning, stacklevel=2)
        return False
    return True


def driver_problem() -> str | None:
    """Why the loaded extension's CUDA runtime cannot use this machine's driver, or None. A runtime
    runs on any driver of its major CUDA version or newer (a release wheel built with CUDA 13 needs
    an R580+ driver). Asked only where torch sees a GPU: without one no kernel launches (the host
    harness needs no driver)."""
    if not torch.cuda.is_available():
        return None
    from .. import _C  # noqa: PLC0415 - loaded by the caller

    runtime, driver = _C.cuda_versions()
    if driver // 1000 >= runtime // 1000:
        return None
    return (f"it was built with CUDA {cuda_version_text(runtime)}, which needs a driver for CUDA {runtime // 1000}.x "
            f"or newer, and the driver here supports CUDA {cuda_version_text(driver)}: update the driver, or build "
            "the extension from source with the toolkit here (`pip install .` in a clone)")


def cuda_version_text(version: int) -> str:
    """13000 -> "13.0" (CUDA's integer versions: 1000 * major + 10 * minor)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def cuda_host_harness() -> bool:
    """True when backend="cuda" steps CPU tensors in the extension's host harness (tests)."""
    return env_flag("EPI_CUDA_HOST")


BACKEND = register(Backend("cuda", functools.partial(kernel_step, "cuda"), refreshes_in_step=True, param_dtypes=KERNEL_PARAM_DTYPES,
                           capturable_on_cpu=True, auto_rank=2, available=_has_extension,
                           install_hint="the CUDA extension was not built: reinstall with a CUDA toolchain, "
                                        "EPI_BUILD_CUDA=1",
                           device_error=cuda_or_emulated("cuda", "EPI_CUDA_HOST", "the extension's host harness")))
